//! Convolution as im2col + one GEMM, forward and backward.
//!
//! candle 0.11's CPU conv2d backward goes through a naive transposed convolution that
//! dominated step time (~5x the forward). Here the patch extraction is a custom op whose
//! backward is the matching col2im scatter, and both the forward and the two backward
//! products are single large matrix multiplications (gemm) that candle differentiates.

use super::dispatch::{flat_values, generic_path, Float, HostKernel, HostOp};
use anyhow::Result;
use candle_core::{Shape, Tensor, WithDType};
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

    fn col2im<T: WithDType>(&self, g: &[T], n: usize) -> Vec<T> {
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

impl Im2col {
    /// The geometry of this extraction on an input of shape `[N, C, H, W]`, and `N`.
    fn geometry(&self, x: &Shape) -> candle_core::Result<(Geometry, usize)> {
        let (n, c, h, w) = x.dims4()?;
        Ok((Geometry::new(c, h, w, self.k, self.stride, self.pad), n))
    }
}

impl HostKernel<1> for Im2col {
    const NAME: &'static str = "ldt-im2col";

    fn shape(&self, x: &Shape) -> candle_core::Result<Shape> {
        let (g, n) = self.geometry(x)?;
        Ok(Shape::from((n * g.oh * g.ow, g.row_len())))
    }

    fn fwd<T: Float>(&self, [x]: [&[T]; 1], shape: &Shape) -> candle_core::Result<Vec<T>> {
        let (g, n) = self.geometry(shape)?;
        Ok(g.im2col(x, n))
    }

    /// Patches overlap-add in `T::Sum` (f32 for bf16) and are rounded once.
    fn bwd<T: Float>(
        &self,
        [arg]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Tensor; 1]> {
        let (g, n) = self.geometry(arg.shape())?;
        let gx = g.col2im(&flat_values::<T::Sum>(grad)?, n);
        Ok([Tensor::from_vec(gx, arg.shape(), arg.device())?.to_dtype(T::DTYPE)?])
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
    if generic_path(x) {
        return conv2d_generic(x, w, b, stride, pad);
    }
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let g = Geometry::new(c, h, wd, (kh, kw), stride, pad);
    let cols = x.contiguous()?.apply_op1(HostOp(Im2col {
        k: (kh, kw),
        stride,
        pad,
    }))?;
    let mut y = super::matmul::matmul(&cols, &w.reshape((o, c * kh * kw))?.t()?)?;
    if let Some(b) = b {
        y = super::matmul::broadcast_add(&y, b)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{CustomOp1, DType, Device};

    /// The patch extraction refuses an f16 tensor by name, forward (through `conv2d`)
    /// and backward (called directly); the backward used to compute it in f32.
    #[test]
    fn im2col_refuses_other_dtypes_by_name() {
        let f16 = |shape: &[usize]| Tensor::ones(shape, DType::F16, &Device::Cpu).unwrap();
        let (x, w, cols) = (f16(&[1, 2, 4, 4]), f16(&[3, 2, 3, 3]), f16(&[16, 18]));
        let fwd = conv2d(&x, &w, None, 1, 1).map(|_| ());
        let op = HostOp(Im2col {
            k: (3, 3),
            stride: 1,
            pad: 1,
        });
        let bwd = op.bwd(&x, &cols, &cols).map(|_| ());
        for (what, r) in [
            ("forward", fwd.map_err(|e| e.to_string())),
            ("backward", bwd.map_err(|e| e.to_string())),
        ] {
            let e = r.expect_err(what);
            assert!(e.contains("ldt-im2col") && e.contains("F16"), "{what}: {e}");
        }
    }
}
