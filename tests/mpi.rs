//! Data-parallel training over MPI (`cargo test --release --features mpi --test mpi`;
//! needs `mpirun`, e.g. from Debian's openmpi-bin, and skips loudly without it).
//!
//! Through the real binary on cnn, 50 steps at batch 32, bundled data:
//! - `mpirun -np 2` (16 examples per rank) equals one process with `train.accumulate = 2`
//!   bit for bit (the two shard gradients are summed by one f32 addition either way),
//!   for erm, ldt (resident and swap) and ldt-s;
//! - and one process with whole batches of 32 within relative L2 1e-5 (summation order);
//! - every rank holds rank 0's partition, and at the end rank 0's networks, bit for bit
//!   (checked by the ranks themselves, recorded in `summary.json`);
//! - a checkpoint written by 2 ranks resumes in 1 process and ends where the 2-rank run
//!   ends; rank 1 writes nothing into the run directory;
//! - with BatchNorm (cnn_bn) the weights still equal `accumulate = 2`'s bit for bit, while
//!   the running statistics are rank 0's, broadcast after every step as PyTorch DDP does:
//!   one update per step (`num_batches_tracked` 50, where `accumulate = 2` counts 100).
#![cfg(feature = "mpi")]

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const CFG: &str = r#"
seed = 3
threads = 1
[model]
arch = "cnn"
[train]
method = "METHOD"
steps = 50
batch_size = 32
[optim]
lr = 1e-3
[stage1]
warmup_steps = 5
stat_batches = 8
stat_batch_size = 8
[ldt]
ema_every = 5
[ldt_s]
p_steps = 5
a_steps = 5
[eval]
every = 0
"#;

fn mpirun() -> Option<PathBuf> {
    let found = Command::new("mpirun").arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIPPED: mpirun is absent (apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    }
    Some(PathBuf::from("mpirun"))
}

