//! `ldt compare`: runs several methods over several seeds with one config and prints
//! three tables, also written as markdown (`compare.md`) and CSV:
//! - the final evaluation (source mean, target mean, each target domain; mean ± std over
//!   seeds; the best mean per column marked) — `compare.csv`;
//! - target accuracy at chosen evaluation steps (`--at`), and each method's paired
//!   difference to `erm` (same seed, so the same training batches: per-seed difference,
//!   then mean ± std);
//! - for the methods that export a composite: the composite against its two branches at
//!   the last step, and the EMA half-lives of its sets (the lag report), which show where
//!   a composite that trails comes from.
//!
//! Every evaluation of every run (step, network, source and target accuracy) is also
//! written to `compare_runs.csv`. Both CSV files hold accuracies in percent, as the
//! tables do, and say so in their column names (`_pct`).
//!
//! Rows with `auto` settings (`ldt+auto`, `ldt-s+auto`) add a fourth table: the search's
//! choice per seed and its time.
//!
//! Super-resolution runs are scored by the Y-channel PSNR in dB in the same tables
//! (columns `_psnr_db`), and a second final table gives the Y-channel SSIM.

use super::{run_method, RunContext};
use crate::config::{AutoWord, Config, DpuWarmup, Method, RatioChoice};
use crate::metrics::Record;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The network a method exports (its row in the table).
pub fn exported(method: Method) -> &'static str {
    match method {
        Method::Erm | Method::LpFt => "model",
        _ => "composite",
    }
}

/// One row of a comparison: a method, optionally with a DPU warm-up
/// (`ldt+ratio` = `ldt` with `ldt.dpu_warmup = "ratio"`) and an unstable ratio
/// (`ldt-s@0.3` fixes `stage1.unstable_ratio = 0.3`; `ldt-s+auto` lets the search
/// choose it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Variant {
    /// The training method.
    pub method: Method,
    /// `ldt.dpu_warmup` for this row; `None` keeps the config's.
    pub dpu_warmup: Option<DpuWarmup>,
    /// `stage1.unstable_ratio` for this row; `None` keeps the config's.
    pub unstable_ratio: Option<RatioChoice>,
}

impl Variant {
    /// Parses `METHOD`, then optionally `+timm` / `+ratio` / `+none` (sets
    /// `ldt.dpu_warmup`, for the methods that fold counterparts: deft, ldt, ldt-s) and
    /// `+auto` or `@R` (sets `stage1.unstable_ratio`, for ldt and ldt-s).
    pub fn parse(s: &str) -> Result<Variant> {
        let (head, fixed) = match s.split_once('@') {
            Some((h, r)) => {
                let r: f64 = r
                    .parse()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .with_context(|| {
                        format!("`{s}`: `@{r}` must be an unstable ratio in [0, 1], e.g. ldt-s@0.3")
                    })?;
                (h, Some(RatioChoice::Fixed(r)))
            }
            None => (s, None),
        };
        let mut parts = head.split('+');
        let m = parts.next().unwrap_or_default();
        let method = Method::parse(m).with_context(|| {
            format!(
                "`{s}`: a method may carry a DPU warm-up (+timm, +ratio, +none) and an \
                 unstable ratio (+auto or @R), e.g. ldt+ratio or ldt-s@0.3"
            )
        })?;
        let mut v = Variant {
            method,
            dpu_warmup: None,
            unstable_ratio: fixed,
        };
        for part in parts {
            let w = match part {
                "auto" => {
                    if v.unstable_ratio.is_some() {
                        bail!("`{s}`: the unstable ratio is given twice (+auto, @R)");
                    }
                    v.unstable_ratio = Some(RatioChoice::Auto(AutoWord::Auto));
                    continue;
                }
                "none" => DpuWarmup::None,
                "timm" => DpuWarmup::Timm,
                "ratio" => DpuWarmup::Ratio,
                w => bail!(
                    "`{s}`: unknown `+{w}`; allowed: +timm, +ratio, +none (`ldt.dpu_warmup`) \
                     and +auto (`stage1.unstable_ratio`)"
                ),
            };
            if v.dpu_warmup.replace(w).is_some() {
                bail!("`{s}`: the DPU warm-up is given twice");
            }
        }
        if v.dpu_warmup.is_some() && exported(method) == "model" {
            bail!(
                "`{s}`: {} has no DPU to warm up; +timm / +ratio / +none apply to deft, ldt, ldt-s",
                method.name()
            );
        }
        if v.unstable_ratio.is_some() && !matches!(method, Method::Ldt | Method::LdtS) {
            bail!(
                "`{s}`: {} has no unstable ratio to set; +auto and @R apply to ldt and ldt-s",
                method.name()
            );
        }
        Ok(v)
    }

