//! Helpers shared by the integration tests: fixture paths, running a config through the
//! library, tensor comparisons.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use ldt::config::Config;
use ldt::train::{run_method, RunContext};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `../shared/fixtures` next to the repository, or None (tests then skip loudly).
pub fn fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent (it is present in CI)", p.display());
        None
    }
}

/// The repository root: `LDT_REPO_ROOT` when set (test binaries carried to another
/// machine, `scripts/gpu-check.sh`), else the directory they were built in.
pub fn root() -> PathBuf {
    std::env::var_os("LDT_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `--set` override that points a run at the bundled RotatedMNIST-5k manifest.
pub fn bundled_manifest() -> String {
    format!(
        "data.manifest=\"{}\"",
        root().join("data/rotmnist5k/manifest.json").display()
    )
}

/// Runs `toml` with overrides in a fresh directory; returns the run directory.
pub fn run(toml: &str, overrides: &[&str]) -> (tempfile::TempDir, RunContext) {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = Config::from_toml(toml, "test", &ov).expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ctx = RunContext::open(cfg, dir.path()).expect("open run");
    run_method(&mut ctx).expect("run");
    (dir, ctx)
}

/// All tensors of a safetensors file.
pub fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Flattened f64 values.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Worst relative L2 over the tensors both files share (all of `want`'s must be present).
pub fn worst_rel_l2(got: &Path, want: &Path) -> (f64, String) {
    let (g, w) = (load(got), load(want));
    let mut worst = (0.0, String::new());
    for (k, wt) in &w {
        let gt = g
            .get(k)
            .unwrap_or_else(|| panic!("{} lacks `{k}`", got.display()));
        let r = rel_l2(gt, wt);
        if r > worst.0 {
            worst = (r, k.clone());
        }
    }
    worst
}

/// Bitwise equality of two safetensors files' tensors.
pub fn identical(a: &Path, b: &Path) -> bool {
    let (x, y) = (load(a), load(b));
    x.len() == y.len()
        && x.iter().all(|(k, t)| {
            y.get(k).is_some_and(|u| {
                t.dims() == u.dims()
                    && values(t)
                        .iter()
                        .zip(values(u))
                        .all(|(p, q)| p.to_bits() == q.to_bits())
            })
        })
}

/// The one-rank engine check shared by `tests/one_rank_engine.rs` (CPU) and
/// `tests/nccl.rs` (GPU): erm, ldt and ldt-s on cnn_bn (stage 1, DPU every 3 steps, a
/// checkpoint at step 6, 12 steps) on `device`, first without an engine, then after
/// `install` has made a one-rank engine the process group. Each run through the engine
/// must export the plain run's weights bit for bit, and its `summary.json` must name
/// `engine` and record `replicas_agreed_ranks` 1; `after(method)` runs after each.
pub fn one_rank_engine_runs(
    device: &str,
    install: impl FnOnce(),
    engine: &str,
    mut after: impl FnMut(&str),
) {
    let toml = r#"
seed = 3
[model]
arch = "cnn_bn"
[train]
steps = 12
batch_size = 16
[optim]
lr = 1e-3
[stage1]
warmup_steps = 2
stat_batches = 2
stat_batch_size = 4
[ldt]
ema_every = 3
[ldt_s]
p_steps = 3
a_steps = 3
[checkpoint]
every = 6
"#;
    let (man, dev) = (bundled_manifest(), format!("device=\"{device}\""));
    let cases = [
        ("erm", "model.safetensors"),
        ("ldt", "composite.safetensors"),
        ("ldt-s", "composite.safetensors"),
    ];
    let method = |m: &str| format!("train.method=\"{m}\"");
    let plain: Vec<_> = cases
        .iter()
        .map(|(m, _)| run(toml, &[&man, &dev, &method(m)]).0)
        .collect();
    install();
    for ((m, file), p) in cases.iter().zip(&plain) {
        let (e, _) = run(toml, &[&man, &dev, &method(m)]);
        let (worst, key) = worst_rel_l2(&e.path().join(file), &p.path().join(file));
        println!("{engine} {m}: worst relative L2 {worst:.2e} ({key})");
        assert!(
            identical(&e.path().join(file), &p.path().join(file)),
            "{m}: the one-rank {engine} run differs from the run without an engine"
        );
        let summary = std::fs::read_to_string(e.path().join("summary.json")).unwrap();
        assert!(
            summary.contains(&format!("\"engine\": \"{engine}\"")),
            "{m}: {summary}"
        );
        assert!(
            summary.contains("\"replicas_agreed_ranks\": 1"),
            "{m}: {summary}"
        );
        after(m);
    }
}

/// A fresh run directory holding only checkpoint `checkpoints/step-{step}` of run `dir`,
/// to resume from it with `checkpoint.resume = "auto"`.
pub fn only_checkpoint(dir: &Path, step: usize) -> tempfile::TempDir {
    let fresh = tempfile::tempdir().unwrap();
    let ck = Path::new("checkpoints").join(format!("step-{step}"));
    let to = fresh.path().join(&ck);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(dir.join(&ck)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
    fresh
}

/// `ldt::train::step::gradients` with every gradient as a device tensor (the plans of
/// these tests never release gradients to the host).
pub fn gradients(
    net: &dyn ldt::model::Network,
    state: &mut ldt::model::NetState,
    trainable: &[bool],
    batch: &ldt::train::step::Batch,
    mode: ldt::model::Mode,
    plan: ldt::train::step::GradPlan,
) -> anyhow::Result<(ldt::train::step::StepStats, Vec<Option<Tensor>>)> {
    let (s, g) = ldt::train::step::gradients(net, state, trainable, batch, mode, plan)?;
    let g = g
        .into_iter()
        .map(|g| g.map(|g| g.device().expect("a device gradient").clone()))
        .collect();
    Ok((s, g))
}

/// Highest `step` of the records of `kind` (and `stage`, when given) in a run
/// directory's `metrics.jsonl` so far (0 when none).
pub fn last_of(out: &Path, kind: &str, stage: Option<&str>) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == kind && stage.is_none_or(|s| v["stage"] == s))
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0) as usize
}

/// Highest training step logged so far.
pub fn last_step(out: &Path) -> usize {
    last_of(out, "train", Some("train"))
}

/// A copy of the bundled RotatedMNIST-5k in `to`; with `poison`, its target domains
/// (rot60, rot75) have every label shifted by 3 and every image inverted: what never
/// reads a target domain gives the same bits on both copies.
pub fn copy_rotmnist(to: &Path, poison: bool) {
    let from = root().join("data/rotmnist5k");
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(&from).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let dst = to.join(&name);
        let target = name.starts_with("rot60") || name.starts_with("rot75");
        if poison && target && name.ends_with(".safetensors") {
            let mut t = candle_core::safetensors::load(e.path(), &Device::Cpu).unwrap();
            let labels = t["labels"].to_vec1::<i64>().unwrap();
            let shifted: Vec<i64> = labels.iter().map(|l| (l + 3) % 10).collect();
            t.insert(
                "labels".into(),
                Tensor::new(shifted.as_slice(), &Device::Cpu).unwrap(),
            );
            let images = t["images"].clone();
            let inverted = images
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .affine(-1.0, 255.0)
                .unwrap()
                .to_dtype(images.dtype())
                .unwrap();
            t.insert("images".into(), inverted);
            candle_core::safetensors::save(&t, &dst).unwrap();
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}
