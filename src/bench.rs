//! `ldt bench`: side-by-side step time and live memory of erm, ldt (resident and swap)
//! and ldt-s on the bundled data, for the small `cnn` and a >10M-parameter `mlp`; stage-1
//! peak RSS against the number of statistics batches; and the host EMA throughput against a plain memcpy of the same bytes. Ratios come from
//! runs made one after the other in the same process, on the same data.

use crate::config::{Config, Method, ParamsPlacement, Placement, Precision, Recompute};
use crate::offload::{fused_ema, EmaTask, HostSlice, HostSliceMut};
use crate::train::{run_method, RunContext};
use anyhow::Result;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

fn variant(base: &Config, method: Method, placement: Placement) -> Config {
    let mut c = base.clone();
    c.train.method = method;
    c.ldt.placement = placement;
    // A benchmark's run directories are its own scratch: a rerun replaces them.
    c.checkpoint.overwrite = true;
    c
}

/// Times of one ERM optimizer step on random data (milliseconds, mean over `iters` after
/// one warm-up): the whole step (forward, backward, Adam), the forward alone, and the
/// forward + backward.
#[derive(Clone, Copy, Debug)]
pub struct StepTimes {
    /// Parameters of the network.
    pub params: usize,
    /// Forward + backward + optimizer.
    pub step_ms: f64,
    /// Forward (train mode).
    pub forward_ms: f64,
    /// Forward + backward.
    pub forward_backward_ms: f64,
}

/// Measures [`StepTimes`] of `arch` (default model settings) at `batch` x `input` in
/// `precision` (bf16: the forward casts the weights and the input, as training does).
pub fn step_times(
    arch: &str,
    input: [usize; 3],
    batch: usize,
    iters: usize,
    precision: Precision,
) -> Result<StepTimes> {
    use crate::model::{build, Mode, NetState};
    use crate::optim::{OptimSettings, Optimizer};
    use crate::train::step::{apply, gradients, Batch, GradPlan};
    let plan = GradPlan {
        precision,
        ..GradPlan::F32
    };
    let dev = candle_core::Device::Cpu;
    let cfg = crate::config::ModelConfig {
        arch: arch.into(),
        ..Default::default()
    };
    let net = build(&cfg, input, 10)?;
    let mut rng = crate::rng::Rng::new(0, 0);
    let mut state = NetState::init(net.as_ref(), &mut rng, &dev)?;
    let n: usize = input.iter().product();
    let x = candle_core::Tensor::from_vec(
        rng.uniform_vec(batch * n, 0.0, 1.0),
        (batch, input[0], input[1], input[2]),
        &dev,
    )?;
    let y = candle_core::Tensor::from_vec(
        (0..batch as i64).map(|i| i % 10).collect::<Vec<i64>>(),
        batch,
        &dev,
    )?;
    let all = vec![true; net.params().len()];
    let mut opt = Optimizer::new(
        OptimSettings::from(&crate::config::OptimConfig::default()),
        all.len(),
    );
    let lrs = vec![1e-4; all.len()];
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
    };
    let dtype = match precision {
        Precision::F32 => candle_core::DType::F32,
        Precision::Bf16 => candle_core::DType::BF16,
    };
    let forward_ms = time(&mut || {
        let mut b = state.buffers.clone();
        let view = state
            .frozen_view()
            .iter()
            .map(|t| t.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        net.forward(&view, &mut b, &x.to_dtype(dtype)?, Mode::Train)?;
        Ok(())
    })?;
    let batch = Batch::whole(x.clone(), y.clone())?;
    let forward_backward_ms = time(&mut || {
        gradients(net.as_ref(), &mut state, &all, &batch, Mode::Train, plan)?;
        Ok(())
    })?;
    let step_ms = time(&mut || {
        let (_, g) = gradients(net.as_ref(), &mut state, &all, &batch, Mode::Train, plan)?;
        apply(&mut opt, &mut state, &g, &lrs)
    })?;
    Ok(StepTimes {
        params: net.numel(),
        step_ms,
        forward_ms,
        forward_backward_ms,
    })
}

