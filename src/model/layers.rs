//! Layer functions with exact gradients, composed of candle ops that record backward.
//!
//! candle-nn's fused norms and softmax record no backward and its max-pool backward needs
//! kernel == stride and splits ties; these versions follow PyTorch's arithmetic instead.

use super::dispatch::{
    apply_weight_op, flat_values, generic_path, read_values, with_cpu_slice, zip_map, Float,
    HostKernel, HostOp, WeightKernel, ELEMS_PER_TASK,
};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

/// `y = x W^T + b` (PyTorch `Linear`, weight `[out, in]`).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = super::matmul::matmul(x, &w.t()?)?;
    Ok(match b {
        Some(b) => super::matmul::broadcast_add(&y, b)?,
        None => y,
    })
}

/// 2-D convolution, weight `[O, I, kh, kw]`, symmetric zero padding (im2col + GEMM).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    super::conv::conv2d(x, w, b, stride, padding)
}

#[doc(hidden)]
pub use super::conv::conv2d_generic;

/// Rectified linear unit with PyTorch's gradient: zero where the input is <= 0
/// (candle's relu passes the gradient at exactly 0).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if generic_path(x) {
        return relu_generic(x);
    }
    Ok(x.contiguous()?.apply_op1(HostOp(Relu))?)
}

/// [`relu`] from candle's differentiable ops, on any device: `x * (x > 0)` with the mask
/// recorded as a constant, so the gradient is zero where `x <= 0` (candle's own `relu`
/// passes it at exactly 0). Used off the CPU; public so tests can run it on the CPU.
#[doc(hidden)]
pub fn relu_generic(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul(&x.gt(0.0)?.to_dtype(x.dtype())?)?)
}

struct Relu;

impl HostKernel<1> for Relu {
    const NAME: &'static str = "ldt-relu";

    fn fwd<T: Float>(&self, [x]: [&[T]; 1], _: &Shape) -> candle_core::Result<Vec<T>> {
        let z = T::zero();
        Ok(x.iter().map(|&x| if x > z { x } else { z }).collect())
    }

    fn bwd<T: Float>(
        &self,
        [arg]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        // `grad * (x > 0)`, in one pass instead of candle's three.
        let gx = relu_grad::<T>(grad, &arg.contiguous()?)?;
        Ok([Some(Tensor::from_vec(gx, arg.shape(), arg.device())?)])
    }
}

/// `relu(a + b)` for `a` and `b` of one shape and dtype (a residual block's end), with
/// the bits of the two apart. On the CPU one op: the sum is not kept for the backward
/// and costs no graph node (a zero-filled, accumulated gradient) of its own.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if generic_path(a) || a.shape() != b.shape() || a.dtype() != b.dtype() {
        return relu(&(a + b)?);
    }
    Ok(a.contiguous()?
        .apply_op2(&b.contiguous()?, HostOp(AddRelu))?)
}

struct AddRelu;

impl HostKernel<2> for AddRelu {
    const NAME: &'static str = "ldt-add-relu";

    fn fwd<T: Float>(&self, [a, b]: [&[T]; 2], _: &Shape) -> candle_core::Result<Vec<T>> {
        let z = T::zero();
        Ok(zip_map(a, b, |a, b| {
            let v = a + b;
            if v > z {
                v
            } else {
                z
            }
        }))
    }

    fn bwd<T: Float>(
        &self,
        [a, b]: [&Tensor; 2],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        // The ReLU's `grad * (a + b > 0)` (the output is > 0 exactly where the sum is),
        // which the sum passes to both of its inputs.
        let gx = relu_grad::<T>(grad, &res.contiguous()?)?;
        let gx = Tensor::from_vec(gx, a.shape(), a.device())?;
        Ok([a.track_op().then(|| gx.clone()), b.track_op().then_some(gx)])
    }
}

/// The ReLU's backward, `grad * (x > 0)` with the mask as 1 or 0 in `T` (the arithmetic
/// of the generic path), `x` contiguous: for [`relu`] its input, for [`add_relu`] its
/// output (positive exactly where the input is).
fn relu_grad<T: Float>(grad: &Tensor, x: &Tensor) -> candle_core::Result<Vec<T>> {
    let (z, one) = (T::zero(), T::one());
    with_cpu_slice::<T, _>(&grad.contiguous()?, |g| {
        with_cpu_slice::<T, _>(x, |x| zip_map(g, x, |g, x| g * T::select(x > z, one, z)))
    })?
}

/// PyTorch's `PixelShuffle(r)`: `[N, C*r*r, H, W] -> [N, C, H*r, W*r]`, output
/// `(c, y*r + i, x*r + j)` = input `(c*r*r + i*r + j, y, x)`. A reshape, a permute and a
/// copy: exact data movement on any device, whose backward candle records (the inverse
/// movement).
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if r == 0 || !c.is_multiple_of(r * r) {
        anyhow::bail!("pixel_shuffle: {c} channels are not a multiple of {r}x{r}");
    }
    let c = c / (r * r);
    Ok(x.reshape((n, c, r, r, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((n, c, h * r, w * r))?)
}

/// Max pooling with PyTorch semantics: `-inf` padding, the first maximum of a window
/// takes the whole gradient. Any kernel, stride and padding.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if generic_path(x) {
        return max_pool2d_generic(x, kernel, stride, padding);
    }
    Ok(x.contiguous()?.apply_op1(HostOp(MaxPool2d {
        kernel,
        stride,
        padding,
    }))?)
}