    /// The row name, e.g. `ldt`, `ldt+ratio`, `ldt-s+auto` or `ldt-s@0.3` (also the run
    /// directory's prefix).
    pub fn name(&self) -> String {
        let mut name = self.method.name().to_string();
        match self.dpu_warmup {
            None => {}
            Some(DpuWarmup::None) => name.push_str("+none"),
            Some(DpuWarmup::Timm) => name.push_str("+timm"),
            Some(DpuWarmup::Ratio) => name.push_str("+ratio"),
        }
        match self.unstable_ratio {
            None => {}
            Some(RatioChoice::Auto(_)) => name.push_str("+auto"),
            Some(RatioChoice::Fixed(r)) => write!(name, "@{r}").expect("writing to a String"),
        }
        name
    }

    /// The run configuration of this row for `seed`.
    pub fn config(&self, base: &Config, seed: u64) -> Config {
        let mut cfg = base.clone();
        cfg.train.method = self.method;
        cfg.seed = seed;
        if let Some(w) = self.dpu_warmup {
            cfg.ldt.dpu_warmup = w;
        }
        if let Some(r) = self.unstable_ratio {
            cfg.stage1.unstable_ratio = r;
        }
        cfg
    }
}

/// Checks that every step of `at` is evaluated by a run of `cfg`: a multiple of
/// `eval.every` or the last step.
pub fn check_steps(cfg: &Config, at: &[usize]) -> Result<()> {
    let (every, last) = (cfg.eval.every, cfg.train.steps);
    for &s in at {
        let evaluated = s == last || (every > 0 && s < last && s.is_multiple_of(every));
        if !evaluated {
            bail!(
                "--at {s}: the runs evaluate every `eval.every` = {every} steps (0 = only at \
                 the end) and at the last step {last} (`train.steps`); pick evaluated steps \
                 or set `eval.every`"
            );
        }
    }
    Ok(())
}

/// Mean and sample standard deviation (0 for one value).
fn stat(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

/// How the tables show the task's headline score.
#[derive(Clone, Copy, Debug)]
struct Unit {
    /// Factor from the stored score to the shown one.
    factor: f64,
    /// Decimals shown.
    decimals: usize,
    /// The score in words, for the notes under the tables.
    words: &'static str,
    /// The CSV columns' suffix.
    csv: &'static str,
    /// A difference's unit.
    delta: &'static str,
}

/// Accuracy in percent.
const ACCURACY: Unit = Unit {
    decimals: 2,
    factor: 100.0,
    words: "accuracy in %",
    csv: "acc_pct",
    delta: "points",
};

/// Y-channel PSNR in dB.
const PSNR: Unit = Unit {
    decimals: 2,
    factor: 1.0,
    words: "Y-channel PSNR in dB",
    csv: "psnr_db",
    delta: "dB",
};

/// `mean ± std` of scores shown in `unit`.
fn pct(unit: Unit, v: &[f64]) -> String {
    let (m, s) = stat(v);
    let d = unit.decimals;
    format!("{:.d$} ± {:.d$}", unit.factor * m, unit.factor * s)
}

/// An evaluation record of `metrics.jsonl`: (step, network) -> (source, target accuracy).
type Evals = BTreeMap<(usize, String), (f64, f64)>;

/// The `kind: eval` records of a run's `metrics.jsonl` (NaN for a missing accuracy).
fn read_evals(dir: &Path) -> Result<Evals> {
    let records = crate::metrics::read_records(&dir.join("metrics.jsonl"))?;
    Ok(records
        .into_iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some(((e.step, e.model.clone()), e.headline())),
            _ => None,
        })
        .collect())
}

/// What one run contributes to the tables.
struct RunResult {
    /// Final source, target and per-target-domain headline score of the exported network.
    last: Vec<f64>,
    /// The same columns' Y-channel SSIM (super-resolution; empty otherwise).
    ssim: Vec<f64>,
    /// Every evaluation of the run.
    evals: Evals,
    /// `(set, min, max)` EMA half-lives in run steps (composite methods).
    lag: Vec<(String, f64, f64)>,
    /// The search's choice (`criterion @ ratio`) and its seconds (`auto` rows).
    search: Option<(String, f64)>,
    /// Seconds of the whole run.
    seconds: f64,
}

