//! Layer functions with exact gradients, composed of candle ops that record backward.
//!
//! candle-nn's fused norms and softmax record no backward and its max-pool backward needs
//! kernel == stride and splits ties; these versions follow PyTorch's arithmetic instead.

use anyhow::Result;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D,
};
use half::bf16;
use rayon::prelude::*;

/// `y = x W^T + b` (PyTorch `Linear`, weight `[out, in]`).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
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

thread_local! {
    /// Set inside [`with_generic_ops`].
    static FORCE_GENERIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every device-dependent choice of `generic_path` (the layer functions,
/// the optimizer update, the DPU fold between live tensors) taking its device-generic
/// path on the CPU too, on this thread, so tests can compare whole networks and whole
/// training runs across the two paths. Work on other threads is not forced.
#[doc(hidden)]
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    let prev = FORCE_GENERIC.with(|c| c.replace(true));
    let r = f();
    FORCE_GENERIC.with(|c| c.set(prev));
    r
}

/// The one switch between host kernels and device-generic candle ops, for the layer
/// functions, the optimizer and the DPU fold: the generic path for tensors off the CPU,
/// or inside [`with_generic_ops`].
pub(crate) fn generic_path(t: &Tensor) -> bool {
    !t.device().is_cpu() || FORCE_GENERIC.with(|c| c.get())
}

/// Rectified linear unit with PyTorch's gradient: zero where the input is <= 0
/// (candle's relu passes the gradient at exactly 0).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if generic_path(x) {
        return relu_generic(x);
    }
    Ok(x.contiguous()?.apply_op1(Relu)?)
}

/// [`relu`] from candle's differentiable ops, on any device: `x * (x > 0)` with the mask
/// recorded as a constant, so the gradient is zero where `x <= 0` (candle's own `relu`
/// passes it at exactly 0). Used off the CPU; public so tests can run it on the CPU.
#[doc(hidden)]
pub fn relu_generic(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul(&x.gt(0.0)?.to_dtype(x.dtype())?)?)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "ldt-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn go<T: WithDType + PartialOrd>(
            s: &CpuStorage,
            l: &Layout,
        ) -> candle_core::Result<Vec<T>> {
            let z = T::zero();
            let v = contiguous_slice::<T>(s, l, "relu")?;
            Ok(v.iter().map(|&x| if x > z { x } else { z }).collect())
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(go(s, l)?),
            CpuStorage::F64(_) => CpuStorage::F64(go(s, l)?),
            CpuStorage::BF16(_) => CpuStorage::BF16(go(s, l)?),
            _ => candle_core::bail!("relu supports f32, f64 and bf16 tensors"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.mul(&arg.gt(0.0)?.to_dtype(arg.dtype())?)?))
    }
}