/// [`max_pool2d`] from candle's differentiable ops, on any device: the input is padded
/// with `-inf` (plus `stride` more rows and columns at the end, never read, so every
/// window offset has a full strided view), and the `kernel*kernel` strided views
/// (narrow + reshape) are folded in window order with `where_cond`, a later element
/// replacing the running maximum only when strictly greater (or a NaN over a number):
/// the first maximum takes the whole gradient, as in PyTorch. Used off the CPU; public
/// so tests can run it on the CPU.
#[doc(hidden)]
pub fn max_pool2d_generic(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if kernel == 0 || stride == 0 || h + 2 * padding < kernel || w + 2 * padding < kernel {
        anyhow::bail!(
            "max_pool2d: kernel {kernel}, stride {stride}, padding {padding} do not fit {h}x{w}"
        );
    }
    let geo = MaxPool2d {
        kernel,
        stride,
        padding,
    };
    let (oh, ow) = (geo.out_dim(h), geo.out_dim(w));
    let (hp, wp) = (h + 2 * padding + stride, w + 2 * padding + stride);
    // -inf outside the image, 0 inside.
    let mut mask = vec![f32::NEG_INFINITY; hp * wp];
    for iy in 0..h {
        mask[(iy + padding) * wp + padding..][..w].fill(0.0);
    }
    let mask = Tensor::from_vec(mask, (1, 1, hp, wp), x.device())?.to_dtype(x.dtype())?;
    let xp = x
        .pad_with_zeros(2, padding, padding + stride)?
        .pad_with_zeros(3, padding, padding + stride)?
        .broadcast_add(&mask)?;
    let mut best: Option<Tensor> = None;
    for ky in 0..kernel {
        for kx in 0..kernel {
            let v = xp
                .narrow(2, ky, oh * stride)?
                .narrow(3, kx, ow * stride)?
                .reshape((n, c, oh, stride, ow * stride))?
                .narrow(3, 0, 1)?
                .reshape((n, c, oh, ow, stride))?
                .narrow(4, 0, 1)?
                .reshape((n, c, oh, ow))?;
            best = Some(match best {
                None => v,
                Some(b) => {
                    let nan_over_number = v.ne(&v)?.mul(&b.eq(&b)?)?;
                    let take = v.gt(&b)?.add(&nan_over_number)?;
                    take.where_cond(&v, &b)?
                }
            });
        }
    }
    Ok(best.expect("kernel >= 1"))
}

/// One plane's output `o` (row width `ow`) for 2x2 windows at stride 2 without padding,
/// from the input `plane` (row width `w`): each window's [`window_max`].
fn window_maxes<T: WithDType>(plane: &[T], o: &mut [T], w: usize, ow: usize) {
    for (oy, o) in o.chunks_exact_mut(ow).enumerate() {
        let top = &plane[2 * oy * w..][..2 * ow];
        let bottom = &plane[(2 * oy + 1) * w..][..2 * ow];
        let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
        for (o, (t, b)) in o.iter_mut().zip(pairs) {
            *o = window_max([t[0], t[1], b[0], b[1]]);
        }
    }
}

/// One plane's input gradient `gp` (zeros) for 2x2 windows at stride 2 without
/// padding, from the input `plane` (row width `w`) and the output's gradient `go` (row
/// width `ow`): each window's first maximum ([`window_max`]) takes `0 + go`, as the
/// generic path's accumulation into zeros gives it. Windows do not overlap, so every
/// element is written once. Selects on values, no branch on the data: with branches
/// (the generic path's) the baseline x86-64 build mispredicted on most windows.
fn window_grads<T: WithDType>(plane: &[T], gp: &mut [T], go: &[T], w: usize, ow: usize) {
    let z = T::zero();
    for (oy, go) in go.chunks_exact(ow).enumerate() {
        let (top, bottom) = (2 * oy * w, (2 * oy + 1) * w);
        let (xt, xb) = (&plane[top..][..2 * ow], &plane[bottom..][..2 * ow]);
        let (gt, gb) = gp[top..bottom + 2 * ow].split_at_mut(w);
        let x = xt.chunks_exact(2).zip(xb.chunks_exact(2));
        let g = gt[..2 * ow].chunks_exact_mut(2).zip(gb.chunks_exact_mut(2));
        for (((t, b), (gt, gb)), &go) in x.zip(g).zip(go) {
            let v = [t[0], t[1], b[0], b[1]];
            let best = window_max(v);
            // The first element that is the maximum (or, the maximum a NaN, the first
            // NaN) takes the gradient.
            #[allow(clippy::eq_op)] // NaN tests in any `T`
            let hit = v.map(|x| (x == best) | (x != x));
            let g = z + go;
            let mut taken = false;
            let mut out = [z; 4];
            for (o, h) in out.iter_mut().zip(hit) {
                *o = if h & !taken { g } else { z };
                taken |= h;
            }
            gt.copy_from_slice(&out[..2]);
            gb.copy_from_slice(&out[2..]);
        }
    }
}