/// Runs every `(variant, seed)` in `DIR/<variant>-s<seed>`, writes `compare.md`,
/// `compare.csv` and `compare_runs.csv`, and returns the markdown; `DIR` is locked for
/// the comparison ([`crate::lock`]). `at` lists the
/// evaluation steps of the by-step table (empty: the last step only).
pub fn compare(
    base: &Config,
    variants: &[Variant],
    seeds: &[u64],
    at: &[usize],
    dir: &Path,
) -> Result<String> {
    check_steps(base, at)?;
    // The tables are this comparison's: a second one into `dir` stops here.
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = crate::dist::is_main()
        .then(|| crate::lock::RunLock::acquire(dir))
        .transpose()?;
    let at: Vec<usize> = if at.is_empty() {
        vec![base.train.steps]
    } else {
        at.to_vec()
    };
    // A row's settings that the config cannot have fail here, before any run.
    for v in variants {
        v.config(base, seeds.first().copied().unwrap_or(base.seed))
            .validate()
            .with_context(|| format!("row `{}`", v.name()))?;
    }
    let mut cols: Vec<String> = vec!["source".into(), "target".into()];
    let mut runs: Vec<(Variant, Vec<RunResult>)> = Vec::new();
    let mut unit = ACCURACY;
    let mut raw = String::new();
    for v in variants {
        let mut per_seed = Vec::new();
        for &seed in seeds {
            let run_dir = dir.join(format!("{}-s{seed}", v.name()));
            println!("== {} seed {seed} -> {}", v.name(), run_dir.display());
            let mut ctx = RunContext::open(v.config(base, seed), &run_dir)?;
            run_method(&mut ctx)?;
            let r = &ctx.summary.eval[exported(v.method)];
            let targets: Vec<_> = r.domains.iter().filter(|d| d.role == "target").collect();
            if cols.len() == 2 {
                cols.extend(targets.iter().map(|d| d.name.clone()));
            }
            if r.image.is_some() {
                unit = PSNR;
            }
            let (src, tgt) = r.headline();
            let last = [src, tgt]
                .into_iter()
                .chain(targets.iter().map(|d| d.headline()))
                .collect();
            let ssim = match &r.image {
                Some([s, t]) => [s, t]
                    .into_iter()
                    .map(|x| x.map_or(f64::NAN, |i| i.ssim))
                    .chain(targets.iter().map(|d| d.image.map_or(f64::NAN, |i| i.ssim)))
                    .collect(),
                None => Vec::new(),
            };
            let lag = ctx.summary.lag.as_ref().map_or(Vec::new(), |l| {
                l.sets
                    .iter()
                    .map(|s| (s.set.name().to_string(), s.min_half_life, s.max_half_life))
                    .collect()
            });
            // This rank's own metrics (rank 0: the run directory; others: their scratch).
            let evals = read_evals(&ctx.dir)?;
            for ((step, net), (s, t)) in &evals {
                writeln!(
                    raw,
                    "{},{seed},{step},{net},{:.4},{:.4}",
                    v.name(),
                    unit.factor * s,
                    unit.factor * t
                )?;
            }
            let search = ctx.summary.search.as_ref().map(|r| {
                let pick = r.choice();
                let seconds = ctx.summary.search_seconds.unwrap_or(f64::NAN);
                (
                    format!(
                        "{} @ {}",
                        pick.candidate.criterion.name(),
                        pick.candidate.unstable_ratio
                    ),
                    seconds,
                )
            });
            per_seed.push(RunResult {
                last,
                ssim,
                evals,
                lag,
                search,
                seconds: ctx.elapsed(),
            });
        }
        runs.push((*v, per_seed));
    }
    let raw = format!(
        "method,seed,step,network,source_{u},target_{u}\n{raw}",
        u = unit.csv
    );
    let mut md = final_table(&runs, &cols, seeds, (unit, |r: &RunResult| &r.last))?;
    if runs
        .iter()
        .any(|(_, r)| r.iter().any(|x| !x.ssim.is_empty()))
    {
        md.push('\n');
        md.push_str(&final_table(
            &runs,
            &cols,
            seeds,
            (SSIM, |r: &RunResult| &r.ssim),
        )?);
    }
    md.push('\n');
    md.push_str(&by_step_table(&runs, &at, seeds, unit)?);
    if runs.iter().any(|(v, _)| exported(v.method) == "composite") {
        md.push('\n');
        md.push_str(&branch_table(&runs, base.train.steps, unit)?);
    }
    if runs
        .iter()
        .any(|(_, r)| r.iter().any(|x| x.search.is_some()))
    {
        md.push('\n');
        md.push_str(&search_table(&runs, seeds)?);
    }
    if crate::dist::is_main() {
        std::fs::write(dir.join("compare.md"), &md)?;
        std::fs::write(dir.join("compare.csv"), final_csv(&runs, &cols, unit)?)?;
        std::fs::write(dir.join("compare_runs.csv"), raw)?;
    }
    Ok(md)
}

