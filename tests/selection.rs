//! Model selection by training-domain validation: the hold-out is disjoint from the
//! training examples and drawn from source domains only, and the choice never reads a
//! target domain: with the target labels (and images) poisoned, the selected step, network,
//! validation accuracy and best.safetensors are bit-identical while the reported
//! target accuracy changes.

mod common;

use common::*;
use ldt::config::Config;
use ldt::train::RunContext;
use std::path::Path;

const TOML: &str = r#"
seed = 2
threads = 1
[model]
arch = "mlp"
[train]
method = "ldt"
steps = 40
batch_size = 16
[optim]
lr = 1e-3
[stage1]
stat_batches = 4
[eval]
every = 10
[data]
val_fraction = 0.2
"#;

fn run_on(data: &Path) -> (tempfile::TempDir, RunContext) {
    let man = format!("data.manifest=\"{}\"", data.join("manifest.json").display());
    run(TOML, &[&man])
}

#[test]
fn hold_out_is_disjoint_and_from_sources_only() {
    let man = format!(
        "data.manifest=\"{}\"",
        root().join("data/rotmnist5k/manifest.json").display()
    );
    let cfg = Config::from_toml(TOML, "t", &[man]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = RunContext::open(cfg, dir.path()).unwrap();
    let mut all: Vec<usize> = ctx.train_indices.clone();
    let nval: usize = ctx.val.iter().map(|(_, v)| v.len()).sum();
    for (_, v) in &ctx.val {
        all.extend(v);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..ctx.pool.len()).collect::<Vec<_>>(),
        "train + val is not a partition of the source pool"
    );
    let names: Vec<&str> = ctx.val.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["rot00", "rot15", "rot30", "rot45"]);
    // floor(0.2 * n) per domain: 668, 668, 667, 667 train examples.
    assert_eq!(nval, 133 + 133 + 133 + 133);
}

#[test]
fn selection_never_reads_a_target_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let (clean, poisoned) = (tmp.path().join("clean"), tmp.path().join("poisoned"));
    copy_rotmnist(&clean, false);
    copy_rotmnist(&poisoned, true);
    let (d1, c1) = run_on(&clean);
    let (d2, c2) = run_on(&poisoned);
    let b1 = c1.summary.best.as_ref().expect("a best network");
    let b2 = c2.summary.best.as_ref().expect("a best network");
    eprintln!("best (clean) {b1:?}, (poisoned) {b2:?}");
    assert_eq!(b1, b2, "the choice depends on the target domains");
    assert!(identical(
        &d1.path().join("best.safetensors"),
        &d2.path().join("best.safetensors")
    ));
    let t1 = c1.summary.eval["pm"].target_acc;
    let t2 = c2.summary.eval["pm"].target_acc;
    assert!(
        (t1 - t2).abs() > 0.05,
        "poisoning had no effect on the target accuracy ({t1} vs {t2})"
    );
}