/// The first maximum of a window's elements `v` in reading order, a NaN at once: the
/// rule of [`MaxPool2d::argmax`], as a running value in selects.
#[inline]
fn window_max<T: WithDType, const K: usize>(v: [T; K]) -> T {
    let mut best = v[0];
    for &x in &v[1..] {
        #[allow(clippy::eq_op)] // NaN tests in any `T`
        let take = (x > best) | ((x != x) & (best == best));
        best = if take { x } else { best };
    }
    best
}

struct MaxPool2d {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool2d {
    fn out_dim(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Index (within one `H*W` plane) of the first maximum of output cell `(oy, ox)`
    /// (a NaN wins at once, as in PyTorch), the window read row by row. Generic over the
    /// float type (f32, f64). The window is clipped to the plane once, not per element.
    fn argmax<T: WithDType>(&self, plane: &[T], h: usize, w: usize, oy: usize, ox: usize) -> usize {
        let (y0, x0) = (oy * self.stride, ox * self.stride);
        // Window rows and columns inside the plane (padding reads nothing).
        let (ky_lo, kx_lo) = (
            self.padding.saturating_sub(y0),
            self.padding.saturating_sub(x0),
        );
        let ky_hi = self.kernel.min((h + self.padding).saturating_sub(y0));
        let kx_hi = self.kernel.min((w + self.padding).saturating_sub(x0));
        let mut idx = usize::MAX;
        let mut best = T::zero();
        for ky in ky_lo..ky_hi {
            let row = (y0 + ky - self.padding) * w;
            for kx in kx_lo..kx_hi {
                let i = row + x0 + kx - self.padding;
                let v = plane[i];
                #[allow(clippy::eq_op)] // NaN test in any `T`
                let nan = v != v;
                if idx == usize::MAX || v > best || nan {
                    best = v;
                    idx = i;
                    if nan {
                        return idx;
                    }
                }
            }
        }
        idx
    }

    /// The 2x2 window at stride 2 without padding (the `cnn`s' pooling), which has a
    /// path of its own ([`window_maxes`], [`window_grads`]).
    fn is_2x2(&self) -> bool {
        (self.kernel, self.stride, self.padding) == (2, 2, 0)
    }

    /// Calls `f(cell, index)` for every output cell of one `H*W` plane (cells in row
    /// order) with the index of its window's first maximum ([`MaxPool2d::argmax`]).
    fn plane_argmax<T: WithDType>(
        &self,
        plane: &[T],
        h: usize,
        w: usize,
        mut f: impl FnMut(usize, usize),
    ) {
        let (oh, ow) = (self.out_dim(h), self.out_dim(w));
        for oy in 0..oh {
            for ox in 0..ow {
                f(oy * ow + ox, self.argmax(plane, h, w, oy, ox));
            }
        }
    }

    /// Planes per parallel task: about 4096 output cells, so that a small plane (a
    /// 14x14 map) is not one task each.
    fn planes_per_task(&self, oh: usize, ow: usize) -> usize {
        (4096 / (oh * ow).max(1)).max(1)
    }

    /// The input gradient, summed in `T` over overlapping windows; `arg` is in `T`, and
    /// `grad_res` (in the input's element type: bf16 for a bf16 input) is widened to `T`
    /// unless it is in `T` already, then read in place.
    fn grad<T: WithDType>(&self, arg: &Tensor, grad_res: &Tensor) -> candle_core::Result<Tensor> {
        let (_n, _c, h, w) = arg.dims4()?;
        let (oh, ow) = (self.out_dim(h), self.out_dim(w));
        let k = self.planes_per_task(oh, ow);
        let (arg, grad_res) = (
            arg.contiguous()?,
            grad_res.to_dtype(T::DTYPE)?.contiguous()?,
        );
        let gx = with_cpu_slice::<T, _>(&arg, |x| {
            with_cpu_slice::<T, _>(&grad_res, |g| {
                let mut gx = vec![T::zero(); x.len()];
                gx.par_chunks_mut(k * h * w)
                    .zip(x.par_chunks(k * h * w))
                    .zip(g.par_chunks(k * oh * ow))
                    .for_each(|((gp, xp), gop)| {
                        let planes = gp.chunks_mut(h * w).zip(xp.chunks(h * w));
                        for ((gp, plane), go) in planes.zip(gop.chunks(oh * ow)) {
                            if self.is_2x2() {
                                window_grads(plane, gp, go, w, ow);
                            } else {
                                self.plane_argmax(plane, h, w, |cell, i| gp[i] += go[cell]);
                            }
                        }
                    });
                gx
            })
        })??;
        Tensor::from_vec(gx, arg.shape(), arg.device())
    }
}

impl HostKernel<1> for MaxPool2d {
    const NAME: &'static str = "ldt-max-pool2d";

    fn shape(&self, x: &Shape) -> candle_core::Result<Shape> {
        let (n, c, h, w) = x.dims4()?;
        Ok(Shape::from((n, c, self.out_dim(h), self.out_dim(w))))
    }

