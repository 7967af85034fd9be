//! The counting allocator (`ldt::heap`) measures the process's heap: a known allocation
//! moves the live bytes and the peak by its size, and a run records its peaks by stage in
//! `summary.json` (`measured_memory`), with the counterpart buffer's host arena counted
//! apart. One test function, so no other test of this binary allocates meanwhile.

mod common;
use common::*;
use ldt::heap;

#[test]
fn the_heap_is_counted() {
    // A known allocation: 64 MiB, touched so it is really there.
    const N: usize = 64 << 20;
    let before = heap::live();
    heap::take_peak();
    let v = std::hint::black_box(vec![1u8; N]);
    let during = heap::live();
    assert!(
        during >= before + N as u64 && during < before + N as u64 + (4 << 20),
        "live {before} -> {during} for a {N}-byte allocation"
    );
    drop(v);
    let after = heap::live();
    assert!(
        after < during - (N as u64) + (4 << 20),
        "freed: {during} -> {after}"
    );
    assert!(heap::take_peak() >= before + N as u64, "the peak saw it");

    // A run's stages: the training window holds at least the computed plan (weights,
    // gradients, optimizer state: all heap tensors on a CPU); the host arena is exactly
    // the counterpart buffer's RAM tier.
    let toml = r#"
seed = 2
threads = 1
[model]
arch = "cnn"
[train]
method = "ldt-s"
steps = 6
batch_size = 16
[stage1]
stat_batches = 3
[eval]
every = 3
[ldt_s]
p_steps = 2
a_steps = 2
[checkpoint]
every = 3
"#;
    let (_dir, ctx) = run(toml, &[&bundled_manifest()]);
    let plan = ctx.summary.memory.expect("memory plan");
    let m = ctx
        .summary
        .measured_memory
        .clone()
        .expect("measured memory");
    eprintln!("plan {plan:?}\nmeasured {m:?}");
    for stage in ["setup", "stage1", "train", "eval", "checkpoint", "export"] {
        assert!(m.stages.contains_key(stage), "no `{stage}` peak: {m:?}");
    }
    assert!(
        m.stages["train"] >= plan.live_peak,
        "train peak {} below the plan's live peak {}",
        m.stages["train"],
        plan.live_peak
    );
    assert!(m.process_peak >= *m.stages.values().max().unwrap());
    assert_eq!(m.host_arena_peak, plan.counterparts_ram);

    plan_matches_the_measurement();
    recompute_keeps_a_block_of_activations();
    ldt_s_holds_no_more_than_erm_and_its_buffer();
    a_budget_too_small_stops_before_stage_1();
    auto_recompute_follows_the_budget();
    streamed_weights_leave_the_device();
    the_frozen_set_streams_with_the_device_optimizer();
    a_budget_below_the_weights_trains_the_same_bits();
}

/// A short run of `arch` / `method` on the bundled data; `extra` overrides.
fn short_run(
    arch: &str,
    method: &str,
    extra: &[&str],
) -> (tempfile::TempDir, ldt::train::RunContext) {
    let toml = format!(
        r#"
seed = 1
threads = 2
[model]
arch = "{arch}"
patch = 7
width = 64
depth = 2
heads = 2
[train]
method = "{method}"
steps = 6
batch_size = 8
[stage1]
stat_batches = 3
[ldt_s]
p_steps = 3
a_steps = 3
"#
    );
    let mut o = vec![bundled_manifest()];
    o.extend(extra.iter().map(|s| s.to_string()));
    let o: Vec<&str> = o.iter().map(|s| s.as_str()).collect();
    run(&toml, &o)
}

/// What the training stage holds on a CPU beyond the plan whatever the network: 172-192
/// KB measured in every row below (cnn, resnet18 and vit alike, at 1 and 2 threads, the
/// same before and after #17's fused ops), most likely the data loader's batches in
/// flight (every row trains on the same bundled data), which are host memory on a GPU.
/// Bound for the tiny networks, where it exceeds 10% of the peak.
const UNPLANNED_BYTES: u64 = 256 * 1024;

