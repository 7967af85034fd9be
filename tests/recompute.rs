//! Block-wise recompute (`train.recompute = "blocks"`) computes the bits of one backward
//! through the whole graph.
//!
//! - Blocks: every backbone's blocks are contiguous ranges that cover its parameters and
//!   buffers once, in order.
//! - Segments: each block's segments cover its parameters and buffers once, in order
//!   (resnet: one per convolution unit and one per projection shortcut; ViT: the
//!   attention and the MLP half of each transformer block; edsr: one per residual block
//!   of the body and one for its end — `tests/edsr.rs` checks their gradients, which
//!   need the L1 loss; swinir: the attention and the MLP half of each Swin block, each
//!   group's convolution, the patch norm and the body's end — `tests/swinir.rs`).
//! - Gradients: on mlp, cnn_bn, resnet18 and vit, for every layer set a method trains
//!   (all; the first half; every third layer, scattered like LDT's unstable set; the head
//!   only), and on resnet50 (Bottleneck units) for every third layer and for the layers
//!   from a block's last unit up (a walk that starts mid-block), whole batches and 3 micro-batches, f32 and bf16 (f32 weights cast in the
//!   forward, and bf16 working weights with host masters), each block's gradients kept
//!   on the device, released to host memory, or handed to the block's update (each layer
//!   once, one call per block with a trained layer, none returned): the loss, the
//!   correct count, every gradient and the BatchNorm running statistics after the step
//!   are identical bit for bit to `recompute = "none"`.
//! - Streamed weights (`offload.params = "stream"`): the same gradients, losses and
//!   statistics from a state whose working copies are fetched block by block from its
//!   host masters (f32 against the resident f32 weights, bf16 against the resident bf16
//!   working copies), for every case above.
//! - Whole runs: erm, the dual branch (resident and swap) and LDT-S on cnn_bn, with
//!   stage 1, DPU folds, evaluation and bf16 / accumulate 3 cases, export byte-identical
//!   files: with the device optimizer updating block by block (and, with clipping,
//!   after the backward), with the host optimizer releasing gradients block by block;
//!   with streamed weights too — every layer with the host optimizer, the frozen set
//!   with the device optimizer (LDT-S bf16 / accumulate 3, the dual branch resident and
//!   swapped, lp-ft) — and a device budget below the weights' bytes choosing them. (`tests/heap.rs` measures the memory recompute and streaming save.)

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use ldt::config::{ModelConfig, Precision, Recompute};
use ldt::model::{self, Mode, NetState, Network};
use ldt::optim::Grad;
use ldt::rng::Rng;
use ldt::train::step::{Batch, GradPlan};

fn build(arch: &str) -> Box<dyn Network> {
    let cfg = ModelConfig {
        arch: arch.into(),
        patch: 7,
        width: 32,
        depth: 2,
        heads: 2,
        scale: Some(4),
        num_feat: 8,
        num_block: 3,
        ..ModelConfig::default()
    };
    let input = if arch == "edsr" || arch == "swinir" {
        [3, 8, 8]
    } else {
        [1, 28, 28]
    };
    model::build(&cfg, input, 10).unwrap()
}

