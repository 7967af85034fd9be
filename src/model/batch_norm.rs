//! BatchNorm2d with batch statistics as one recorded op on the CPU, bit for bit the
//! arithmetic of the candle graph it replaces.
//!
//! That graph (transpose to `[C, N*H*W]`, mean, centre, square, mean, `+ eps`, sqrt,
//! reciprocal, scale, transpose back, `* w`, `+ b`) cost two dozen activation-sized
//! tensors per layer in its backward: candle zero-fills and accumulates a gradient for
//! every node, and reduces `[N, C, H, W]` over `(0, 2, 3)` one element at a time through
//! an index division. Here the forward and backward are per-channel loops that round the
//! same operations in the same order: the row sums through candle's own `vec_reduce_sum`
//! (what its last-dimension reduction calls), the `(0, 2, 3)` sums in candle's element
//! order, `mean` as `sum * (1/m)` in the element type, and each elementwise step as candle
//! rounds it. A zero's sign may differ inside the backward (candle adds every gradient
//! to a zero first); it cannot change a non-zero value, and candle's accumulation into
//! the inputs' gradients makes it +0 again. Golden hashes are unchanged.

use super::dispatch::{
    channel_sums, narrowed, widened, with_cpu_slice, Float, HostKernel, HostOp, ELEMS_PER_TASK,
};
use anyhow::Result;
use candle_core::{CpuStorage, Device, Shape, Tensor, WithDType};
use rayon::prelude::*;

use std::sync::{Arc, OnceLock};

/// `(y, mean, var)`: BatchNorm2d of `x` `[N, C, H, W]` with the batch's statistics,
/// epsilon `eps`, scale `w` `[C]` and shift `b` `[C]` (all of one element type), then
/// with `relu` a ReLU. f32 and f64 compute in their own type; bf16 is normalized in f32
/// (as cuDNN does) and rounded once on the way out, the ReLU applied to the rounding:
/// the bits of widening the inputs, normalizing in f32 and narrowing, without the four
/// casts and the ReLU as graph nodes of their own (each a zero-filled, accumulated
/// gradient in candle's backward, and the ReLU's input an activation kept for it).
/// `mean` and the biased `var` are `[C]` in the compute type, untracked, for the
/// running buffers.
pub(super) fn batch_norm_train(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let stats = Arc::new(OnceLock::new());
    let op = BatchNorm {
        eps,
        relu,
        keep: x.track_op() || w.track_op(),
        saved: OnceLock::new(),
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, HostOp(op))?;
    let Some([mean, var]) = stats.get().cloned() else {
        anyhow::bail!("batch_norm: the forward did not record its statistics")
    };
    Ok((y, mean, var))
}

/// What the backward reads from the forward: the centred input `[C, N*H*W]` and, per
/// channel, `sqrt(var + eps)` and its reciprocal (`[2C]`), in the compute type.
struct Saved {
    centered: CpuStorage,
    sd_inv: CpuStorage,
}

/// The op. `relu`: a ReLU follows. `keep`: whether the backward needs the centred
/// input (the input or the scale is tracked; the shift's gradient needs only the
/// output's).
struct BatchNorm {
    eps: f64,
    relu: bool,
    keep: bool,
    saved: OnceLock<Saved>,
    stats: Arc<OnceLock<[Tensor; 2]>>,
}

/// `(n, c, h*w)` of an `[N, C, H, W]` shape.
fn dims(shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let (n, c, h, w) = shape.dims4()?;
    Ok((n, c, h * w))
}

/// candle's sum of a contiguous row (its last-dimension reduction), from zero.
fn row_sum<T: WithDType>(row: &[T]) -> T {
    let mut s = T::zero();
    // SAFETY: `row` is a valid slice of `row.len()` elements and `s` a valid output.
    unsafe { T::vec_reduce_sum(row.as_ptr(), &mut s, row.len()) };
    s
}

/// `1/m` as candle's `mean` scales a sum: computed in f64, rounded to `T`.
fn inv_count<T: WithDType>(m: usize) -> T {
    T::from_f64(1f64 / m as f64)
}