/// The plan (weights + gradients + optimizer state + staging + the probed activations)
/// equals the measured peak of the training stage within 10% on every backbone (or
/// within [`UNPLANNED_BYTES`] for a network that small), for a method that trains
/// everything and for LDT-S, in f32 and with bf16 working weights (host optimizer and
/// f32 masters: 2-byte weights and gradients on the device).
fn plan_matches_the_measurement() {
    const BF16_HOST: &[&str] = &["train.precision=\"bf16\"", "offload.optimizer=\"host\""];
    for arch in ["cnn", "resnet18", "vit"] {
        for (method, extra) in [
            ("erm", &[][..]),
            ("ldt-s", &[][..]),
            ("erm", BF16_HOST),
            ("ldt-s", BF16_HOST),
        ] {
            let (_d, ctx) = short_run(arch, method, extra);
            let method = format!("{method} {extra:?}");
            let plan = ctx.summary.memory.expect("plan");
            let m = ctx.summary.measured_memory.as_ref().unwrap();
            let train = m.device("train").unwrap();
            let rel = plan.device_peak as f64 / train as f64 - 1.0;
            eprintln!(
                "{arch} {method}: plan {} (activations {}) measured {train} ({:+.1}%)",
                plan.device_peak,
                plan.activations,
                100.0 * rel
            );
            assert!(
                plan.activations > 0,
                "{arch} {method}: no activations planned"
            );
            let off = plan.device_peak.abs_diff(train);
            assert!(
                rel.abs() <= 0.10 || off <= UNPLANNED_BYTES,
                "{arch} {method}: plan {} vs measured {train} ({:+.1}%, {off} bytes)",
                plan.device_peak,
                100.0 * rel
            );
        }
    }
}

/// `train.recompute = "blocks"` on resnet18 (erm, batch 32): the probed activations
/// fall below half, the measured training peak falls, and the plan still matches the
/// measurement within 10%; the gradients leave the device block by block — applied by
/// the device optimizer as each block's backward ends, or released to the host
/// optimizer — instead of all being held until the update (clipping needs them all).
fn recompute_keeps_a_block_of_activations() {
    let peak = |r: &str, optimizer: &str, clip: &str| {
        let (_d, ctx) = short_run(
            "resnet18",
            "erm",
            &[
                "train.batch_size=32",
                &format!("train.recompute=\"{r}\""),
                &format!("offload.optimizer=\"{optimizer}\""),
                &format!("train.clip_grad_norm={clip}"),
            ],
        );
        let plan = ctx.summary.memory.expect("plan");
        let train = ctx
            .summary
            .measured_memory
            .unwrap()
            .device("train")
            .unwrap();
        (plan, train)
    };
    let (p0, none) = peak("none", "device", "0");
    // A clip that never scales (the norm stays below it): the same updates, but every
    // gradient is held until the update.
    let (pk, kept) = peak("blocks", "device", "1e9");
    let (p1, blocks) = peak("blocks", "device", "0");
    let (p2, released) = peak("blocks", "host", "0");
    eprintln!(
        "resnet18 batch 32: activations {} -> {}, training peak {none} -> {kept} with every \
         gradient held (plan {}), {blocks} updated by block (plan {}), {released} with the \
         host optimizer (plan {})",
        p0.activations, pk.activations, pk.device_peak, p1.device_peak, p2.device_peak
    );
    // (Updated by block, a block's gradients are counted in its activations.)
    assert!(
        2 * pk.activations < p0.activations,
        "activations {} -> {}",
        p0.activations,
        pk.activations
    );
    assert!(kept < none, "training peak {none} -> {kept}");
    for (p, m) in [(pk, kept), (p1, blocks), (p2, released)] {
        let rel = p.device_peak as f64 / m as f64 - 1.0;
        assert!(
            rel.abs() <= 0.10,
            "recompute: plan {} vs measured {m}",
            p.device_peak
        );
    }
    // Updated by block, the device holds one block's gradients at a time instead of
    // all of them at the bottom of the backward; its own peak moves to the top block's
    // backward (that block's gradients, with candle's zeros-and-sum, next to the rest).
    // Measured 19.0 MB less (0.74 of the gradients outside the largest block, layer4.1's
    // 18.9 MB); asserted: at least half of those.
    let weights = p1.live_weights;
    let largest = 4 * 2 * 512 * 512 * 9;
    assert!(
        (kept as f64 - blocks as f64) >= 0.5 * (weights - largest) as f64,
        "update by block: {kept} -> {blocks} with {weights} bytes of weights"
    );
    // With the optimizer on the host its state (the default Adam's v, beta1 = 0: the
    // weights' size) is off the device too (measured: 1.0x the weights less).
    assert!(
        released as f64 + 0.8 * weights as f64 <= blocks as f64,
        "host optimizer: {blocks} -> {released} with {weights} bytes of weights"
    );
}

