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