/// Peak RSS of `ldt stats` on the bundled data with `n` statistics batches, measured
/// in a child process so that every count starts from a fresh process.
fn stage1_rss(dir: &Path, n: usize) -> Result<u64> {
    let cfg = dir.join("stage1-rss.toml");
    std::fs::write(
        &cfg,
        "[model]\narch = \"cnn\"\n[stage1]\nstat_batch_size = 4\n",
    )?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("stats")
        .arg(&cfg)
        .args(["--set", &format!("stage1.stat_batches={n}")])
        .arg("--out")
        .arg(dir.join(format!("stage1-rss-{n}")))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("peak RSS ")
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`ldt stats` printed no peak RSS: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Runs the benchmark in `dir` and returns the markdown tables.
pub fn run(dir: &Path, steps: usize, threads: usize) -> Result<String> {
    let mut out = String::new();
    std::fs::create_dir_all(dir)?;
    let mut base = Config {
        threads,
        ..Default::default()
    };
    base.optim.lr = 1e-3;
    base.stage1.stat_batches = 4;
    base.train.log_every = steps.max(1);
    let models: [(&str, Vec<usize>, usize); 2] = [
        ("cnn", vec![], steps),
        ("mlp", vec![4096, 2048], (steps / 5).max(10)),
    ];
    writeln!(
        out,
        "| model | params | method | ms/step | x erm | plan MiB | heap MiB, training | x erm | heap MiB, evaluation |\n|---|---|---|---|---|---|---|---|---|"
    )?;
    for (arch, hidden, n) in models {
        let mut b = base.clone();
        b.model.arch = arch.into();
        if !hidden.is_empty() {
            b.model.hidden = hidden;
        }
        b.train.steps = n;
        // LDT-S phases short enough that every run covers both.
        let phase = (n / 4).max(1);
        b.ldt_s.p_steps = phase;
        b.ldt_s.a_steps = phase;
        let ldt_s = format!("ldt-s {phase}/{phase}");
        let mut erm = (0.0, 0.0);
        for (label, m, p) in [
            ("erm", Method::Erm, Placement::Resident),
            ("ldt resident", Method::Ldt, Placement::Resident),
            ("ldt swap", Method::Ldt, Placement::Swap),
            (ldt_s.as_str(), Method::LdtS, Placement::Resident),
        ] {
            let cfg = variant(&b, m, p);
            let mut ctx = RunContext::open(
                cfg,
                &dir.join(format!("{arch}-{}", label.replace([' ', '/'], "-"))),
            )?;
            run_method(&mut ctx)?;
            let ms = ctx.summary.ms_per_step.unwrap_or(f64::NAN);
            let plan = ctx.summary.memory.map_or(f64::NAN, |m| m.live_peak as f64);
            let heap = ctx.stages.report();
            let stage = |k: &str| heap.stages.get(k).map_or(f64::NAN, |&b| b as f64);
            let (train, eval) = (stage("train"), stage("eval"));
            if m == Method::Erm {
                erm = (ms, train);
            }
            let mib = |b: f64| b / (1 << 20) as f64;
            writeln!(
                out,
                "| {arch} | {:.2}M | {label} | {ms:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} |",
                ctx.net.numel() as f64 / 1e6,
                ms / erm.0,
                mib(plan),
                mib(train),
                train / erm.1,
                mib(eval),
            )?;
        }
    }
    writeln!(out, "\n(ldt steps are a PM and an AM step on the same batch: compare ldt with 2x erm; ldt-s steps are one phase step each. plan: weights + gradients + optimizer state counted from the tensors held; heap: every allocation, measured by the counting allocator, peak over the stage; the counterpart buffer's host arena is counted apart)\n")?;
    writeln!(
        out,
        "| backbone, batch 32, 3x32x32 | precision | params | ms/step | ms forward | ms fwd+bwd |\n|---|---|---|---|---|---|"
    )?;
    for arch in ["resnet18", "vit"] {
        for (label, precision) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
            let t = step_times(arch, [3, 32, 32], 32, 3, precision)?;
            writeln!(
                out,
                "| {arch} | {label} | {:.2}M | {:.1} | {:.1} | {:.1} |",
                t.params as f64 / 1e6,
                t.step_ms,
                t.forward_ms,
                t.forward_backward_ms
            )?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "| stage 1 on cnn, statistics batches of 4 | peak RSS MiB | x 10 batches |\n|---|---|---|"
    )?;
    let mut first = None;
    for n in [10usize, 100, 1000] {
        let rss = stage1_rss(dir, n)?;
        let f = *first.get_or_insert(rss);
        writeln!(
            out,
            "| {n} | {:.1} | {:.2} |",
            rss as f64 / (1 << 20) as f64,
            rss as f64 / f as f64
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "| host EMA, f32 | GB/s (read+write) | memcpy GB/s | EMA / memcpy |\n|---|---|---|---|"
    )?;
    let n = 16 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.5f32; n];
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let bytes = (3 * 4 * n) as f64;
    let ema_t = best(&mut || {
        fused_ema(
            &mut [EmaTask {
                dst: HostSliceMut::F32(&mut dst),
                src: HostSlice::F32(&src),
                w: 0.99,
            }],
            threads.max(1),
        )
    });
    let copy_t = best(&mut || dst.copy_from_slice(&src));
    let copy_bytes = (2 * 4 * n) as f64;
    writeln!(
        out,
        "| {} MiB, {} threads | {:.1} | {:.1} | {:.2} |",
        (4 * n) >> 20,
        threads.max(1),
        bytes / ema_t / 1e9,
        copy_bytes / copy_t / 1e9,
        (bytes / ema_t) / (copy_bytes / copy_t)
    )?;
    Ok(out)
}

/// The model of backbone name `arch`: an architecture of `model.arch` with its defaults,
/// or a ViT preset: `vit-b16` (ViT-B/16: width 768, depth 12, 12 heads, patch 16),
/// `vit-tiny` and `vit-small` (DeiT-Tiny / -Small widths: 192 and 384, depth 12, 3 and
/// 6 heads; patch 4, for 32x32 inputs).
fn preset(m: &mut crate::config::ModelConfig, arch: &str) -> Result<()> {
    let vit = |m: &mut crate::config::ModelConfig, shape: (usize, usize, usize, usize)| {
        m.arch = "vit".into();
        (m.patch, m.width, m.depth, m.heads) = shape;
    };
    if arch == "vit-b16" {
        vit(m, (16, 768, 12, 12));
    } else if arch == "vit-tiny" {
        vit(m, (4, 192, 12, 3));
    } else if arch == "vit-small" {
        vit(m, (4, 384, 12, 6));
    } else if crate::config::ARCHS.contains(&arch) {
        m.arch = arch.into();
    } else {
        anyhow::bail!(
            "--archs: unknown backbone `{arch}`; known: {}, vit-tiny, vit-small, vit-b16",
            crate::config::ARCHS.join(", ")
        );
    }
    Ok(())
}

/// Writes a small benchmark of random images of `shape` (10 classes; two source
/// domains of 32 training and 8 test images, one target domain) under `dir` and
/// returns its manifest: memory and step time do not depend on the pixels.
fn synthetic_benchmark(dir: &Path, shape: [usize; 3]) -> Result<std::path::PathBuf> {
    use candle_core::{Device, Tensor};
    let [c, h, w] = shape;
    let d = dir.join(format!("synthetic-{c}x{h}x{w}"));
    std::fs::create_dir_all(&d)?;
    let mut rng = crate::rng::Rng::new(0, 0);
    let mut domains = Vec::new();
    for (name, role) in [("a", "source"), ("b", "source"), ("t", "target")] {
        let mut splits = serde_json::Map::new();
        for (split, n) in [("train", 32usize), ("test", 8)] {
            let pixels: Vec<u8> = (0..n * c * h * w)
                .map(|_| (rng.next_f64() * 256.0) as u8)
                .collect();
            let labels: Vec<i64> = (0..n as i64).map(|i| i % 10).collect();
            let file = format!("{name}_{split}.safetensors");
            let tensors = [
                (
                    "images",
                    Tensor::from_vec(pixels, (n, c, h, w), &Device::Cpu)?,
                ),
                ("labels", Tensor::from_vec(labels, n, &Device::Cpu)?),
            ];
            candle_core::safetensors::save(
                &tensors
                    .into_iter()
                    .map(|(k, t)| (k.to_string(), t))
                    .collect(),
                d.join(&file),
            )?;
            splits.insert(split.into(), serde_json::json!({ "file": file, "n": n }));
        }
        domains.push(serde_json::json!({ "name": name, "role": role, "splits": splits }));
    }
    let manifest = serde_json::json!({
        "format": "dg-benchmark/v1",
        "name": format!("random {c}x{h}x{w}"),
        "num_classes": 10,
        "image_shape": shape,
        "domains": domains,
    });
    let path = d.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)?;
    Ok(path)
}