    fn fwd<T: Float>(&self, [x]: [&[T]; 1], shape: &Shape) -> candle_core::Result<Vec<T>> {
        let (n, c, h, w) = shape.dims4()?;
        let (oh, ow) = (self.out_dim(h), self.out_dim(w));
        let k = self.planes_per_task(oh, ow);
        let mut out = vec![T::zero(); n * c * oh * ow];
        out.par_chunks_mut(k * oh * ow)
            .zip(x.par_chunks(k * h * w))
            .for_each(|(op, xp)| {
                for (o, plane) in op.chunks_mut(oh * ow).zip(xp.chunks(h * w)) {
                    if self.is_2x2() {
                        window_maxes(plane, o, w, ow);
                    } else {
                        self.plane_argmax(plane, h, w, |cell, i| o[cell] = plane[i]);
                    }
                }
            });
        Ok(out)
    }

    /// Overlapping windows add up in `T::Sum` (f32 for bf16), rounded once.
    fn bwd<T: Float>(
        &self,
        [arg]: [&Tensor; 1],
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let gx = self.grad::<T::Sum>(&arg.to_dtype(T::Sum::DTYPE)?, grad_res)?;
        Ok([Some(gx.to_dtype(T::DTYPE)?)])
    }
}

/// BatchNorm2d buffers `(running_mean, running_var, num_batches_tracked)`.
pub struct BnBuffers<'a> {
    /// Running mean `[C]`.
    pub mean: &'a mut Tensor,
    /// Running (unbiased) variance `[C]`.
    pub var: &'a mut Tensor,
    /// Batches seen, i64 scalar.
    pub count: &'a mut Tensor,
}

/// PyTorch's BatchNorm2d momentum and epsilon defaults.
pub const BN_MOMENTUM: f64 = 0.1;
/// BatchNorm epsilon.
pub const BN_EPS: f64 = 1e-5;

/// BatchNorm2d: batch statistics in `Train`/`Stats` (running statistics updated with
/// momentum 0.1 and the unbiased variance only in `Train`), running statistics in `Eval`.
pub fn batch_norm2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    buf: BnBuffers<'_>,
    mode: super::Mode,
) -> Result<Tensor> {
    batch_norm2d_act(x, w, b, buf, mode, false)
}

/// [`batch_norm2d`] then [`relu`], with the bits of the two apart. On the CPU in
/// `Train`/`Stats` one op: the ReLU's input (the normalized activation) is not kept
/// for the backward, and neither it nor the bf16 casts around the normalization cost a
/// graph node of their own.
pub fn batch_norm2d_relu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    buf: BnBuffers<'_>,
    mode: super::Mode,
) -> Result<Tensor> {
    batch_norm2d_act(x, w, b, buf, mode, true)
}

/// [`batch_norm2d`], with `relu` followed by a ReLU.
fn batch_norm2d_act(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    buf: BnBuffers<'_>,
    mode: super::Mode,
    relu: bool,
) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    // bf16 activations are normalized in f32 (as cuDNN does) and rounded once on the way
    // out; the running statistics stay f32.
    let dt = x.dtype();
    let ct = compute_dtype(dt);
    let (y, stats) = if mode == super::Mode::Eval {
        let (x, w, b) = (&x.to_dtype(ct)?, &w.to_dtype(ct)?, &b.to_dtype(ct)?);
        let mean = buf.mean.reshape((1, c, 1, 1))?;
        let inv = (buf.var.reshape((1, c, 1, 1))? + BN_EPS)?.sqrt()?.recip()?;
        let y = x.broadcast_sub(&mean)?.broadcast_mul(&inv)?;
        let y = super::matmul::broadcast_mul(&y, &w.reshape((1, c, 1, 1))?)?;
        let y = super::matmul::broadcast_add(&y, &b.reshape((1, c, 1, 1))?)?;
        (y.to_dtype(dt)?, None)
    } else if generic_path(x) {
        let (x, w, b) = (&x.to_dtype(ct)?, &w.to_dtype(ct)?, &b.to_dtype(ct)?);
        let (y, mean, var) = batch_norm_generic(x, w, b)?;
        (y.to_dtype(dt)?, Some((mean, var)))
    } else {
        // One op in `dt` itself (bf16 normalized in f32 inside), the ReLU fused.
        let (w, b) = (&w.to_dtype(dt)?, &b.to_dtype(dt)?);
        let (y, mean, var) = super::batch_norm::batch_norm_train(x, w, b, BN_EPS, relu)?;
        return finish_batch_norm(y, (mean, var), buf, mode, n * h * wd);
    };
    let y = if relu { self::relu(&y)? } else { y };
    match stats {
        Some(stats) => finish_batch_norm(y, stats, buf, mode, n * h * wd),
        None => Ok(y),
    }
}

/// Updates the running buffers from the batch statistics `(mean, biased var)` over `m`
/// values per channel in `Train` (not in `Stats`), and returns `y`.
fn finish_batch_norm(
    y: Tensor,
    (mean, var): (Tensor, Tensor),
    buf: BnBuffers<'_>,
    mode: super::Mode,
    m: usize,
) -> Result<Tensor> {
    if mode == super::Mode::Train {
        let m = m as f64;
        let var_unbiased = (var * (m / (m - 1.0).max(1.0)))?;
        *buf.mean = ((&*buf.mean * (1.0 - BN_MOMENTUM))? + (mean * BN_MOMENTUM)?)?;
        *buf.var = ((&*buf.var * (1.0 - BN_MOMENTUM))? + (var_unbiased * BN_MOMENTUM)?)?;
        *buf.count = (&*buf.count + 1.0)?;
    }
    Ok(y)
}

