//! The host optimizer update in one pass: Adam, AdamW and SGD over f32 slices, every
//! element read and written once, on several threads.
//!
//! The arithmetic is PyTorch's single-tensor path, operation by operation (the rules are
//! in `adam.rs` and `sgd.rs`), on the scalars of `Scalars` (Adam) and on
//! `f32(momentum)`, `f32(-lr)` (SGD): separate IEEE multiplies, adds, divides and square
//! roots in f32, never a fused multiply-add (Rust does not contract floating-point
//! expressions). L2 weight decay is `g + (p * f32(wd) + 0)`, the bits of candle's
//! `g + p * wd` on the CPU (`Tensor * f64` is `affine(wd, 0)`, `x * mul + add` with both
//! rounded to f32: the `+ 0` turns a `-0` product into `+0`), which the device-generic
//! path computes. Per element:
//!
//! - Adam/AdamW: `g' = g + (p*wd + 0)` (Adam with weight decay); `p = p * (1 - lr*wd)`
//!   (AdamW); `m = m + w*(g' - m)` if `|w| < 0.5` else `g' - (g' - m)*(1 - w)` with
//!   `w = 1 - b1` (with b1 = 0 there is no `m`: it is `g'`); `v = v*b2 + c*g'*g'`;
//!   `p = p + (neg_step * m) / (sqrt(v)/bc2 + eps)`.
//! - SGD: `d = g + (p*wd + 0)` (with weight decay); `buf = d` at step 1, else
//!   `buf = buf*mu + d` (with momentum; then `d` is `buf`); `p = p + neg_lr * d`.
//!
//! Every element is computed on its own, so how the work is split between threads (and
//! which vector width the CPU runs it with) cannot change a bit. [`update`] is the
//! kernel; the optimizer's CPU path calls it once per layer on the tensors' storages
//! (`update_layer`).

use super::{f32_kernel, OptimSettings};
use crate::config::OptimName;
use anyhow::{anyhow, bail, Result};
use candle_core::{Storage, Tensor, Var};
use std::cell::Cell;

/// One layer's update on host memory.
#[derive(Debug)]
pub struct Update<'a> {
    /// Weights, updated in place.
    pub p: &'a mut [f32],
    /// Gradient, as many elements as `p`.
    pub g: &'a [f32],
    /// Adam's first moment (None when beta1 = 0) or SGD's momentum buffer (None without
    /// momentum). Adam's holds zeros at step 1; SGD's is overwritten at step 1.
    pub m: Option<&'a mut [f32]>,
    /// Adam's second moment, zeros at step 1 (None for SGD).
    pub v: Option<&'a mut [f32]>,
    /// This layer's step count, already incremented (1 at the first step).
    pub step: u64,
    /// Learning rate of this step.
    pub lr: f64,
}

/// The scalars of one Adam/AdamW step, rounded to f32 as PyTorch rounds them (bias
/// corrections in f64 first); the host kernel and the device-generic path both take
/// them from here, so both compute with the same numbers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Scalars {
    /// AdamW's weight factor `1 - lr * wd` (None: no decoupled decay).
    pub(super) adamw_scale: Option<f32>,
    /// Lerp weight of the first moment, `1 - b1` (None with b1 = 0: `m` is the gradient).
    pub(super) w1: Option<f32>,
    /// Second-moment decay `b2`.
    pub(super) b2: f32,
    /// Gradient weight of the second moment, `1 - b2`.
    pub(super) c: f32,
    /// `-lr / (1 - b1^t)`.
    pub(super) neg_step: f32,
    /// `sqrt(1 - b2^t)`.
    pub(super) bc2: f32,
    /// Epsilon.
    pub(super) eps: f32,
}

impl Scalars {
    /// The scalars of step `step` (counted from 1) at learning rate `lr`.
    pub(super) fn of(s: &OptimSettings, step: u64, lr: f64) -> Scalars {
        let [b1, b2] = s.betas;
        let t = step as i32;
        let adamw = s.weight_decay > 0.0 && s.name == OptimName::Adamw;
        Scalars {
            adamw_scale: adamw.then_some((1.0 - lr * s.weight_decay) as f32),
            w1: (b1 > 0.0).then_some((1.0 - b1) as f32),
            b2: b2 as f32,
            c: (1.0 - b2) as f32,
            neg_step: (-(lr / (1.0 - b1.powi(t)))) as f32,
            bc2: (1.0 - b2.powi(t)).sqrt() as f32,
            eps: s.eps as f32,
        }
    }
}

