//! The DPU fold on the host: `dst = w * dst + (1 - w) * src` over many tensors at once.
//!
//! The arithmetic is fixed so every placement (host threads, GPU kernels) computes the same
//! bits: with `wf = w as f32` and `cf = (1 - w) as f32` (both rounded from f64), each element
//! is `d * wf + cf * s` in f32 — two rounded products, then a rounded add, never a fused
//! multiply-add (Rust does not contract floating-point expressions) — and the result is
//! rounded to the destination's storage dtype (bf16/f16: nearest, ties to even).
//! Every element is computed independently, so how the work is split between threads cannot
//! change a single bit.

use super::convert::{self, Lane};
use super::{HostSlice, HostSliceMut};

/// One tensor of a fused fold: `dst = w * dst + (1 - w) * src`, element by element.
#[derive(Debug)]
pub struct EmaTask<'a> {
    /// The counterpart that accumulates (e.g. `~A^S`), updated in place.
    pub dst: HostSliceMut<'a>,
    /// The trained weights folded in (e.g. `P^S`), same number of elements as `dst`.
    pub src: HostSlice<'a>,
    /// The DPU coefficient of this layer, as computed in f64.
    pub w: f64,
}

/// The f32 coefficients of a fold with DPU coefficient `w`: `(w, 1 - w)`, the subtraction
/// in f64, each rounded once to f32. Every placement (host threads, GPU kernels) uses these.
pub(crate) fn coefficients(w: f64) -> (f32, f32) {
    (w as f32, (1.0 - w) as f32)
}

/// Below this many bytes per thread, another thread costs more to start than it saves.
const MIN_BYTES_PER_THREAD: u64 = 512 << 10;

/// Pieces end on a multiple of this many elements (64 bytes of f32, 32 of bf16/f16), so two
/// threads rarely write the same cache line.
const SPLIT_ALIGN: usize = 16;

/// Elements widened to f32 at a time when f16 is involved: two 1 KiB scratch blocks on the
/// stack, in L1, long enough that the per-block conversion set-up is amortized.
const BLOCK: usize = 256;

/// A contiguous range of one task, with its coefficients already rounded to f32.
struct Piece<'a> {
    dst: HostSliceMut<'a>,
    src: HostSlice<'a>,
    wf: f32,
    cf: f32,
}

/// Folds every task's `src` into its `dst` with the task's coefficient, using up to
/// `threads` threads (the calling thread is one of them; 0 counts as 1).
///
/// The work is split into contiguous pieces of roughly equal bytes (read + written), so one
/// large tensor is shared between threads as well as many small ones. The result is
/// bit-identical for any thread count.
///
/// # Panics
/// If a task's `dst` and `src` have different lengths (checked before anything is written).
pub fn fused_ema(tasks: &mut [EmaTask<'_>], threads: usize) {
    let mut total: u64 = 0;
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(
            t.dst.len(),
            t.src.len(),
            "fused_ema: task {i} has {} destination elements but {} source elements",
            t.dst.len(),
            t.src.len()
        );
        total += (t.dst.len() * bytes_per_element(t)) as u64;
    }
    let by_size = total.div_ceil(MIN_BYTES_PER_THREAD).max(1);
    let n = (threads.max(1) as u64).min(by_size) as usize;
    let mut buckets = split(tasks, n, total).into_iter().filter(|b| !b.is_empty());
    let Some(first) = buckets.next() else {
        return;
    };
    std::thread::scope(|s| {
        for bucket in buckets {
            s.spawn(move || bucket.into_iter().for_each(run_piece));
        }
        first.into_iter().for_each(run_piece);
    });
}

/// Bytes one element of `t` moves: the destination read and written, the source read.
fn bytes_per_element(t: &EmaTask<'_>) -> usize {
    2 * t.dst.dtype().size_of() + t.src.dtype().size_of()
}

