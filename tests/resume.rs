//! Interrupted runs are the same runs: the trainer is killed with SIGKILL at random
//! steps (and once more after resuming), resumed with --resume, and its final weights
//! must equal the uninterrupted run's bit for bit — for erm, ldt (resident and swap),
//! ldt-s, and ldt-s with the file-backed counterpart tier. SIGUSR1 finishes the step,
//! writes a checkpoint and exits with code 3; the resumed run again matches.

mod common;
use common::*;
use ldt::rng::Rng;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BASE: &str = r#"
seed = 5
threads = 1
[model]
arch = "cnn"
[train]
steps = 60
batch_size = 16
log_every = 1000
[optim]
lr = 1e-3
[stage1]
stat_batches = 4
[ldt]
ema_every = 5
[ldt_s]
p_steps = 7
a_steps = 5
[checkpoint]
every = 4
keep_last = 2
"#;

fn write_config(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("run.toml");
    let man = root().join("data/rotmnist5k/manifest.json");
    std::fs::write(
        &p,
        format!("{BASE}\n[data]\nmanifest = \"{}\"\n", man.display()),
    )
    .unwrap();
    p
}

fn spawn(cfg: &Path, sets: &[String], out: &Path, resume: bool) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ldt"));
    c.arg("train").arg(cfg).arg("--out").arg(out);
    for s in sets {
        c.arg("--set").arg(s);
    }
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the run logged step `k` (or ended), then returns.
fn wait_for_step(child: &mut Child, out: &Path, k: usize) {
    let t = Instant::now();
    while last_step(out) < k && child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "run did not reach step {k}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn finish(mut child: Child) {
    let st = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(st.success(), "run failed: {err}");
}

fn outputs(method: &str) -> &'static [&'static str] {
    if method == "erm" {
        &["model.safetensors"]
    } else {
        &["pm.safetensors", "am.safetensors", "composite.safetensors"]
    }
}

fn check_kill_resume(method: &str, extra: &[&str], seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path());
    let spill = tmp.path().join("spill.bin");
    let mut sets = vec![format!("train.method=\"{method}\"")];
    sets.extend(
        extra
            .iter()
            .map(|e| e.replace("SPILL", &spill.display().to_string())),
    );
    let full = tmp.path().join("full");
    finish(spawn(&cfg, &sets, &full, false));
    let cut = tmp.path().join("cut");
    let mut r = Rng::new(seed, 0);
    let k1 = 9 + r.below(20);
    let k2 = k1 + 6 + r.below(15);
    let mut child = spawn(&cfg, &sets, &cut, false);
    wait_for_step(&mut child, &cut, k1);
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = last_step(&cut);
    assert!(
        cut.join("checkpoints").exists() && killed_at < 60,
        "{method}: the first run ended (step {killed_at}) before the kill or wrote no checkpoint"
    );
    let mut child = spawn(&cfg, &sets, &cut, true);
    wait_for_step(&mut child, &cut, k2);
    child.kill().unwrap();
    child.wait().unwrap();
    finish(spawn(&cfg, &sets, &cut, true));
    for f in outputs(method) {
        assert!(
            identical(&full.join(f), &cut.join(f)),
            "{method} {extra:?}: {f} differs after kills near steps {killed_at} and {k2}"
        );
    }
    eprintln!("{method} {extra:?}: killed at step {killed_at} and near {k2}, resumed, identical");
}

#[test]
fn erm_resumes_bit_exactly() {
    check_kill_resume("erm", &[], 1);
}

#[test]
fn ldt_resident_resumes_bit_exactly() {
    check_kill_resume("ldt", &[], 2);
}

#[test]
fn ldt_swap_with_batchnorm_resumes_bit_exactly() {
    check_kill_resume(
        "ldt",
        &["ldt.placement=\"swap\"", "model.arch=\"cnn_bn\""],
        3,
    );
}

#[test]
fn ldt_s_resumes_bit_exactly() {
    check_kill_resume("ldt-s", &[], 4);
}

#[test]
fn ldt_s_file_tier_resumes_bit_exactly() {
    check_kill_resume(
        "ldt-s",
        &["offload.host_bytes=4096", "offload.path=\"SPILL\""],
        5,
    );
}

#[test]
fn sigusr1_checkpoints_exits_3_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path());
    let sets = vec!["train.method=\"ldt-s\"".to_string()];
    let full = tmp.path().join("full");
    finish(spawn(&cfg, &sets, &full, false));
    let cut = tmp.path().join("cut");
    let mut child = spawn(&cfg, &sets, &cut, false);
    wait_for_step(&mut child, &cut, 10);
    let ok = Command::new("kill")
        .arg("-USR1")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(3), "exit code after SIGUSR1");
    let stopped = last_step(&cut);
    assert!(
        cut.join(format!("checkpoints/step-{stopped}/meta.json"))
            .exists(),
        "no checkpoint at the step where it stopped ({stopped})"
    );
    assert!(stopped < 60, "the run finished before the signal arrived");
    finish(spawn(&cfg, &sets, &cut, true));
    for f in outputs("ldt-s") {
        assert!(
            identical(&full.join(f), &cut.join(f)),
            "{f} differs after SIGUSR1 at step {stopped}"
        );
    }
}