/// Applies every update with settings `s`, in one pass per element, on up to `threads`
/// threads (the calling thread is one of them; 0 counts as 1).
///
/// The work is split into contiguous pieces of roughly equal bytes (read + written), so
/// one large tensor is shared between threads as well as many small ones; the result is
/// bit-identical for any thread count. Every job is checked before anything is written:
/// lengths that differ, a buffer missing or one the settings do not use, or step 0 are
/// errors naming the job.
pub fn update(s: &OptimSettings, jobs: &mut [Update<'_>], threads: usize) -> Result<()> {
    let mut rules = Vec::with_capacity(jobs.len());
    let mut total: u64 = 0;
    for (i, j) in jobs.iter().enumerate() {
        let rule = Rule::of(s, j).map_err(|e| anyhow!("optimizer update {i}: {e}"))?;
        total += (j.p.len() * rule.bytes_per_element()) as u64;
        rules.push(rule);
    }
    let by_size = total.div_ceil(MIN_BYTES_PER_THREAD).max(1);
    let n = (threads.max(1) as u64).min(by_size) as usize;
    let mut buckets = split(jobs, &rules, n, total)
        .into_iter()
        .filter(|b| !b.is_empty());
    let Some(first) = buckets.next() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        for bucket in buckets {
            scope.spawn(move || bucket.into_iter().for_each(run_piece));
        }
        first.into_iter().for_each(run_piece);
    });
    Ok(())
}

/// [`update`] of one layer held in candle tensors (f32, contiguous, on the CPU): the
/// weights `p`, the gradient `g` and the state buffers `m`, `v` as [`Update`] describes
/// them, on as many threads as candle uses.
///
/// Each tensor is borrowed through its own storage lock, with candle's in-place ops
/// (`f32_kernel`): `p` written with `g` read, and inside that `m` then `v` written, so the
/// slices are exclusive borrows that the locks guard and no `unsafe` is needed. Locking
/// one storage twice would wait forever, so `m` and `v` must not share a storage with
/// each other, `p` or `g` (checked first: an error, not a hang); `p` and `g` sharing one
/// is refused by candle.
pub(super) fn update_layer(
    s: &OptimSettings,
    p: &Var,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    step: u64,
    lr: f64,
) -> Result<()> {
    let p = p.as_tensor();
    let ids = [Some(p), Some(g), m, v].map(|t| t.map(storage_id));
    for (i, a) in ids.iter().enumerate().skip(2) {
        if a.is_some() && ids[..i].contains(a) {
            let name = ["p", "g", "m", "v"][i];
            bail!("the optimizer state `{name}` shares its storage with another operand");
        }
    }
    let threads = candle_core::utils::get_num_threads();
    let out = Cell::new(None);
    f32_kernel("ldt-optim-update", p, [g], |p, [g]| {
        out.set(Some(with_f32_mut("ldt-optim-m", m, |m| {
            with_f32_mut("ldt-optim-v", v, |v| {
                let job = Update {
                    p,
                    g,
                    m,
                    v,
                    step,
                    lr,
                };
                update(s, &mut [job], threads)
            })
        })));
    })?;
    out.into_inner()
        .unwrap_or_else(|| bail!("ldt-optim-update: the update kernel did not run"))
}

/// Identifies the storage of `t`: equal for tensors that share one (the address of the
/// storage behind its lock, stable while `t` holds it).
fn storage_id(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    std::ptr::from_ref::<Storage>(&s) as usize
}

/// Runs `f` on the f32 elements of `t` borrowed mutably (`f(None)` without `t`), through
/// a candle in-place op, which holds `t`'s storage lock meanwhile.
fn with_f32_mut(
    name: &'static str,
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&mut [f32]>) -> Result<()>,
) -> Result<()> {
    let Some(t) = t else {
        return f(None);
    };
    let (f, out) = (Cell::new(Some(f)), Cell::new(None));
    f32_kernel(name, t, [], |x, []| {
        if let Some(f) = f.take() {
            out.set(Some(f(Some(x))));
        }
    })?;
    out.into_inner()
        .unwrap_or_else(|| bail!("{name}: the update kernel did not run"))
}

/// Below this many bytes per thread, another thread costs more to start than it saves.
const MIN_BYTES_PER_THREAD: u64 = 512 << 10;

/// Pieces end on a multiple of this many elements (64 bytes of f32), so two threads rarely
/// write the same cache line.
const SPLIT_ALIGN: usize = 16;

/// How Adam decays: not at all, L2 on the gradient (Adam), or the weights (AdamW).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Decay {
    None,
    L2,
    Decoupled,
}