/// BatchNorm2d with the batch's statistics from candle's differentiable ops, on any
/// device: `(y, mean, biased var)`, the statistics `[C]` and untracked. Off the CPU;
/// the CPU runs the same arithmetic as one op (`model::batch_norm`).
fn batch_norm_generic(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, h, wd) = x.dims4()?;
    let xt = x.transpose(0, 1)?.reshape((c, n * h * wd))?;
    let mean = xt.mean_keepdim(1)?;
    let centered = xt.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(1)?;
    let inv = (&var + BN_EPS)?.sqrt()?.recip()?;
    // Back to `[N, C, H, W]` in memory order, so that the scale and shift below (and
    // their backward) take candle's contiguous broadcast path instead of indexing a
    // transposed view.
    let y = centered
        .broadcast_mul(&inv)?
        .reshape((c, n, h, wd))?
        .transpose(0, 1)?
        .contiguous()?;
    let y = super::matmul::broadcast_mul(&y, &w.reshape((1, c, 1, 1))?)?;
    let y = super::matmul::broadcast_add(&y, &b.reshape((1, c, 1, 1))?)?;
    Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
}

/// Log-softmax over the last dimension; the max is detached (it only shifts the
/// logits), so the gradient is exactly `softmax - onehot` without a cancelling term.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(diff.broadcast_sub(&lse)?)
}

/// Mean cross-entropy of logits `[N, K]` against i64 labels `[N]`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let lsm = log_softmax(logits)?;
    let picked = lsm.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

// ------------------------------------------------------------------ transformer layers
//
// LayerNorm, GELU and softmax as custom ops: candle's fused versions record no backward,
// and compositions of elementwise ops cost several passes over the activations. Each
// forward reduces in f64 and rounds once; each backward is the exact analytic gradient,
// also reduced in f64. All accept f32, f64 and bf16 tensors.

/// Layer normalization over the last dimension (biased variance), then the affine
/// `weight`/`bias` of that dimension: PyTorch `LayerNorm(dim, eps)`. timm's ViT uses
/// eps 1e-6. One fused op: the backward gives `dx`, `dweight` and `dbias` at once.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] || b.dims() != [d] {
        anyhow::bail!(
            "layer_norm: weight {:?} and bias {:?} must be [{d}]",
            w.dims(),
            b.dims()
        );
    }
    if generic_path(x) {
        return layer_norm_generic(x, w, b, eps);
    }
    Ok(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        HostOp(LayerNorm { eps }),
    )?)
}

/// The dtype the layers written in tensor ops (the generic paths, batch norm) compute
/// in: f32 for bf16 (rounded once on the way out, as the CPU ops round their f64 results
/// once), else the tensor's own.
fn compute_dtype(dt: DType) -> DType {
    if dt == DType::BF16 {
        DType::F32
    } else {
        dt
    }
}

/// [`layer_norm`] from candle's differentiable ops, on any device (mean, centred
/// square mean, `1/sqrt(var + eps)`, affine), reduced in the compute dtype rather than
/// in f64. Used off the CPU; public so tests can run it on the CPU.
#[doc(hidden)]
pub fn layer_norm_generic(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let ct = compute_dtype(dt);
    let (x, w, b) = (&x.to_dtype(ct)?, &w.to_dtype(ct)?, &b.to_dtype(ct)?);
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let y = super::matmul::broadcast_mul(&centered.broadcast_mul(&rstd)?, w)?;
    Ok(super::matmul::broadcast_add(&y, b)?.to_dtype(dt)?)
}

/// `(x - mean) / sqrt(var + eps) * w + b` per row of the last dimension.
struct LayerNorm {
    eps: f64,
}

impl LayerNorm {
    /// Mean and `1/sqrt(var + eps)` of one row, accumulated in f64.
    fn moments<T: WithDType>(&self, row: &[T]) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
        let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    /// With `h = g * w`: `dx = rstd * (h - mean(h) - xhat * mean(h * xhat))` per row,
    /// `dw = sum_rows(g * xhat)`, `db = sum_rows(g)`.
    fn grad<T: WithDType>(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let d = w.elem_count().max(1);
        let ws: Vec<f64> = flat_values::<T>(w)?.iter().map(|v| v.to_f64()).collect();
        let (gx, dw, db) = read_values::<T, _>(x, |xs| {
            read_values::<T, _>(grad, |gs| {
                let mut gx = vec![T::zero(); xs.len()];
                // Per-row work in parallel; each chunk of rows returns its partial dw and db.
                let rows_per_task = (4096 / d).max(1);
                let partial: Vec<(Vec<f64>, Vec<f64>)> = gx
                    .par_chunks_mut(d * rows_per_task)
                    .zip(
                        xs.par_chunks(d * rows_per_task)
                            .zip(gs.par_chunks(d * rows_per_task)),
                    )
                    .map(|(o, (x, g))| {
                        let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
                        let mut h = vec![0f64; d];
                        let mut xhat = vec![0f64; d];
                        for ((o, row), g) in o.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                            let (mean, rstd) = self.moments(row);
                            for k in 0..d {
                                let gk = g[k].to_f64();
                                xhat[k] = (row[k].to_f64() - mean) * rstd;
                                h[k] = gk * ws[k];
                                dw[k] += gk * xhat[k];
                                db[k] += gk;
                            }
                            let n = d as f64;
                            let mh = h.iter().sum::<f64>() / n;
                            let mhx = h.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n;
                            for k in 0..d {
                                o[k] = T::from_f64(rstd * (h[k] - mh - xhat[k] * mhx));
                            }
                        }
                        (dw, db)
                    })
                    .collect();
                let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
                for (pw, pb) in partial {
                    for k in 0..d {
                        dw[k] += pw[k];
                        db[k] += pb[k];
                    }
                }
                (gx, dw, db)
            })
        })??;
        let to_t = |v: Vec<f64>| -> Vec<T> { v.into_iter().map(T::from_f64).collect() };
        Ok((
            Tensor::from_vec(gx, x.shape(), x.device())?,
            Tensor::from_vec(to_t(dw), w.shape(), w.device())?,
            Tensor::from_vec(to_t(db), w.shape(), w.device())?,
        ))
    }
}