/// The centred input `[C, N*H*W]` of `x` `[N, C, H, W]` and, per channel, `(mean, var,
/// sqrt(var + eps), 1/that)`, rounded as candle's graph rounds them.
fn statistics<C: Float>(
    x: &[C],
    (n, c, hw): (usize, usize, usize),
    eps: f64,
) -> (Vec<C>, Vec<[C; 4]>) {
    let m = n * hw;
    let (scale, eps, zero) = (inv_count::<C>(m), C::from_f64(eps), C::zero());
    let mut centered = vec![zero; c * m];
    let mut per = vec![[zero; 4]; c];
    centered
        .par_chunks_mut(m.max(1))
        .zip(per.par_iter_mut())
        .enumerate()
        .for_each(|(ch, (row, st))| {
            for i in 0..n {
                row[i * hw..(i + 1) * hw].copy_from_slice(&x[(i * c + ch) * hw..][..hw]);
            }
            let mean = row_sum(row) * scale + zero;
            let mut sq = vec![zero; m];
            for (v, s) in row.iter_mut().zip(&mut sq) {
                *v -= mean;
                *s = *v * *v;
            }
            let var = row_sum(&sq) * scale + zero;
            let sd = (var * C::one() + eps).sqrt();
            *st = [mean, var, sd, C::one() / sd];
        });
    (centered, per)
}

impl HostKernel<3> for BatchNorm {
    const NAME: &'static str = "ldt-batch-norm";

    fn fwd<T: Float>(&self, [x, w, b]: [&[T]; 3], shape: &Shape) -> candle_core::Result<Vec<T>> {
        let (n, c, hw) = dims(shape)?;
        let m = n * hw;
        let (x, w, b) = (widened(x), widened(w), widened(b));
        let (w, b): (&[T::Sum], &[T::Sum]) = (&w, &b);
        let (centered, per) = statistics(&x, (n, c, hw), self.eps);
        let (zero, relu) = (T::zero(), self.relu);
        let mut y = vec![zero; n * c * hw];
        y.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(k, out)| {
                let (i, ch) = (k / c, k % c);
                let row = &centered[ch * m + i * hw..][..hw];
                let (inv, wc, bc) = (per[ch][3], w[ch], b[ch]);
                let normalized = row.iter().map(|v| T::narrow(*v * inv * wc + bc));
                for (o, v) in out.iter_mut().zip(normalized) {
                    *o = v;
                }
                if relu {
                    // As `layers::relu` computes it (a NaN becomes 0).
                    for o in out.iter_mut() {
                        *o = if *o > zero { *o } else { zero };
                    }
                }
            });
        let column = |k: usize| -> candle_core::Result<Tensor> {
            Tensor::from_vec(per.iter().map(|p| p[k]).collect(), c, &Device::Cpu)
        };
        let _ = self.stats.set([column(0)?, column(1)?]);
        if self.keep {
            let sd_inv = per.iter().map(|p| p[2]).chain(per.iter().map(|p| p[3]));
            let _ = self.saved.set(Saved {
                centered: <T::Sum as WithDType>::to_cpu_storage_owned(centered),
                sd_inv: <T::Sum as WithDType>::to_cpu_storage_owned(sd_inv.collect()),
            });
        }
        Ok(y)
    }

    /// In the compute type `T::Sum`: the output's gradient is read as the replaced
    /// graph delivers it (masked by the ReLU in `T` as `grad * (out > 0)`, then widened),
    /// and each input's gradient is rounded to `T` (the casts' backward).
    fn bwd<T: Float>(
        &self,
        [x, w, b]: [&Tensor; 3],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (grad, res) = (grad.contiguous()?, res.contiguous()?);
        let gy = with_cpu_slice::<T, _>(&grad, |g| {
            with_cpu_slice::<T, _>(&res, |out| {
                let (zero, one, relu) = (T::zero(), T::one(), self.relu);
                let sum_zero = T::Sum::from_f64(0.0);
                let mut gy = vec![sum_zero; g.len()];
                let chunks = g
                    .par_chunks(ELEMS_PER_TASK)
                    .zip(out.par_chunks(ELEMS_PER_TASK));
                gy.par_chunks_mut(ELEMS_PER_TASK)
                    .zip(chunks)
                    .for_each(|(gy, (g, out))| {
                        // Each added to zero, as candle accumulates a gradient (-0 to +0).
                        if relu {
                            let masked = g.iter().zip(out).map(|(&g, &o)| {
                                sum_zero + (g * T::select(o > zero, one, zero)).widen()
                            });
                            for (d, v) in gy.iter_mut().zip(masked) {
                                *d = v;
                            }
                        } else {
                            for (d, &g) in gy.iter_mut().zip(g) {
                                *d = sum_zero + g.widen();
                            }
                        }
                    });
                gy
            })
        })??;
        let [gx, gw, gb] = self.grads::<T::Sum>([x, w, b], &gy)?;
        let to_t = |v: Option<Vec<T::Sum>>, like: &Tensor| {
            v.map(|v| Tensor::from_vec(narrowed::<T>(v), like.shape(), &Device::Cpu))
                .transpose()
        };
        Ok([to_t(gx, x)?, to_t(gw, w)?, to_t(gb, b)?])
    }
}

