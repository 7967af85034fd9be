//! Checkpoint safety and guards, through the binary: a write that fails mid-checkpoint
//! (injected) exits non-zero, leaves every earlier checkpoint byte-identical and no new
//! one visible, and the run then resumes; a checkpoint of another method is refused
//! naming the mismatch; a non-finite loss stops the run naming the step (or is skipped,
//! counted, with `train.on_nonfinite = "skip"`).

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn ldt(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ldt"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn config(dir: &Path) -> String {
    let p = dir.join("c.toml");
    let man = root().join("data/rotmnist5k/manifest.json");
    std::fs::write(
        &p,
        format!("threads = 1\n[model]\narch = \"mlp\"\n[train]\nsteps = 8\nbatch_size = 8\n[checkpoint]\nevery = 4\nkeep_last = 5\n[data]\nmanifest = \"{}\"\n", man.display()),
    )
    .unwrap();
    p.display().to_string()
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            for f in std::fs::read_dir(&p).unwrap().flatten() {
                out.push((
                    f.path().display().to_string(),
                    std::fs::read(f.path()).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn failed_checkpoint_write_changes_nothing_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let out = tmp.path().join("run");
    let o = out.display().to_string();
    assert!(ldt(&["train", &cfg, "--out", &o], &[]).status.success());
    let ck = out.join("checkpoints");
    let before = tree(&ck);
    assert!(
        before.iter().any(|(p, _)| p.contains("step-8")),
        "no step-8 checkpoint"
    );
    let r = ldt(
        &[
            "train",
            &cfg,
            "--out",
            &o,
            "--resume",
            "--set",
            "train.steps=16",
        ],
        &[("LDT_FAULT_INJECT", "checkpoint-write")],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("injected write failure") && err.contains("step-12"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !ck.join("step-12").exists(),
        "a failed checkpoint is visible"
    );
    let visible: Vec<_> = tree(&ck)
        .into_iter()
        .filter(|(p, _)| !p.contains("/.step-"))
        .collect();
    assert_eq!(visible, before, "earlier checkpoints changed");
    let r = ldt(
        &[
            "train",
            &cfg,
            "--out",
            &o,
            "--resume",
            "--set",
            "train.steps=16",
        ],
        &[],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(ck.join("step-16/meta.json").exists());
    assert!(
        !std::fs::read_dir(&ck)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".step-")),
        "stale temporary checkpoint left"
    );
}

#[test]
fn checkpoint_of_another_method_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let o = tmp.path().join("run").display().to_string();
    assert!(ldt(&["train", &cfg, "--out", &o], &[]).status.success());
    let r = ldt(
        &[
            "train",
            &cfg,
            "--out",
            &o,
            "--resume",
            "--set",
            "train.method=\"ldt\"",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("method `erm`") && err.contains("`ldt`"),
        "{err}"
    );
    let r = ldt(
        &[
            "train",
            &cfg,
            "--out",
            &o,
            "--resume",
            "--set",
            "model.hidden=[32]",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("layers or shapes differ"),
        "{err}"
    );
}

#[test]
fn nonfinite_loss_stops_or_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let o = tmp.path().join("run").display().to_string();
    let blow = [
        "--set",
        "optim.name=\"sgd\"",
        "--set",
        "optim.lr=1e30",
        "--set",
        "checkpoint.every=0",
    ];
    let mut args = vec!["train", cfg.as_str(), "--out", o.as_str()];
    args.extend_from_slice(&blow);
    let r = ldt(&args, &[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step ") && (err.contains("the loss is") || err.contains("the gradient of")),
        "{err}"
    );
    assert!(err.contains("on_nonfinite"), "{err}");
    // The runs below replace the stopped run's outputs in the same directory.
    args.push("--overwrite");
    // Block-wise recompute with the device optimizer updates block by block: it stops
    // the same way.
    let mut by_block = args.clone();
    by_block.extend_from_slice(&["--set", "train.recompute=\"blocks\""]);
    let r = ldt(&by_block, &[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step ") && err.contains("on_nonfinite"),
        "{err}"
    );
    args.extend_from_slice(&["--set", "train.on_nonfinite=\"skip\""]);
    let r = ldt(&args, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("run/summary.json")).unwrap(),
    )
    .unwrap();
    assert!(s["skipped_steps"].as_u64().unwrap_or(0) > 0, "{s}");
}

#[test]
fn counterpart_budget_too_small_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let out = tmp.path().join("run");
    let o = out.display().to_string();
    let r = ldt(
        &[
            "train",
            &cfg,
            "--out",
            &o,
            "--set",
            "train.method=\"ldt-s\"",
            "--set",
            "offload.host_bytes=1024",
            "--set",
            "stage1.warmup_steps=5",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("offload.host_bytes") && err.contains("offload.path") && err.contains("bytes"),
        "{err}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    assert!(
        !metrics.contains("\"kind\":\"train\"") && !metrics.contains("\"kind\":\"stats\""),
        "work was done before the budget error: {metrics}"
    );
}
