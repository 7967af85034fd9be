//! Re-partition during training (`stage1.repartition_every`, issue #21 item 2): the
//! statistics pass again on the composite, layers moved between the stable and the
//! unstable set with their optimizer state. Every comparison here is bit identity (f32
//! bits, nothing looser): a move, a move back, the statistics pass and a re-partition to
//! the same sets change nothing they must not change, in every branch storage; a resumed
//! run replays its re-partitions; the records say what moved; configs where a
//! re-partition has no meaning are refused naming the key.

mod common;
use common::*;
use ldt::config::Config;
use ldt::ldt::partition::{Partition, Phase, Set};
use ldt::metrics::Record;
use ldt::train::branches::{self, half_step, Branches, View};
use ldt::train::driver::Rates;
use ldt::train::{run_method, stage1, RunContext};
use std::path::Path;

/// Small LDT runs on the bundled data: a narrow cnn_bn (BatchNorm buffers travel with
/// the branches), Adam with a first moment (so the optimizer state has two moments), a DPU
/// fold every 2 steps, LDT-S cycles of 2 + 2 steps; every checkpoint kept.
const BASE: &str = r#"
seed = 4
threads = 1
[model]
arch = "cnn_bn"
channels = [4, 8]
fc_hidden = 16
[train]
steps = 12
batch_size = 16
log_every = 1000
[optim]
lr = 1e-3
betas = [0.9, 0.999]
[stage1]
stat_batches = 3
stat_batch_size = 8
[ldt]
ema_every = 2
[ldt_s]
p_steps = 2
a_steps = 2
[checkpoint]
keep_last = 10
"#;

/// The config of [`BASE`] on the bundled data with `sets`.
fn config(sets: &[&str]) -> Config {
    let mut ov: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    ov.push(bundled_manifest());
    Config::from_toml(BASE, "repartition", &ov).expect("config")
}

/// Trains [`BASE`] with `sets` in `dir`.
fn train_in(dir: &Path, sets: &[&str]) {
    let mut ctx = RunContext::open(config(sets), dir).expect("open run");
    run_method(&mut ctx).expect("run");
}

/// A fresh run of [`BASE`] with `sets`.
fn train(sets: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    train_in(dir.path(), sets);
    dir
}

/// The exported networks of an LDT run.
const NETWORKS: [&str; 3] = ["composite.safetensors", "pm.safetensors", "am.safetensors"];

/// Asserts that runs `a` and `b` exported the same networks, bit for bit.
fn same_networks(what: &str, a: &Path, b: &Path) {
    for f in NETWORKS {
        assert!(identical(&a.join(f), &b.join(f)), "{what}: {f} differs");
    }
}

/// The `repartition` records of a run: (step, to_stable, to_unstable, stable, unstable).
fn repartitions(dir: &Path) -> Vec<Record> {
    ldt::metrics::read_records(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r, Record::Repartition { .. }))
        .collect()
}

/// Layers moved by a run's re-partitions.
fn moves(dir: &Path) -> usize {
    repartitions(dir)
        .iter()
        .map(|r| match r {
            Record::Repartition {
                to_stable,
                to_unstable,
                ..
            } => to_stable.len() + to_unstable.len(),
            _ => 0,
        })
        .sum()
}

/// A re-partition to the same sets is a no-op, bit for bit: the run exports the
/// composite, PM and AM of the same run without re-partitions bit for bit — ldt-s
/// (alternating phases and repeat-batch), ldt resident and ldt swap — where every
/// re-partition keeps the sets: with the `random` criterion (its scores come from the
/// seed, not the weights), and with `var` at `unstable_ratio = 0` and a fixed DPU
/// coefficient (every layer stays stable, so the statistics pass runs on the composite,
/// swapped in and back, and must leave no trace). Each run records its re-partitions,
/// with no layer moved.
#[test]
fn a_repartition_to_the_same_sets_changes_no_bit() {
    let storages: [(&str, &[&str], usize); 4] = [
        ("ldt-s", &[], 4),
        ("ldt-s", &["ldt_s.repeat_batch=true"], 2),
        ("ldt", &["ldt.placement=\"resident\""], 3),
        ("ldt", &["ldt.placement=\"swap\""], 3),
    ];
    let criteria: [&[&str]; 2] = [
        &["stage1.criterion=\"random\""],
        &[
            "stage1.criterion=\"var\"",
            "stage1.unstable_ratio=0.0",
            "ldt.dpu=\"fixed\"",
        ],
    ];
    for ((method, extra, every), criterion) in
        storages.into_iter().flat_map(|s| criteria.map(|c| (s, c)))
    {
        let what = format!("{method} {extra:?} {criterion:?}");
        let m = format!("train.method=\"{method}\"");
        let mut sets = vec![m.as_str()];
        sets.extend(extra);
        sets.extend(criterion);
        let plain = train(&sets);
        let n = format!("stage1.repartition_every={every}");
        sets.push(&n);
        let re = train(&sets);
        same_networks(&what, plain.path(), re.path());
        let records = repartitions(re.path());
        assert_eq!(records.len(), (12 - 1) / every, "{what}: re-partitions");
        assert_eq!(moves(re.path()), 0, "{what}: a re-partition moved");
        eprintln!("{what}: {} re-partitions, same bits", records.len());
    }
}

