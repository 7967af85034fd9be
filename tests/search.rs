//! The search of `auto` stage-1 settings (`stage1.unstable_ratio`, `stage1.criterion`):
//! - a run with `auto` equals the run with the chosen settings fixed, from the same
//!   start, bit for bit (every exported network and `partition.json`), for LDT-S and the
//!   dual branch in both placements, and with re-partitions (which probes never do);
//! - one warm-up and one statistics pass serve every candidate (records counted), and
//!   candidates with equal partitions are probed once;
//! - the choice never reads a target domain: with the target labels and images
//!   poisoned, `search.json`, `partition.json` and the probe records are byte-identical
//!   while the reported target accuracy changes;
//! - the settings the search cannot serve are refused naming the key;
//! - `ldt compare` rows `+auto` / `@R`, and the search on super-resolution.

mod common;

use common::*;
use ldt::config::Config;
use ldt::ldt::search::SearchReport;
use std::path::Path;

/// LDT-S on the MLP with phases of 5 steps; the search probes 10 steps (one cycle).
const TOML: &str = r#"
seed = 3
threads = 1
[model]
arch = "mlp"
[train]
method = "ldt-s"
steps = 20
batch_size = 16
[optim]
lr = 1e-3
[stage1]
stat_batches = 4
probe_steps = 10
[ldt_s]
p_steps = 5
a_steps = 5
[eval]
every = 10
[data]
val_fraction = 0.2
"#;

/// Two files with the same bytes (safetensors: the same tensors, bit for bit).
fn same(a: &Path, b: &Path) -> bool {
    match a.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => identical(a, b),
        _ => std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
    }
}

fn search_report(dir: &Path) -> SearchReport {
    let text = std::fs::read_to_string(dir.join("search.json")).expect("search.json");
    serde_json::from_str(&text).expect("a search report")
}