impl HostKernel<3> for LayerNorm {
    const NAME: &'static str = "ldt-layer-norm";

    fn fwd<T: Float>(&self, [x, w, b]: [&[T]; 3], _: &Shape) -> candle_core::Result<Vec<T>> {
        let d = w.len().max(1);
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let (mean, rstd) = self.moments(row);
                for (k, (o, v)) in o.iter_mut().zip(row).enumerate() {
                    *o = T::from_f64((v.to_f64() - mean) * rstd * w[k].to_f64() + b[k].to_f64());
                }
            });
        Ok(out)
    }

    fn bwd<T: Float>(
        &self,
        [x, w, _b]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (gx, gw, gb) = self.grad::<T>(x, w, grad)?;
        Ok([Some(gx), Some(gw), Some(gb)])
    }
}

/// `y + b` with `b` `[n]` added to every row of `y` `[.., n]` (a Linear's bias). The
/// bias gradient is the row sum, accumulated in f64 in one pass (candle's broadcast
/// backward reduces the leading dimensions element by element, which dominated ViT
/// steps).
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = y.dim(D::Minus1)?;
    if b.dims() != [n] {
        anyhow::bail!("add_bias: bias {:?} does not fit rows of {n}", b.dims());
    }
    if generic_path(y) {
        return add_bias_generic(y, b);
    }
    Ok(y.contiguous()?
        .apply_op2(&b.contiguous()?, HostOp(AddBias))?)
}

/// [`add_bias`] as candle's `broadcast_add`, on any device (its backward sums the bias
/// gradient in the tensor's dtype). Used off the CPU; public so tests can run it on the
/// CPU.
#[doc(hidden)]
pub fn add_bias_generic(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(y.broadcast_add(b)?)
}

/// Linear `y = x W^T + b` over the last dimension of any-rank `x` (leading dimensions
/// flattened into rows), bias through [`add_bias`]. On the CPU one recorded op
/// ([`LinearRows`]) with the bits of the chain of candle ops the generic path records.
pub fn linear_rows(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let last = dims.pop().unwrap_or(1);
    let rows: usize = dims.iter().product();
    let out = w.dim(0)?;
    let fits = w.dims() == [out, last] && b.is_none_or(|b| b.dims() == [out]);
    if !generic_path(x) && fits && rows * last * out > 0 {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let b = b.map(Tensor::contiguous).transpose()?;
        let op = LinearRows { rows, last, out };
        return Ok(apply_weight_op(&x, &w, b.as_ref(), op)?);
    }
    let y = super::matmul::matmul(&x.reshape((rows, last))?, &w.t()?)?;
    let y = match b {
        Some(b) => add_bias(&y, b)?,
        None => y,
    };
    dims.push(w.dim(0)?);
    Ok(y.reshape(dims)?)
}

struct AddBias;

impl AddBias {
    /// The bias gradient: row sums of `grad`, accumulated in f64.
    fn bias_grad<T: WithDType>(b: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let n = b.elem_count().max(1);
        let rows_per_task = (16384 / n).max(1);
        // Fixed chunks summed in order: the result does not depend on the thread count.
        let partial: Vec<Vec<f64>> = read_values::<T, _>(grad, |g| {
            g.par_chunks(n * rows_per_task)
                .map(|chunk| {
                    let mut acc = vec![0f64; n];
                    for row in chunk.chunks(n) {
                        for (a, v) in acc.iter_mut().zip(row) {
                            *a += v.to_f64();
                        }
                    }
                    acc
                })
                .collect()
        })?;
        let mut sum = vec![0f64; n];
        for p in partial {
            for (s, v) in sum.iter_mut().zip(p) {
                *s += v;
            }
        }
        let sum: Vec<T> = sum.into_iter().map(T::from_f64).collect();
        Tensor::from_vec(sum, b.shape(), b.device())
    }
}

impl HostKernel<2> for AddBias {
    const NAME: &'static str = "ldt-add-bias";