/// Every weight and buffer of the composite, PM and AM (in that order) as f32 bits, and
/// every layer's optimizer state in PM's and AM's optimizer (`[P, A]`): step count and
/// the bits of each moment. Reading it changes nothing: each branch is made live in
/// turn (a parked one through the counterpart store) and the live one is restored.
struct Dump {
    views: [Vec<Vec<u32>>; 3],
    states: [Vec<Option<State>>; 2],
}

/// A layer's optimizer state: step count, first and second moment (empty when absent).
type State = (u64, Vec<u32>, Vec<u32>);

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn dump(ctx: &RunContext, b: &mut dyn Branches, partition: &Partition) -> Dump {
    let views = [
        View::Composite,
        View::Branch(Phase::P),
        View::Branch(Phase::A),
    ]
    .map(|v| {
        let mut out = Vec::new();
        b.visit(v, partition, &mut |w, buffers| {
            out.extend(w.all()?.iter().map(bits));
            out.extend(buffers.iter().map(bits));
            Ok(())
        })
        .unwrap();
        out
    });
    let live = b.live();
    let states = [Phase::P, Phase::A].map(|phase| {
        b.switch_to(phase).unwrap();
        let opt = b.trainer(phase).1;
        ctx.net
            .params()
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let st = opt.snapshot(i, &spec.shape).unwrap()?;
                let moment = |t: &Option<candle_core::Tensor>| t.as_ref().map_or(vec![], bits);
                Some((st.step, moment(&st.m), moment(&st.v)))
            })
            .collect()
    });
    if let Some(p) = live {
        b.switch_to(p).unwrap();
    }
    Dump { views, states }
}

/// What a move of `moved` must make of `d`: PM's and AM's copies of each moved layer
/// traded, and its optimizer state handed to the other branch's optimizer; the
/// composite, the buffers and every other layer the same.
fn moved_dump(d: &Dump, moved: &[usize]) -> Dump {
    let (mut pm, mut am) = (d.views[1].clone(), d.views[2].clone());
    let (mut sp, mut sa) = (d.states[0].clone(), d.states[1].clone());
    for &i in moved {
        std::mem::swap(&mut pm[i], &mut am[i]);
        std::mem::swap(&mut sp[i], &mut sa[i]);
    }
    Dump {
        views: [d.views[0].clone(), pm, am],
        states: [sp, sa],
    }
}

fn assert_same(what: &str, got: &Dump, want: &Dump) {
    let names = ["composite", "pm", "am"];
    for (k, name) in names.iter().enumerate() {
        let bad = (0..want.views[k].len()).find(|&t| got.views[k][t] != want.views[k][t]);
        assert!(bad.is_none(), "{what}: {name} tensor {bad:?} differs");
    }
    for (k, name) in ["opt_p", "opt_a"].iter().enumerate() {
        let bad = (0..want.states[k].len()).find(|&i| got.states[k][i] != want.states[k][i]);
        assert!(
            bad.is_none(),
            "{what}: {name} state of layer {bad:?} differs"
        );
    }
}

