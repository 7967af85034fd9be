//! What a run tells as it goes: every `metrics.jsonl` record carries its time, LDT-S
//! train records carry `lr` and `acc`.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
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