/// Y-channel SSIM (a fraction, shown as it is).
const SSIM: Unit = Unit {
    decimals: 4,
    factor: 1.0,
    words: "Y-channel SSIM",
    csv: "ssim",
    delta: "",
};

/// Which final scores of a run a table shows.
type Column = fn(&RunResult) -> &Vec<f64>;

/// Column `c` of the final evaluation over seeds.
fn final_col(r: &[RunResult], c: usize, col: Column) -> Vec<f64> {
    r.iter().map(|x| col(x)[c]).collect()
}

/// The final evaluation: mean ± std per column, the best mean marked.
fn final_table(
    runs: &[(Variant, Vec<RunResult>)],
    cols: &[String],
    seeds: &[u64],
    (unit, col): (Unit, Column),
) -> Result<String> {
    let best: Vec<f64> = (0..cols.len())
        .map(|c| {
            runs.iter()
                .map(|(_, r)| stat(&final_col(r, c, col)).0)
                .fold(f64::MIN, f64::max)
        })
        .collect();
    let mut md = format!(
        "| method | {} |\n|---|{}\n",
        cols.join(" | "),
        "---|".repeat(cols.len())
    );
    for (v, r) in runs {
        write!(md, "| {} |", v.name())?;
        for (c, b) in best.iter().enumerate() {
            let vals = final_col(r, c, col);
            let mark = if stat(&vals).0 == *b { " **best**" } else { "" };
            write!(md, " {}{mark} |", pct(unit, &vals))?;
        }
        md.push('\n');
    }
    writeln!(
        md,
        "\n{}, mean ± std over seeds {seeds:?}, at the last step; exported \
         network: model (erm, lp-ft) or composite (deft, ldt, ldt-s and their variants)",
        unit.words
    )?;
    Ok(md)
}

/// `compare.csv`: the final evaluation, mean and std per column, in percent as the
/// markdown tables (the unit in every column's name).
fn final_csv(runs: &[(Variant, Vec<RunResult>)], cols: &[String], unit: Unit) -> Result<String> {
    let mut csv = String::from("method");
    for c in cols {
        write!(csv, ",{c}_{u}_mean,{c}_{u}_std", u = unit.csv)?;
    }
    csv.push('\n');
    for (v, r) in runs {
        csv.push_str(&v.name());
        for c in 0..cols.len() {
            let (m, s) = stat(&final_col(r, c, |x| &x.last));
            write!(csv, ",{:.4},{:.4}", unit.factor * m, unit.factor * s)?;
        }
        csv.push('\n');
    }
    Ok(csv)
}

/// Target accuracy of network `net` at `step` in each run (NaN where not evaluated).
fn target_at(r: &[RunResult], step: usize, net: &str) -> Vec<f64> {
    r.iter()
        .map(|x| {
            x.evals
                .get(&(step, net.to_string()))
                .map_or(f64::NAN, |a| a.1)
        })
        .collect()
}

