//! Nothing lost, nothing mixed (#19): damaged checkpoints and weights files are found by
//! their checksums, a damaged newest checkpoint is skipped for the newest intact one
//! (and the run still ends bit-identical to an uninterrupted one), a second run into a
//! directory in use stops at once naming the holder, SIGINT checkpoints like SIGTERM, and
//! a second signal exits at once with code 4 leaving only complete checkpoints.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BASE: &str = r#"
seed = 7
threads = 1
[model]
arch = "cnn"
[train]
method = "ldt-s"
steps = 12
batch_size = 16
log_every = 1000
[optim]
lr = 1e-3
[stage1]
stat_batches = 4
[ldt]
ema_every = 3
[ldt_s]
p_steps = 3
a_steps = 2
[checkpoint]
every = 4
keep_last = 3
"#;

const OUTPUTS: [&str; 3] = ["pm.safetensors", "am.safetensors", "composite.safetensors"];

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("run.toml");
    let man = root().join("data/rotmnist5k/manifest.json");
    std::fs::write(
        &p,
        format!(
            "{BASE}\n{extra}\n[data]\nmanifest = \"{}\"\n",
            man.display()
        ),
    )
    .unwrap();
    p
}

fn ldt(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ldt"));
    c.args(args);
    c
}

fn train(cfg: &Path, out: &Path, resume: bool) -> Command {
    let mut c = ldt(&["train"]);
    c.arg(cfg).arg("--out").arg(out);
    if resume {
        c.arg("--resume");
    }
    c
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn ok(mut c: Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "failed: {}", text(&o));
    o
}

/// Flips 64 bytes in the middle of `path`.
fn flip_middle(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let mid = b.len() / 2;
    for x in &mut b[mid..mid + 64] {
        *x ^= 0x5a;
    }
    std::fs::write(path, b).unwrap();
}