/// LDT-S on resnet18: its training and evaluation peaks stay within 10% of erm's (one
/// network at a time, parked layers swapped in to be looked at), and the process with
/// the counterpart buffer within erm's plus the buffer plus 10%.
fn ldt_s_holds_no_more_than_erm_and_its_buffer() {
    let peaks = |method: &str| {
        let (_d, ctx) = short_run("resnet18", method, &["eval.every=3"]);
        ctx.summary.measured_memory.clone().unwrap()
    };
    let (erm, s) = (peaks("erm"), peaks("ldt-s"));
    eprintln!("erm {erm:?}\nldt-s {s:?}");
    for stage in ["train", "eval"] {
        let (a, b) = (s.device(stage).unwrap(), erm.device(stage).unwrap());
        assert!(
            a as f64 <= 1.10 * b as f64,
            "{stage}: ldt-s {a} vs erm {b} (device share)"
        );
    }
    let process = |m: &ldt::metrics::MeasuredMemory| m.total_peak;
    assert!(
        process(&s) as f64 <= 1.10 * (process(&erm) + s.host_arena_peak) as f64,
        "process: ldt-s {} vs erm {} + buffer {}",
        process(&s),
        process(&erm),
        s.host_arena_peak
    );
}

/// `offload.device_bytes` below the plan stops the run before stage 1 (no statistics,
/// no partition), naming the budget and the consumers with what shrinks them.
fn a_budget_too_small_stops_before_stage_1() {
    let toml = r#"
[model]
arch = "cnn"
[train]
method = "ldt-s"
[offload]
device_bytes = 1000000
"#;
    let cfg = ldt::config::Config::from_toml(toml, "test", &[bundled_manifest()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = ldt::train::RunContext::open(cfg, dir.path()).unwrap();
    let err = format!("{:#}", ldt::train::run_method(&mut ctx).unwrap_err());
    for want in [
        "offload.device_bytes = 1000000",
        "activations",
        "train.batch_size",
        "optimizer state",
        "offload.optimizer",
    ] {
        assert!(err.contains(want), "`{want}` missing from: {err}");
    }
    assert!(!dir.path().join("partition.json").exists(), "stage 1 ran");
}

/// `train.recompute = "auto"`: `none` without a budget or when its plan fits; `blocks`
/// when only that fits (resnet18, erm, batch 32: about 195 MB measured keeping every
/// activation, 134 MB keeping block inputs), and the run then stays within the budget.
fn auto_recompute_follows_the_budget() {
    let chosen = |budget: &str| {
        let (_d, ctx) = short_run(
            "resnet18",
            "erm",
            &[
                "train.batch_size=32",
                "train.recompute=\"auto\"",
                &format!("offload.device_bytes={budget}"),
            ],
        );
        let train = ctx
            .summary
            .measured_memory
            .as_ref()
            .unwrap()
            .device("train");
        (ctx.cfg.train.recompute, train.unwrap())
    };
    use ldt::config::Recompute;
    assert_eq!(chosen("0").0, Recompute::None, "no budget");
    assert_eq!(chosen("400000000").0, Recompute::None, "a budget none fits");
    let (r, train) = chosen("170000000");
    assert_eq!(r, Recompute::Blocks, "a budget only blocks fits");
    assert!(
        train <= 170_000_000,
        "measured training peak {train} over the budget"
    );
}

/// `offload.params = "stream"` (resnet18, erm, batch 32, block-wise recompute, host
/// optimizer): the weights leave the device but for the blocks being fetched and run,
/// so the measured training peak falls by more than half the weight bytes, and the plan
/// (no resident weights; the fetched blocks are in the probed activations) matches the
/// measurement within 10%.
fn streamed_weights_leave_the_device() {
    let peak = |params: &str| {
        let (_d, ctx) = short_run(
            "resnet18",
            "erm",
            &[
                "train.batch_size=32",
                "train.recompute=\"blocks\"",
                "offload.optimizer=\"host\"",
                &format!("offload.params=\"{params}\""),
            ],
        );
        let plan = ctx.summary.memory.expect("plan");
        let m = ctx.summary.measured_memory.as_ref().unwrap();
        (plan, m.device("train").unwrap(), m.device("eval").unwrap())
    };
    let (p0, resident, eval0) = peak("resident");
    let (p1, streamed, eval1) = peak("stream");
    let weights = p0.live_weights;
    // What stays: in training the block running and the one being fetched (its
    // gradients are released either way); in evaluation one block.
    let net = build_net("resnet18");
    let bytes: Vec<u64> = net
        .blocks()
        .iter()
        .map(|b| {
            4 * net.params()[b.params.clone()]
                .iter()
                .map(|s| s.numel() as u64)
                .sum::<u64>()
        })
        .collect();
    let window = bytes.windows(2).map(|w| w[0] + w[1]).max().unwrap();
    let largest = *bytes.iter().max().unwrap();
    eprintln!(
        "resnet18 batch 32, host optimizer, recompute: training peak {resident} -> {streamed} \
         (plan {}), evaluation {eval0} -> {eval1}, with {weights} bytes of weights, \
         {window} in the largest two adjacent blocks, {largest} in the largest",
        p1.device_peak
    );
    assert_eq!(p1.live_weights, 0, "no resident weights planned");
    assert!(
        (resident - streamed) as f64 >= 0.8 * (weights - window) as f64,
        "streamed: {resident} -> {streamed} with {weights} bytes of weights, {window} fetched"
    );
    assert!(
        (eval0 - eval1) as f64 >= 0.8 * (weights - largest) as f64,
        "evaluation uploads a block at a time: {eval0} -> {eval1}"
    );
    let rel = p1.device_peak as f64 / streamed as f64 - 1.0;
    assert!(
        rel.abs() <= 0.10,
        "streamed: plan {} vs measured {streamed} ({:+.1}%)",
        p1.device_peak,
        100.0 * rel
    );
}

/// `offload.params = "stream"` with the optimizer on the device (resnet18, the dual
/// branch with both networks resident, batch 32, block-wise recompute): each network
/// keeps its trained set on the device, where the optimizer updates it, and streams its
/// frozen set, so the two networks hold one network's weights between them instead of
/// two: the measured training peak falls by at least 80% of one network's weights less
/// the fetch window, the plan keeps exactly one network's weights (the trained sets of
/// both) and matches the measurement within 10%. With `offload.params = "auto"` and a
/// budget between the two plans, the run streams and stays within it.
fn the_frozen_set_streams_with_the_device_optimizer() {
    let peak = |params: &str, budget: u64| {
        let (_d, ctx) = short_run(
            "resnet18",
            "ldt",
            &[
                "train.batch_size=32",
                "train.recompute=\"blocks\"",
                &format!("offload.params=\"{params}\""),
                &format!("offload.device_bytes={budget}"),
            ],
        );
        let plan = ctx.summary.memory.expect("plan");
        let m = ctx.summary.measured_memory.as_ref().unwrap();
        (plan, m.device("train").unwrap(), ctx.cfg.offload.params)
    };
    let (p0, resident, _) = peak("resident", 0);
    let (p1, streamed, _) = peak("stream", 0);
    let one = 4 * build_net("resnet18").numel() as u64;
    let net = build_net("resnet18");
    let bytes: Vec<u64> = net
        .blocks()
        .iter()
        .map(|b| {
            4 * net.params()[b.params.clone()]
                .iter()
                .map(|s| s.numel() as u64)
                .sum::<u64>()
        })
        .collect();
    let window = bytes.windows(2).map(|w| w[0] + w[1]).max().unwrap();
    eprintln!(
        "resnet18 batch 32, ldt resident, device optimizer, recompute: training peak \
         {resident} -> {streamed} (plan {} -> {}), {one} bytes of weights per network",
        p0.device_peak, p1.device_peak
    );
    assert_eq!(p0.live_weights, 2 * one, "two resident networks planned");
    assert_eq!(p1.live_weights, one, "the trained sets of both planned");
    assert!(
        (resident - streamed) as f64 >= 0.8 * (one - window) as f64,
        "frozen sets streamed: {resident} -> {streamed} with {one} bytes per network"
    );
    let rel = p1.device_peak as f64 / streamed as f64 - 1.0;
    assert!(
        rel.abs() <= 0.10,
        "frozen sets streamed: plan {} vs measured {streamed} ({:+.1}%)",
        p1.device_peak,
        100.0 * rel
    );
    let budget = (p0.device_peak + p1.device_peak) / 2;
    let (_, within, chosen) = peak("auto", budget);
    assert_eq!(
        chosen,
        ldt::config::ParamsPlacement::Stream,
        "auto under {budget}"
    );
    assert!(within <= budget, "auto: measured {within} over {budget}");
}

/// A device budget below the f32 weight bytes: a ViT of 8 blocks of width 256 (25 MB
/// of weights, a budget of 85% of them) and resnet50 (94 MB of weights, the issue's
/// 64 MiB budget; streamed by convolution unit). `auto` picks block-wise recompute and
/// streamed weights, the measured peaks of setup, stage 1, training and evaluation (in
/// batches lowered to fit) stay within the budget, and LDT-S exports the bytes of the
/// run without a budget (resident weights, every activation kept) and scores every
/// network the same.
fn a_budget_below_the_weights_trains_the_same_bits() {
    let vit = [
        "model.width=256",
        "model.depth=8",
        "model.heads=4",
        "offload.optimizer=\"host\"",
    ];
    let weights = {
        let (_d, ctx) = short_run("vit", "erm", &[&vit[..], &["train.steps=1"]].concat());
        4 * ctx.net.numel() as u64
    };
    trains_the_same_bits_within("vit", &vit, weights * 85 / 100);
    let resnet = ["offload.optimizer=\"host\"", "stage1.warmup_steps=2"];
    let weights = 4 * build_net("resnet50").numel() as u64;
    assert!(weights > 64 << 20, "resnet50's weights: {weights} bytes");
    trains_the_same_bits_within("resnet50", &resnet, 64 << 20);
}

/// LDT-S on `arch` with `sets` under `offload.device_bytes = budget` (below its weight
/// bytes) against the same run without a budget (see the caller).
fn trains_the_same_bits_within(arch: &str, sets: &[&str], budget: u64) {
    let (free, free_ctx) = short_run(arch, "ldt-s", sets);
    let limited = [
        "train.recompute=\"auto\"".to_string(),
        "offload.params=\"auto\"".to_string(),
        format!("offload.device_bytes={budget}"),
    ];
    let limited: Vec<&str> = sets
        .iter()
        .copied()
        .chain(limited.iter().map(|s| s.as_str()))
        .collect();
    let (d, ctx) = short_run(arch, "ldt-s", &limited);
    use ldt::config::{ParamsPlacement, Recompute};
    assert_eq!(ctx.cfg.train.recompute, Recompute::Blocks, "{arch}");
    assert_eq!(ctx.cfg.offload.params, ParamsPlacement::Stream, "{arch}");
    let m = ctx.summary.measured_memory.as_ref().unwrap();
    let weights = 4 * ctx.net.numel() as u64;
    // Evaluation too: its batch is lowered to fit (eval.batch_size = 256 needs several
    // times the budget here).
    for stage in ["setup", "stage1", "train", "eval"] {
        let peak = m.device(stage).unwrap();
        eprintln!("{arch}: {weights} bytes of weights, budget {budget}: {stage} peak {peak}");
        assert!(
            peak <= budget,
            "{arch}: measured {stage} peak {peak} over {budget}"
        );
    }
    for f in ["composite.safetensors", "pm.safetensors", "am.safetensors"] {
        let a = std::fs::read(free.path().join(f)).unwrap();
        let b = std::fs::read(d.path().join(f)).unwrap();
        assert!(a == b, "{arch}: {f} differs from the run without a budget");
    }
    // Scored in smaller batches, every network's accuracy on every domain is the same
    // here; the mean losses agree to f32 rounding (the matrix kernels block by batch
    // size, so a logit can differ in its last bits: measured 1.9e-9 relative).
    let (a, b) = (&free_ctx.summary.eval, &ctx.summary.eval);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, ra) in a {
        for (x, y) in ra.domains.iter().zip(&b[name].domains) {
            assert_eq!((x.acc, x.n), (y.acc, y.n), "{arch}: {name} on {}", x.name);
            assert!(
                (x.loss - y.loss).abs() <= 1e-6 * x.loss.abs(),
                "{arch}: {name} on {}: loss {} vs {}",
                x.name,
                x.loss,
                y.loss
            );
        }
    }
}

/// `arch` as `short_run` builds it (the bundled data: 1x28x28, 10 classes).
fn build_net(arch: &str) -> Box<dyn ldt::model::Network> {
    let cfg = ldt::config::ModelConfig {
        arch: arch.into(),
        ..Default::default()
    };
    ldt::model::build(&cfg, [1, 28, 28], 10).unwrap()
}
