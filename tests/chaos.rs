//! Chaos: for every method and placement, a run is killed with SIGKILL at seeded random
//! moments — during setup, stage 1, training steps, checkpoint writes, evaluations and
//! exports alike, since the moments are drawn over the whole run's wall time — and
//! resumed with `--resume` each time, until it completes; every exported file and
//! `partition.json` must then equal the uninterrupted run's bit for bit.
//!
//! `LDT_CHAOS=K` sets the kills per configuration (default 2, the short form every
//! `cargo test` runs); `LDT_CHAOS_SEED` the seed. Each kill's moment is reported by the
//! last record the run had logged (`stage1`, `train`, `eval`, `checkpoint`, `setup`),
//! and a summary line gives the kills survived, configurations and time.

mod common;
use common::*;
use ldt::rng::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BASE: &str = r#"
seed = 11
threads = 1
[model]
arch = "cnn_bn"
[train]
steps = 24
batch_size = 16
log_every = 1000
lp_steps = 6
[optim]
lr = 1e-3
[stage1]
warmup_steps = 8
warmup_layers = "all"
stat_batches = 6
[ldt]
ema_every = 3
[ldt_s]
p_steps = 4
a_steps = 3
[eval]
every = 8
batch_size = 512
branches = true
[snapshots]
at_steps = [12]
[checkpoint]
every = 3
keep_last = 2
"#;

/// Name and overrides of every configuration: each method, both placements of the dual
/// branch, LDT-S with its counterpart tier in a file.
const CONFIGS: [(&str, &[&str]); 7] = [
    ("erm", &["train.method=\"erm\""]),
    ("lp-ft", &["train.method=\"lp-ft\""]),
    ("deft", &["train.method=\"deft\""]),
    ("ldt-resident", &["train.method=\"ldt\""]),
    (
        "ldt-swap",
        &["train.method=\"ldt\"", "ldt.placement=\"swap\""],
    ),
    ("ldt-s", &["train.method=\"ldt-s\""]),
    (
        "ldt-s-file-tier",
        &[
            "train.method=\"ldt-s\"",
            "offload.host_bytes=4096",
            "offload.path=\"SPILL\"",
        ],
    ),
];

fn command(cfg: &Path, sets: &[String], out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ldt"));
    c.arg("train")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .arg("--resume");
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// What the run was doing when killed: its last logged record.
fn moment(out: &Path) -> &'static str {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let Some(last) = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    else {
        return "setup";
    };
    match (last["kind"].as_str(), last["stage"].as_str()) {
        (Some("stats"), _) | (Some("train"), Some("warmup")) => "stage1",
        (Some("train"), _) => "train",
        (Some("eval"), _) => "eval",
        (Some("checkpoint"), _) => "checkpoint",
        (Some("resume"), _) => "setup",
        _ => "other",
    }
}

/// Exported tensors and the partition of a finished run.
fn outputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                || p.file_name().is_some_and(|n| n == "partition.json")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_method_survives_random_kills() {
    let kills: usize = std::env::var("LDT_CHAOS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("LDT_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_261_206);
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("chaos.toml");
    let man = root().join("data/rotmnist5k/manifest.json");
    std::fs::write(
        &cfg,
        format!("{BASE}\n[data]\nmanifest = \"{}\"\n", man.display()),
    )
    .unwrap();
    let mut r = Rng::new(seed, 0);
    let mut at: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, sets) in CONFIGS {
        let spill = tmp.path().join(format!("{name}.spill"));
        let sets: Vec<String> = sets
            .iter()
            .map(|s| s.replace("SPILL", &spill.display().to_string()))
            .collect();
        let full = tmp.path().join(format!("{name}-full"));
        let t = Instant::now();
        let o = command(&cfg, &sets, &full).output().unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let whole = t.elapsed();
        let cut = tmp.path().join(format!("{name}-cut"));
        let mut done = 0;
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(
                attempts < kills + 100,
                "{name}: no completion after {attempts} runs"
            );
            let mut child = command(&cfg, &sets, &cut).spawn().unwrap();
            if done == kills {
                let st = child.wait().unwrap();
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).ok();
                assert!(st.success(), "{name}: the final resume failed: {err}");
                break;
            }
            let delay = whole.mul_f64(r.next_f64() * 1.1);
            let t = Instant::now();
            while t.elapsed() < delay && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(st) = child.try_wait().unwrap() {
                // It finished first: this attempt killed nothing; start over on this run
                // (a resume of a finished run redoes only the exports).
                assert!(st.success(), "{name}: a resumed run failed");
                continue;
            }
            child.kill().unwrap();
            child.wait().unwrap();
            done += 1;
            *at.entry(moment(&cut)).or_default() += 1;
        }
        let (a, b) = (outputs(&full), outputs(&cut));
        assert_eq!(
            a.iter().map(|p| p.file_name()).collect::<Vec<_>>(),
            b.iter().map(|p| p.file_name()).collect::<Vec<_>>(),
            "{name}: other files"
        );
        for (x, y) in a.iter().zip(&b) {
            let same = match x.extension().is_some_and(|e| e == "safetensors") {
                true => identical(x, y),
                false => std::fs::read(x).unwrap() == std::fs::read(y).unwrap(),
            };
            assert!(same, "{name}: {} differs after {kills} kills", x.display());
        }
        eprintln!("{name}: {kills} kills survived, outputs identical");
    }
    eprintln!(
        "chaos: {} kills survived over {} configurations in {:.0} s (seed {seed}); last record before each kill: {at:?}",
        kills * CONFIGS.len(),
        CONFIGS.len(),
        started.elapsed().as_secs_f64()
    );
}
