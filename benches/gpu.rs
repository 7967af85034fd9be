//! GPU benchmark (feature `cuda`, GPU 0), run by `scripts/gpu-check.sh`; prints one table
//! last:
//! - every EMA kernel's bandwidth (bytes read + written: dst twice, src once) against a
//!   device-to-device copy (read + written) of the same size (goal: at least 0.9);
//! - host-device copies from pinned against pageable memory, each direction;
//! - step time and peak device memory (the pool's high-water mark: weights, gradients,
//!   optimizer state, activations, staging) of erm, ldt resident, ldt swap and ldt-s on
//!   resnet50 at batch 64 (goals: ldt-s at most 1.05x erm's time and at most erm's peak),
//!   and the share of the swap placement's copy time hidden behind compute.
//!
//! Times are medians over repeats, measured with CUDA events after a warm-up.

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{Device, Tensor};
use ldt::config::{Config, EmaPlacement, Method, Placement};
use ldt::offload::backend::Backend;
use ldt::offload::cuda::{self, Cuda};
use ldt::offload::launch::{pack, EmaLaunch, EmaSpan, CHUNK_ELEMS};
use ldt::offload::order::Queue;
use ldt::offload::stream::{DeviceApi, Loc, StreamBackend};
use ldt::offload::{OffloadConfig, SharedCounterpartBuffer, SlotSpec, StorageDtype};
use ldt::train::{run_method, RunContext};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

/// Median milliseconds of `f` on queue `q`, timed with events, after two warm-ups.
fn time_ms(dev: &Cuda, q: Queue, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    let s = dev.stream(q);
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let b = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        t.push(a.elapsed_ms(&b)? as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[reps / 2])
}

fn gbs(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / ms / 1e6
}

/// One line of the result table.
struct Row {
    what: String,
    value: String,
    reference: String,
    ratio: String,
    goal: String,
}

fn row(what: &str, value: String, reference: String, ratio: String, goal: &str) -> Row {
    Row {
        what: what.into(),
        value,
        reference,
        ratio,
        goal: goal.into(),
    }
}

/// Kernel bandwidth against the device copy.
fn kernels(dev: &Cuda, rows: &mut Vec<Row>) -> Result<()> {
    let n: usize = 1 << 28;
    let a = dev.alloc(4 * n)?;
    let b = dev.alloc(4 * n)?;
    let (pa, pb) = (dev.address(&a), dev.address(&b));
    // Random contents (never time on zeros), from the device's RNG.
    let rnd = Tensor::rand(-1f32, 1f32, n, dev.device())?;
    let (addr, _, _) = dev.tensor_address(&rnd)?;
    let e = dev.record(Queue::Compute)?;
    dev.wait(Queue::H2D, &e)?;
    dev.copy(Queue::H2D, Loc::Device(pa), Loc::Device(addr), 4 * n)?;
    dev.copy(Queue::H2D, Loc::Device(pb), Loc::Device(addr), 4 * n)?;
    let copy = time_ms(dev, Queue::H2D, 10, &mut || {
        dev.copy(Queue::H2D, Loc::Device(pb), Loc::Device(pa), 4 * n)
    })?;
    let copy_gbs = gbs(8 * n, copy);
    rows.push(row(
        "device copy, 1 GiB",
        format!("{copy_gbs:.0} GB/s"),
        "-".into(),
        "-".into(),
        "the ceiling",
    ));
    use StorageDtype::{BF16, F16, F32};
    for (dd, sd) in [
        (F32, F32),
        (BF16, BF16),
        (F16, F16),
        (BF16, F32),
        (F32, BF16),
    ] {
        let m = (4 * n) / dd.size_of().max(sd.size_of());
        let span = EmaSpan {
            dst: pa,
            dst_dtype: dd,
            src: pb,
            src_dtype: sd,
            len: m,
            w: 0.999,
        };
        let bytes = m * (2 * dd.size_of() + sd.size_of());
        let table = EmaLaunch::Table {
            entries: pack(&[span], CHUNK_ELEMS),
            mapped: false,
        };
        for (name, l) in [
            ("ldt_ema", EmaLaunch::Single(span)),
            ("ldt_ema_multi", table),
        ] {
            let ms = time_ms(dev, Queue::H2D, 10, &mut || dev.launch(Queue::H2D, &l))?;
            let g = gbs(bytes, ms);
            rows.push(row(
                &format!("{name} {dd:?} <- {sd:?}"),
                format!("{g:.0} GB/s"),
                format!("{copy_gbs:.0} GB/s"),
                format!("{:.2}", g / copy_gbs),
                ">= 0.90",
            ));
        }
    }
    Ok(())
}