    fn fwd<T: Float>(&self, [y, b]: [&[T]; 2], _: &Shape) -> candle_core::Result<Vec<T>> {
        let mut out = y.to_vec();
        out.par_chunks_mut(b.len().max(1)).for_each(|row| {
            for (o, &bk) in row.iter_mut().zip(b) {
                *o += bk;
            }
        });
        Ok(out)
    }

    fn bwd<T: Float>(
        &self,
        [_y, b]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        Ok([Some(grad.clone()), Some(Self::bias_grad::<T>(b, grad)?)])
    }
}

/// [`linear_rows`] on the CPU as one op of `x` (`rows x last` elements), `W` `[out,
/// last]` and an optional bias. The chain it replaces (reshape, transpose, product, bias,
/// reshape) is five graph nodes, each a zero-filled, accumulated gradient in candle's
/// backward, and kept the product before the bias for the backward. Forward: candle's
/// product kernel on the layouts of `x.reshape((rows, last)).matmul(W.t())`, then
/// [`AddBias`]'s forward. Backward: the products candle's backward computes (`g W`,
/// `(x^T g)^T`) and [`AddBias`]'s bias gradient, each only for a tracked input.
struct LinearRows {
    rows: usize,
    last: usize,
    out: usize,
}

impl WeightKernel for LinearRows {
    const NAME: &'static str = "ldt-linear-rows";

    fn forward(
        &self,
        (sx, lx): (&CpuStorage, &Layout),
        (sw, lw): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, last, out) = (self.rows, self.last, self.out);
        let lx2 = Layout::contiguous_with_offset((rows, last), lx.start_offset());
        let y = sx.matmul(sw, (1, rows, out, last), &lx2, &lw.transpose(0, 1)?)?;
        let y = match bias {
            Some((sb, lb)) => {
                let ly = Layout::contiguous((rows, out));
                HostOp(AddBias).cpu_fwd(&y, &ly, sb, lb)?.0
            }
            None => y,
        };
        let mut dims = lx.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = out;
        }
        Ok((y, Shape::from(dims)))
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let g = grad.contiguous()?.reshape((self.rows, self.out))?;
        // The products run on detached inputs: a product with a tracked `x` would record
        // it, and `W`'s gradient (a variable's, which candle's backward never detaches)
        // would keep every linear's input alive until the step ends.
        let gx = match x.track_op() {
            true => Some(g.matmul(&w.detach())?.reshape(x.shape())?),
            false => None,
        };
        let gw = match w.track_op() {
            true => Some(
                x.detach()
                    .reshape((self.rows, self.last))?
                    .t()?
                    .matmul(&g)?
                    .t()?,
            ),
            false => None,
        };
        let gb = match b {
            Some(b) if b.track_op() => HostOp(AddBias).bwd(&g, b, &g, &g)?.1,
            _ => None,
        };
        Ok([gx, gw, gb])
    }
}

/// GELU in its exact form `0.5 x (1 + erf(x / sqrt 2))` (PyTorch `GELU()`, not the tanh
/// approximation), evaluated in f64; the backward is `Phi(x) + x phi(x)` exactly.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if generic_path(x) {
        return gelu_erf_generic(x);
    }
    Ok(x.contiguous()?.apply_op1(HostOp(GeluErf))?)
}

/// [`gelu_erf`] from candle's differentiable ops, on any device: `x * 0.5 (1 + erf(x /
/// sqrt 2))`, differentiated through candle's exact `erf` backward (candle's fused
/// `gelu_erf` backward uses a 6-digit `1/sqrt(2 pi)`). Used off the CPU; public so tests
/// can run it on the CPU.
#[doc(hidden)]
pub fn gelu_erf_generic(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(compute_dtype(dt))?;
    let cdf = (((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    Ok(x.mul(&cdf)?.to_dtype(dt)?)
}

struct GeluErf;

impl GeluErf {
    /// Standard normal CDF `Phi(x) = 0.5 (1 + erf(x / sqrt 2))`.
    fn cdf(x: f64) -> f64 {
        0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
    }

    /// `grad * (Phi(x) + x phi(x))`.
    fn grad<T: WithDType>(arg: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        // 1 / sqrt(2 pi)
        const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
        let gx = read_values::<T, _>(arg, |x| {
            read_values::<T, _>(grad, |g| {
                zip_map(x, g, |v, g| {
                    let v = v.to_f64();
                    let d = Self::cdf(v) + v * INV_SQRT_2PI * (-0.5 * v * v).exp();
                    T::from_f64(g.to_f64() * d)
                })
            })
        })??;
        Tensor::from_vec(gx, arg.shape(), arg.device())
    }
}

impl HostKernel<1> for GeluErf {
    const NAME: &'static str = "ldt-gelu-erf";

    fn fwd<T: Float>(&self, [x]: [&[T]; 1], _: &Shape) -> candle_core::Result<Vec<T>> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(ELEMS_PER_TASK)
            .zip(x.par_chunks(ELEMS_PER_TASK))
            .for_each(|(o, x)| {
                for (o, v) in o.iter_mut().zip(x) {
                    let v = v.to_f64();
                    *o = T::from_f64(v * Self::cdf(v));
                }
            });
        Ok(out)
    }

    fn bwd<T: Float>(
        &self,
        [arg]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        Ok([Some(Self::grad::<T>(arg, grad)?)])
    }
}

/// Softmax over the last dimension (max subtracted, sum in f64); the backward is the
/// exact `y * (g - sum(g * y))` per row.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if generic_path(x) {
        return softmax_last_dim_generic(x);
    }
    Ok(x.contiguous()?.apply_op1(HostOp(SoftmaxLastDim))?)
}

