//! Layer functions with exact gradients, composed of candle ops that record backward.
//!
//! candle-nn's fused norms and softmax record no backward and its max-pool backward needs
//! kernel == stride and splits ties; these versions follow PyTorch's arithmetic instead.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType, D};
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

/// Rectified linear unit with PyTorch's gradient: zero where the input is <= 0
/// (candle's relu passes the gradient at exactly 0).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Relu)?)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "ldt-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn go<T: WithDType + PartialOrd>(v: &[T], l: &Layout) -> Vec<T> {
            let z = T::zero();
            let (a, b) = l.contiguous_offsets().expect("relu input made contiguous");
            v[a..b].iter().map(|&x| if x > z { x } else { z }).collect()
        }
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(go(v, l)),
            CpuStorage::F64(v) => CpuStorage::F64(go(v, l)),
            _ => candle_core::bail!("relu supports f32 and f64 tensors"),
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
    Ok(x.contiguous()?.apply_op1(MaxPool2d {
        kernel,
        stride,
        padding,
    })?)
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
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("max_pool2d expects a contiguous input")
        };
        let x = &storage.as_slice::<T>()?[start..end];
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
            _ => candle_core::bail!("max_pool2d supports f32 and f64 tensors"),
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
        .broadcast_add(&b.reshape((1, c, 1, 1))?)?)
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
