//! GPU checks (feature `cuda`, a CUDA GPU at index 0; without one every test says
//! SKIPPED): every EMA kernel against the host fold on random data of odd sizes, the
//! pinned counterpart buffer round trip and every backend call against the CPU backend,
//! and erm / ldt / ldt-s on the cnn for 20 steps on the GPU against the CPU.
//! `scripts/gpu-check.sh` runs them on a lent GPU machine.
//!
//! Tolerances: the folds are specified bit for bit, so f32 must be identical and bf16 /
//! f16 within one ulp of the host's rounding (the kernels are written to be identical;
//! the test prints how many elements are). Training on the GPU sums in another order
//! (cuBLAS), so 20 steps are compared by relative L2 distance of the exported weights.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use ldt::config::EmaPlacement;
use ldt::offload::backend::{Backend, CpuBackend};
use ldt::offload::cuda::{self, Cuda};
use ldt::offload::launch::{pack, EmaLaunch, EmaSpan, CHUNK_ELEMS};
use ldt::offload::order::Queue;
use ldt::offload::stream::{DeviceApi, Loc, StreamBackend};
use ldt::offload::{
    fused_ema, CounterpartBuffer, EmaTask, HostMemory, OffloadConfig, SharedCounterpartBuffer,
    SlotSpec, StorageDtype,
};
use std::sync::Arc;

const DTYPES: [StorageDtype; 3] = [StorageDtype::F32, StorageDtype::BF16, StorageDtype::F16];

/// GPU 0, or None (and SKIPPED) without one.
fn gpu() -> Option<Device> {
    match cuda::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA GPU: {e:#}");
            None
        }
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Mostly finite values over a wide range, with zeros, infinities, NaNs and f32
    /// subnormals mixed in.
    fn value(&mut self) -> f32 {
        let r = self.next();
        match r % 64 {
            0 => 0.0,
            1 => -0.0,
            2 => f32::INFINITY,
            3 => f32::NAN,
            4 => f32::from_bits((r >> 40) as u32 & 0x007F_FFFF),
            _ => {
                let m = 1.0 + (r >> 41) as f32 / (1u64 << 23) as f32;
                let e = (r >> 8) % 50;
                let s = if r & 0x100 == 0 { 1.0 } else { -1.0 };
                s * m * 2f32.powi(e as i32 - 25)
            }
        }
    }
}

/// Host bytes of `n` random elements in `dtype`.
fn random_bytes(dtype: StorageDtype, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size_of());
    for _ in 0..n {
        let v = rng.value();
        match dtype {
            StorageDtype::F32 => out.extend_from_slice(&v.to_ne_bytes()),
            StorageDtype::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_bits().to_ne_bytes()),
            StorageDtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_bits().to_ne_bytes()),
        }
    }
    out
}

/// The host fold's result bytes.
fn host_fold(dst: &[u8], dd: StorageDtype, src: &[u8], sd: StorageDtype, w: f64) -> Vec<u8> {
    let n = dst.len() / dd.size_of();
    let spec = |dtype| SlotSpec {
        name: "x".into(),
        numel: n,
        dtype,
    };
    let cfg = OffloadConfig {
        host_budget_bytes: 1 << 40,
        file_path: None,
        staging_bytes: 1 << 20,
        threads: 2,
    };
    let mut b = CounterpartBuffer::allocate(&[spec(dd), spec(sd)], &cfg).unwrap();
    b.write_bytes(0, dst).unwrap();
    b.write_bytes(1, src).unwrap();
    {
        let mut v = b.slots_mut(&[0, 1]).unwrap();
        let s = v.pop().unwrap();
        let d = v.pop().unwrap();
        fused_ema(
            &mut [EmaTask {
                dst: d,
                src: s.as_slice(),
                w,
            }],
            2,
        );
    }
    let mut out = vec![0u8; dst.len()];
    b.read_bytes(0, &mut out).unwrap();
    out
}

/// Compares result bytes: f32 must be identical; bf16 / f16 within one ulp (NaN where
/// the host has NaN). Returns (identical elements, elements).
fn compare(got: &[u8], want: &[u8], dtype: StorageDtype, what: &str) -> (usize, usize) {
    let n = want.len() / dtype.size_of();
    if dtype == StorageDtype::F32 {
        assert!(got == want, "{what}: f32 results differ from the host fold");
        return (n, n);
    }
    let half = |b: &[u8], i: usize| u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]);
    let is_nan = |h: u16| match dtype {
        StorageDtype::BF16 => bf16::from_bits(h).is_nan(),
        _ => f16::from_bits(h).is_nan(),
    };
    let mut same = 0;
    for i in 0..n {
        let (g, w) = (half(got, i), half(want, i));
        if g == w {
            same += 1;
            continue;
        }
        if is_nan(w) {
            assert!(
                is_nan(g),
                "{what}: element {i}: {g:#06x}, host NaN {w:#06x}"
            );
            continue;
        }
        // Same sign and adjacent magnitudes: one ulp apart.
        let (gm, wm) = (g & 0x7FFF, w & 0x7FFF);
        assert!(
            g & 0x8000 == w & 0x8000 && gm.abs_diff(wm) <= 1,
            "{what}: element {i}: {g:#06x} vs host {w:#06x}"
        );
    }
    (same, n)
}