/// Target accuracy of the exported network at each step of `at`, and the paired
/// difference to `erm` (per seed, then mean ± std) when `erm` is among the rows.
fn by_step_table(
    runs: &[(Variant, Vec<RunResult>)],
    at: &[usize],
    seeds: &[u64],
    unit: Unit,
) -> Result<String> {
    let erm = runs
        .iter()
        .find(|(v, _)| v.method == Method::Erm && v.dpu_warmup.is_none())
        .map(|(_, r)| r);
    let mut md = String::from("| method |");
    for s in at {
        write!(md, " target @{s} |")?;
    }
    if erm.is_some() {
        for s in at {
            write!(md, " Δ erm @{s} |")?;
        }
    }
    let n = at.len() * if erm.is_some() { 2 } else { 1 };
    write!(md, "\n|---|{}\n", "---|".repeat(n))?;
    for (v, r) in runs {
        write!(md, "| {} |", v.name())?;
        for &s in at {
            write!(md, " {} |", pct(unit, &target_at(r, s, exported(v.method))))?;
        }
        if let Some(e) = erm {
            for &s in at {
                if std::ptr::eq(e, r) {
                    md.push_str(" — |");
                    continue;
                }
                let d: Vec<f64> = target_at(r, s, exported(v.method))
                    .iter()
                    .zip(target_at(e, s, "model"))
                    .map(|(a, b)| a - b)
                    .collect();
                let (m, sd) = stat(&d);
                write!(md, " {:+.2} ± {:.2} |", unit.factor * m, unit.factor * sd)?;
            }
        }
        md.push('\n');
    }
    writeln!(
        md,
        "\ntarget {} of the exported network at each step, mean ± std over seeds \
         {seeds:?}{}",
        unit.words,
        if erm.is_some() {
            format!(
                "; Δ erm: the per-seed difference to erm (same seed = same batches) in {}, \
                 mean ± std",
                unit.delta
            )
        } else {
            String::new()
        }
    )?;
    Ok(md)
}

/// The composite against its branches at the last step, and the EMA half-lives.
fn branch_table(runs: &[(Variant, Vec<RunResult>)], last: usize, unit: Unit) -> Result<String> {
    let mut md = String::from(
        "| method | composite | pm | am | composite − best branch | stable half-life | unstable half-life |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (v, r) in runs
        .iter()
        .filter(|(v, _)| exported(v.method) == "composite")
    {
        let (c, p, a) = (
            target_at(r, last, "composite"),
            target_at(r, last, "pm"),
            target_at(r, last, "am"),
        );
        let gap: Vec<f64> = (0..c.len()).map(|i| c[i] - p[i].max(a[i])).collect();
        let (gm, gs) = stat(&gap);
        write!(
            md,
            "| {} | {} | {} | {} | {:+.2} ± {:.2} |",
            v.name(),
            pct(unit, &c),
            pct(unit, &p),
            pct(unit, &a),
            unit.factor * gm,
            unit.factor * gs
        )?;
        for set in ["stable", "unstable"] {
            let h: Vec<(f64, f64)> = r
                .iter()
                .flat_map(|x| x.lag.iter().filter(|l| l.0 == set).map(|l| (l.1, l.2)))
                .collect();
            if h.is_empty() {
                md.push_str(" — |");
            } else {
                let lo = h.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
                let hi = h.iter().map(|x| x.1).fold(0.0, f64::max);
                write!(md, " {lo:.0}–{hi:.0} |")?;
            }
        }
        md.push('\n');
    }
    writeln!(
        md,
        "\ntarget {} at step {last} of the exported composite and of each branch \
         (PM trains the stable set, AM the unstable set), mean ± std over seeds; composite − \
         best branch per seed, in {}; half-lives of the DPU folds in steps (the range \
         over layers and seeds; without the warm-up, which shortens early exchanges)",
        unit.words, unit.delta
    )?;
    Ok(md)
}

/// The search's choice per seed and its time, for the rows with `auto` settings.
fn search_table(runs: &[(Variant, Vec<RunResult>)], seeds: &[u64]) -> Result<String> {
    let mut md = String::from("| method |");
    for s in seeds {
        write!(md, " seed {s} |")?;
    }
    write!(
        md,
        " search seconds | of the run |\n|---|{}---|---|\n",
        "---|".repeat(seeds.len())
    )?;
    for (v, r) in runs {
        if r.iter().all(|x| x.search.is_none()) {
            continue;
        }
        write!(md, "| {} |", v.name())?;
        for x in r {
            let pick = x.search.as_ref().map_or("—", |s| s.0.as_str());
            write!(md, " {pick} |")?;
        }
        let secs: Vec<f64> = r
            .iter()
            .filter_map(|x| x.search.as_ref().map(|s| s.1))
            .collect();
        let runs: Vec<f64> = r.iter().map(|x| x.seconds).collect();
        let (m, sd) = stat(&secs);
        let share = secs.iter().sum::<f64>() / runs.iter().sum::<f64>();
        writeln!(md, " {m:.0} ± {sd:.0} | {:.0}% |", 100.0 * share)?;
    }
    writeln!(
        md,
        "\nthe search's choice (criterion @ unstable ratio) per seed, scored on the source \
         validation hold-out only; its seconds (the probes, not stage 1) and their share of \
         the whole run's"
    )?;
    Ok(md)
}
