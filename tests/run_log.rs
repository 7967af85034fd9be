//! What a run tells as it goes: every `metrics.jsonl` record carries its time, LDT-S
//! train records carry `lr` and `acc`, and on a terminal the progress bar shows the step
//! the log is at.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

const LDT_S: &str = "threads = 1
[model]
arch = \"mlp\"
[train]
method = \"ldt-s\"
steps = 4
batch_size = 8
[stage1]
warmup_steps = 2
stat_batches = 2
[ldt_s]
p_steps = 2
a_steps = 2
";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Compares, for LDT-S alternating and with `repeat_batch`, each train record of the
/// training stage with what it must hold: `lr` (the scheduled rate) and `acc` (an
/// accuracy on the 8-example batch: a multiple of 1/8 in [0, 1]); and every record with
/// a `time` inside the run's wall-clock window and an `elapsed` that never decreases.
/// Before, these records had no `acc` and no record had a time.
#[test]
fn ldt_s_records_carry_lr_and_acc_and_every_record_its_time() {
    for repeat in ["false", "true"] {
        let before = now();
        let set = format!("ldt_s.repeat_batch={repeat}");
        let (dir, _) = run(LDT_S, &[&bundled_manifest(), &set]);
        let after = now();
        let records = lines(dir.path());
        let mut last = 0.0;
        for r in &records {
            let t = r["time"].as_f64().unwrap_or_else(|| panic!("no time: {r}"));
            let e = r["elapsed"]
                .as_f64()
                .unwrap_or_else(|| panic!("no elapsed: {r}"));
            assert!(before - 1e-3 <= t && t <= after, "{r}: {before}..{after}");
            assert!(e >= last, "{r}: elapsed before {last}");
            last = e;
        }
        let train: Vec<&Value> = records
            .iter()
            .filter(|r| r["kind"] == "train" && r["stage"] == "train")
            .collect();
        assert_eq!(train.len(), 4, "repeat_batch {repeat}");
        for r in train {
            assert_eq!(r["lr"].as_f64(), Some(1e-4), "{r}");
            let acc = r["acc"].as_f64().unwrap_or_else(|| panic!("no acc: {r}"));
            assert!(
                (0.0..=1.0).contains(&acc) && (acc * 8.0).fract() == 0.0,
                "{r}"
            );
        }
    }
}

/// `arg` quoted for `sh`.
fn quoted(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// The step the bar shows in its first draw after `at` in a terminal's output.
fn bar_step_after(out: &str, at: &str, total: usize) -> usize {
    let from = out
        .find(at)
        .unwrap_or_else(|| panic!("no `{at}` in {out:?}"));
    let rest = &out[from..];
    let slash = rest
        .find(&format!("/{total} "))
        .unwrap_or_else(|| panic!("no bar after `{at}` in {rest:?}"));
    let digits: String = rest[..slash]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().unwrap()
}

/// Compares, on a terminal (`script` gives the run a pseudo-terminal), the step of the
/// bar drawn right after each evaluation line `eval @N` with N, where progress lines are
/// due only at the end (`train.log_every` above the steps). Before, the bar moved only
/// at log steps, so it showed 0/6 beside `eval @2` and `eval @4`.
#[test]
fn the_bar_shows_the_step_of_the_log_lines() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no `script` (util-linux) to give the run a terminal");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        env!("CARGO_BIN_EXE_ldt").to_string(),
        "train".into(),
        root().join("configs/quickstart.toml").display().to_string(),
        "--out".into(),
        tmp.path().join("run").display().to_string(),
    ];
    let sets = [
        "threads=1",
        "model.arch=\"mlp\"",
        "train.method=\"erm\"",
        "train.steps=6",
        "train.log_every=1000",
        "eval.every=2",
    ];
    let mut cmd: Vec<String> = args.iter().map(|a| quoted(a)).collect();
    for s in sets {
        cmd.push("--set".into());
        cmd.push(quoted(s));
    }
    let o = Command::new("script")
        .args(["-qec", &cmd.join(" "), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for n in [2, 4] {
        assert_eq!(
            bar_step_after(&out, &format!("eval @{n}:"), 6),
            n,
            "bar after eval @{n} in {out:?}"
        );
    }
}