/// Uploads host bytes to new device memory.
fn upload(dev: &Cuda, pinned: &dyn HostMemory, bytes: &[u8]) -> <Cuda as DeviceApi>::Memory {
    let m = dev.alloc(bytes.len().max(1)).unwrap();
    // SAFETY: `pinned` holds at least `bytes.len()` bytes; the copy is waited for below.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), pinned.ptr(), bytes.len()) };
    dev.copy(
        Queue::H2D,
        Loc::Device(dev.address(&m)),
        Loc::Host(pinned.ptr()),
        bytes.len(),
    )
    .unwrap();
    let e = dev.record(Queue::H2D).unwrap();
    dev.synchronize(&e).unwrap();
    m
}

/// Downloads device bytes.
fn download(dev: &Cuda, pinned: &dyn HostMemory, addr: u64, len: usize) -> Vec<u8> {
    dev.copy(Queue::D2H, Loc::Host(pinned.ptr()), Loc::Device(addr), len)
        .unwrap();
    let e = dev.record(Queue::D2H).unwrap();
    dev.synchronize(&e).unwrap();
    // SAFETY: the copy above filled `len` bytes of `pinned` and completed.
    unsafe { std::slice::from_raw_parts(pinned.ptr(), len) }.to_vec()
}

/// Every kernel (one tensor, a table of several tensors, a table with the destination or
/// the source in mapped pinned memory), every dtype pair, odd sizes, against the host.
#[test]
fn ema_kernels_match_the_host_fold() {
    let Some(device) = gpu() else { return };
    let dev = Cuda::new(&device).unwrap();
    let sizes = [1usize, 7, 255, 4097, 1_000_003];
    let total: usize = sizes.iter().sum::<usize>() * 4;
    let stage = dev.host_alloc(total).unwrap();
    let mut rng = Rng(0x5EED);
    let mut report = Vec::new();
    for dd in DTYPES {
        for sd in DTYPES {
            let w = 0.99 + rng.next() as f64 / u64::MAX as f64 * 0.009;
            let dsts: Vec<Vec<u8>> = sizes
                .iter()
                .map(|&n| random_bytes(dd, n, &mut rng))
                .collect();
            let srcs: Vec<Vec<u8>> = sizes
                .iter()
                .map(|&n| random_bytes(sd, n, &mut rng))
                .collect();
            let want: Vec<Vec<u8>> = dsts
                .iter()
                .zip(&srcs)
                .map(|(d, s)| host_fold(d, dd, s, sd, w))
                .collect();
            for kernel in ["single", "multi", "mapped-dst", "mapped-src"] {
                let mut same = (0, 0);
                // Device copies of every tensor (and pinned ones for the mapped sides).
                let mapped_dst: Vec<Box<dyn HostMemory>> = dsts
                    .iter()
                    .map(|d| {
                        let m = dev.host_alloc(d.len().max(1)).unwrap();
                        // SAFETY: `m` holds `d.len()` bytes, nothing else uses it yet.
                        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), m.ptr(), d.len()) };
                        m
                    })
                    .collect();
                let mapped_src: Vec<Box<dyn HostMemory>> = srcs
                    .iter()
                    .map(|s| {
                        let m = dev.host_alloc(s.len().max(1)).unwrap();
                        // SAFETY: as above.
                        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), m.ptr(), s.len()) };
                        m
                    })
                    .collect();
                let dmem: Vec<_> = dsts
                    .iter()
                    .map(|d| upload(&dev, stage.as_ref(), d))
                    .collect();
                let smem: Vec<_> = srcs
                    .iter()
                    .map(|s| upload(&dev, stage.as_ref(), s))
                    .collect();
                let spans: Vec<EmaSpan> = (0..sizes.len())
                    .map(|k| EmaSpan {
                        dst: if kernel == "mapped-dst" {
                            dev.mapped(mapped_dst[k].ptr()).unwrap()
                        } else {
                            dev.address(&dmem[k])
                        },
                        dst_dtype: dd,
                        src: if kernel == "mapped-src" {
                            dev.mapped(mapped_src[k].ptr()).unwrap()
                        } else {
                            dev.address(&smem[k])
                        },
                        src_dtype: sd,
                        len: sizes[k],
                        w,
                    })
                    .collect();
                match kernel {
                    "single" => {
                        for sp in &spans {
                            dev.launch(Queue::H2D, &EmaLaunch::Single(*sp)).unwrap();
                        }
                    }
                    _ => dev
                        .launch(
                            Queue::H2D,
                            &EmaLaunch::Table {
                                entries: pack(&spans, CHUNK_ELEMS),
                                mapped: kernel != "multi",
                            },
                        )
                        .unwrap(),
                }
                let e = dev.record(Queue::H2D).unwrap();
                dev.synchronize(&e).unwrap();
                for k in 0..sizes.len() {
                    let got = if kernel == "mapped-dst" {
                        // SAFETY: the kernel wrote these bytes and completed.
                        unsafe { std::slice::from_raw_parts(mapped_dst[k].ptr(), dsts[k].len()) }
                            .to_vec()
                    } else {
                        download(&dev, stage.as_ref(), dev.address(&dmem[k]), dsts[k].len())
                    };
                    let what = format!("{kernel} {dd:?} <- {sd:?}, n = {}", sizes[k]);
                    let (s, n) = compare(&got, &want[k], dd, &what);
                    same = (same.0 + s, same.1 + n);
                }
                report.push(format!(
                    "{kernel:>10} {dd:?} <- {sd:?}: {}/{} elements bit-identical",
                    same.0, same.1
                ));
            }
        }
    }
    println!("{}", report.join("\n"));
}