fn config(dir: &Path, method: &str) -> PathBuf {
    let p = dir.join(format!("{method}.toml"));
    let manifest = root().join("data/rotmnist5k/manifest.json");
    let text = format!(
        "{}\n",
        CFG.replace("METHOD", method).replace(
            "[train]",
            &format!(
                "[data]\nmanifest = {:?}\n[train]",
                manifest.display().to_string()
            )
        )
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn check(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ldt train CFG --out OUT ARGS` on `ranks` MPI ranks (plain process for 0).
fn train(ranks: usize, cfg: &Path, out: &Path, args: &[&str]) {
    let bin = env!("CARGO_BIN_EXE_ldt");
    let mut c = if ranks == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
            .arg(ranks.to_string())
            .arg(bin);
        c
    };
    c.arg("train").arg(cfg).arg("--out").arg(out).args(args);
    check(
        c.output().unwrap(),
        &format!("{ranks} ranks {}", cfg.display()),
    );
}

fn outputs(method: &str) -> Vec<&'static str> {
    if method == "erm" {
        vec!["model.safetensors"]
    } else {
        vec!["composite.safetensors", "pm.safetensors", "am.safetensors"]
    }
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

fn data_parallel(method: &str, extra: &[&str]) {
    if mpirun().is_none() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let cfg = config(t.path(), method);
    let (two, acc2, one) = (
        t.path().join("two"),
        t.path().join("acc2"),
        t.path().join("one"),
    );
    train(2, &cfg, &two, extra);
    let mut a = extra.to_vec();
    a.extend(["--set", "train.accumulate=2"]);
    train(0, &cfg, &acc2, &a);
    train(0, &cfg, &one, extra);
    for f in outputs(method) {
        assert!(
            identical(&two.join(f), &acc2.join(f)),
            "{method} {extra:?}: {f} of 2 ranks differs from accumulate = 2"
        );
        let (w, name) = worst_rel_l2(&two.join(f), &one.join(f));
        eprintln!("{method} {extra:?}: {f}: 2 ranks x 16 vs 1 x 32: worst rel L2 {w:.2e} ({name})");
        assert!(
            w < 1e-5,
            "{method}: {f} `{name}` rel L2 {w:.2e} (bound 1e-5)"
        );
    }
    let s = summary(&two);
    assert_eq!(s["data_parallel"]["world"], 2, "{s}");
    assert_eq!(s["replicas_agreed_ranks"], 2, "{s}");
    if method != "erm" {
        assert_eq!(s["partition_agreed_ranks"], 2, "{s}");
        let read = |d: &Path| std::fs::read_to_string(d.join("partition.json")).unwrap();
        assert!(
            read(&two) == read(&acc2),
            "the 2-rank partition.json differs from accumulate = 2's"
        );
        let sets = |d: &Path| {
            let v: serde_json::Value = serde_json::from_str(&read(d)).unwrap();
            (v["stable"].clone(), v["unstable"].clone())
        };
        assert_eq!(
            sets(&two),
            sets(&one),
            "stable/unstable sets of 2 ranks vs 1 x 32"
        );
    }
}

#[test]
fn erm_on_two_ranks() {
    data_parallel("erm", &[]);
}

#[test]
fn ldt_on_two_ranks() {
    data_parallel("ldt", &[]);
}

#[test]
fn ldt_swap_on_two_ranks() {
    data_parallel("ldt", &["--set", "ldt.placement=\"swap\""]);
}

#[test]
fn ldt_s_on_two_ranks() {
    data_parallel("ldt-s", &[]);
}

#[test]
fn batchnorm_buffers_follow_rank_0() {
    if mpirun().is_none() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let cfg = config(t.path(), "erm");
    let (two, acc2) = (t.path().join("two"), t.path().join("acc2"));
    let bn = ["--set", "model.arch=\"cnn_bn\""];
    train(2, &cfg, &two, &bn);
    let mut a = bn.to_vec();
    a.extend(["--set", "train.accumulate=2"]);
    train(0, &cfg, &acc2, &a);
    let (got, want) = (
        load(&two.join("model.safetensors")),
        load(&acc2.join("model.safetensors")),
    );
    let mut buffers = 0;
    for (name, w) in &want {
        let g = &got[name];
        if name.ends_with("num_batches_tracked") {
            buffers += 1;
            assert_eq!(
                g.to_scalar::<i64>().unwrap(),
                50,
                "{name}: one update per step"
            );
            assert_eq!(w.to_scalar::<i64>().unwrap(), 100, "{name}: accumulate = 2");
        } else if !name.contains("running_") {
            assert!(
                values(g) == values(w),
                "{name}: 2 ranks differ from accumulate = 2"
            );
        }
    }
    assert!(buffers > 0, "cnn_bn exports its BatchNorm buffers");
    // Rank 1's own statistics differ from rank 0's; the broadcast makes them equal.
    assert_eq!(summary(&two)["replicas_agreed_ranks"], 2);
}

#[test]
fn two_rank_checkpoint_resumes_in_one_process() {
    if mpirun().is_none() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let cfg = config(t.path(), "ldt-s");
    let full = t.path().join("full");
    train(
        2,
        &cfg,
        &full,
        &[
            "--set",
            "checkpoint.every=20",
            "--set",
            "checkpoint.keep_last=5",
        ],
    );
    // Keep only the step-20 checkpoint, as if the job had been stopped after it.
    let part = t.path().join("part");
    copy_dir(&full, &part);
    for e in std::fs::read_dir(&part).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    for s in [40, 50] {
        std::fs::remove_dir_all(part.join(format!("checkpoints/step-{s}"))).unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(full.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "one writer of step-20/40/50: {names:?}");
    train(
        0,
        &cfg,
        &part,
        &[
            "--set",
            "checkpoint.every=20",
            "--set",
            "train.accumulate=2",
            "--resume",
        ],
    );
    for f in outputs("ldt-s") {
        assert!(
            identical(&full.join(f), &part.join(f)),
            "{f}: resumed in 1 process differs from the 2-rank run"
        );
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}