/// Adam's first moment: none (`m` is the gradient), or the lerp with a weight below 0.5
/// (`m + w*(g - m)`) or not (`g - (g - m)*(1 - w)`), PyTorch's two formulas.
#[derive(Clone, Copy, Debug, PartialEq)]
enum First {
    Grad,
    Near,
    Far,
}

/// SGD's momentum: none, the first step (`buf = d`), a later step (`buf = buf*mu + d`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Momentum {
    None,
    First,
    Later,
}

/// The f32 scalars of one Adam/AdamW job, with its variant.
#[derive(Clone, Copy, Debug)]
struct Adam {
    decay: Decay,
    first: First,
    /// L2 factor `f32(wd)`.
    wd: f32,
    /// AdamW's `1 - lr*wd`.
    scale: f32,
    /// Lerp weight `1 - b1` and its complement `1 - w` (computed in f32, as PyTorch).
    w: f32,
    u: f32,
    b2: f32,
    c: f32,
    neg_step: f32,
    bc2: f32,
    eps: f32,
}

/// The f32 scalars of one SGD job, with its variant.
#[derive(Clone, Copy, Debug)]
struct Sgd {
    /// Whether the gradient gets L2 decay, with factor `wd` = `f32(weight_decay)`.
    l2: bool,
    wd: f32,
    momentum: Momentum,
    mu: f32,
    neg_lr: f32,
}

/// One job's update rule.
#[derive(Clone, Copy, Debug)]
enum Rule {
    Adam(Adam),
    Sgd(Sgd),
}

impl Rule {
    /// The rule of job `j` under `s`, after checking the job's buffers (an error names
    /// what differs).
    fn of(s: &OptimSettings, j: &Update<'_>) -> Result<Rule> {
        let n = j.p.len();
        if j.g.len() != n {
            bail!("the gradient has {} elements, the weights {n}", j.g.len());
        }
        for (name, b) in [("m", j.m.as_deref()), ("v", j.v.as_deref())] {
            if let Some(b) = b {
                if b.len() != n {
                    bail!(
                        "the state `{name}` has {} elements, the weights {n}",
                        b.len()
                    );
                }
            }
        }
        if j.step == 0 {
            bail!("step 0: the step count starts at 1");
        }
        let buffer = |name: &str, have: bool, want: bool, why: &str| -> Result<()> {
            match (have, want) {
                (false, true) => bail!("{why} needs the state `{name}`, none was given"),
                (true, false) => bail!("{why} keeps no state `{name}`, one was given"),
                _ => Ok(()),
            }
        };
        // The L2 factor as candle rounds `* wd` (`affine`), under `l2_decayed`'s condition.
        let l2 = s.weight_decay > 0.0;
        let wd = s.weight_decay as f32;
        Ok(match s.name {
            OptimName::Adam | OptimName::Adamw => {
                let k = Scalars::of(s, j.step, j.lr);
                let why = format!("{:?} with beta1 = {}", s.name, s.betas[0]);
                buffer("m", j.m.is_some(), k.w1.is_some(), &why)?;
                buffer("v", j.v.is_some(), true, &why)?;
                let w = k.w1.unwrap_or(1.0);
                Rule::Adam(Adam {
                    decay: match (k.adamw_scale, l2) {
                        (Some(_), _) => Decay::Decoupled,
                        (None, true) => Decay::L2,
                        (None, false) => Decay::None,
                    },
                    first: match k.w1 {
                        None => First::Grad,
                        Some(w) if w.abs() < 0.5 => First::Near,
                        Some(_) => First::Far,
                    },
                    wd,
                    scale: k.adamw_scale.unwrap_or(1.0),
                    w,
                    u: 1.0 - w,
                    b2: k.b2,
                    c: k.c,
                    neg_step: k.neg_step,
                    bc2: k.bc2,
                    eps: k.eps,
                })
            }
            OptimName::Sgd => {
                let why = format!("SGD with momentum {}", s.momentum);
                buffer("m", j.m.is_some(), s.momentum > 0.0, &why)?;
                buffer("v", j.v.is_some(), false, &why)?;
                Rule::Sgd(Sgd {
                    l2,
                    wd,
                    momentum: match (s.momentum > 0.0, j.step) {
                        (false, _) => Momentum::None,
                        (true, 1) => Momentum::First,
                        (true, _) => Momentum::Later,
                    },
                    mu: s.momentum as f32,
                    neg_lr: (-j.lr) as f32,
                })
            }
        })
    }

    /// Bytes one element moves: every buffer read, the written ones (p and the state)
    /// written too.
    fn bytes_per_element(&self) -> usize {
        let state = match self {
            Rule::Adam(a) => 1 + usize::from(a.first != First::Grad),
            Rule::Sgd(k) => usize::from(k.momentum != Momentum::None),
        };
        4 * (3 + 2 * state)
    }
}