/// Branches made by `branches::open` for [`BASE`] with `sets` (stage 1 included), both
/// trained 4 steps of the dual branch with DPU folds, so that every branch, frozen copy
/// and moment differs from its start.
fn trained(ctx: &mut RunContext, parked: bool) -> (Box<dyn Branches>, Partition) {
    let (mut b, partition) = branches::open(ctx, branches::Opening::Stage1, parked, true).unwrap();
    let cfg = ctx.cfg.clone();
    let names: Vec<String> = ctx.net.params().iter().map(|s| s.name.clone()).collect();
    let rates = Rates::new(&cfg, &names);
    let mut loader = ctx.train_loader(0, 4).unwrap();
    for step in 1..=4 {
        let hb = loader.next_batch().unwrap();
        let batch = ctx.batch(&hb).unwrap();
        for phase in [Phase::P, Phase::A] {
            b.switch_to(phase).unwrap();
            half_step(
                ctx,
                b.as_mut(),
                &partition,
                phase,
                step,
                &batch,
                &rates.at(step),
            )
            .unwrap();
        }
        if step % 2 == 0 {
            b.fold(&partition, Phase::P, 1.0).unwrap();
            b.fold(&partition, Phase::A, 1.0).unwrap();
        }
    }
    (b, partition)
}

/// A move between the sets loses nothing, in every branch storage: moving stable and
/// unstable layers keeps the composite bit for bit (under the new partition), trades
/// PM's and AM's copies of each moved layer and hands its Adam state (step, both
/// moments) to the other branch's optimizer exactly; moving them back restores every
/// weight, buffer and optimizer state bit for bit. The re-partition's statistics pass
/// on the composite changes no bit either. Storages: resident; swap (moments through
/// the counterpart store); swap with the optimizer on the host; swap and resident with
/// bf16 working weights and f32 host masters; swap with streamed weights.
#[test]
fn moves_lose_nothing_in_every_branch_storage() {
    let host = "offload.optimizer=\"host\"";
    let (bf16, blocks) = ("train.precision=\"bf16\"", "train.recompute=\"blocks\"");
    let cases: [(&str, bool, &[&str]); 6] = [
        ("resident", false, &[]),
        ("swap", true, &[]),
        ("swap, host optimizer", true, &[host]),
        ("swap, host masters", true, &[host, bf16]),
        ("resident, host masters", false, &[host, bf16]),
        (
            "swap, streamed",
            true,
            &["offload.params=\"stream\"", blocks],
        ),
    ];
    for (what, parked, sets) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = RunContext::open(config(sets), dir.path()).unwrap();
        ctx.decide_memory().unwrap();
        let (mut b, partition) = trained(&mut ctx, parked);
        let before = dump(&ctx, b.as_mut(), &partition);
        // Two stable layers and one unstable layer change sets.
        let first = |set: Set, k: usize| {
            partition
                .layers
                .iter()
                .enumerate()
                .filter(|(_, l)| l.set == set)
                .map(|(i, _)| i)
                .take(k)
                .collect::<Vec<_>>()
        };
        let moved = [first(Set::Stable, 2), first(Set::Unstable, 1)].concat();
        for &i in &moved {
            // Not vacuous: the two copies differ and the trained one has moments.
            assert_ne!(before.views[1][i], before.views[2][i], "{what}: layer {i}");
            let trainer = usize::from(!partition.is_stable(i));
            let st = before.states[trainer][i].as_ref();
            assert!(
                st.is_some_and(|s| !s.1.is_empty() && !s.2.is_empty()),
                "{what}: {i}"
            );
        }
        let mut flipped = partition.clone();
        for &i in &moved {
            let l = &mut flipped.layers[i];
            l.set = match l.set {
                Set::Stable => Set::Unstable,
                Set::Unstable => Set::Stable,
            };
        }
        b.move_layers(&moved).unwrap();
        let after = dump(&ctx, b.as_mut(), &flipped);
        assert_same(
            &format!("{what}: moved"),
            &after,
            &moved_dump(&before, &moved),
        );
        b.move_layers(&moved).unwrap();
        assert_same(
            &format!("{what}: moved back"),
            &dump(&ctx, b.as_mut(), &partition),
            &before,
        );
        b.with_composite(&partition, &mut |state| {
            stage1::restatistics(&mut ctx, state, false, 1).map(|_| ())
        })
        .unwrap();
        assert_same(
            &format!("{what}: statistics pass"),
            &dump(&ctx, b.as_mut(), &partition),
            &before,
        );
        b.sync().unwrap();
        eprintln!("{what}: moved {moved:?} and back, same bits");
    }
}