#[test]
fn blocks_cover_every_parameter_and_buffer_once() {
    for (arch, count) in [
        ("mlp", 3),
        ("cnn", 4),
        ("cnn_bn", 4),
        ("resnet18", 10),
        ("resnet50", 18),
        ("vit", 4),
        ("edsr", 5),
        ("swinir", 3),
    ] {
        let net = build(arch);
        let blocks = net.blocks();
        assert_eq!(blocks.len(), count, "{arch}: blocks {blocks:?}");
        let (mut p, mut b) = (0, 0);
        for blk in blocks {
            assert_eq!(blk.params.start, p, "{arch}: parameter ranges in order");
            assert_eq!(blk.buffers.start, b, "{arch}: buffer ranges in order");
            assert!(!blk.params.is_empty(), "{arch}: a block without parameters");
            (p, b) = (blk.params.end, blk.buffers.end);
        }
        // A block's segments cover its parameters and buffers once, in order; resnet's
        // residual blocks have one per convolution unit.
        let mut units = 0;
        for (k, blk) in blocks.iter().enumerate() {
            let (mut p, mut b) = (0, 0);
            let segments = net.segments(k);
            for s in &segments {
                assert_eq!(
                    (s.params.start, s.buffers.start),
                    (p, b),
                    "{arch}: block {k}"
                );
                (p, b) = (s.params.end, s.buffers.end);
            }
            assert_eq!(p, blk.params.len(), "{arch}: block {k}'s parameters");
            assert_eq!(b, blk.buffers.len(), "{arch}: block {k}'s buffers");
            units += segments.len();
        }
        let expected = match arch {
            // stem, head, 8 BasicBlocks of 2 units, 3 of them with a shortcut unit
            "resnet18" => 2 + 8 * 2 + 3,
            // stem, head, 16 Bottlenecks of 3 units, 4 of them with a shortcut unit
            "resnet50" => 2 + 16 * 3 + 4,
            // embedding, head, 2 transformer blocks of an attention and an MLP half
            "vit" => 2 + 2 * 2,
            // conv_first, two upsampling stages, conv_last; the body: 3 residual blocks
            // and conv_after_body with the global skip
            "edsr" => 4 + 3 + 1,
            // conv_first, upsample; the body: patch_embed.norm, 24 Swin blocks of an
            // attention and an MLP half, 4 group convolutions, the end with the skip
            "swinir" => 2 + 1 + 24 * 2 + 4 + 1,
            _ => count,
        };
        assert_eq!(units, expected, "{arch}: segments");
        assert_eq!(p, net.params().len(), "{arch}: every parameter");
        assert_eq!(b, net.buffers().len(), "{arch}: every buffer");
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// A step's loss, correct count, gradient bits (per layer) and buffer bits afterwards.
type Outcome = (f32, usize, Vec<Option<Vec<u64>>>, Vec<Vec<u64>>);

/// Where a step's final gradients go.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keep {
    /// Kept on the device and returned.
    Device,
    /// Released to host memory block by block ([`GradPlan::release`]).
    Release,
    /// Handed to an update block by block ([`GradPlan::update_by_block`]).
    Update,
}

/// Where a step's weights live.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Weights {
    /// f32 on the device.
    Resident,
    /// bf16 working copies on the device, f32 masters on the host.
    Masters,
    /// f32 masters on the host, working copies (of the plan's precision) fetched.
    Streamed,
}

/// One step's gradients of `trainable` with `plan`, from a fresh state (seeded), and
/// the buffers after it.
fn step(net: &dyn Network, trainable: &[bool], plan: GradPlan, weights: Weights) -> Outcome {
    let mut rng = Rng::new(3, 1);
    let mut state = NetState::init(net, &mut rng, &Device::Cpu).unwrap();
    state = match weights {
        Weights::Resident => state,
        Weights::Masters => state.with_host_masters().unwrap(),
        Weights::Streamed => {
            let dtype = match plan.precision {
                Precision::F32 => DType::F32,
                Precision::Bf16 => DType::BF16,
            };
            let s = state.streamed(dtype, &Device::Cpu).unwrap();
            assert!(s.params.is_empty(), "no resident working copy");
            s
        }
    };
    let n = 12;
    let x: Vec<f32> = (0..n * 784).map(|_| rng.next_f64() as f32).collect();
    let x = Tensor::from_vec(x, (n, 1, 28, 28), &Device::Cpu).unwrap();
    let y: Vec<i64> = (0..n).map(|_| rng.below(10) as i64).collect();
    let y = Tensor::from_vec(y, n, &Device::Cpu).unwrap();
    let batch = Batch::whole(x, y).unwrap();
    // With the block-wise update, the gradients handed to it (each once), and how many
    // times it was called.
    let mut handed: Vec<Option<Grad>> = vec![None; trainable.len()];
    let mut calls = 0;
    let mut update = |_: &mut NetState, finals: &[Option<Grad>]| -> anyhow::Result<()> {
        calls += 1;
        for (i, g) in finals.iter().enumerate() {
            if let Some(g) = g {
                assert!(handed[i].is_none(), "layer {i} handed to its update twice");
                handed[i] = Some(g.clone());
            }
        }
        Ok(())
    };
    let (s, g) = ldt::train::step::gradients_updating(
        net,
        &mut state,
        trainable,
        &batch,
        Mode::Train,
        plan,
        Some(&mut update),
    )
    .unwrap();
    let g = match plan.update_by_block {
        true => {
            assert!(g.iter().all(Option::is_none), "updated gradients returned");
            let blocks = net
                .blocks()
                .iter()
                .filter(|b| trainable[b.params.clone()].iter().any(|&t| t))
                .count();
            assert_eq!(calls, blocks, "one update per block with a trained layer");
            handed
        }
        false => {
            assert_eq!(calls, 0, "an update without update_by_block");
            g
        }
    };
    // Every gradient as the f32 values the optimizer reads (a bf16 one widened).
    let grads = g
        .iter()
        .map(|g| {
            g.as_ref().map(|g| {
                let v = match g {
                    Grad::Device(t) => ldt::optim::host::grad_values(t).unwrap().to_vec(),
                    Grad::Host(v) => v.to_vec(),
                };
                v.iter().map(|x| x.to_bits() as u64).collect()
            })
        })
        .collect();
    let buffers = state.buffers.iter().map(bits).collect();
    (s.loss, s.correct, grads, buffers)
}