/// A contiguous range of one job, with the job's rule.
struct Piece<'a> {
    p: &'a mut [f32],
    g: &'a [f32],
    m: Option<&'a mut [f32]>,
    v: Option<&'a mut [f32]>,
    rule: Rule,
}

/// Cuts the jobs into `n` buckets of contiguous pieces, each about `total / n` bytes; the
/// last bucket takes whatever is left.
fn split<'a>(
    jobs: &'a mut [Update<'_>],
    rules: &[Rule],
    n: usize,
    total: u64,
) -> Vec<Vec<Piece<'a>>> {
    let target = total.div_ceil(n as u64).max(1);
    let mut buckets: Vec<Vec<Piece<'a>>> = (0..n).map(|_| Vec::new()).collect();
    let mut b = 0;
    let mut room = target;
    for (j, &rule) in jobs.iter_mut().zip(rules) {
        let bpe = rule.bytes_per_element() as u64;
        let mut p: &mut [f32] = j.p;
        let mut g: &[f32] = j.g;
        let mut m: Option<&mut [f32]> = j.m.as_deref_mut();
        let mut v: Option<&mut [f32]> = j.v.as_deref_mut();
        while !p.is_empty() {
            let take = if b + 1 == n {
                p.len()
            } else {
                let want = room.div_ceil(bpe) as usize;
                want.next_multiple_of(SPLIT_ALIGN).min(p.len())
            };
            let (p0, p1) = p.split_at_mut(take);
            let (g0, g1) = g.split_at(take);
            let (m0, m1) = split_opt(m, take);
            let (v0, v1) = split_opt(v, take);
            buckets[b].push(Piece {
                p: p0,
                g: g0,
                m: m0,
                v: v0,
                rule,
            });
            (p, g, m, v) = (p1, g1, m1, v1);
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

/// `split_at_mut(at)` of an optional buffer.
fn split_opt(b: Option<&mut [f32]>, at: usize) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
    match b {
        Some(b) => {
            let (x, y) = b.split_at_mut(at);
            (Some(x), Some(y))
        }
        None => (None, None),
    }
}

/// Updates one piece, on x86-64 with AVX-512F or AVX2 code where the CPU has it (square
/// roots and divisions on 16 or 8 lanes instead of 4). All versions compute the same
/// bits: IEEE single-precision operations, correctly rounded at any width, no FMA.
fn run_piece(p: Piece<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        unsafe { run_piece_avx512(p) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { run_piece_avx2(p) };
        return;
    }
    run_piece_any(p);
}

/// `run_piece_any` compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_piece_avx2(p: Piece<'_>) {
    run_piece_any(p);
}

/// `run_piece_any` compiled for AVX-512F.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn run_piece_avx512(p: Piece<'_>) {
    run_piece_any(p);
}

/// Updates one piece, dispatching once on the rule's variant to a loop with the variant
/// fixed at compile time. Inlined into each CPU-specific version, so every loop below is
/// compiled for that CPU.
#[inline(always)]
fn run_piece_any(x: Piece<'_>) {
    let Piece { p, g, m, v, rule } = x;
    match rule {
        Rule::Adam(k) => match (k.decay, v) {
            (Decay::None, Some(v)) => adam_first::<NO_DECAY>(k, p, g, m, v),
            (Decay::L2, Some(v)) => adam_first::<L2>(k, p, g, m, v),
            (Decay::Decoupled, Some(v)) => adam_first::<DECOUPLED>(k, p, g, m, v),
            (_, None) => unreachable!("Rule::of checks that Adam has `v`"),
        },
        Rule::Sgd(k) => match k.l2 {
            false => sgd_momentum::<NO_DECAY>(k, p, g, m),
            true => sgd_momentum::<L2>(k, p, g, m),
        },
    }
}

// The variants as const parameters of the loops (so each loop is compiled without
// branches): decay, Adam's first moment, SGD's momentum.
const NO_DECAY: u8 = 0;
const L2: u8 = 1;
const DECOUPLED: u8 = 2;
const GRAD: u8 = 0;
const NEAR: u8 = 1;
const FAR: u8 = 2;
const NO_MOMENTUM: u8 = 0;
const FIRST_STEP: u8 = 1;
const LATER_STEP: u8 = 2;

/// The L2 term of the decayed gradient, `p*wd + 0`: candle's `Tensor * f64` on the CPU
/// (`affine(wd, 0)`), whose `+ 0` makes a `-0` product `+0`.
#[inline(always)]
fn l2_term(p: f32, wd: f32) -> f32 {
    p * wd + 0.0
}