/// What `ldt bench --memory` measures.
pub struct MemoryBench {
    /// Backbones (`model.arch` names, or `vit-b16`).
    pub archs: Vec<String>,
    /// Steps per run.
    pub steps: usize,
    /// Examples per batch.
    pub batch: usize,
    /// Random images of this shape instead of the bundled data.
    pub input: Option<[usize; 3]>,
    /// The optimizer.
    pub optim: crate::config::OptimConfig,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// CPU threads.
    pub threads: usize,
    /// Also erm and LDT-S in bf16 with the optimizer on the host (bf16 working weights,
    /// f32 masters on the host).
    pub bf16: bool,
    /// Also erm and LDT-S with the device optimizer (updating block by block) and
    /// LDT-S with the host optimizer (in bf16 too with `bf16`), with block-wise recompute.
    pub recompute: bool,
    /// Also erm and LDT-S (in bf16 too with `bf16`) with block-wise recompute, the
    /// optimizer on the host and streamed weights.
    pub stream: bool,
}

/// `ldt bench --memory`: for each backbone of `b.archs` (batch `b.batch`, `b.steps`
/// steps, LDT-S phases of a quarter of the run so both are measured, stage 1 warming up
/// the head), erm and LDT-S with the optimizer state on the device and on the host: the
/// planned and the measured device peak of training ([`MeasuredMemory::device`]), the
/// evaluation peak, the process peak (heap + host arenas: counterpart buffer, host
/// optimizer), and the step time, each as a ratio to erm with the device optimizer (in
/// f32), measured one run after the other in this process. With `b.bf16`, erm and LDT-S
/// in bf16 with the host optimizer follow; with `b.recompute`, rows with block-wise
/// recompute; with `b.stream`, rows with streamed weights (every weight with the host
/// optimizer; the frozen set with the device optimizer: LDT-S, and the dual branch with
/// its resident-weights row beside it).
///
/// [`MeasuredMemory::device`]: crate::metrics::MeasuredMemory::device
pub fn memory(dir: &Path, b: &MemoryBench) -> Result<String> {
    use crate::config::OptimizerPlacement;
    let (steps, batch, optim) = (b.steps, b.batch, &b.optim);
    let mut out = String::new();
    std::fs::create_dir_all(dir)?;
    let manifest = match b.input {
        Some(shape) => Some(synthetic_benchmark(dir, shape)?),
        None => None,
    };
    if let Some(m) = &manifest {
        writeln!(out, "data: {} (random images)", m.display())?;
    }
    writeln!(
        out,
        "optimizer: {:?}, betas {:?}, weight decay {}; batch {batch}, {steps} steps, device {}\n",
        optim.name, optim.betas, optim.weight_decay, b.device
    )?;
    writeln!(
        out,
        "| backbone | params | method | optimizer | plan MiB | device MiB, training | x erm | device MiB, evaluation | process MiB | x erm | ms/step | x erm |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    for arch in &b.archs {
        let mut base = Config {
            threads: b.threads,
            device: b.device.clone(),
            ..Default::default()
        };
        preset(&mut base.model, arch)?;
        if let Some(m) = &manifest {
            base.data.manifest = m.clone();
        }
        base.optim = optim.clone();
        base.stage1.stat_batches = 4;
        base.stage1.stat_batch_size = batch;
        base.train.steps = steps;
        base.train.batch_size = batch;
        base.train.log_every = steps.max(1);
        let phase = (steps / 4).max(1);
        base.ldt_s.p_steps = phase;
        base.ldt_s.a_steps = phase;
        let mut erm: Option<(u64, u64, f64)> = None;
        let (host, device) = (OptimizerPlacement::Host, OptimizerPlacement::Device);
        let (f32, bf16, none, blocks) = (
            Precision::F32,
            Precision::Bf16,
            Recompute::None,
            Recompute::Blocks,
        );
        let (resident, stream) = (ParamsPlacement::Resident, ParamsPlacement::Stream);
        let mut rows = vec![
            (Method::Erm, device, f32, none, resident),
            (Method::Erm, host, f32, none, resident),
            (Method::LdtS, device, f32, none, resident),
            (Method::LdtS, host, f32, none, resident),
        ];
        if b.bf16 {
            rows.push((Method::Erm, host, bf16, none, resident));
            rows.push((Method::LdtS, host, bf16, none, resident));
        }
        if b.recompute {
            rows.push((Method::Erm, device, f32, blocks, resident));
            rows.push((Method::LdtS, device, f32, blocks, resident));
            rows.push((Method::LdtS, host, f32, blocks, resident));
            if b.bf16 {
                rows.push((Method::LdtS, host, bf16, blocks, resident));
            }
        }
        if b.stream {
            rows.push((Method::Erm, host, f32, blocks, stream));
            rows.push((Method::LdtS, host, f32, blocks, stream));
            if b.bf16 {
                rows.push((Method::LdtS, host, bf16, blocks, stream));
            }
            // The optimizer on the device: the frozen set streams, the trained set stays
            // (LDT-S, and the dual branch with both networks resident, where each
            // network's frozen set is most of a network).
            rows.push((Method::LdtS, device, f32, blocks, stream));
            rows.push((Method::Ldt, device, f32, blocks, resident));
            rows.push((Method::Ldt, device, f32, blocks, stream));
        }
        for (method, placement, precision, recompute, params) in rows {
            let mut cfg = variant(&base, method, Placement::Resident);
            cfg.offload.optimizer = placement;
            cfg.train.precision = precision;
            cfg.train.recompute = recompute;
            cfg.offload.params = params;
            let label = format!(
                "{}-{}-{placement:?}-{precision:?}-{recompute:?}-{params:?}",
                arch,
                method.name()
            )
            .to_lowercase();
            let mut ctx = RunContext::open(cfg, &dir.join(label))?;
            run_method(&mut ctx)?;
            let heap = ctx.stages.report();
            let plan = ctx.summary.memory.map_or(0, |m| m.device_peak);
            let train = heap.device("train").unwrap_or(0);
            let eval = heap.device("eval").unwrap_or(0);
            let process = heap.total_peak;
            let ms = ctx.summary.ms_per_step.unwrap_or(f64::NAN);
            let e = *erm.get_or_insert((train, process, ms));
            let name = match method {
                Method::LdtS => format!("ldt-s {phase}/{phase}"),
                Method::Ldt => "ldt (dual, resident)".to_string(),
                m => m.name().to_string(),
            };
            let mut at = format!("{placement:?}").to_lowercase();
            if precision == bf16 {
                at += ", bf16";
            }
            if recompute == blocks {
                at += ", recompute";
            }
            if params == stream {
                at += ", stream";
            }
            writeln!(
                out,
                "| {arch} | {:.2}M | {name} | {at} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {ms:.1} | {:.2} |",
                ctx.net.numel() as f64 / 1e6,
                mib(plan),
                mib(train),
                train as f64 / e.0 as f64,
                mib(eval),
                mib(process),
                process as f64 / e.1 as f64,
                ms / e.2,
            )?;
        }
    }
    writeln!(
        out,
        "\n(device: on a CPU the heap's peak over the stage minus the host baseline (data, logs), what a GPU would hold; on a GPU the driver's used memory above the run's start, sampled after every step; plan: weights + gradients + device optimizer state + staging + the probed activations; process: peak of heap + host arenas (counterpart buffer, host optimizer state and master weights) together; x erm: against erm in f32 with the optimizer on the device; bf16: bf16 working weights and gradients on the device, f32 masters on the host; recompute: train.recompute = \"blocks\"; stream: offload.params = \"stream\", the weights in host memory, fetched a segment at a time: every weight with the host optimizer, the frozen set with the device optimizer)"
    )?;
    Ok(out)
}