/// The records of `kind` in a run's metrics.jsonl, without their time stamps.
fn records(dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .map(|mut v| {
            for k in ldt::metrics::STAMP_KEYS {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

/// Runs `TOML` with `extra` overrides on the bundled data.
fn run_with(extra: &[&str]) -> tempfile::TempDir {
    let man = bundled_manifest();
    let mut ov = vec![man.as_str()];
    ov.extend_from_slice(extra);
    run(TOML, &ov).0
}

/// `auto` then the chosen settings fixed: every exported network and the partition
/// report are byte-identical (the probes leave no trace in the run).
fn auto_equals_fixed(extra: &[&str]) {
    let mut ov = vec![
        "stage1.unstable_ratio=\"auto\"",
        "stage1.criterion=\"auto\"",
    ];
    ov.extend_from_slice(extra);
    let auto = run_with(&ov);
    let report = search_report(auto.path());
    let pick = report.choice();
    let ratio = format!("stage1.unstable_ratio={}", pick.candidate.unstable_ratio);
    let crit = format!("stage1.criterion=\"{}\"", pick.candidate.criterion.name());
    let mut ov = vec![ratio.as_str(), crit.as_str()];
    ov.extend_from_slice(extra);
    let fixed = run_with(&ov);
    assert!(!fixed.path().join("search.json").exists());
    for f in [
        "composite.safetensors",
        "pm.safetensors",
        "am.safetensors",
        "best.safetensors",
        "partition.json",
    ] {
        assert!(
            same(&auto.path().join(f), &fixed.path().join(f)),
            "{f} differs between the auto run ({:?} @ {}) and the fixed one ({extra:?})",
            pick.candidate.criterion,
            pick.candidate.unstable_ratio
        );
    }
}

#[test]
fn auto_equals_the_chosen_settings_fixed_ldt_s() {
    auto_equals_fixed(&[]);
}

/// With re-partitions every 10 steps (the probes' length): the probes never
/// re-partition (the auto run writes the fixed run's one `repartition` record) and the
/// runs agree bit for bit.
#[test]
fn auto_equals_the_chosen_settings_fixed_with_repartitions() {
    let every = "stage1.repartition_every=10";
    auto_equals_fixed(&[every]);
    let auto = run_with(&["stage1.unstable_ratio=\"auto\"", every]);
    assert_eq!(records(auto.path(), "repartition").len(), 1);
}

#[test]
fn auto_equals_the_chosen_settings_fixed_dual_branch_both_placements() {
    auto_equals_fixed(&["train.method=\"ldt\""]);
    auto_equals_fixed(&["train.method=\"ldt\"", "ldt.placement=\"swap\""]);
}

/// 3 criteria x 5 ratios: one statistics pass (4 `stats` records, not 4 per
/// candidate), one probe record per candidate, candidates with equal partitions share
/// the first one's probe and score, and the choice is the best score (ties to the
/// earliest).
#[test]
fn one_statistics_pass_serves_every_candidate() {
    let dir = run_with(&[
        "stage1.unstable_ratio=\"auto\"",
        "stage1.criterion=\"auto\"",
        "stage1.warmup_steps=3",
    ]);
    let r = search_report(dir.path());
    assert_eq!(r.candidates.len(), 15);
    assert_eq!(records(dir.path(), "stats").len(), 4, "statistics batches");
    let warmup = records(dir.path(), "train")
        .into_iter()
        .filter(|v| v["stage"] == "warmup")
        .count();
    assert_eq!(warmup, 3, "warm-up steps");
    let probes = records(dir.path(), "probe");
    assert_eq!(probes.len(), 15);
    let distinct = r.candidates.iter().filter(|c| c.same_as.is_none()).count();
    assert_eq!(r.probes_run, distinct);
    assert!(distinct < 15, "the MLP's 6 tensors make some ratios equal");
    for (i, c) in r.candidates.iter().enumerate() {
        assert_eq!(probes[i]["criterion"], c.candidate.criterion.name());
        assert_eq!(probes[i]["unstable_ratio"], c.candidate.unstable_ratio);
        if let Some(j) = c.same_as {
            assert!(j < i);
            assert_eq!(c.score.to_bits(), r.candidates[j].score.to_bits());
            assert_eq!(
                (c.stable, c.unstable),
                (r.candidates[j].stable, r.candidates[j].unstable)
            );
        }
    }
    let best = r
        .candidates
        .iter()
        .map(|c| c.score)
        .fold(f64::MIN, f64::max);
    let first = r.candidates.iter().position(|c| c.score == best).unwrap();
    assert_eq!(r.chosen, first);
    // The run's partition and summary are the choice's.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["search"]["chosen"], r.chosen);
    let part: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("partition.json")).unwrap())
            .unwrap();
    assert_eq!(part["unstable_ratio"], r.choice().candidate.unstable_ratio);
    assert_eq!(part["criterion"], r.choice().candidate.criterion.name());
    // The partition picture shows the search.
    let svg = std::fs::read_to_string(dir.path().join("partition.svg")).unwrap();
    assert!(
        svg.contains("search"),
        "partition.svg lacks the search panel"
    );
}

#[test]
fn the_choice_never_reads_a_target_domain() {
    let data = tempfile::tempdir().unwrap();
    let (clean, poisoned) = (data.path().join("clean"), data.path().join("poisoned"));
    copy_rotmnist(&clean, false);
    copy_rotmnist(&poisoned, true);
    let go = |d: &Path| {
        let man = format!("data.manifest=\"{}\"", d.join("manifest.json").display());
        run(
            TOML,
            &[
                &man,
                "stage1.unstable_ratio=\"auto\"",
                "stage1.criterion=\"auto\"",
            ],
        )
    };
    let (a, ctx_a) = go(&clean);
    let (b, ctx_b) = go(&poisoned);
    for f in ["search.json", "partition.json", "composite.safetensors"] {
        assert!(
            same(&a.path().join(f), &b.path().join(f)),
            "{f} depends on the target domains"
        );
    }
    assert_eq!(records(a.path(), "probe"), records(b.path(), "probe"));
    // The poison is real: the reported target accuracy changes.
    let target = |c: &ldt::train::RunContext| c.summary.eval["composite"].headline().1;
    assert_ne!(
        target(&ctx_a),
        target(&ctx_b),
        "the poison did not reach the targets"
    );
}

fn config_error(extra: &[&str]) -> String {
    let mut ov: Vec<String> = vec![bundled_manifest()];
    ov.extend(extra.iter().map(|s| s.to_string()));
    match Config::from_toml(TOML, "t", &ov) {
        Ok(_) => panic!("{extra:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn settings_the_search_cannot_serve_are_refused_by_key() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["stage1.unstable_ratio=\"auto\"", "train.method=\"erm\""],
            &["stage1.unstable_ratio", "erm"],
        ),
        (
            &["stage1.criterion=\"auto\"", "train.method=\"deft\""],
            &["stage1.criterion", "deft"],
        ),
        (
            &["stage1.unstable_ratio=\"auto\"", "data.val_fraction=0.0"],
            &["data.val_fraction", "held-out source"],
        ),
        (
            &["stage1.unstable_ratio=\"auto\"", "stage1.probe_steps=6"],
            &["stage1.probe_steps", "cycle", "10"],
        ),
        (
            &["stage1.unstable_ratio=\"auto\"", "stage1.probe_steps=30"],
            &["stage1.probe_steps", "train.steps"],
        ),
        (
            &[
                "stage1.unstable_ratio=\"auto\"",
                "stage1.criterion=\"names\"",
            ],
            &["stage1.unstable_ratio", "names"],
        ),
        (
            &[
                "stage1.unstable_ratio=\"auto\"",
                "stage1.partition=\"p.json\"",
            ],
            &["stage1.partition"],
        ),
        (
            &["stage1.search_criteria=[\"names\"]"],
            &["stage1.search_criteria[0]"],
        ),
        (
            &["stage1.search_ratios=[0.3, 0.3]"],
            &["stage1.search_ratios[1]", "twice"],
        ),
        (
            &["stage1.search_ratios=[1.5]"],
            &["stage1.search_ratios[0]", "[0, 1]"],
        ),
        (&["stage1.search_ratios=[]"], &["stage1.search_ratios"]),
        (
            &["stage1.unstable_ratio=\"half\""],
            &["unstable_ratio", "auto"],
        ),
        (&["stage1.criterion=\"best\""], &["criterion", "auto"]),
    ];
    for (set, want) in cases {
        let e = config_error(set);
        for w in *want {
            assert!(e.contains(w), "{set:?}: `{w}` missing in: {e}");
        }
    }
}

/// `ldt compare` with a fixed-ratio row and an `auto` row: the fixed row runs with that
/// ratio, the auto row's search table names its choice, and rows that cannot carry a
/// ratio are refused.
#[test]
fn compare_rows_with_fixed_and_auto_ratios() {
    use ldt::train::compare::{compare, Variant};
    let rows: Vec<Variant> = ["ldt-s@0.3", "ldt-s+auto", "ldt+ratio+auto"]
        .iter()
        .map(|v| Variant::parse(v).unwrap())
        .collect();
    let names: Vec<String> = rows.iter().map(|v| v.name()).collect();
    assert_eq!(names, ["ldt-s@0.3", "ldt-s+auto", "ldt+ratio+auto"]);
    for bad in [
        "erm+auto",
        "deft@0.3",
        "ldt-s@1.5",
        "ldt-s+auto@0.3",
        "ldt+ratio+timm",
    ] {
        assert!(Variant::parse(bad).is_err(), "{bad} was accepted");
    }
    let cfg = Config::from_toml(TOML, "t", &[bundled_manifest()]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let md = compare(&cfg, &rows[..2], &[0], &[], out.path()).unwrap();
    let part: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("ldt-s@0.3-s0/partition.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(part["unstable_ratio"], 0.3);
    let report = search_report(&out.path().join("ldt-s+auto-s0"));
    let pick = report.choice();
    let cell = format!(
        "| ldt-s+auto | {} @ {} |",
        pick.candidate.criterion.name(),
        pick.candidate.unstable_ratio
    );
    assert!(md.contains(&cell), "{cell} missing in:\n{md}");
}

/// A run with `auto` settings resumed from its step-10 checkpoint (in a directory that
/// holds only the checkpoint) ends with the whole run's composite, bit for bit, and
/// reports the same search and partition in `summary.json`.
#[test]
fn a_resumed_auto_run_keeps_its_choice_and_bits() {
    let auto = ["stage1.unstable_ratio=\"auto\"", "checkpoint.every=10"];
    let whole = run_with(&auto);
    let fresh = only_checkpoint(whole.path(), 10);
    let man = bundled_manifest();
    let cfg = Config::from_toml(
        TOML,
        "t",
        &[
            man,
            auto[0].into(),
            auto[1].into(),
            "checkpoint.resume=\"auto\"".into(),
        ],
    )
    .unwrap();
    let mut ctx = ldt::train::RunContext::open(cfg, fresh.path()).unwrap();
    ldt::train::run_method(&mut ctx).unwrap();
    assert!(
        !fresh.path().join("search.json").exists(),
        "the resumed run searched again"
    );
    assert!(same(
        &whole.path().join("composite.safetensors"),
        &fresh.path().join("composite.safetensors")
    ));
    let summary = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap()
    };
    let (a, b) = (summary(whole.path()), summary(fresh.path()));
    assert_eq!(a["search"], b["search"]);
    assert_eq!(a["partition"], b["partition"]);
    assert!(b["search"]["candidates"].is_array());
}