/// One Adam/AdamW element: the new `(p, m, v)` from the old ones and the gradient `g`
/// (`m` is ignored and returned as the decayed gradient when `FIRST` is `GRAD`). The
/// arithmetic of the module docs; nowhere else in the crate.
#[inline(always)]
fn adam_element<const DECAY: u8, const FIRST: u8>(
    k: &Adam,
    p: f32,
    g: f32,
    m: f32,
    v: f32,
) -> (f32, f32, f32) {
    let g = if DECAY == L2 { g + l2_term(p, k.wd) } else { g };
    let p = if DECAY == DECOUPLED { p * k.scale } else { p };
    let m = match FIRST {
        GRAD => g,
        NEAR => m + k.w * (g - m),
        _ => g - (g - m) * k.u,
    };
    let v = v * k.b2 + k.c * g * g;
    let p = p + (k.neg_step * m) / (v.sqrt() / k.bc2 + k.eps);
    (p, m, v)
}

/// One SGD element: the new `(p, buf)` from the old ones and the gradient `g` (`buf` is
/// ignored, and returned as `d`, without momentum).
#[inline(always)]
fn sgd_element<const DECAY: u8, const MOMENTUM: u8>(
    k: &Sgd,
    p: f32,
    g: f32,
    buf: f32,
) -> (f32, f32) {
    let d = if DECAY == L2 { g + l2_term(p, k.wd) } else { g };
    let d = match MOMENTUM {
        LATER_STEP => buf * k.mu + d,
        _ => d,
    };
    (p + k.neg_lr * d, d)
}

#[inline(always)]
fn adam_first<const DECAY: u8>(
    k: Adam,
    p: &mut [f32],
    g: &[f32],
    m: Option<&mut [f32]>,
    v: &mut [f32],
) {
    match (k.first, m) {
        (First::Grad, _) => adam_loop::<DECAY, GRAD>(k, p, g, None, v),
        (First::Near, Some(m)) => adam_loop::<DECAY, NEAR>(k, p, g, Some(m), v),
        (First::Far, Some(m)) => adam_loop::<DECAY, FAR>(k, p, g, Some(m), v),
        (_, None) => unreachable!("Rule::of checks that Adam with beta1 > 0 has `m`"),
    }
}