/// Cuts the tasks into `n` buckets of contiguous pieces, each about `total / n` bytes; the
/// last bucket takes whatever is left.
fn split<'a>(tasks: &'a mut [EmaTask<'_>], n: usize, total: u64) -> Vec<Vec<Piece<'a>>> {
    let target = total.div_ceil(n as u64).max(1);
    let mut buckets: Vec<Vec<Piece<'a>>> = (0..n).map(|_| Vec::new()).collect();
    let mut b = 0;
    let mut room = target;
    for t in tasks.iter_mut() {
        let bpe = bytes_per_element(t) as u64;
        let (wf, cf) = coefficients(t.w);
        let mut dst = t.dst.reborrow();
        let mut src = t.src;
        while !dst.is_empty() {
            let take = if b + 1 == n {
                dst.len()
            } else {
                let want = room.div_ceil(bpe) as usize;
                want.next_multiple_of(SPLIT_ALIGN).min(dst.len())
            };
            let (d0, d1) = dst.split_at_mut(take);
            let (s0, s1) = src.split_at(take);
            buckets[b].push(Piece {
                dst: d0,
                src: s0,
                wf,
                cf,
            });
            dst = d1;
            src = s1;
            let used = take as u64 * bpe;
            if used >= room && b + 1 < n {
                b += 1;
                room = target;
            } else {
                room = room.saturating_sub(used);
            }
        }
    }
    buckets
}

/// Folds one piece, on x86-64 with AVX-512BW or AVX2 code (plus F16C) where the CPU has
/// it: 4 or 2 times the lanes of the SSE2 baseline, which the narrow dtypes need to keep
/// up with memory. All versions compute the same bits (separate IEEE multiplies and add,
/// no FMA); the tests were run on each.
fn run_piece(p: Piece<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU supports AVX-512BW and F16C, checked just above.
        unsafe { run_piece_avx512(p) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above.
        unsafe { run_piece_avx2(p) };
        return;
    }
    run_piece_any(p);
}

/// `run_piece_any` compiled for AVX2 + F16C.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn run_piece_avx2(p: Piece<'_>) {
    run_piece_any(p);
}

/// `run_piece_any` compiled for AVX-512BW + F16C.
///
/// # Safety
/// The CPU must support AVX-512BW and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bw,avx2,f16c")]
unsafe fn run_piece_avx512(p: Piece<'_>) {
    run_piece_any(p);
}

/// Folds one piece, dispatching once on the dtype pair. Inlined into each CPU-specific
/// version, so every loop below is compiled for that CPU.
#[inline(always)]
fn run_piece_any(p: Piece<'_>) {
    use HostSlice as S;
    use HostSliceMut as D;
    let Piece { dst, src, wf, cf } = p;
    match (dst, src) {
        (D::F32(d), S::F32(s)) => fold(d, s, wf, cf),
        (D::F32(d), S::BF16(s)) => fold(d, s, wf, cf),
        (D::BF16(d), S::F32(s)) => fold(d, s, wf, cf),
        (D::BF16(d), S::BF16(s)) => fold(d, s, wf, cf),
        (dst, src) => fold_blocked(dst, src, wf, cf),
    }
}

/// `d = d * wf + cf * s` lane by lane, converting inline; a straight loop that LLVM
/// vectorizes (no FMA: the two products are rounded separately, as the fold requires).
#[inline(always)]
fn fold<D: Lane, T: Lane>(dst: &mut [D], src: &[T], wf: f32, cf: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = D::from_f32(d.to_f32() * wf + cf * s.to_f32());
    }
}

/// Widens `BLOCK`-sized pieces of any dtype into f32 scratch.
#[inline(always)]
fn widen(src: HostSlice<'_>, out: &mut [f32]) {
    match src {
        HostSlice::F32(s) => out.copy_from_slice(s),
        HostSlice::BF16(s) => convert::bf16_to_f32(s, out),
        HostSlice::F16(s) => convert::f16_to_f32(s, out),
    }
}

/// Folds a piece involving f16, `BLOCK` elements at a time through f32 scratch: widen
/// (exact, 8 lanes with F16C), fold in f32, narrow the destination (round to nearest even).
#[inline(always)]
fn fold_blocked(mut dst: HostSliceMut<'_>, mut src: HostSlice<'_>, wf: f32, cf: f32) {
    let mut dbuf = [0f32; BLOCK];
    let mut sbuf = [0f32; BLOCK];
    while !dst.is_empty() {
        let len = dst.len().min(BLOCK);
        let (d, d_rest) = dst.split_at_mut(len);
        let (s, s_rest) = src.split_at(len);
        let s: &[f32] = match s {
            HostSlice::F32(s) => s,
            narrow => {
                widen(narrow, &mut sbuf[..len]);
                &sbuf[..len]
            }
        };
        let a = &mut dbuf[..len];
        match d {
            HostSliceMut::F32(d) => fold(d, s, wf, cf),
            HostSliceMut::BF16(d) => {
                convert::bf16_to_f32(d, a);
                fold(a, s, wf, cf);
                convert::f32_to_bf16(a, d);
            }
            HostSliceMut::F16(d) => {
                convert::f16_to_f32(d, a);
                fold(a, s, wf, cf);
                convert::f32_to_f16(a, d);
            }
        }
        dst = d_rest;
        src = s_rest;
    }
}