/// A run resumed from a checkpoint written after a re-partition (the partition it
/// holds is the moved one, its branches and optimizer states moved) ends bit for bit
/// where the uninterrupted run ends: the same later re-partitions (their batches come
/// from the seed and the re-partition's number), the same composite, PM and AM. ldt-s
/// resumes between two re-partitions; ldt swap from the checkpoint written in the step
/// that re-partitioned; ldt resident between two. Each run really moves layers.
#[test]
fn a_run_resumes_across_a_repartition_bit_exactly() {
    let cases: [(&str, &[&str], usize); 3] = [
        (
            "ldt-s",
            &["stage1.repartition_every=4", "checkpoint.every=6"],
            6,
        ),
        (
            "ldt",
            &[
                "ldt.placement=\"swap\"",
                "stage1.repartition_every=4",
                "checkpoint.every=4",
            ],
            4,
        ),
        (
            "ldt",
            &["stage1.repartition_every=3", "checkpoint.every=5"],
            5,
        ),
    ];
    for (method, extra, at) in cases {
        let what = format!("{method} {extra:?}");
        let m = format!("train.method=\"{method}\"");
        let mut sets = vec![m.as_str()];
        sets.extend(extra);
        let whole = train(&sets);
        assert!(moves(whole.path()) > 0, "{what}: no layer moved");
        let resumed = only_checkpoint(whole.path(), at);
        sets.push("checkpoint.resume=\"auto\"");
        train_in(resumed.path(), &sets);
        same_networks(&what, whole.path(), resumed.path());
        assert_eq!(
            std::fs::read_to_string(whole.path().join("partition.json")).unwrap(),
            std::fs::read_to_string(resumed.path().join("partition.json")).unwrap(),
            "{what}: partition.json"
        );
        eprintln!("{what}: resumed from step {at}, same bits");
    }
}

/// The dual branch computes the same bits in every branch storage, re-partitions
/// included: with the `var` criterion moving layers every 4 steps, ldt swap (the moved
/// layers' moments through the counterpart store), swap with the optimizer on the host,
/// and swap with streamed weights export the composite, PM and AM of ldt resident bit
/// for bit.
#[test]
fn every_branch_storage_repartitions_alike() {
    let base = ["train.method=\"ldt\"", "stage1.repartition_every=4"];
    let resident = train(&base);
    assert!(moves(resident.path()) > 0, "no layer moved");
    let swap = "ldt.placement=\"swap\"";
    let stream: &[&str] = &[
        swap,
        "offload.params=\"stream\"",
        "train.recompute=\"blocks\"",
    ];
    for extra in [&[swap][..], &[swap, "offload.optimizer=\"host\""], stream] {
        let dir = train(&[&base[..], extra].concat());
        same_networks(&format!("{extra:?}"), resident.path(), dir.path());
        eprintln!("{extra:?}: the bits of ldt resident");
    }
}