/// Max pooling with PyTorch semantics: `-inf` padding, the first maximum of a window
/// takes the whole gradient. Any kernel, stride and padding.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if generic_path(x) {
        return max_pool2d_generic(x, kernel, stride, padding);
    }
    Ok(x.contiguous()?.apply_op1(MaxPool2d {
        kernel,
        stride,
        padding,
    })?)
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
    /// (a NaN wins at once, as in PyTorch). Generic over the float type (f32, f64).
    fn argmax<T: WithDType>(&self, plane: &[T], h: usize, w: usize, oy: usize, ox: usize) -> usize {
        let mut best: Option<T> = None;
        let mut idx = usize::MAX;
        for ky in 0..self.kernel {
            let iy = (oy * self.stride + ky) as isize - self.padding as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            for kx in 0..self.kernel {
                let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                if ix < 0 || ix >= w as isize {
                    continue;
                }
                let i = iy as usize * w + ix as usize;
                let v = plane[i];
                let nan = v.partial_cmp(&v).is_none();
                if best.is_none_or(|b| v > b) || nan {
                    best = Some(v);
                    idx = i;
                    if nan {
                        return idx;
                    }
                }
            }
        }
        idx
    }

    fn fwd<T: WithDType>(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let x = contiguous_slice::<T>(storage, layout, "max_pool2d")?;
        let (oh, ow) = (self.out_dim(h), self.out_dim(w));
        let mut out = vec![T::zero(); n * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        o[oy * ow + ox] = plane[self.argmax(plane, h, w, oy, ox)];
                    }
                }
            });
        Ok((T::to_cpu_storage_owned(out), Shape::from((n, c, oh, ow))))
    }

    fn grad<T: WithDType>(&self, arg: &Tensor, grad_res: &Tensor) -> candle_core::Result<Tensor> {
        let (_n, _c, h, w) = arg.dims4()?;
        let (oh, ow) = (self.out_dim(h), self.out_dim(w));
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<T>()?;
        let g = grad_res
            .to_dtype(T::DTYPE)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<T>()?;
        let mut gx = vec![T::zero(); x.len()];
        gx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .zip(g.par_chunks(oh * ow))
            .for_each(|((gp, plane), go)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        gp[self.argmax(plane, h, w, oy, ox)] += go[oy * ow + ox];
                    }
                }
            });
        Tensor::from_vec(gx, arg.shape(), arg.device())
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "ldt-max-pool2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(_) => self.fwd::<f32>(storage, layout),
            CpuStorage::F64(_) => self.fwd::<f64>(storage, layout),
            CpuStorage::BF16(_) => self.fwd::<bf16>(storage, layout),
            _ => candle_core::bail!("max_pool2d supports f32, f64 and bf16 tensors"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match arg.dtype() {
            DType::F64 => self.grad::<f64>(arg, grad_res)?,
            // Overlapping windows add up in f32, rounded once.
            DType::BF16 => self
                .grad::<f32>(&arg.to_dtype(DType::F32)?, grad_res)?
                .to_dtype(DType::BF16)?,
            _ => self.grad::<f32>(arg, grad_res)?,
        }))
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
    // bf16 activations are normalized in f32 (as cuDNN does) and rounded once on the way
    // out; the running statistics stay f32.
    let dt = x.dtype();
    let ct = if dt == DType::BF16 { DType::F32 } else { dt };
    let (x, w, b) = (&x.to_dtype(ct)?, &w.to_dtype(ct)?, &b.to_dtype(ct)?);
    let (n, c, h, wd) = x.dims4()?;
    let y = if mode == super::Mode::Eval {
        let mean = buf.mean.reshape((1, c, 1, 1))?;
        let inv = (buf.var.reshape((1, c, 1, 1))? + BN_EPS)?.sqrt()?.recip()?;
        x.broadcast_sub(&mean)?.broadcast_mul(&inv)?
    } else {
        let m = n * h * wd;
        let xt = x.transpose(0, 1)?.reshape((c, m))?;
        let mean = xt.mean_keepdim(1)?;
        let centered = xt.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(1)?;
        if mode == super::Mode::Train {
            let mean_d = mean.detach().flatten_all()?;
            let var_unbiased =
                (var.detach().flatten_all()? * (m as f64 / (m as f64 - 1.0).max(1.0)))?;
            *buf.mean = ((&*buf.mean * (1.0 - BN_MOMENTUM))? + (mean_d * BN_MOMENTUM)?)?;
            *buf.var = ((&*buf.var * (1.0 - BN_MOMENTUM))? + (var_unbiased * BN_MOMENTUM)?)?;
            *buf.count = (&*buf.count + 1.0)?;
        }
        let inv = (var + BN_EPS)?.sqrt()?.recip()?;
        centered
            .broadcast_mul(&inv)?
            .reshape((c, n, h, wd))?
            .transpose(0, 1)?
    };
    Ok(y.broadcast_mul(&w.reshape((1, c, 1, 1))?)?
        .broadcast_add(&b.reshape((1, c, 1, 1))?)?
        .to_dtype(dt)?)
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

/// Number of correct argmax predictions and the summed cross-entropy of a batch.
pub fn correct_and_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(usize, f64)> {
    let pred = logits.argmax(D::Minus1)?.to_dtype(DType::I64)?;
    let correct = pred
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize;
    let lsm = log_softmax(logits)?;
    let picked = lsm.gather(&labels.unsqueeze(1)?, 1)?;
    let loss_sum = -(picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?);
    Ok((correct, loss_sum))
}

// ------------------------------------------------------------------ transformer layers
//
// LayerNorm, GELU and softmax as custom ops: candle's fused versions record no backward,
// and compositions of elementwise ops cost several passes over the activations. Each
// forward reduces in f64 and rounds once; each backward is the exact analytic gradient,
// also reduced in f64. All accept f32, f64 and bf16 tensors.

/// Elements of `x`'s contiguous storage, for custom-op kernels.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} expects a contiguous input")
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Elements per parallel task of the elementwise kernels.
const ELEMS_PER_TASK: usize = 4096;

/// Values of `t` (any layout) as a flat vector of `T`.
fn flat_values<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()
}

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
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })?)
}