/// A copy of run `full`'s checkpoints at `steps` in a fresh directory.
fn with_checkpoints(full: &Path, steps: &[usize], to: &Path) {
    for s in steps {
        let ck = Path::new("checkpoints").join(format!("step-{s}"));
        std::fs::create_dir_all(to.join(&ck)).unwrap();
        for e in std::fs::read_dir(full.join(&ck)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(&ck).join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// 64 bytes flipped in the newest checkpoint's state: `--resume` names it, resumes from
/// the older one and ends bit-identical to the uninterrupted run; the damaged
/// checkpoint is replaced. `meta.json` with one field changed is damage too; with every
/// checkpoint damaged the resume stops naming each. `ldt verify-checkpoint` says which.
#[test]
fn a_damaged_checkpoint_is_named_and_the_previous_one_used() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let full = tmp.path().join("full");
    ok(train(&cfg, &full, false));
    let v = ok(ldt(&["verify-checkpoint", full.to_str().unwrap()]));
    assert!(text(&v).contains("all intact"), "{}", text(&v));

    let cut = tmp.path().join("cut");
    with_checkpoints(&full, &[4, 8], &cut);
    flip_middle(&cut.join("checkpoints/step-8/state.safetensors"));
    let v = ldt(&["verify-checkpoint", cut.to_str().unwrap()])
        .output()
        .unwrap();
    let t = text(&v);
    assert_eq!(v.status.code(), Some(1), "{t}");
    assert!(
        t.contains("DAMAGED") && t.contains("step-8") && t.contains("does not match its checksum"),
        "{t}"
    );
    let o = ok(train(&cfg, &cut, true));
    let t = text(&o);
    assert!(
        t.contains("warning: checkpoint")
            && t.contains("step-8 is damaged")
            && t.contains("tensor `"),
        "{t}"
    );
    assert!(t.contains("resuming from") && t.contains("step 4"), "{t}");
    for f in OUTPUTS {
        assert!(
            identical(&full.join(f), &cut.join(f)),
            "{f} differs after resuming past a damaged checkpoint"
        );
    }
    let v = ok(ldt(&["verify-checkpoint", cut.to_str().unwrap()]));
    assert!(
        text(&v).contains("all intact"),
        "the damaged step 8 was replaced: {}",
        text(&v)
    );

    // One field of meta.json changed (a counter), every checkpoint damaged.
    let bad = tmp.path().join("bad");
    with_checkpoints(&full, &[8, 12], &bad);
    let meta = bad.join("checkpoints/step-12/meta.json");
    let m = std::fs::read_to_string(&meta).unwrap();
    let changed = m.replacen("\"step\": 12", "\"step\": 13", 1);
    assert_ne!(m, changed, "meta.json records the step");
    std::fs::write(&meta, changed).unwrap();
    flip_middle(&bad.join("checkpoints/step-8/state.safetensors"));
    let o = train(&cfg, &bad, true).output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("no intact checkpoint")
            && t.contains("step-12/meta.json: its fields do not match their checksum")
            && t.contains("step-8/state.safetensors: tensor `"),
        "{t}"
    );
}

/// A damaged exported weights file is refused by `ldt eval` naming the tensor, and
/// `ldt verify-checkpoint` names it.
#[test]
fn a_damaged_weights_file_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let run = tmp.path().join("run");
    ok(train(&cfg, &run, false));
    let w = run.join("composite.safetensors");
    ok(ldt(&[
        "eval",
        cfg.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
    ]));
    flip_middle(&w);
    let o = ldt(&[
        "eval",
        cfg.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("composite.safetensors: tensor `") && t.contains("does not match its checksum"),
        "{t}"
    );
    let v = ldt(&["verify-checkpoint", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(1));
    assert!(text(&v).contains("DAMAGED  ") && text(&v).contains("composite.safetensors"));
}

fn spawn(cfg: &Path, out: &Path) -> Child {
    train(cfg, out, false)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_step(child: &mut Child, out: &Path, k: usize) {
    let t = Instant::now();
    while last_step(out) < k {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t.elapsed() < Duration::from_secs(300), "no step {k}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// erm on resnet18 at batch 128: steps slow enough that signals land inside one.
fn slow_config(dir: &Path) -> PathBuf {
    let cfg = write_config(dir, "");
    let t = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("arch = \"cnn\"", "arch = \"resnet18\"")
        .replace("steps = 12", "steps = 400")
        .replace("batch_size = 16", "batch_size = 128")
        .replace("method = \"ldt-s\"", "method = \"erm\"");
    std::fs::write(&cfg, t).unwrap();
    cfg
}

/// A second run into a directory in use stops at once, naming the first one's PID,
/// and writes nothing there; after the first is killed (SIGKILL) the lock is free.
#[test]
fn a_second_run_into_a_directory_in_use_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = slow_config(tmp.path());
    let out = tmp.path().join("run");
    let mut first = spawn(&cfg, &out);
    wait_for_step(&mut first, &out, 1);
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let o = train(&cfg, &out, false).output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("is in use by pid") && t.contains(&format!("pid {} on host", first.id())),
        "{t}"
    );
    let now = std::fs::read(out.join("metrics.jsonl")).unwrap();
    assert!(
        now.starts_with(&metrics),
        "the refused run touched metrics.jsonl"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let lock = ldt::lock::RunLock::acquire(&out).expect("free after SIGKILL");
    drop(lock);
}

/// SIGINT finishes the step and checkpoints (exit 3) like SIGTERM; a second signal
/// while that happens exits at once with code 4, and every `step-N` checkpoint left is
/// complete and intact.
#[test]
fn sigint_checkpoints_and_a_second_signal_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = slow_config(tmp.path());
    let out = tmp.path().join("int");
    let mut child = spawn(&cfg, &out);
    wait_for_step(&mut child, &out, 2);
    signal(&child, "INT");
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(3), "exit code after SIGINT");
    let stopped = last_step(&out);
    assert!(out
        .join(format!("checkpoints/step-{stopped}/meta.json"))
        .exists());

    let out = tmp.path().join("twice");
    let mut child = spawn(&cfg, &out);
    wait_for_step(&mut child, &out, 2);
    let at = last_step(&out);
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(20));
    signal(&child, "TERM");
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(4), "exit code of a second signal");
    assert!(
        last_step(&out) <= at + 1,
        "the run went on after the second signal"
    );
    let steps = std::fs::read_dir(out.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
                .count()
        })
        .unwrap_or(0);
    if steps > 0 {
        let v = ok(ldt(&["verify-checkpoint", out.to_str().unwrap()]));
        assert!(!text(&v).contains("DAMAGED"), "{}", text(&v));
    }
}