/// A re-partition ranks the composite: `partition.json` after the one re-partition of
/// a run (after step 4) is, byte for byte, the `var` partition of the statistics pass
/// over that re-partition's D2 batches of the network made of AM's stable and PM's
/// unstable layers at step 4 (exported by `snapshots.at_steps`; a move does not change
/// it).
#[test]
fn a_repartition_ranks_the_composite() {
    let sets = [
        "train.method=\"ldt\"",
        "train.steps=5",
        "stage1.repartition_every=4",
        "snapshots.at_steps=[4]",
    ];
    let run = train(&sets);
    assert!(moves(run.path()) > 0, "no layer moved");
    let written = std::fs::read_to_string(run.path().join("partition.json")).unwrap();
    let after: Partition = serde_json::from_str(&written).unwrap();
    let (pm, am) = (
        load(&run.path().join("step4_pm.safetensors")),
        load(&run.path().join("step4_am.safetensors")),
    );
    let composite: std::collections::HashMap<String, candle_core::Tensor> = pm
        .iter()
        .map(|(k, t)| match after.stable.contains(k) {
            true => (k.clone(), am[k].clone()),
            false => (k.clone(), t.clone()),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("composite.safetensors");
    candle_core::safetensors::save(&composite, &file).unwrap();
    let mut ctx = RunContext::open(config(&sets), &dir.path().join("run")).unwrap();
    let net = ldt::model::io::load_state(ctx.net.as_ref(), &file, &candle_core::Device::Cpu);
    let stats = stage1::restatistics(&mut ctx, &mut net.unwrap(), false, 1).unwrap();
    let scores = stage1::scores(after.criterion, &stats).unwrap();
    let ranking = ldt::ldt::partition::Ranking {
        criterion: after.criterion,
        unstable_ratio: 0.5,
        stats: Some(&stats),
        scores: &scores,
        stat_batches: 3,
    };
    let want = Partition::by_score(ctx.net.as_ref(), &ranking, &ctx.cfg.ldt).unwrap();
    assert_eq!(serde_json::to_string_pretty(&want).unwrap(), written);
}

/// With the `var` criterion re-partitions rank the layers again and move some: each
/// writes a `repartition` record whose moves are the difference between the sets
/// before and after it, and at the end `partition.json` and `summary.json` hold the
/// last record's sets (exact equality of the name lists).
#[test]
fn repartitions_are_recorded_and_partition_json_is_the_last() {
    for method in ["ldt-s", "ldt"] {
        let m = format!("train.method=\"{method}\"");
        let dir = train(&[&m, "stage1.repartition_every=4"]);
        let records = repartitions(dir.path());
        assert_eq!(
            records.len(),
            2,
            "{method}: re-partitions after steps 4 and 8"
        );
        assert!(moves(dir.path()) > 0, "{method}: no layer moved");
        let mut last: Option<(Vec<String>, Vec<String>)> = None;
        for r in &records {
            let Record::Repartition {
                to_stable,
                to_unstable,
                stable,
                unstable,
                ..
            } = r
            else {
                unreachable!()
            };
            if let Some((s0, u0)) = &last {
                let gained = |now: &[String], was: &[String]| -> Vec<String> {
                    now.iter().filter(|n| !was.contains(n)).cloned().collect()
                };
                let sorted = |mut v: Vec<String>| {
                    v.sort();
                    v
                };
                assert_eq!(sorted(gained(stable, s0)), sorted(to_stable.clone()));
                assert_eq!(sorted(gained(unstable, u0)), sorted(to_unstable.clone()));
            }
            last = Some((stable.clone(), unstable.clone()));
        }
        let (stable, unstable) = last.unwrap();
        let p: Partition = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("partition.json")).unwrap(),
        )
        .unwrap();
        assert_eq!((&p.stable, &p.unstable), (&stable, &unstable), "{method}");
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(s["partition"]["stable"], serde_json::json!(stable));
        assert_eq!(s["partition"]["unstable"], serde_json::json!(unstable));
        eprintln!("{method}: {} layers moved", moves(dir.path()));
    }
}

/// `stage1.repartition_every` is refused, naming the key and why, where a re-partition
/// has no meaning: methods without LDT's two sets, sets fixed by a partition file or by
/// name, a batch schedule in place of the seeded D2, and ldt-s periods that are not
/// whole cycles of phases. Whole cycles are accepted.
#[test]
fn repartition_every_is_refused_where_it_has_no_meaning() {
    let refused: [(&[&str], &str); 8] = [
        (&["train.method=\"erm\""], "\"erm\""),
        (&["train.method=\"lp-ft\""], "\"lp-ft\""),
        (&["train.method=\"deft\""], "\"deft\""),
        (
            &["train.method=\"ldt\"", "stage1.partition=\"p.json\""],
            "stage1.partition",
        ),
        (
            &["train.method=\"ldt\"", "stage1.criterion=\"names\""],
            "names",
        ),
        (
            &["train.method=\"ldt\"", "data.schedule=\"s.safetensors\""],
            "data.schedule",
        ),
        (&["train.method=\"ldt-s\""], "(2 + 2)"),
        (
            &[
                "train.method=\"ldt-s\"",
                "ldt_s.repeat_batch=true",
                "ldt_s.p_steps=4",
                "ldt_s.a_steps=4",
            ],
            "`ldt_s.p_steps` (4) with `ldt_s.repeat_batch`",
        ),
    ];
    for (sets, why) in refused {
        let mut ov: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        ov.push("stage1.repartition_every=6".into());
        let e = format!("{:#}", Config::from_toml(BASE, "t", &ov).unwrap_err());
        assert!(
            e.contains("stage1.repartition_every") && e.contains(why),
            "{sets:?}: {e}"
        );
    }
    for sets in [
        &["train.method=\"ldt-s\"", "stage1.repartition_every=8"][..],
        &[
            "train.method=\"ldt-s\"",
            "ldt_s.repeat_batch=true",
            "stage1.repartition_every=6",
        ],
        &["train.method=\"ldt\"", "stage1.repartition_every=5"],
        &["train.method=\"erm\"", "stage1.repartition_every=0"],
    ] {
        let ov: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml(BASE, "t", &ov).unwrap_or_else(|e| panic!("{sets:?}: {e:#}"));
    }
}