fn offload() -> OffloadConfig {
    OffloadConfig {
        host_budget_bytes: 1 << 34,
        file_path: None,
        staging_bytes: 1 << 20,
        threads: 2,
    }
}

/// The counterpart buffer in pinned memory: store / load / swap / prefetch give back the
/// same bits, and every fold of every placement equals the CPU backend's (the mapped
/// placement also shows the arena is pinned and mapped: the driver maps nothing else).
#[test]
fn pinned_buffer_round_trip_and_folds_match_the_cpu_backend() {
    let Some(device) = gpu() else { return };
    let sizes = [1usize, 300, 1_000_001, 77];
    let mut rng = Rng(42);
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    };
    let specs: Vec<SlotSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| SlotSpec {
            name: format!("{i}"),
            numel: n,
            dtype: StorageDtype::F32,
        })
        .collect();
    for ema in [
        EmaPlacement::Host,
        EmaPlacement::Device,
        EmaPlacement::Mapped,
    ] {
        let gpu = StreamBackend::new(Cuda::new(&device).unwrap(), &offload(), ema).unwrap();
        let cpu = CpuBackend::new(2);
        let gbuf = Arc::new(SharedCounterpartBuffer::new(
            gpu.allocate(&specs, &offload()).unwrap(),
        ));
        let cbuf = Arc::new(SharedCounterpartBuffer::new(
            cpu.allocate(&specs, &offload()).unwrap(),
        ));
        let host: Vec<Vec<f32>> = sizes.iter().map(|&n| values(n)).collect();
        let slots: Vec<Vec<f32>> = sizes.iter().map(|&n| values(n)).collect();
        let on = |v: &Vec<f32>, d: &Device| Tensor::from_slice(v, v.len(), d).unwrap();
        let glive: Vec<Tensor> = host.iter().map(|v| on(v, &device)).collect();
        let clive: Vec<Tensor> = host.iter().map(|v| on(v, &Device::Cpu)).collect();
        for (k, v) in slots.iter().enumerate() {
            gpu.store(&on(v, &device), &gbuf, k).unwrap();
            cpu.store(&on(v, &Device::Cpu), &cbuf, k).unwrap();
        }
        let check = |what: &str| {
            for k in 0..sizes.len() {
                let g = gpu
                    .load(&gbuf, k, &[sizes[k]])
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let c = cpu
                    .load(&cbuf, k, &[sizes[k]])
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert!(g == c, "{ema:?} {what}: slot {k} differs");
                let g = glive[k].to_vec1::<f32>().unwrap();
                let c = clive[k].to_vec1::<f32>().unwrap();
                assert!(g == c, "{ema:?} {what}: live {k} differs");
            }
        };
        check("store/load");
        for k in 0..sizes.len() {
            gpu.swap(&glive[k], &gbuf, k).unwrap();
            cpu.swap(&clive[k], &cbuf, k).unwrap();
        }
        check("swap");
        let jobs = |live: &[Tensor]| -> Vec<(usize, Tensor, f64)> {
            live.iter()
                .enumerate()
                .map(|(k, t)| (k, t.clone(), 0.99 + 0.001 * k as f64))
                .collect()
        };
        gpu.fold_into_slots(&gbuf, jobs(&glive)).wait().unwrap();
        cpu.fold_into_slots(&cbuf, jobs(&clive)).wait().unwrap();
        check("fold into slots");
        for k in 0..sizes.len() {
            gpu.fold_into_live(&glive[k], &gbuf, k, 0.9).unwrap();
            cpu.fold_into_live(&clive[k], &cbuf, k, 0.9).unwrap();
        }
        check("fold into live");
        let want: Vec<(usize, Vec<usize>)> =
            (0..sizes.len()).map(|k| (k, vec![sizes[k]])).collect();
        let (f, ts) = gpu.prefetch(&gbuf, want.clone());
        f.wait().unwrap();
        let (cf, cts) = cpu.prefetch(&cbuf, want);
        cf.wait().unwrap();
        for (g, c) in ts.lock().iter().zip(cts.lock().iter()) {
            assert!(
                g.to_vec1::<f32>().unwrap() == c.to_vec1::<f32>().unwrap(),
                "{ema:?} prefetch"
            );
        }
        println!("{ema:?}: store/load/swap/folds/prefetch identical to the CPU backend");
    }
}

