//! Chaos: for every method and placement, a run is killed with SIGKILL at seeded random
//! moments and resumed with `--resume` each time, until it completes; every exported
//! file and `partition.json` must then equal the uninterrupted run's bit for bit.
//!
//! A moment is drawn in two steps: a kind of moment, uniformly among those the
//! uninterrupted run has — `setup` (before the first record), `stage1` (a warm-up step
//! or statistics batch), `train` (a training step), `eval` (an evaluation), `checkpoint`
//! (right after a checkpoint record: the next step or the write that follows),
//! `export` (after the last step's checkpoint: exports and the final evaluation) — then
//! one of its records; the run is killed 0-20 ms after it logs that record (`setup`: 0-1 s
//! after the start). A run that resumes past its moment completes unkilled and is
//! compared too; the next kill starts a fresh directory.
//!
//! `LDT_CHAOS=K` sets the kills per configuration (default 2, the short form every
//! `cargo test` runs); `LDT_CHAOS_SEED` the seed. A summary line gives the kills
//! survived by kind of moment, the configurations and the time.

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
every = 12
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

/// A record as the moments name it: `(kind of moment, kind, stage, step)`.
type Mark = (&'static str, String, String, u64);

/// The records of `metrics.jsonl` from line `from` on, as [`Mark`]s.
fn marks(out: &Path, from: usize) -> Vec<Mark> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let v: Vec<serde_json::Value> = text
        .lines()
        .skip(from)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last_step = v
        .iter()
        .filter(|r| r["kind"] == "checkpoint")
        .filter_map(|r| r["step"].as_u64())
        .max();
    v.iter()
        .map(|r| {
            let (kind, stage) = (
                r["kind"].as_str().unwrap_or("").to_string(),
                r["stage"].as_str().unwrap_or("").to_string(),
            );
            let step = r["step"].as_u64().unwrap_or(0);
            let moment = match (kind.as_str(), stage.as_str()) {
                ("stats", _) | ("train", "warmup") => "stage1",
                ("train", _) => "train",
                ("eval", _) => "eval",
                ("checkpoint", _) if Some(step) == last_step => "export",
                ("checkpoint", _) => "checkpoint",
                _ => "other",
            };
            (moment, kind, stage, step)
        })
        .collect()
}

fn lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
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

/// Every output of `cut` equals `full`'s bit for bit.
fn same_outputs(name: &str, full: &Path, cut: &Path) {
    let (a, b) = (outputs(full), outputs(cut));
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
        assert!(same, "{name}: {} differs", x.display());
    }
}

fn finish(name: &str, child: &mut std::process::Child) {
    let st = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).ok();
    assert!(st.success(), "{name}: a resumed run failed: {err}");
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
    let mut completed = 0;
    for (name, sets) in CONFIGS {
        let spill = tmp.path().join(format!("{name}.spill"));
        let sets: Vec<String> = sets
            .iter()
            .map(|s| s.replace("SPILL", &spill.display().to_string()))
            .collect();
        let full = tmp.path().join(format!("{name}-full"));
        let o = command(&cfg, &sets, &full).output().unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let records = marks(&full, 0);
        let mut kinds: Vec<&str> = records
            .iter()
            .map(|m| m.0)
            .filter(|k| *k != "other")
            .collect();
        kinds.push("setup");
        kinds.sort_unstable();
        kinds.dedup();
        let (mut done, mut cycle, mut runs) = (0, 0, 0);
        while done < kills {
            cycle += 1;
            let cut = tmp.path().join(format!("{name}-cut{cycle}"));
            loop {
                runs += 1;
                assert!(
                    runs < 20 * kills + 50,
                    "{name}: {runs} runs for {done} kills"
                );
                let kind = kinds[r.below(kinds.len())];
                let of_kind: Vec<&Mark> = records.iter().filter(|m| m.0 == kind).collect();
                let target = (!of_kind.is_empty()).then(|| of_kind[r.below(of_kind.len())].clone());
                let from = lines(&cut);
                let mut child = command(&cfg, &sets, &cut).spawn().unwrap();
                let t = Instant::now();
                let setup_delay = Duration::from_millis(r.below(1000) as u64);
                let reached = || match &target {
                    // The record itself (its kind of moment can read otherwise among
                    // fewer records).
                    Some(m) => marks(&cut, from)
                        .iter()
                        .any(|n| n.1 == m.1 && n.2 == m.2 && n.3 == m.3),
                    None => t.elapsed() >= setup_delay,
                };
                while !reached() && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_micros(500));
                }
                std::thread::sleep(Duration::from_millis(r.below(21) as u64));
                if child.try_wait().unwrap().is_some() {
                    // Resumed past its moment, or done: this directory's run is complete.
                    finish(name, &mut child);
                    break;
                }
                child.kill().unwrap();
                child.wait().unwrap();
                done += 1;
                *at.entry(kind).or_default() += 1;
                if done == kills {
                    finish(name, &mut command(&cfg, &sets, &cut).spawn().unwrap());
                    break;
                }
            }
            same_outputs(name, &full, &cut);
            completed += 1;
        }
        eprintln!("{name}: {done} kills survived in {cycle} run directories, outputs identical");
    }
    eprintln!(
        "chaos: {} kills survived over {} configurations ({completed} interrupted runs completed, outputs identical) in {:.0} s (seed {seed}); kills by moment: {at:?}",
        kills * CONFIGS.len(),
        CONFIGS.len(),
        started.elapsed().as_secs_f64()
    );
}
