//! Throughput of the host EMA fold against a plain memory copy of the same tensors.
//!
//! For each storage dtype, ~256 MB (destination + source) spread over many tensors of mixed
//! sizes is folded with `fused_ema` and, for comparison, copied with `copy_from_slice`
//! (source into destination), at 1 thread and at all threads. Throughput counts the bytes
//! read plus written: EMA reads dst and src and writes dst, the copy reads src and writes
//! dst. The best of several runs is reported. Run with `cargo bench --bench ema`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use ldt::offload::{fused_ema, EmaTask, HostSlice, HostSliceMut};

/// dst + src bytes per case.
const TOTAL_BYTES: usize = 256 << 20;
/// Timed runs per measurement (the best is kept).
const RUNS: usize = 7;

/// Tensor sizes in elements: a repeating mix from 4 Ki to 4 Mi elements, like the layers of
/// a mid-size network (biases excluded, they don't matter for bandwidth).
fn sizes(elem_bytes: usize) -> Vec<usize> {
    let pattern = [
        4096, 65_536, 262_144, 1_048_576, 4_194_304, 589_824, 2_359_296,
    ];
    let mut left = TOTAL_BYTES / (2 * elem_bytes);
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

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The tensors of one case in one dtype.
enum Store {
    F32(Vec<Vec<f32>>, Vec<Vec<f32>>),
    BF16(Vec<Vec<bf16>>, Vec<Vec<bf16>>),
    F16(Vec<Vec<f16>>, Vec<Vec<f16>>),
}

impl Store {
    fn new(name: &str) -> Store {
        let make = |elem: usize, seed: u64| -> Vec<Vec<f32>> {
            sizes(elem)
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, seed + i as u64))
                .collect()
        };
        let narrow = |v: Vec<Vec<f32>>, f: fn(f32) -> bf16| -> Vec<Vec<bf16>> {
            v.into_iter()
                .map(|t| t.into_iter().map(f).collect())
                .collect()
        };
        match name {
            "f32" => Store::F32(make(4, 1), make(4, 1000)),
            "bf16" => Store::BF16(
                narrow(make(2, 1), bf16::from_f32),
                narrow(make(2, 1000), bf16::from_f32),
            ),
            _ => {
                let h = |v: Vec<Vec<f32>>| -> Vec<Vec<f16>> {
                    v.into_iter()
                        .map(|t| t.into_iter().map(f16::from_f32).collect())
                        .collect()
                };
                Store::F16(h(make(2, 1)), h(make(2, 1000)))
            }
        }
    }

    /// Bytes moved by one EMA pass and by one copy pass.
    fn traffic(&self) -> (usize, usize) {
        let (elems, size) = match self {
            Store::F32(d, _) => (d.iter().map(Vec::len).sum::<usize>(), 4),
            Store::BF16(d, _) => (d.iter().map(Vec::len).sum::<usize>(), 2),
            Store::F16(d, _) => (d.iter().map(Vec::len).sum::<usize>(), 2),
        };
        (3 * elems * size, 2 * elems * size)
    }

    fn ema(&mut self, threads: usize) {
        let mut tasks: Vec<EmaTask<'_>> = match self {
            Store::F32(d, s) => d
                .iter_mut()
                .zip(s.iter())
                .enumerate()
                .map(|(i, (d, s))| task(HostSliceMut::F32(d), HostSlice::F32(s), i))
                .collect(),
            Store::BF16(d, s) => d
                .iter_mut()
                .zip(s.iter())
                .enumerate()
                .map(|(i, (d, s))| task(HostSliceMut::BF16(d), HostSlice::BF16(s), i))
                .collect(),
            Store::F16(d, s) => d
                .iter_mut()
                .zip(s.iter())
                .enumerate()
                .map(|(i, (d, s))| task(HostSliceMut::F16(d), HostSlice::F16(s), i))
                .collect(),
        };
        fused_ema(&mut tasks, threads);
    }

    fn copy(&mut self, threads: usize) {
        match self {
            Store::F32(d, s) => parallel_copy(d, s, threads),
            Store::BF16(d, s) => parallel_copy(d, s, threads),
            Store::F16(d, s) => parallel_copy(d, s, threads),
        }
    }
}

/// A task with a DPU-like coefficient that differs per tensor.
fn task<'a>(dst: HostSliceMut<'a>, src: HostSlice<'a>, i: usize) -> EmaTask<'a> {
    EmaTask {
        dst,
        src,
        w: 0.99 + 0.01 * (i % 97) as f64 / 97.0,
    }
}

/// `copy_from_slice` of every tensor, split into `threads` runs of equal elements, the
/// same way `fused_ema` balances its work.
fn parallel_copy<T: Copy + Send + Sync>(dst: &mut [Vec<T>], src: &[Vec<T>], threads: usize) {
    let total: usize = dst.iter().map(Vec::len).sum();
    let per = total.div_ceil(threads);
    let mut buckets: Vec<Vec<(&mut [T], &[T])>> = (0..threads).map(|_| Vec::new()).collect();
    let (mut b, mut room) = (0, per);
    for (d, s) in dst.iter_mut().zip(src) {
        let (mut d, mut s): (&mut [T], &[T]) = (d, s);
        while !d.is_empty() {
            let take = if b + 1 == threads {
                d.len()
            } else {
                room.min(d.len())
            };
            let (d0, d1) = d.split_at_mut(take);
            let (s0, s1) = s.split_at(take);
            buckets[b].push((d0, s0));
            (d, s) = (d1, s1);
            room -= take.min(room);
            if room == 0 && b + 1 < threads {
                b += 1;
                room = per;
            }
        }
    }
    std::thread::scope(|scope| {
        for bucket in buckets {
            scope.spawn(move || {
                for (d, s) in bucket {
                    d.copy_from_slice(s);
                }
            });
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
    println!(
        "fused_ema vs copy_from_slice, {} MiB dst+src per case, best of {RUNS}",
        TOTAL_BYTES >> 20
    );
    println!(
        "{:<6} {:>7} {:>9} {:>12} {:>13} {:>7}",
        "dtype", "threads", "tensors", "ema GB/s", "memcpy GB/s", "ratio"
    );
    for name in ["f32", "bf16", "f16"] {
        let mut store = Store::new(name);
        let tensors = match &store {
            Store::F32(d, _) => d.len(),
            Store::BF16(d, _) => d.len(),
            Store::F16(d, _) => d.len(),
        };
        let (ema_bytes, copy_bytes) = store.traffic();
        for &threads in &thread_counts {
            let t_ema = best(|| store.ema(black_box(threads)));
            let t_copy = best(|| store.copy(black_box(threads)));
            let ema = ema_bytes as f64 / t_ema.as_secs_f64() / 1e9;
            let copy = copy_bytes as f64 / t_copy.as_secs_f64() / 1e9;
            println!(
                "{name:<6} {threads:>7} {tensors:>9} {ema:>12.2} {copy:>13.2} {:>6.2}x",
                ema / copy
            );
        }
    }
}