/// The dtype the generic paths compute in: f32 for bf16 (rounded once on the way out, as
/// the CPU ops round their f64 results once), else the tensor's own.
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
    Ok(centered
        .broadcast_mul(&rstd)?
        .broadcast_mul(w)?
        .broadcast_add(b)?
        .to_dtype(dt)?)
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

    fn fwd<T: WithDType>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let x = contiguous_slice::<T>(s1, l1, "layer_norm")?;
        let w = contiguous_slice::<T>(s2, l2, "layer_norm")?;
        let b = contiguous_slice::<T>(s3, l3, "layer_norm")?;
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
        Ok(T::to_cpu_storage_owned(out))
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
        let xs = flat_values::<T>(x)?;
        let ws: Vec<f64> = flat_values::<T>(w)?.iter().map(|v| v.to_f64()).collect();
        let gs = flat_values::<T>(grad)?;
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
        let to_t = |v: Vec<f64>| -> Vec<T> { v.into_iter().map(T::from_f64).collect() };
        Ok((
            Tensor::from_vec(gx, x.shape(), x.device())?,
            Tensor::from_vec(to_t(dw), w.shape(), w.device())?,
            Tensor::from_vec(to_t(db), w.shape(), w.device())?,
        ))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "ldt-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1 {
            CpuStorage::F32(_) => self.fwd::<f32>(args.0, args.1, args.2)?,
            CpuStorage::F64(_) => self.fwd::<f64>(args.0, args.1, args.2)?,
            CpuStorage::BF16(_) => self.fwd::<bf16>(args.0, args.1, args.2)?,
            _ => candle_core::bail!("layer_norm supports f32, f64 and bf16 tensors"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = match x.dtype() {
            DType::F64 => self.grad::<f64>(x, w, grad)?,
            DType::BF16 => self.grad::<bf16>(x, w, grad)?,
            _ => self.grad::<f32>(x, w, grad)?,
        };
        Ok((Some(gx), Some(gw), Some(gb)))
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
    Ok(y.contiguous()?.apply_op2(&b.contiguous()?, AddBias)?)
}

/// [`add_bias`] as candle's `broadcast_add`, on any device (its backward sums the bias
/// gradient in the tensor's dtype). Used off the CPU; public so tests can run it on the
/// CPU.
#[doc(hidden)]
pub fn add_bias_generic(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(y.broadcast_add(b)?)
}

/// Linear `y = x W^T + b` over the last dimension of any-rank `x` (leading dimensions
/// flattened into rows), bias through [`add_bias`].
pub fn linear_rows(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let last = dims.pop().unwrap_or(1);
    let rows: usize = dims.iter().product();
    let y = x.reshape((rows, last))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => add_bias(&y, b)?,
        None => y,
    };
    dims.push(w.dim(0)?);
    Ok(y.reshape(dims)?)
}

struct AddBias;

impl AddBias {
    fn fwd<T: WithDType>(
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let y = contiguous_slice::<T>(s1, l1, "add_bias")?;
        let b = contiguous_slice::<T>(s2, l2, "add_bias")?;
        let mut out = y.to_vec();
        out.par_chunks_mut(b.len().max(1)).for_each(|row| {
            for (o, &bk) in row.iter_mut().zip(b) {
                *o += bk;
            }
        });
        Ok(T::to_cpu_storage_owned(out))
    }

    fn bias_grad<T: WithDType>(b: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let n = b.elem_count().max(1);
        let g = flat_values::<T>(grad)?;
        let rows_per_task = (16384 / n).max(1);
        // Fixed chunks summed in order: the result does not depend on the thread count.
        let partial: Vec<Vec<f64>> = g
            .par_chunks(n * rows_per_task)
            .map(|chunk| {
                let mut acc = vec![0f64; n];
                for row in chunk.chunks(n) {
                    for (a, v) in acc.iter_mut().zip(row) {
                        *a += v.to_f64();
                    }
                }
                acc
            })
            .collect();
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

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "ldt-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => Self::fwd::<f32>((s1, l1), (s2, l2))?,
            CpuStorage::F64(_) => Self::fwd::<f64>((s1, l1), (s2, l2))?,
            CpuStorage::BF16(_) => Self::fwd::<bf16>((s1, l1), (s2, l2))?,
            _ => candle_core::bail!("add_bias supports f32, f64 and bf16 tensors"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gb = match b.dtype() {
            DType::F64 => Self::bias_grad::<f64>(b, grad)?,
            DType::BF16 => Self::bias_grad::<bf16>(b, grad)?,
            _ => Self::bias_grad::<f32>(b, grad)?,
        };
        Ok((Some(grad.clone()), Some(gb)))
    }
}

/// GELU in its exact form `0.5 x (1 + erf(x / sqrt 2))` (PyTorch `GELU()`, not the tanh
/// approximation), evaluated in f64; the backward is `Phi(x) + x phi(x)` exactly.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if generic_path(x) {
        return gelu_erf_generic(x);
    }
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
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

    fn fwd<T: WithDType>(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
        let x = contiguous_slice::<T>(s, l, "gelu_erf")?;
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(ELEMS_PER_TASK)
            .zip(x.par_chunks(ELEMS_PER_TASK))
            .for_each(|(o, x)| {
                for (o, v) in o.iter_mut().zip(x) {
                    let v = v.to_f64();
                    *o = T::from_f64(v * Self::cdf(v));
                }
            });
        Ok(T::to_cpu_storage_owned(out))
    }

    fn grad<T: WithDType>(arg: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        // 1 / sqrt(2 pi)
        const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
        let x = flat_values::<T>(arg)?;
        let g = flat_values::<T>(grad)?;
        let mut gx = vec![T::zero(); x.len()];
        gx.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                x.par_chunks(ELEMS_PER_TASK)
                    .zip(g.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(o, (x, g))| {
                for ((o, v), g) in o.iter_mut().zip(x).zip(g) {
                    let v = v.to_f64();
                    let d = Self::cdf(v) + v * INV_SQRT_2PI * (-0.5 * v * v).exp();
                    *o = T::from_f64(g.to_f64() * d);
                }
            });
        Tensor::from_vec(gx, arg.shape(), arg.device())
    }
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "ldt-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => Self::fwd::<f32>(s, l)?,
            CpuStorage::F64(_) => Self::fwd::<f64>(s, l)?,
            CpuStorage::BF16(_) => Self::fwd::<bf16>(s, l)?,
            _ => candle_core::bail!("gelu_erf supports f32, f64 and bf16 tensors"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match arg.dtype() {
            DType::F64 => Self::grad::<f64>(arg, grad)?,
            DType::BF16 => Self::grad::<bf16>(arg, grad)?,
            _ => Self::grad::<f32>(arg, grad)?,
        }))
    }
}

