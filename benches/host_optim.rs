//! Throughput of the fused host optimizer kernel against a plain memory copy of the same
//! number of bytes.
//!
//! For Adam with beta1 = 0 (one moment), Adam with two moments, AdamW and SGD with
//! momentum, 64 MiB of f32 weights spread over many tensors of mixed sizes are updated
//! with one `fused::update` call (all tensors, each with its own rate) and, for
//! comparison, as many bytes are moved by `copy_from_slice` (a source half the byte count
//! copied into a destination as large), at 1 thread and at all threads. Throughput counts
//! the bytes read plus written: the update reads g, p, m, v and writes p, m, v (those the
//! optimizer keeps), the copy reads its source and writes its destination. The best of
//! several runs is reported, as a markdown table. Run with `cargo bench --bench host_optim`;
//! `scripts/host_adam_torch.py` prints the same columns for PyTorch's CPU optimizers.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ldt::config::OptimName;
use ldt::optim::fused::{update, Update};
use ldt::optim::OptimSettings;

/// Weight bytes per case.
const WEIGHT_BYTES: usize = 64 << 20;
/// Timed runs per measurement (the best is kept).
const RUNS: usize = 7;

/// Tensor sizes in elements: a repeating mix from 4 Ki to 4 Mi elements, like the layers of
/// a mid-size network (the same mix as benches/ema.rs; `scripts/host_adam_torch.py` uses it
/// too).
fn sizes() -> Vec<usize> {
    let pattern = [
        4096, 65_536, 262_144, 1_048_576, 4_194_304, 589_824, 2_359_296,
    ];
    let mut left = WEIGHT_BYTES / 4;
    let mut out = Vec::new();
    for &n in pattern.iter().cycle() {
        if left == 0 {
            break;
        }
        let n = n.min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// Deterministic values in [-1, 1) times `scale`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

/// One optimizer setting of the benchmark.
struct Case {
    name: &'static str,
    s: OptimSettings,
    /// Whether it keeps `m`, `v`.
    m: bool,
    v: bool,
}

fn cases() -> Vec<Case> {
    let s = |name, betas, weight_decay, momentum| OptimSettings {
        name,
        betas,
        eps: 1e-8,
        weight_decay,
        momentum,
    };
    vec![
        Case {
            name: "Adam (beta1 = 0)",
            s: s(OptimName::Adam, [0.0, 0.99], 0.0, 0.0),
            m: false,
            v: true,
        },
        Case {
            name: "Adam",
            s: s(OptimName::Adam, [0.9, 0.999], 0.0, 0.0),
            m: true,
            v: true,
        },
        Case {
            name: "AdamW",
            s: s(OptimName::Adamw, [0.9, 0.999], 0.01, 0.0),
            m: true,
            v: true,
        },
        Case {
            name: "SGD momentum",
            s: s(OptimName::Sgd, [0.9, 0.999], 0.0, 0.9),
            m: true,
            v: false,
        },
    ]
}

/// The tensors of one case: weights, gradients and state.
struct Store {
    p: Vec<Vec<f32>>,
    g: Vec<Vec<f32>>,
    m: Vec<Option<Vec<f32>>>,
    v: Vec<Option<Vec<f32>>>,
    step: u64,
}

impl Store {
    fn new(c: &Case) -> Store {
        let sizes = sizes();
        let make = |seed: u64, scale: f32| -> Vec<Vec<f32>> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, seed + i as u64, scale))
                .collect()
        };
        let state = |on: bool| -> Vec<Option<Vec<f32>>> {
            sizes.iter().map(|&n| on.then(|| vec![0.0; n])).collect()
        };
        Store {
            p: make(1, 1.0),
            g: make(1000, 1e-2),
            m: state(c.m),
            v: state(c.v),
            step: 1,
        }
    }

    /// Bytes one step reads plus writes: g read, p and each state buffer read and written.
    fn traffic(&self, c: &Case) -> usize {
        let elems: usize = self.p.iter().map(Vec::len).sum();
        4 * elems * (3 + 2 * (usize::from(c.m) + usize::from(c.v)))
    }

    /// One optimizer step of every tensor, in one call.
    fn step(&mut self, s: &OptimSettings, threads: usize) {
        // Past step 1, so SGD reads its momentum buffer (at step 1 it only writes it).
        self.step += 1;
        let step = self.step;
        let mut jobs: Vec<Update<'_>> = self
            .p
            .iter_mut()
            .zip(&self.g)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .enumerate()
            .map(|(i, ((p, g), (m, v)))| Update {
                p,
                g,
                m: m.as_deref_mut(),
                v: v.as_deref_mut(),
                step,
                lr: 1e-4 * (1.0 + (i % 7) as f64),
            })
            .collect();
        update(s, &mut jobs, threads).expect("update");
    }
}

/// `copy_from_slice` of `src` into `dst`, split into `threads` runs of equal length.
fn parallel_copy(dst: &mut [f32], src: &[f32], threads: usize) {
    let per = dst.len().div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(per).zip(src.chunks(per)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

fn best(mut f: impl FnMut()) -> Duration {
    f();
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_counts = vec![1];
    if all > 1 {
        thread_counts.push(all);
    }
    let tensors = sizes().len();
    println!(
        "fused host optimizer vs memcpy of the same bytes, {} MiB of f32 weights in {tensors} tensors, best of {RUNS}\n",
        WEIGHT_BYTES >> 20
    );
    println!(
        "| optimizer | threads | MiB moved/step | fused ms/step | fused GB/s | memcpy ms | memcpy GB/s | fused/memcpy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cases() {
        let mut store = Store::new(&c);
        let bytes = store.traffic(&c);
        // A copy that reads and writes `bytes` in all.
        let src = values(bytes / 8, 7, 1.0);
        let mut dst = vec![0f32; bytes / 8];
        for &threads in &thread_counts {
            let t_opt = best(|| store.step(&c.s, black_box(threads)));
            let t_copy = best(|| parallel_copy(&mut dst, &src, black_box(threads)));
            let gbs = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
            let ms = |t: Duration| t.as_secs_f64() * 1e3;
            println!(
                "| {} | {threads} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                c.name,
                bytes >> 20,
                ms(t_opt),
                gbs(t_opt),
                ms(t_copy),
                gbs(t_copy),
                gbs(t_opt) / gbs(t_copy)
            );
        }
        let p: f64 = store.p.iter().flatten().map(|&x| x as f64).sum();
        assert!(p.is_finite(), "{}: the weights diverged", c.name);
    }
}