fn wait_until(child: &mut Child, what: &str, done: impl Fn() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {what}"
        );
        assert!(t.elapsed() < Duration::from_secs(300), "no {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn stage1_dirs(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("stage1-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Stage 1 is resumable: SIGUSR1 during the warm-up writes a `stage1-N` checkpoint and
/// exits 3; the resumed run is killed (SIGKILL) during the statistics pass and resumed
/// from its newest periodic stage-1 checkpoint; the outputs equal the uninterrupted
/// run's bit for bit, and the first training checkpoint removes stage 1's.
#[test]
fn stage1_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let t = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "stat_batches = 4",
            "stat_batches = 40\nwarmup_steps = 60\nwarmup_layers = \"all\"",
        )
        .replace("every = 4", "every = 7");
    std::fs::write(&cfg, t).unwrap();
    let full = tmp.path().join("full");
    ok(train(&cfg, &full, false));
    assert!(
        stage1_dirs(&full).is_empty(),
        "training checkpoints supersede stage 1's"
    );

    let cut = tmp.path().join("cut");
    let mut child = spawn(&cfg, &cut);
    wait_until(&mut child, "warm-up step 10", || {
        last_of(&cut, "train", Some("warmup")) >= 10
    });
    signal(&child, "USR1");
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(3), "exit code after SIGUSR1 in the warm-up");
    let warm = last_of(&cut, "train", Some("warmup"));
    assert!(warm < 60, "the warm-up ended before the signal ({warm})");
    assert!(
        stage1_dirs(&cut).contains(&format!("stage1-{warm}")),
        "no stage-1 checkpoint at warm-up step {warm}: {:?}",
        stage1_dirs(&cut)
    );
    assert_eq!(last_step(&cut), 0, "no training step before stage 1 ends");
    // A config without that warm-up cannot continue it.
    let o = train(&cfg, &cut, true)
        .arg("--set")
        .arg("stage1.warmup_steps=0")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("config asks for 0 (`stage1.warmup_steps`)"),
        "{t}"
    );

    let mut child = train(&cfg, &cut, true)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // After the periodic checkpoint at stage-1 step 70 (statistics batch 10).
    wait_until(&mut child, "statistics batch 12", || {
        last_of(&cut, "stats", None) >= 12
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let b = last_of(&cut, "stats", None);
    assert!(b < 40, "the statistics pass ended before the kill ({b})");
    assert!(
        stage1_dirs(&cut).contains(&"stage1-70".to_string()),
        "{:?}",
        stage1_dirs(&cut)
    );
    let o = ok(train(&cfg, &cut, true));
    let t = text(&o);
    assert!(t.contains("stage1-") && t.contains("stage-1 step"), "{t}");
    for f in OUTPUTS {
        assert!(
            identical(&full.join(f), &cut.join(f)),
            "{f} differs after stage 1 was interrupted at warm-up step {warm} and statistics batch {b}"
        );
    }
    // The statistics themselves (a partition could survive a wrong statistic).
    let stats = |d: &Path| std::fs::read_to_string(d.join("partition.json")).unwrap();
    assert!(
        stats(&full) == stats(&cut),
        "partition.json (with every layer's statistics) differs"
    );
    assert!(stage1_dirs(&cut).is_empty(), "{:?}", stage1_dirs(&cut));
}

/// A new run (no `--resume`) into a directory holding an earlier run's outputs is
/// refused before it writes anything, naming them and the ways on (`--resume`,
/// `--overwrite`, another `--out`): outputs of two runs never mix. With `--overwrite`
/// every earlier output goes first — the checkpoints (a later `--resume` must not
/// continue that run's history), its exports and its partition report — but the
/// weights the new run starts from. `--resume` with nothing to resume says so.
#[test]
fn a_new_run_never_mixes_with_an_earlier_runs_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let dir = tmp.path().join("run");
    let o = ok(train(&cfg, &dir, true));
    assert!(text(&o).contains("nothing to resume"), "{}", text(&o));
    assert!(dir.join("checkpoints/step-12").exists());
    let listing = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing(&dir);
    let summary = std::fs::read(dir.join("summary.json")).unwrap();
    let s: serde_json::Value = serde_json::from_slice(&summary).unwrap();
    assert_eq!(s["seed"], 7, "summary.json records the seed");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "and the version");
    let t = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("seed = 7", "seed = 8")
        .replace("every = 4", "every = 0");
    let other = tmp.path().join("other.toml");
    std::fs::write(&other, t.clone()).unwrap();
    let o = train(&other, &dir, false).output().unwrap();
    let e = text(&o);
    assert!(!o.status.success(), "a second run was let in: {e}");
    assert!(
        e.contains("holds another run's outputs")
            && e.contains("--overwrite")
            && e.contains("--resume"),
        "{e}"
    );
    assert_eq!(
        listing(&dir),
        before,
        "the refused run changed the directory"
    );
    assert_eq!(std::fs::read(dir.join("summary.json")).unwrap(), summary);
    // Starting from the earlier run's export, in its directory, with --overwrite.
    let init = dir.join(before.iter().find(|f| f.ends_with(".safetensors")).unwrap());
    let t = format!("{t}\n").replace(
        "[model]\n",
        &format!("[model]\ninit = {:?}\n", init.display().to_string()),
    );
    std::fs::write(&other, t).unwrap();
    let mut c = train(&other, &dir, false);
    c.arg("--overwrite");
    let o = ok(c);
    assert!(text(&o).contains("--overwrite: removed"), "{}", text(&o));
    assert!(init.exists(), "the run's own starting weights were removed");
    let left: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "the earlier run's checkpoints remain: {left:?}"
    );
    assert_ne!(std::fs::read(dir.join("summary.json")).unwrap(), summary);
}

