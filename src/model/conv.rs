//! Convolution as im2col + one GEMM, forward and backward.
//!
//! candle 0.11's CPU conv2d backward goes through a naive transposed convolution that
//! dominated step time (~5x the forward). Here the patch extraction is a custom op whose
//! backward is the matching col2im scatter, and both the forward and the two backward
//! products are single large matrix multiplications (gemm) that candle differentiates.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: (usize, usize),
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(c: usize, h: usize, w: usize, k: (usize, usize), stride: usize, pad: usize) -> Self {
        let oh = (h + 2 * pad - k.0) / stride + 1;
        let ow = (w + 2 * pad - k.1) / stride + 1;
        Geometry {
            c,
            h,
            w,
            k,
            stride,
            pad,
            oh,
            ow,
        }
    }

    fn row_len(&self) -> usize {
        self.c * self.k.0 * self.k.1
    }

    /// Calls `f(col, pixel_index)` for every patch element of output pixel `(oy, ox)`
    /// that lies inside the image (padding contributes zeros).
    #[inline]
    fn for_patch(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
        let mut col = 0;
        for ci in 0..self.c {
            for ky in 0..self.k.0 {
                let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                for kx in 0..self.k.1 {
                    let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                    if iy >= 0 && (iy as usize) < self.h && ix >= 0 && (ix as usize) < self.w {
                        f(col, (ci * self.h + iy as usize) * self.w + ix as usize);
                    }
                    col += 1;
                }
            }
        }
    }

    fn im2col<T: WithDType>(&self, x: &[T], n: usize) -> Vec<T> {
        let (rl, img) = (self.row_len(), self.c * self.h * self.w);
        let mut out = vec![T::zero(); n * self.oh * self.ow * rl];
        out.par_chunks_mut(self.oh * self.ow * rl)
            .enumerate()
            .for_each(|(b, o)| {
                let x = &x[b * img..(b + 1) * img];
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let row = &mut o[(oy * self.ow + ox) * rl..][..rl];
                        self.for_patch(oy, ox, |col, p| row[col] = x[p]);
                    }
                }
            });
        out
    }

    fn col2im<T: WithDType + std::ops::AddAssign>(&self, g: &[T], n: usize) -> Vec<T> {
        let (rl, img) = (self.row_len(), self.c * self.h * self.w);
        let mut out = vec![T::zero(); n * img];
        out.par_chunks_mut(img).enumerate().for_each(|(b, o)| {
            let g = &g[b * self.oh * self.ow * rl..][..self.oh * self.ow * rl];
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    let row = &g[(oy * self.ow + ox) * rl..][..rl];
                    self.for_patch(oy, ox, |col, p| o[p] += row[col]);
                }
            }
        });
        out
    }
}

/// Patch extraction `[N,C,H,W] -> [N*OH*OW, C*kh*kw]` (rows ordered n, oy, ox; columns
/// c, ky, kx as PyTorch's weight layout).
struct Im2col {
    k: (usize, usize),
    stride: usize,
    pad: usize,
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "ldt-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let g = Geometry::new(c, h, w, self.k, self.stride, self.pad);
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("im2col expects a contiguous input")
        };
        let shape = Shape::from((n * g.oh * g.ow, g.row_len()));
        Ok(match s {
            CpuStorage::F32(v) => (CpuStorage::F32(g.im2col(&v[a..b], n)), shape),
            CpuStorage::F64(v) => (CpuStorage::F64(g.im2col(&v[a..b], n)), shape),
            CpuStorage::BF16(v) => (CpuStorage::BF16(g.im2col(&v[a..b], n)), shape),
            _ => candle_core::bail!("im2col supports f32, f64 and bf16"),
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let g = Geometry::new(c, h, w, self.k, self.stride, self.pad);
        let grad = grad.contiguous()?.flatten_all()?;
        let out = match arg.dtype() {
            candle_core::DType::F64 => Tensor::from_vec(
                g.col2im(&grad.to_vec1::<f64>()?, n),
                arg.shape(),
                arg.device(),
            )?,
            // bf16 patches overlap-add in f32 and are rounded once.
            dt => Tensor::from_vec(
                g.col2im(
                    &grad.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
                    n,
                ),
                arg.shape(),
                arg.device(),
            )?
            .to_dtype(dt)?,
        };
        Ok(Some(out))
    }
}

/// 2-D convolution (groups 1, dilation 1), weight `[O, C, kh, kw]`, optional bias `[O]`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    if super::layers::generic_path(x) {
        return conv2d_generic(x, w, b, stride, pad);
    }
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let g = Geometry::new(c, h, wd, (kh, kw), stride, pad);
    let cols = x.contiguous()?.apply_op1(Im2col {
        k: (kh, kw),
        stride,
        pad,
    })?;
    let mut y = cols.matmul(&w.reshape((o, c * kh * kw))?.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    Ok(y.reshape((n, g.oh, g.ow, o))?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// [`conv2d`] as candle's `Tensor::conv2d` (which records its backward), on any device,
/// bias added per output channel. The input is zero-padded here and cut to the rows and
/// columns the windows read, and candle convolves it unpadded: candle 0.11's backward
/// derives the transposed convolution's output padding from the height alone, which
/// gives a wrong-shaped gradient when the width leaves another remainder. Used off the
/// CPU; public so tests can run it on the CPU.
#[doc(hidden)]
pub fn conv2d_generic(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    if stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
        anyhow::bail!(
            "conv2d: kernel {kh}x{kw}, stride {stride}, padding {pad} do not fit {h}x{wd}"
        );
    }
    let g = Geometry::new(c, h, wd, (kh, kw), stride, pad);
    let xp = x
        .pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?
        .narrow(2, 0, (g.oh - 1) * stride + kh)?
        .narrow(3, 0, (g.ow - 1) * stride + kw)?;
    let y = xp.conv2d(w, 0, stride, 1, 1)?;
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1))?)?,
        None => y,
    })
}