#[test]
fn recomputed_gradients_are_the_whole_graphs_bits() {
    for arch in ["mlp", "cnn_bn", "resnet18", "resnet50", "vit"] {
        let net = build(arch);
        let n = net.params().len();
        let mut masks: Vec<(&str, Vec<bool>)> = vec![
            ("every third", (0..n).map(|i| i % 3 == 1).collect()),
            ("all", vec![true; n]),
            ("first half", (0..n).map(|i| i < n / 2).collect()),
            ("head", (0..n).map(|i| net.is_head(i)).collect()),
        ];
        if arch == "resnet50" {
            // Its segments are resnet18's kinds; two sets keep the test short: the
            // scattered one, and one whose lowest trained layer is a block's last unit
            // (the segments below it are not recomputed, its inputs not tracked).
            let unit = net
                .params()
                .iter()
                .position(|p| p.name == "layer2.1.conv3.weight")
                .unwrap();
            masks.truncate(1);
            masks.push((
                "from layer2.1.conv3 up",
                (0..n).map(|i| i >= unit).collect(),
            ));
        }
        for (what, mask) in &masks {
            for accumulate in [1, 3] {
                for (precision, masters) in [
                    (Precision::F32, Weights::Resident),
                    (Precision::Bf16, Weights::Resident),
                    (Precision::Bf16, Weights::Masters),
                ] {
                    let plan = |recompute, keep| GradPlan {
                        accumulate,
                        loss: ldt::task::Loss::CrossEntropy,
                        precision,
                        recompute,
                        release: keep == Keep::Release,
                        update_by_block: keep == Keep::Update,
                    };
                    let case = format!(
                        "{arch}, {what}, accumulate {accumulate}, {precision:?} {masters:?}"
                    );
                    let whole = step(
                        net.as_ref(),
                        mask,
                        plan(Recompute::None, Keep::Device),
                        masters,
                    );
                    // Recomputed, with each block's gradients kept on the device,
                    // released to host memory as soon as they are final (micro-batch
                    // sums there too), or handed to the block's update (resident device
                    // weights: the device optimizer); and with the working copies
                    // streamed from the masters (f32 weights, or the bf16 working copies
                    // of the masters).
                    let mut variants = vec![(Keep::Device, masters), (Keep::Release, masters)];
                    if masters == Weights::Resident {
                        variants.push((Keep::Update, masters));
                    }
                    if masters != Weights::Resident || precision == Precision::F32 {
                        variants.extend([
                            (Keep::Device, Weights::Streamed),
                            (Keep::Release, Weights::Streamed),
                        ]);
                    }
                    for (keep, weights) in variants {
                        let case = format!("{case}, {keep:?}, blocks {weights:?}");
                        let blocks =
                            step(net.as_ref(), mask, plan(Recompute::Blocks, keep), weights);
                        assert_eq!(whole.0.to_bits(), blocks.0.to_bits(), "{case}: loss");
                        assert_eq!(whole.1, blocks.1, "{case}: correct");
                        for (i, (a, b)) in whole.2.iter().zip(&blocks.2).enumerate() {
                            let name = &net.params()[i].name;
                            assert_eq!(a.is_some(), mask[i], "{case}: `{name}` present");
                            assert!(a == b, "{case}: `{name}` gradient differs");
                        }
                        assert!(whole.3 == blocks.3, "{case}: running statistics differ");
                    }
                }
            }
            eprintln!("{arch}, {what}: recompute == whole graph");
        }
    }
}

const RUN: &str = r#"
seed = 4
threads = 2
[model]
arch = "cnn_bn"
[train]
steps = 12
batch_size = 16
log_every = 1000
[stage1]
warmup_steps = 2
stat_batches = 3
[ldt]
ema_every = 2
[ldt_s]
p_steps = 3
a_steps = 2
[eval]
every = 6
batch_size = 512
"#;