/// Bytes of a bf16 / f16 slot survive the round trip too.
#[test]
fn narrow_slots_round_trip() {
    let Some(device) = gpu() else { return };
    let b = StreamBackend::new(
        Cuda::new(&device).unwrap(),
        &offload(),
        EmaPlacement::Device,
    )
    .unwrap();
    for (dtype, d) in [
        (StorageDtype::BF16, DType::BF16),
        (StorageDtype::F16, DType::F16),
    ] {
        let specs = vec![SlotSpec {
            name: "s".into(),
            numel: 12345,
            dtype,
        }];
        let buf = Arc::new(SharedCounterpartBuffer::new(
            b.allocate(&specs, &offload()).unwrap(),
        ));
        let t = Tensor::randn(0f32, 1.0, 12345, &device)
            .unwrap()
            .to_dtype(d)
            .unwrap();
        b.store(&t, &buf, 0).unwrap();
        let back = b.load(&buf, 0, &[12345]).unwrap();
        let (x, y) = (
            t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            back.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(x == y, "{dtype:?} round trip");
        let host: Vec<u16> = buf
            .read(0)
            .slice()
            .as_bytes()
            .chunks_exact(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]))
            .collect();
        let want: Vec<u16> = match dtype {
            StorageDtype::BF16 => t
                .to_vec1::<bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            _ => t
                .to_vec1::<f16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        };
        assert!(
            host == want,
            "{dtype:?}: the pinned slot holds the tensor's bits"
        );
    }
}

/// erm, ldt (both placements) and ldt-s with every fold placement on the cnn for 20
/// steps: the GPU run's exported weights against the CPU run's.
#[test]
fn training_on_the_gpu_follows_the_cpu() {
    let Some(_device) = gpu() else { return };
    let toml = r#"
seed = 1
[model]
arch = "cnn"
[train]
steps = 20
batch_size = 16
[optim]
lr = 1e-3
[stage1]
warmup_steps = 2
stat_batches = 4
stat_batch_size = 4
[ldt]
ema_every = 5
[ldt_s]
p_steps = 5
a_steps = 5
"#;
    let man = common::bundled_manifest();
    let cases: [(&str, &[&str], &str); 6] = [
        ("erm", &["train.method=\"erm\""], "model.safetensors"),
        (
            "ldt resident",
            &["train.method=\"ldt\""],
            "composite.safetensors",
        ),
        (
            "ldt swap",
            &["train.method=\"ldt\"", "ldt.placement=\"swap\""],
            "composite.safetensors",
        ),
        (
            "ldt-s host",
            &["train.method=\"ldt-s\"", "offload.ema=\"host\""],
            "composite.safetensors",
        ),
        (
            "ldt-s device",
            &["train.method=\"ldt-s\"", "offload.ema=\"device\""],
            "composite.safetensors",
        ),
        (
            "ldt-s mapped",
            &["train.method=\"ldt-s\"", "offload.ema=\"mapped\""],
            "composite.safetensors",
        ),
    ];
    for (name, extra, file) in cases {
        let mut cpu: Vec<&str> = vec![man.as_str()];
        cpu.extend(extra.iter().filter(|s| !s.starts_with("offload.ema")));
        let mut gpu: Vec<&str> = vec![man.as_str(), "device=\"cuda:0\""];
        gpu.extend(extra.iter());
        let (c, _) = common::run(toml, &cpu);
        let (g, _) = common::run(toml, &gpu);
        let (worst, key) = common::worst_rel_l2(&g.path().join(file), &c.path().join(file));
        println!("{name}: worst relative L2 of {file} {worst:.2e} ({key})");
        assert!(
            worst < 1e-3,
            "{name}: GPU and CPU runs differ: {worst:.2e} at {key}"
        );
    }
}