/// [`adam_element`] over a piece.
#[inline(always)]
fn adam_loop<const DECAY: u8, const FIRST: u8>(
    k: Adam,
    p: &mut [f32],
    g: &[f32],
    m: Option<&mut [f32]>,
    v: &mut [f32],
) {
    match m {
        Some(m) => {
            let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
            for (((p, &g), m), v) in it {
                (*p, *m, *v) = adam_element::<DECAY, FIRST>(&k, *p, g, *m, *v);
            }
        }
        None => {
            for ((p, &g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
                let (p1, _, v1) = adam_element::<DECAY, FIRST>(&k, *p, g, 0.0, *v);
                (*p, *v) = (p1, v1);
            }
        }
    }
}

#[inline(always)]
fn sgd_momentum<const DECAY: u8>(k: Sgd, p: &mut [f32], g: &[f32], buf: Option<&mut [f32]>) {
    match (k.momentum, buf) {
        (Momentum::None, _) => sgd_loop::<DECAY, NO_MOMENTUM>(k, p, g, None),
        (Momentum::First, Some(b)) => sgd_loop::<DECAY, FIRST_STEP>(k, p, g, Some(b)),
        (Momentum::Later, Some(b)) => sgd_loop::<DECAY, LATER_STEP>(k, p, g, Some(b)),
        (_, None) => unreachable!("Rule::of checks that SGD with momentum has `m`"),
    }
}

/// [`sgd_element`] over a piece.
#[inline(always)]
fn sgd_loop<const DECAY: u8, const MOMENTUM: u8>(
    k: Sgd,
    p: &mut [f32],
    g: &[f32],
    buf: Option<&mut [f32]>,
) {
    match buf {
        Some(b) => {
            for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                (*p, *b) = sgd_element::<DECAY, MOMENTUM>(&k, *p, g, *b);
            }
        }
        None => {
            for (p, &g) in p.iter_mut().zip(g) {
                *p = sgd_element::<DECAY, MOMENTUM>(&k, *p, g, 0.0).0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn settings(
        name: OptimName,
        betas: [f64; 2],
        weight_decay: f64,
        momentum: f64,
    ) -> OptimSettings {
        OptimSettings {
            name,
            betas,
            eps: 1e-8,
            weight_decay,
            momentum,
        }
    }

    /// Every loop variant (see tests/optim.rs for the same list against the generic path).
    fn cases() -> Vec<OptimSettings> {
        use OptimName::{Adam, Adamw, Sgd};
        vec![
            settings(Adam, [0.0, 0.99], 0.0, 0.0),
            settings(Adam, [0.9, 0.999], 0.0, 0.0),
            settings(Adam, [0.9, 0.999], 0.05, 0.0),
            settings(Adam, [0.4, 0.99], 0.05, 0.0),
            settings(Adam, [0.0, 0.99], 0.05, 0.0),
            settings(Adamw, [0.9, 0.999], 0.1, 0.0),
            settings(Adamw, [0.4, 0.999], 0.1, 0.0),
            settings(Adamw, [0.0, 0.99], 0.05, 0.0),
            settings(Sgd, [0.9, 0.999], 0.0, 0.0),
            settings(Sgd, [0.9, 0.999], 0.01, 0.0),
            settings(Sgd, [0.9, 0.999], 0.0, 0.9),
            settings(Sgd, [0.9, 0.999], 0.01, 0.9),
        ]
    }

    /// Deterministic values: random sign, magnitude 10^U(-8, 0), with `+0`, `-0` and
    /// subnormals among them.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let sign = if x >> 63 == 0 { 1.0 } else { -1.0 };
                match (x >> 32) % 40 {
                    0 | 1 => sign * 0.0,
                    2 => sign * 3e-40,
                    _ => sign * 10f32.powf(-8.0 * ((x >> 8) as u32 as f32 / u32::MAX as f32)),
                }
            })
            .collect()
    }

    /// The multi-pass kernels the fused one replaced (`adam.rs` and `sgd.rs` before it),
    /// pass by pass, with L2 decay from candle ops: the bits the fused kernel must keep.
    fn multi_pass(
        s: &OptimSettings,
        p: &mut [f32],
        g: &[f32],
        m: Option<&mut [f32]>,
        v: Option<&mut [f32]>,
        step: u64,
        lr: f64,
    ) {
        let l2 = |p: &[f32]| -> Vec<f32> {
            if s.weight_decay > 0.0 {
                let d = Device::Cpu;
                let (pt, gt) = (Tensor::new(p, &d).unwrap(), Tensor::new(g, &d).unwrap());
                (gt + (pt * s.weight_decay).unwrap())
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            } else {
                g.to_vec()
            }
        };
        if s.name == OptimName::Sgd {
            let d = l2(p);
            let d = match m {
                Some(b) if step == 1 => {
                    b.copy_from_slice(&d);
                    b.to_vec()
                }
                Some(b) => {
                    let mu = s.momentum as f32;
                    b.iter_mut().zip(&d).for_each(|(b, &d)| *b = *b * mu + d);
                    b.to_vec()
                }
                None => d,
            };
            let neg_lr = (-lr) as f32;
            p.iter_mut().zip(&d).for_each(|(p, &d)| *p += neg_lr * d);
            return;
        }
        let k = Scalars::of(s, step, lr);
        let g = match k.adamw_scale {
            Some(f) => {
                p.iter_mut().for_each(|p| *p *= f);
                g.to_vec()
            }
            None => l2(p),
        };
        let m = match (k.w1, m) {
            (Some(w), Some(m)) => {
                if w.abs() < 0.5 {
                    m.iter_mut().zip(&g).for_each(|(m, &g)| *m += w * (g - *m));
                } else {
                    let u = 1.0 - w;
                    m.iter_mut()
                        .zip(&g)
                        .for_each(|(m, &g)| *m = g - (g - *m) * u);
                }
                m.to_vec()
            }
            _ => g.clone(),
        };
        let v = v.unwrap();
        let (b2, c) = (k.b2, k.c);
        v.iter_mut()
            .zip(&g)
            .for_each(|(v, &g)| *v = *v * b2 + c * g * g);
        let (neg_step, bc2, eps) = (k.neg_step, k.bc2, k.eps);
        for ((p, &m), &v) in p.iter_mut().zip(&m).zip(v.iter()) {
            *p += (neg_step * m) / (v.sqrt() / bc2 + eps);
        }
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|x| x.to_bits()).collect()
    }

    /// Weights and optional state of one layer.
    #[derive(Clone)]
    struct Layer {
        p: Vec<f32>,
        m: Option<Vec<f32>>,
        v: Option<Vec<f32>>,
    }

    fn layers(s: &OptimSettings, sizes: &[usize]) -> Vec<Layer> {
        let adam = s.name != OptimName::Sgd;
        let has_m = if adam {
            s.betas[0] > 0.0
        } else {
            s.momentum > 0.0
        };
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Layer {
                p: values(n, 100 + i as u64),
                // Adam's moments start at zero; SGD's buffer is overwritten at step 1.
                m: has_m.then(|| if adam { vec![0.0; n] } else { values(n, 7) }),
                v: adam.then(|| vec![0.0; n]),
            })
            .collect()
    }

    fn jobs<'a>(ls: &'a mut [Layer], gs: &'a [Vec<f32>], step: u64) -> Vec<Update<'a>> {
        ls.iter_mut()
            .zip(gs)
            .enumerate()
            .map(|(i, (l, g))| Update {
                p: &mut l.p,
                g,
                m: l.m.as_deref_mut(),
                v: l.v.as_deref_mut(),
                step,
                lr: 1e-2 * (1.0 + 0.3 * (step + i as u64) as f64),
            })
            .collect()
    }

    /// The fused kernel on 1, 2 and 7 threads gives the multi-pass kernels' bits, signed
    /// zeros included, step after step, for every variant; the layers (empty to large)
    /// are updated in one call, each with its own rate.
    #[test]
    fn fused_equals_the_multi_pass_kernels_bit_for_bit() {
        let sizes = [0, 1, 17, 1000, 65_537, 150_001];
        for s in cases() {
            let start = layers(&s, &sizes);
            let mut want = start.clone();
            let mut got: Vec<Vec<Layer>> = [1, 2, 7].iter().map(|_| start.clone()).collect();
            for step in 1..=4 {
                let gs: Vec<Vec<f32>> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| values(n, 1000 * step + i as u64))
                    .collect();
                for j in jobs(&mut want, &gs, step) {
                    multi_pass(&s, j.p, j.g, j.m, j.v, j.step, j.lr);
                }
                for (ls, threads) in got.iter_mut().zip([1, 2, 7]) {
                    update(&s, &mut jobs(ls, &gs, step), threads).unwrap();
                    for (i, (a, b)) in ls.iter().zip(&want).enumerate() {
                        let at = format!("{s:?} step {step} layer {i} threads {threads}");
                        assert_eq!(bits(&a.p), bits(&b.p), "{at}: p");
                        assert_eq!(
                            a.m.as_deref().map(bits),
                            b.m.as_deref().map(bits),
                            "{at}: m"
                        );
                        assert_eq!(
                            a.v.as_deref().map(bits),
                            b.v.as_deref().map(bits),
                            "{at}: v"
                        );
                    }
                }
            }
            assert_ne!(bits(&want[5].p), bits(&start[5].p), "{s:?}: nothing moved");
        }
    }

    /// The signed zeros of the documented arithmetic: a `-0` weight whose update is zero
    /// stays `-0` (PyTorch's `p + -0`), and L2 decay of a `-0` weight adds `+0` (candle's
    /// `p * wd + 0`), so a `-0` gradient becomes `+0`.
    #[test]
    fn signed_zeros_follow_pytorch_and_candle() {
        let adam = settings(OptimName::Adam, [0.0, 0.99], 0.0, 0.0);
        let sgd_l2 = settings(OptimName::Sgd, [0.9, 0.999], 0.5, 0.9);
        let (mut p, mut v, mut b) = ([-0.0f32, 0.0], [0.0f32; 2], [0.0f32; 2]);
        let g = [0.0f32, -0.0];
        let job = Update {
            p: &mut p,
            g: &g,
            m: None,
            v: Some(&mut v),
            step: 1,
            lr: 0.1,
        };
        update(&adam, &mut [job], 1).unwrap();
        // p + (-lr * 0) / denom: -0 + -0 = -0, +0 + +0 (from g = -0) = +0.
        assert_eq!(bits(&p), bits(&[-0.0, 0.0]));
        assert_eq!(bits(&v), bits(&[0.0, 0.0]));
        let mut p = [-0.0f32, -0.0];
        let job = Update {
            p: &mut p,
            g: &[-0.0, 0.0],
            m: Some(&mut b),
            v: None,
            step: 1,
            lr: 0.1,
        };
        update(&sgd_l2, &mut [job], 1).unwrap();
        // d = g + (-0 * 0.5 + 0) = g + 0 = +0 for both; buf = d; p = -0 + (-0.1 * +0) = -0.
        assert_eq!(bits(&b), bits(&[0.0, 0.0]));
        assert_eq!(bits(&p), bits(&[-0.0, -0.0]));
    }

    /// `update_layer` refuses state that shares a storage with another operand (locking
    /// it twice would hang) and otherwise updates the tensors in place.
    #[test]
    fn update_layer_refuses_shared_storage() {
        let s = settings(OptimName::Adam, [0.9, 0.999], 0.0, 0.0);
        let d = Device::Cpu;
        let t = |x: &[f32]| Tensor::new(x, &d).unwrap();
        let p = Var::from_tensor(&t(&[1.0, -2.0])).unwrap();
        let g = t(&[0.5, 0.5]);
        let (m, v) = (t(&[0.0, 0.0]), t(&[0.0, 0.0]));
        for (what, m, v) in [
            ("m", p.as_tensor(), &v),
            ("m", &g, &v),
            ("v", &m, &m),
            ("v", &m, p.as_tensor()),
        ] {
            let e = update_layer(&s, &p, &g, Some(m), Some(v), 1, 0.1).unwrap_err();
            let want = format!("`{what}` shares its storage");
            assert!(e.to_string().contains(&want), "{e}");
        }
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), [1.0, -2.0]);
        update_layer(&s, &p, &g, Some(&m), Some(&v), 1, 0.1).unwrap();
        // Adam's first step moves each weight by -lr * sign(g) (up to eps).
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] + 2.1).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(m.to_vec1::<f32>().unwrap(), [0.05, 0.05]);
    }

    /// Every vector width the CPU offers computes the baseline's bits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let n = 4099;
        for s in cases() {
            let gs = vec![values(n, 5)];
            let run = |f: &dyn Fn(Piece<'_>)| -> Layer {
                let mut ls = layers(&s, &[n]);
                let mut js = jobs(&mut ls, &gs, 3);
                let rule = Rule::of(&s, &js[0]).unwrap();
                let j = &mut js[0];
                f(Piece {
                    p: j.p,
                    g: j.g,
                    m: j.m.as_deref_mut(),
                    v: j.v.as_deref_mut(),
                    rule,
                });
                drop(js);
                ls.pop().unwrap()
            };
            let base = run(&|p| run_piece_any(p));
            let mut others: Vec<(&str, Layer)> = vec![("dispatched", run(&|p| run_piece(p)))];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    others.push(("avx2", run(&|p| unsafe { run_piece_avx2(p) })));
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    others.push(("avx512", run(&|p| unsafe { run_piece_avx512(p) })));
                }
            }
            for (name, l) in others {
                assert_eq!(bits(&l.p), bits(&base.p), "{s:?} {name}: p");
                assert_eq!(
                    l.m.as_deref().map(bits),
                    base.m.as_deref().map(bits),
                    "{s:?} {name}: m"
                );
                assert_eq!(
                    l.v.as_deref().map(bits),
                    base.v.as_deref().map(bits),
                    "{s:?} {name}: v"
                );
            }
        }
    }

    /// The split shares a large tensor between threads in pieces of about equal bytes
    /// that end on `SPLIT_ALIGN` elements and cover every element once.
    #[test]
    fn split_balances_bytes_and_covers_everything() {
        let s = settings(OptimName::Adam, [0.9, 0.999], 0.0, 0.0);
        let sizes = [10, 300_000, 33];
        let mut ls = layers(&s, &sizes);
        let gs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut js = jobs(&mut ls, &gs, 1);
        let rules: Vec<Rule> = js.iter().map(|j| Rule::of(&s, j).unwrap()).collect();
        let total: u64 = sizes.iter().map(|&n| 28 * n as u64).sum();
        let buckets = split(&mut js, &rules, 4, total);
        assert_eq!(buckets.len(), 4);
        let elems: Vec<usize> = buckets
            .iter()
            .map(|b| b.iter().map(|p| p.p.len()).sum())
            .collect();
        assert_eq!(elems.iter().sum::<usize>(), sizes.iter().sum::<usize>());
        let per = sizes.iter().sum::<usize>() / 4;
        for (k, &e) in elems.iter().enumerate() {
            // Each cut rounds up to SPLIT_ALIGN; the last bucket takes what is left.
            assert!(
                e.abs_diff(per) <= 3 * SPLIT_ALIGN,
                "bucket {k}: {e} elements, {per} wanted"
            );
        }
        // The large tensor is cut on SPLIT_ALIGN boundaries of its own elements.
        let mut offset = 0;
        for b in &buckets {
            for p in b.iter().filter(|p| p.p.len() > 1000) {
                assert_eq!(offset % SPLIT_ALIGN, 0);
                assert!(p.m.as_ref().unwrap().len() == p.p.len() && p.g.len() == p.p.len());
                offset += p.p.len();
            }
        }
        assert_eq!(offset, 300_000);
    }
}