/// Pinned against pageable copies, and the mapped kernel over the bus.
fn transfers(dev: &Cuda, rows: &mut Vec<Row>) -> Result<()> {
    let bytes: usize = 256 << 20;
    let d = dev.alloc(bytes)?;
    let pd = dev.address(&d);
    let pinned = dev.host_alloc(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut pageable = vec![1u8; bytes];
    // SAFETY: `pinned` holds `bytes` bytes.
    unsafe { std::ptr::write_bytes(pinned.ptr(), 1, bytes) };
    let pp = pinned.ptr();
    let pg = pageable.as_mut_ptr();
    let h2d_pin = time_ms(dev, Queue::H2D, 10, &mut || {
        dev.copy(Queue::H2D, Loc::Device(pd), Loc::Host(pp), bytes)
    })?;
    let h2d_page = time_ms(dev, Queue::H2D, 10, &mut || {
        dev.copy(Queue::H2D, Loc::Device(pd), Loc::Host(pg), bytes)
    })?;
    let d2h_pin = time_ms(dev, Queue::D2H, 10, &mut || {
        dev.copy(Queue::D2H, Loc::Host(pp), Loc::Device(pd), bytes)
    })?;
    let d2h_page = time_ms(dev, Queue::D2H, 10, &mut || {
        dev.copy(Queue::D2H, Loc::Host(pg), Loc::Device(pd), bytes)
    })?;
    for (what, pin, page) in [("H2D", h2d_pin, h2d_page), ("D2H", d2h_pin, d2h_page)] {
        rows.push(row(
            &format!("{what} pinned vs pageable, 256 MiB"),
            format!("{:.1} GB/s", gbs(bytes, pin)),
            format!("{:.1} GB/s", gbs(bytes, page)),
            format!("{:.2}", page / pin),
            "pinned faster",
        ));
    }
    // The mapped kernel: f32 counterpart in pinned host memory, source on the device.
    let n = bytes / 4;
    let span = EmaSpan {
        dst: dev.mapped(pp)?,
        dst_dtype: StorageDtype::F32,
        src: pd,
        src_dtype: StorageDtype::F32,
        len: n,
        w: 0.999,
    };
    let l = EmaLaunch::Table {
        entries: pack(&[span], CHUNK_ELEMS),
        mapped: true,
    };
    let ms = time_ms(dev, Queue::D2H, 5, &mut || dev.launch(Queue::D2H, &l))?;
    let bus = gbs(2 * bytes, ms);
    let pinned_both = gbs(2 * bytes, h2d_pin + d2h_pin);
    rows.push(row(
        "ldt_ema_mapped f32, 256 MiB over the bus",
        format!("{bus:.1} GB/s"),
        format!("{pinned_both:.1} GB/s"),
        format!("{:.2}", bus / pinned_both),
        "vs H2D+D2H copies",
    ));
    drop(pageable);
    Ok(())
}

/// Milliseconds to swap every layer of `net` through the backend, nothing else running.
fn swap_alone(device: &Device, arch: &str) -> Result<f64> {
    let cfg = ldt::config::ModelConfig {
        arch: arch.into(),
        ..Default::default()
    };
    let net = ldt::model::build(&cfg, [1, 28, 28], 10)?;
    let offload = OffloadConfig {
        host_budget_bytes: 1 << 36,
        file_path: None,
        staging_bytes: Config::default().offload.staging_bytes,
        threads: 2,
    };
    let b = StreamBackend::new(Cuda::new(device)?, &offload, EmaPlacement::Host)?;
    let specs: Vec<SlotSpec> = net
        .params()
        .iter()
        .map(|p| SlotSpec {
            name: p.name.clone(),
            numel: p.numel(),
            dtype: StorageDtype::F32,
        })
        .collect();
    let buf = Arc::new(SharedCounterpartBuffer::new(b.allocate(&specs, &offload)?));
    let live: Vec<Tensor> = specs
        .iter()
        .map(|s| Tensor::rand(-1f32, 1f32, s.numel, device))
        .collect::<candle_core::Result<_>>()?;
    let all = |b: &StreamBackend<Cuda>| -> Result<f64> {
        let t = Instant::now();
        for (k, t) in live.iter().enumerate() {
            b.swap(t, &buf, k)?;
        }
        for q in Queue::ALL {
            let e = b.device().record(q)?;
            b.device().synchronize(&e)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    all(&b)?;
    let mut t: Vec<f64> = (0..5).map(|_| all(&b)).collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[2])
}

/// Step time (ms) and peak device bytes of one training configuration.
fn train(
    device: &Device,
    label: &str,
    method: Method,
    placement: Placement,
    ema: EmaPlacement,
) -> Result<(f64, u64)> {
    let mut c = Config {
        device: "cuda:0".into(),
        ..Default::default()
    };
    c.model.arch = "resnet50".into();
    c.train.method = method;
    c.train.steps = 20;
    c.train.batch_size = 64;
    c.train.log_every = 20;
    c.optim.lr = 1e-3;
    c.stage1.warmup_steps = 0;
    c.stage1.stat_batches = 2;
    c.ldt.placement = placement;
    c.ldt_s.p_steps = 10;
    c.ldt_s.a_steps = 10;
    c.offload.ema = ema;
    let dir = std::env::temp_dir().join(format!("ldt-gpu-bench-{}", label.replace(' ', "-")));
    let _ = std::fs::remove_dir_all(&dir);
    cuda::reset_peak_memory(device)?;
    let mut ctx = RunContext::open(c, &dir)?;
    run_method(&mut ctx)?;
    let ms = ctx
        .summary
        .ms_per_step
        .context("no ms_per_step in the summary")?;
    Ok((ms, cuda::peak_memory(device)?))
}

fn main() -> Result<()> {
    let device = cuda::open(0)?;
    let dev = Cuda::new(&device)?;
    let mut rows = Vec::new();
    kernels(&dev, &mut rows)?;
    transfers(&dev, &mut rows)?;
    drop(dev);
    let runs = [
        ("erm", Method::Erm, Placement::Resident, EmaPlacement::Host),
        (
            "ldt resident",
            Method::Ldt,
            Placement::Resident,
            EmaPlacement::Host,
        ),
        (
            "ldt swap",
            Method::Ldt,
            Placement::Swap,
            EmaPlacement::Device,
        ),
        (
            "ldt-s host",
            Method::LdtS,
            Placement::Resident,
            EmaPlacement::Host,
        ),
        (
            "ldt-s device",
            Method::LdtS,
            Placement::Resident,
            EmaPlacement::Device,
        ),
        (
            "ldt-s mapped",
            Method::LdtS,
            Placement::Resident,
            EmaPlacement::Mapped,
        ),
    ];
    let mut results = Vec::new();
    for (label, m, p, e) in runs {
        let r = train(&device, label, m, p, e);
        if let Err(e) = &r {
            eprintln!("{label}: {e:#}");
        }
        results.push((label, r));
    }
    let erm = results[0].1.as_ref().ok().copied();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    for (label, r) in &results {
        match (r, erm) {
            (Ok((ms, peak)), Some((erm_ms, erm_peak))) => {
                let goal = if label.starts_with("ldt-s") {
                    " (goal <= 1.05 / <= 1.00)"
                } else {
                    ""
                };
                rows.push(row(
                    &format!("resnet50 b64 {label}: ms/step, peak MiB"),
                    format!("{ms:.1} ms, {:.0} MiB", mib(*peak)),
                    format!("erm {erm_ms:.1} ms, {:.0} MiB", mib(erm_peak)),
                    format!("{:.2} / {:.2}", ms / erm_ms, *peak as f64 / erm_peak as f64),
                    &format!("x erm{goal}"),
                ));
            }
            (Ok((ms, peak)), None) => rows.push(row(
                &format!("resnet50 b64 {label}"),
                format!("{ms:.1} ms, {:.0} MiB", mib(*peak)),
                "erm failed".into(),
                "-".into(),
                "-",
            )),
            (Err(e), _) => rows.push(row(
                &format!("resnet50 b64 {label}"),
                format!("failed: {}", format!("{e:#}").lines().next().unwrap_or("")),
                "-".into(),
                "-".into(),
                "-",
            )),
        }
    }
    let swap = swap_alone(&device, "resnet50");
    match (&swap, &results[1].1, &results[2].1) {
        (Ok(alone), Ok((resident, _)), Ok((swapped, _))) => {
            let exposed = (swapped - resident).max(0.0);
            rows.push(row(
                "swap placement: share of swap time hidden",
                format!("{:.0}%", 100.0 * (1.0 - exposed / alone).clamp(0.0, 1.0)),
                format!("swap alone {alone:.1} ms/step"),
                format!("exposed {exposed:.1} ms"),
                "higher is better",
            ));
        }
        _ => rows.push(row(
            "swap placement: share of swap time hidden",
            match &swap {
                Ok(alone) => format!("n/a (training failed; swap alone {alone:.1} ms)"),
                Err(e) => format!("n/a: {e:#}"),
            },
            "-".into(),
            "-".into(),
            "-",
        )),
    }
    let mut out =
        String::from("\n| measure | value | reference | ratio | goal |\n|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.what, r.value, r.reference, r.ratio, r.goal
        );
    }
    println!("{out}");
    Ok(())
}