/// What `ldt bench --step` measures: the training step of each backbone and method on
/// random images, for a comparison with another implementation of the same step
/// (`scripts/torch-compare.py`).
pub struct StepBench {
    /// Backbones (`model.arch` names, or the presets `vit-tiny`, `vit-small`, `vit-b16`).
    pub archs: Vec<String>,
    /// Methods (`erm`, `ldt`: the dual branch with both networks resident, `ldt-s`).
    pub methods: Vec<Method>,
    /// Input `[C, H, W]`.
    pub input: [usize; 3],
    /// Examples per batch (at most 64: the random benchmark's source examples).
    pub batch: usize,
    /// Training steps per run (LDT-S: phases of a quarter each).
    pub steps: usize,
    /// CPU threads.
    pub threads: usize,
    /// `f32` or `bf16`.
    pub precision: Precision,
}

/// One row of [`steps`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepRow {
    /// The backbone as asked.
    pub arch: String,
    /// `train.method`.
    pub method: String,
    /// `f32` or `bf16`.
    pub precision: String,
    /// CPU threads.
    pub threads: usize,
    /// Examples per step.
    pub batch: usize,
    /// Parameter elements.
    pub params: usize,
    /// Milliseconds per training step after the first (`summary.json`'s
    /// `warm_ms_per_step`; its `ms_per_step` for a one-step run): side-by-side
    /// comparisons time warm steps on both sides.
    pub ms_per_step: f64,
    /// The stable set's layers (LDT methods).
    pub stable: Vec<String>,
    /// LDT-S phase length in steps (both phases).
    pub phase_steps: usize,
    /// DPU exchanges every N steps.
    pub ema_every: usize,
}