/// Softmax over the last dimension (max subtracted, sum in f64); the backward is the
/// exact `y * (g - sum(g * y))` per row.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if generic_path(x) {
        return softmax_last_dim_generic(x);
    }
    Ok(x.contiguous()?.apply_op1(SoftmaxLastDim)?)
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

struct SoftmaxLastDim;

impl SoftmaxLastDim {
    fn fwd<T: WithDType>(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
        let x = contiguous_slice::<T>(s, l, "softmax_last_dim")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
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
        Ok(T::to_cpu_storage_owned(out))
    }

    fn grad<T: WithDType>(res: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let d = res.dims().last().copied().unwrap_or(1).max(1);
        let y = flat_values::<T>(res)?;
        let g = flat_values::<T>(grad)?;
        let mut gx = vec![T::zero(); y.len()];
        gx.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (y, g))| {
                let dot: f64 = y.iter().zip(g).map(|(y, g)| y.to_f64() * g.to_f64()).sum();
                for ((o, y), g) in o.iter_mut().zip(y).zip(g) {
                    *o = T::from_f64(y.to_f64() * (g.to_f64() - dot));
                }
            });
        Tensor::from_vec(gx, res.shape(), res.device())
    }
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ldt-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => Self::fwd::<f32>(s, l)?,
            CpuStorage::F64(_) => Self::fwd::<f64>(s, l)?,
            CpuStorage::BF16(_) => Self::fwd::<bf16>(s, l)?,
            _ => candle_core::bail!("softmax_last_dim supports f32, f64 and bf16 tensors"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match res.dtype() {
            DType::F64 => Self::grad::<f64>(res, grad)?,
            DType::BF16 => Self::grad::<bf16>(res, grad)?,
            _ => Self::grad::<f32>(res, grad)?,
        }))
    }
}

/// Textbook scaled dot-product attention over `[B, heads, N, d]` tensors:
/// `softmax((q / sqrt(d)) k^T) v` (q is scaled before the product, as timm's eager path).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let a = softmax_last_dim(&scores)?;
    Ok(a.matmul(&v.contiguous()?)?)
}

/// timm's `Attention` on `x` `[B, N, D]`: `qkv` Linear `[3D, D]` (rows: q, k, v; inside
/// each, head j owns rows `j*d..(j+1)*d`), [`attention`] per head, heads concatenated in
/// order, then the `proj` Linear `[D, D]`.
pub fn multi_head_attention(
    x: &Tensor,
    qkv_w: &Tensor,
    qkv_b: Option<&Tensor>,
    proj_w: &Tensor,
    proj_b: Option<&Tensor>,
    heads: usize,
) -> Result<Tensor> {
    let (b, n, dim) = x.dims3()?;
    if heads == 0 || !dim.is_multiple_of(heads) {
        anyhow::bail!("multi_head_attention: width {dim} is not divisible by {heads} heads");
    }
    let qkv = linear_rows(x, qkv_w, qkv_b)?
        .reshape((b, n, 3, heads, dim / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let o = attention(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?)?;
    let o = o.transpose(1, 2)?.reshape((b, n, dim))?;
    linear_rows(&o, proj_w, proj_b)
}