fn exported(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    v.sort();
    v
}

#[test]
fn recomputed_runs_export_the_same_bytes() {
    let cases: [(&str, &[&str]); 17] = [
        ("erm", &["train.method=\"erm\""]),
        ("ldt resident", &["train.method=\"ldt\""]),
        (
            "ldt swap",
            &["train.method=\"ldt\"", "ldt.placement=\"swap\""],
        ),
        // The device optimizer updates each block as its backward ends (at the last
        // micro-batch when accumulating); clipping needs every gradient first.
        ("ldt-s", &["train.method=\"ldt-s\""]),
        (
            "ldt-s accumulate 3",
            &["train.method=\"ldt-s\"", "train.accumulate=3"],
        ),
        (
            "erm clip",
            &["train.method=\"erm\"", "train.clip_grad_norm=0.5"],
        ),
        (
            "ldt-s bf16 accumulate 3 host masters",
            &[
                "train.method=\"ldt-s\"",
                "train.precision=\"bf16\"",
                "train.accumulate=3",
                "offload.optimizer=\"host\"",
            ],
        ),
        // The host optimizer: each block's gradients go to the host as soon as they are
        // final; clipping and the non-finite check read them there.
        (
            "ldt-s host release",
            &["train.method=\"ldt-s\"", "offload.optimizer=\"host\""],
        ),
        (
            "erm host release bf16 clip",
            &[
                "train.method=\"erm\"",
                "offload.optimizer=\"host\"",
                "train.precision=\"bf16\"",
                "train.clip_grad_norm=0.5",
            ],
        ),
        // Streamed weights: every weight in host memory between uses.
        (
            "ldt-s stream",
            &[
                "train.method=\"ldt-s\"",
                "offload.optimizer=\"host\"",
                "offload.params=\"stream\"",
            ],
        ),
        (
            "ldt resident stream bf16 accumulate 3",
            &[
                "train.method=\"ldt\"",
                "offload.optimizer=\"host\"",
                "offload.params=\"stream\"",
                "train.precision=\"bf16\"",
                "train.accumulate=3",
            ],
        ),
        (
            "erm stream clip",
            &[
                "train.method=\"erm\"",
                "offload.optimizer=\"host\"",
                "offload.params=\"stream\"",
                "train.clip_grad_norm=0.5",
            ],
        ),
        // Streamed weights with the optimizer on the device: the trained set stays on
        // the device, the frozen set streams; the sets trade places at LDT-S phase
        // switches, between the dual branch's networks and at lp-ft's switch to full
        // fine-tuning, and DPU folds meet every pairing of device and host copies.
        (
            "ldt-s stream device",
            &["train.method=\"ldt-s\"", "offload.params=\"stream\""],
        ),
        (
            "ldt-s stream device bf16 accumulate 3",
            &[
                "train.method=\"ldt-s\"",
                "offload.params=\"stream\"",
                "train.precision=\"bf16\"",
                "train.accumulate=3",
            ],
        ),
        (
            "ldt resident stream device",
            &["train.method=\"ldt\"", "offload.params=\"stream\""],
        ),
        (
            "ldt swap stream device clip",
            &[
                "train.method=\"ldt\"",
                "ldt.placement=\"swap\"",
                "offload.params=\"stream\"",
                "train.clip_grad_norm=0.5",
            ],
        ),
        (
            "lp-ft stream device",
            &["train.method=\"lp-ft\"", "offload.params=\"stream\""],
        ),
    ];
    for (what, sets) in cases {
        let mut ov: Vec<&str> = sets.to_vec();
        let manifest = bundled_manifest();
        ov.push(&manifest);
        // The reference: resident weights, every activation kept.
        let reference: Vec<&str> = ov
            .iter()
            .filter(|o| !o.starts_with("offload.params"))
            .copied()
            .collect();
        let (a, _) = run(RUN, &reference);
        ov.push("train.recompute=\"blocks\"");
        let (b, _) = run(RUN, &ov);
        let files = exported(a.path());
        assert!(!files.is_empty(), "{what}: nothing exported");
        assert_eq!(files, exported(b.path()), "{what}: different files");
        for f in files {
            let (x, y) = (
                std::fs::read(a.path().join(&f)).unwrap(),
                std::fs::read(b.path().join(&f)).unwrap(),
            );
            assert!(x == y, "{what}: {f} differs");
        }
        eprintln!("{what}: recompute == none");
    }
}