/// `ldt bench --step`: one short training run per backbone and method on random images
/// of `b.input` (the authors' optimizer settings, no warm-up, two statistics batches),
/// each row its `ms_per_step` with what another implementation needs to repeat the step:
/// parameters, the stable set, the phase length and the exchange interval.
pub fn steps(dir: &Path, b: &StepBench) -> Result<Vec<StepRow>> {
    anyhow::ensure!(
        (1..=64).contains(&b.batch),
        "--batch {}: the random benchmark holds 64 source examples; use 1..=64",
        b.batch
    );
    std::fs::create_dir_all(dir)?;
    let manifest = synthetic_benchmark(dir, b.input)?;
    let phase = (b.steps / 4).max(1);
    let mut rows = Vec::new();
    for arch in &b.archs {
        for &method in &b.methods {
            let mut c = Config {
                threads: b.threads,
                ..Default::default()
            };
            preset(&mut c.model, arch)?;
            c.data.manifest = manifest.clone();
            c.stage1.warmup_steps = 0;
            c.stage1.stat_batches = 2;
            c.train.steps = b.steps;
            c.train.batch_size = b.batch;
            c.train.precision = b.precision;
            c.train.log_every = b.steps.max(1);
            (c.ldt_s.p_steps, c.ldt_s.a_steps) = (phase, phase);
            let c = variant(&c, method, Placement::Resident);
            let name = format!("{arch}-{}-{:?}-t{}", method.name(), b.precision, b.threads);
            let mut ctx = RunContext::open(c, &dir.join(name.to_lowercase()))?;
            run_method(&mut ctx)?;
            rows.push(StepRow {
                arch: arch.clone(),
                method: method.name().to_string(),
                precision: format!("{:?}", b.precision).to_lowercase(),
                threads: b.threads,
                batch: b.batch,
                params: ctx.net.numel(),
                ms_per_step: ctx
                    .summary
                    .warm_ms_per_step
                    .or(ctx.summary.ms_per_step)
                    .unwrap_or(f64::NAN),
                stable: ctx
                    .summary
                    .partition
                    .as_ref()
                    .map(|p| p.stable.clone())
                    .unwrap_or_default(),
                phase_steps: phase,
                ema_every: ctx.cfg.ldt.ema_every,
            });
        }
    }
    Ok(rows)
}