/// LDT-S with its counterpart tier in a file, killed before its first checkpoint: the
/// file the killed run left is removed by the restart (named in `DIR/.ldt-spill`, held by
/// no live process) and the run ends as the uninterrupted one; a file a live run holds
/// is never removed.
#[test]
fn a_killed_runs_spill_file_is_reclaimed_a_live_ones_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let spill = tmp.path().join("spill.bin");
    let cfg = write_config(
        tmp.path(),
        &format!(
            "[offload]\nhost_bytes = 4096\npath = \"{}\"",
            spill.display()
        ),
    );
    let t = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("stat_batches = 4", "stat_batches = 200")
        .replace("every = 4", "every = 0");
    std::fs::write(&cfg, t).unwrap();
    let full = tmp.path().join("full");
    ok(train(&cfg, &full, false));
    assert!(!spill.exists(), "a finished run removes its file");
    let cut = tmp.path().join("cut");
    let mut child = spawn(&cfg, &cut);
    wait_until(&mut child, "statistics batch 5", || {
        last_of(&cut, "stats", None) >= 5
    });
    // A second run with the same file while the first lives: refused, file untouched.
    let other = tmp.path().join("other");
    let o = train(&cfg, &other, true).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(spill.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(spill.exists(), "the killed run left its file");
    let o = ok(train(&cfg, &cut, true));
    assert!(
        text(&o).contains("removed the stale counterpart file"),
        "{}",
        text(&o)
    );
    for f in OUTPUTS {
        assert!(identical(&full.join(f), &cut.join(f)), "{f} differs");
    }
}

/// `ldt compare` locks its directory too: a second comparison into it stops at once.
#[test]
fn a_comparison_into_a_directory_in_use_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let dir = tmp.path().join("cmp");
    std::fs::create_dir_all(&dir).unwrap();
    let held = ldt::lock::RunLock::acquire(&dir).unwrap();
    let o = ldt(&[
        "compare",
        cfg.to_str().unwrap(),
        "--methods",
        "erm",
        "--seeds",
        "0",
    ])
    .arg("--out")
    .arg(&dir)
    .output()
    .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("in use by pid {}", std::process::id())),
        "{t}"
    );
    assert!(!dir.join("erm-s0").exists(), "nothing was run");
    drop(held);
}