impl BatchNorm {
    /// The gradients of `x`, `w` and `b` (those tracked) in the compute type `C`, from
    /// `gy`, the normalized output's gradient `[N, C, H, W]`.
    fn grads<C: Float>(
        &self,
        [x, w, b]: [&Tensor; 3],
        gy: &[C],
    ) -> candle_core::Result<[Option<Vec<C>>; 3]> {
        let (n, c, hw) = dims(x.shape())?;
        let m = n * hw;
        let gy = |ch: usize, i: usize, q: usize| gy[(i * c + ch) * hw + q];
        let gb = match b.track_op() {
            true => Some(channel_sums(n, c, hw, gy)),
            false => None,
        };
        if !(x.track_op() || w.track_op()) {
            return Ok([None, None, gb]);
        }
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("ldt-batch-norm: an input became tracked after the forward")
        };
        let centered = C::cpu_storage_as_slice(&saved.centered)?;
        let sd_inv = C::cpu_storage_as_slice(&saved.sd_inv)?;
        let (sd, inv) = sd_inv.split_at(c);
        // The scale in the compute type, as the replaced graph widened it.
        let wv: Vec<C> = w.to_dtype(C::DTYPE)?.flatten_all()?.to_vec1::<C>()?;
        let gw = match w.track_op() {
            true => Some(channel_sums(n, c, hw, |ch, i, q| {
                gy(ch, i, q) * (centered[ch * m + i * hw + q] * inv[ch])
            })),
            false => None,
        };
        let gx = if x.track_op() {
            // Per channel the two scalars of the chain, then every element from them:
            // the elementwise steps recomputed round the same.
            let scalars = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let row = &centered[ch * m..(ch + 1) * m];
                    let gt = |i: usize, q: usize| gy(ch, i, q) * wv[ch];
                    input_scalars(row, hw, (sd[ch], inv[ch]), gt)
                })
                .collect::<Vec<_>>();
            let two = C::from_f64(2.0);
            let mut gx = vec![C::zero(); n * c * hw];
            gx.par_chunks_mut(hw.max(1))
                .enumerate()
                .for_each(|(k, out)| {
                    let (i, ch) = (k / c, k % c);
                    let (g_s2, g_s1) = scalars[ch];
                    let row = &centered[ch * m + i * hw..][..hw];
                    for (q, (o, v)) in out.iter_mut().zip(row).enumerate() {
                        let gc = gy(ch, i, q) * wv[ch] * inv[ch] + (*v * g_s2 * two + C::zero());
                        *o = gc + g_s1;
                    }
                });
            Some(gx)
        } else {
            None
        };
        Ok([gx, gw, gb])
    }
}

/// One channel's `(d/d(sum of squares), d/d(sum))` from its centred input `[N*H*W]`
/// (image-major, rows of `hw`), its `(sqrt(var + eps), 1/that)` and `gt(i, q)`, the
/// gradient of its normalized value at image `i`, pixel `q` (the output's times the
/// scale): candle's backward of the forward chain, step by step, in its rounding. The
/// input's gradient at `(i, q)` is then `(gt(i, q) * inv + centred * d_s2 * 2 + 0) +
/// d_s1`.
fn input_scalars<T: Float>(
    centered: &[T],
    hw: usize,
    (sd, inv): (T, T),
    gt: impl Fn(usize, usize) -> T,
) -> (T, T) {
    let m = centered.len();
    let scale = inv_count::<T>(m);
    let (two, half) = (T::from_f64(2.0), T::from_f64(0.5));
    // Image by image: the pixel's position without a division per element.
    let rows = || centered.chunks_exact(hw.max(1)).enumerate();
    // d/d(inv): the sum of the normalized gradient times the centred input.
    let mut scratch = Vec::with_capacity(m);
    for (i, row) in rows() {
        scratch.extend(row.iter().enumerate().map(|(q, v)| gt(i, q) * *v));
    }
    let g_inv = row_sum(&scratch);
    // inv = 1/sd, sd = sqrt(ve), ve = var * 1 + eps, var = sum(sq) * (1/m).
    let g_sd = T::zero() - g_inv / (sd * sd);
    let g_ve = g_sd / sd * half + T::zero();
    let g_var = g_ve * T::one() + T::zero();
    let g_s2 = g_var * scale + T::zero();
    // d/d(centred) through the scale and through the square; centred = x - mean and
    // mean = sum(x) * (1/m) give d/d(sum) from its negated row sum.
    for ((i, row), out) in rows().zip(scratch.chunks_exact_mut(hw.max(1))) {
        for (q, (s, v)) in out.iter_mut().zip(row).enumerate() {
            let gc = gt(i, q) * inv + (*v * g_s2 * two + T::zero());
            *s = T::zero() - gc;
        }
    }
    let g_s1 = row_sum(&scratch) * scale + T::zero();
    (g_s2, g_s1)
}