/// [`softmax_last_dim`] from candle's differentiable ops, on any device: `exp(x - max)`
/// over its sum, the max detached (it only shifts the logits). Used off the CPU; public
/// so tests can run it on the CPU.
#[doc(hidden)]
pub fn softmax_last_dim_generic(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(compute_dtype(dt))?;
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dt)?)
}

/// The softmax over the last dimension as a host kernel (f64 arithmetic per row).
pub(crate) struct SoftmaxLastDim;

impl SoftmaxLastDim {
    /// `y * (g - sum(g * y))` per row, from the result `y`.
    fn grad<T: WithDType>(res: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let d = res.dims().last().copied().unwrap_or(1).max(1);
        let gx = read_values::<T, _>(res, |y| {
            read_values::<T, _>(grad, |g| {
                let mut gx = vec![T::zero(); y.len()];
                gx.par_chunks_mut(d)
                    .zip(y.par_chunks(d).zip(g.par_chunks(d)))
                    .for_each(|(o, (y, g))| {
                        let dot: f64 = y.iter().zip(g).map(|(y, g)| y.to_f64() * g.to_f64()).sum();
                        for ((o, y), g) in o.iter_mut().zip(y).zip(g) {
                            *o = T::from_f64(y.to_f64() * (g.to_f64() - dot));
                        }
                    });
                gx
            })
        })??;
        Tensor::from_vec(gx, res.shape(), res.device())
    }
}

impl HostKernel<1> for SoftmaxLastDim {
    const NAME: &'static str = "ldt-softmax-last-dim";

    fn fwd<T: Float>(&self, [x]: [&[T]; 1], shape: &Shape) -> candle_core::Result<Vec<T>> {
        let d = shape.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let max = row
                    .iter()
                    .map(|v| v.to_f64())
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = row.iter().map(|v| (v.to_f64() - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (o, e) in o.iter_mut().zip(e) {
                    *o = T::from_f64(e / sum);
                }
            });
        Ok(out)
    }

    fn bwd<T: Float>(
        &self,
        [_arg]: [&Tensor; 1],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        Ok([Some(Self::grad::<T>(res, grad)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{CustomOp1, CustomOp2, CustomOp3, Device};

    /// An f16 tensor of ones: a dtype the host kernels do not take.
    fn f16(shape: &[usize]) -> Tensor {
        Tensor::ones(shape, DType::F16, &Device::Cpu).unwrap()
    }

    /// `r` failed with an error that names `op` and the f16 dtype.
    fn refused<T>(r: std::result::Result<T, impl std::fmt::Display>, op: &str) {
        let Err(e) = r else {
            panic!("{op} computed on f16 tensors")
        };
        let e = e.to_string();
        assert!(e.contains(op) && e.contains("F16"), "{op}: {e}");
    }

    /// Every host kernel refuses an f16 tensor in its forward (through the layer
    /// function) and in its backward (called directly: candle never gets there with f16,
    /// the forward refuses first). The backward passes used to compute any dtype but
    /// f64 and bf16 in f32.
    #[test]
    fn host_kernels_refuse_other_dtypes_by_name() {
        let img = f16(&[1, 2, 4, 4]);
        let rows = f16(&[3, 4]);
        let row = f16(&[4]);

        refused(relu(&img), "ldt-relu");
        refused(HostOp(Relu).bwd(&img, &img, &img), "ldt-relu");

        refused(max_pool2d(&img, 2, 2, 0), "ldt-max-pool2d");
        let pool = HostOp(MaxPool2d {
            kernel: 2,
            stride: 2,
            padding: 0,
        });
        let pooled = f16(&[1, 2, 2, 2]);
        refused(pool.bwd(&img, &pooled, &pooled), "ldt-max-pool2d");

        refused(layer_norm(&rows, &row, &row, 1e-6), "ldt-layer-norm");
        let ln = HostOp(LayerNorm { eps: 1e-6 });
        refused(ln.bwd(&rows, &row, &row, &rows, &rows), "ldt-layer-norm");

        refused(add_bias(&rows, &row), "ldt-add-bias");
        refused(
            HostOp(AddBias).bwd(&rows, &row, &rows, &rows),
            "ldt-add-bias",
        );

        refused(add_relu(&img, &img), "ldt-add-relu");
        refused(HostOp(AddRelu).bwd(&img, &img, &img, &img), "ldt-add-relu");

        refused(gelu_erf(&rows), "ldt-gelu-erf");
        refused(HostOp(GeluErf).bwd(&rows, &rows, &rows), "ldt-gelu-erf");

        refused(softmax_last_dim(&rows), "ldt-softmax-last-dim");
        let softmax = HostOp(SoftmaxLastDim);
        refused(softmax.bwd(&rows, &rows, &rows), "ldt-softmax-last-dim");
    }
}
