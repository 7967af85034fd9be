//! `ldt compare`: runs several methods over several seeds with one config and prints one
//! table (source mean, target mean, each target domain; mean ± std over seeds; the best
//! mean per column marked), also written as CSV and markdown.

use super::{run_method, RunContext};
use crate::config::{Config, Method};
use anyhow::Result;
use std::fmt::Write as _;
use std::path::Path;

/// The network a method exports (its row in the table).
pub fn exported(method: Method) -> &'static str {
    match method {
        Method::Erm | Method::LpFt => "model",
        _ => "composite",
    }
}

/// Runs every `(method, seed)` in `DIR/<method>-s<seed>` and writes `compare.csv` and
/// `compare.md`; returns the markdown table.
pub fn compare(base: &Config, methods: &[Method], seeds: &[u64], dir: &Path) -> Result<String> {
    let mut cols: Vec<String> = vec!["source".into(), "target".into()];
    let mut rows: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    for &m in methods {
        let mut per_col: Vec<Vec<f64>> = Vec::new();
        for &seed in seeds {
            let mut cfg = base.clone();
            cfg.train.method = m;
            cfg.seed = seed;
            if m == Method::Deft {
                cfg.stage1.criterion = crate::config::Criterion::Names;
            }
            let run_dir = dir.join(format!("{}-s{seed}", m.name()));
            println!("== {} seed {seed} -> {}", m.name(), run_dir.display());
            let mut ctx = RunContext::open(cfg, &run_dir)?;
            run_method(&mut ctx)?;
            let r = &ctx.summary.eval[exported(m)];
            let targets: Vec<_> = r.domains.iter().filter(|d| d.role == "target").collect();
            if cols.len() == 2 {
                cols.extend(targets.iter().map(|d| d.name.clone()));
            }
            let vals: Vec<f64> = [r.source_acc, r.target_acc]
                .into_iter()
                .chain(targets.iter().map(|d| d.acc))
                .collect();
            per_col.resize(vals.len(), Vec::new());
            for (c, v) in per_col.iter_mut().zip(vals) {
                c.push(v);
            }
        }
        rows.push((m.name().to_string(), per_col));
    }
    let stat = |v: &[f64]| {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let sd = if v.len() > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        (mean, sd)
    };
    let best: Vec<f64> = (0..cols.len())
        .map(|c| {
            rows.iter()
                .map(|(_, v)| stat(&v[c]).0)
                .fold(f64::MIN, f64::max)
        })
        .collect();
    let mut md = format!(
        "| method | {} |\n|---|{}\n",
        cols.join(" | "),
        "---|".repeat(cols.len())
    );
    let mut csv = String::from("method");
    for c in &cols {
        write!(csv, ",{c}_mean,{c}_std")?;
    }
    csv.push('\n');
    for (name, v) in &rows {
        write!(md, "| {name} |")?;
        csv.push_str(name);
        for (c, vals) in v.iter().enumerate() {
            let (m, s) = stat(vals);
            let mark = if m == best[c] { " **best**" } else { "" };
            write!(md, " {:.2} ± {:.2}{mark} |", 100.0 * m, 100.0 * s)?;
            write!(csv, ",{m:.6},{s:.6}")?;
        }
        md.push('\n');
        csv.push('\n');
    }
    writeln!(md, "\naccuracy in %, mean ± std over seeds {seeds:?}; exported network: model (erm, lp-ft) or composite (ldt, deft, ldt-s)")?;
    std::fs::write(dir.join("compare.md"), &md)?;
    std::fs::write(dir.join("compare.csv"), csv)?;
    Ok(md)
}
