//! Convolution as im2col + one GEMM, forward and backward.
//!
//! candle 0.11's CPU conv2d backward goes through a naive transposed convolution that
//! dominated step time (~5x the forward). Here the convolution is one recorded op: the
//! patch extraction, one large matrix multiplication (candle's gemm) forward, and
//! backward the two products and the matching col2im scatter, with no gradient
//! materialized for the intermediates.

use super::dispatch::{
    apply_weight_op, channel_sums, generic_path, read_values, Float, HostKernel, HostOp,
    WeightKernel,
};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::op::{Add, BackpropOp};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

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

    /// The kernel rows and columns of output pixel `(oy, ox)`'s window that fall inside
    /// the image (padding contributes zeros): `(ky range, kx range)`.
    #[inline]
    fn window(&self, oy: usize, ox: usize) -> (Range<usize>, Range<usize>) {
        let (y0, x0) = (oy * self.stride, ox * self.stride);
        let ky = self.pad.saturating_sub(y0)..self.k.0.min((self.h + self.pad).saturating_sub(y0));
        let kx = self.pad.saturating_sub(x0)..self.k.1.min((self.w + self.pad).saturating_sub(x0));
        (ky, kx)
    }

    /// Calls `f(columns, pixels)` for every kernel row of output pixel `(oy, ox)`'s
    /// window, in column order (channel, kernel row): the patch columns whose pixels lie
    /// inside the image and those pixels' indices in one `[C, H, W]` image, one run each.
    #[inline]
    fn for_runs(&self, oy: usize, ox: usize, mut f: impl FnMut(Range<usize>, Range<usize>)) {
        let (kys, kxs) = self.window(oy, ox);
        let (y0, x0) = (oy * self.stride, ox * self.stride);
        let (lo, hi) = (kxs.start, kxs.end);
        for ci in 0..self.c {
            for ky in kys.clone() {
                let col = (ci * self.k.0 + ky) * self.k.1;
                let pix = (ci * self.h + y0 + ky - self.pad) * self.w + x0;
                f(col + lo..col + hi, pix + lo - self.pad..pix + hi - self.pad);
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
                        self.for_runs(oy, ox, |cols, pixels| {
                            row[cols].copy_from_slice(&x[pixels]);
                        });
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
                    // Every pixel takes its patches' values in (oy, ox) order.
                    self.for_runs(oy, ox, |cols, pixels| {
                        for (d, v) in o[pixels].iter_mut().zip(&row[cols]) {
                            *d += *v;
                        }
                    });
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
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let (g, n) = self.geometry(arg.shape())?;
        // The patches' gradient is read in place when it is in `T::Sum` already (f32,
        // f64): a copy would be as large as the patch matrix.
        let gx = read_values::<T::Sum, _>(grad, |gc| g.col2im(gc, n))?;
        Ok([Some(
            Tensor::from_vec(gx, arg.shape(), arg.device())?.to_dtype(T::DTYPE)?,
        )])
    }
}

/// 2-D convolution (groups 1, dilation 1), weight `[O, C, kh, kw]`, optional bias `[O]`.
///
/// On the CPU it is one recorded op ([`Conv`]): candle's backward would otherwise zero
/// and accumulate a gradient for every intermediate (the patch matrix, nine times the
/// input for a 3x3 kernel; the GEMM's rows; their transpose), which cost more than the
/// products themselves. The arithmetic is unchanged: the same im2col, the same GEMM
/// calls on the same layouts, the same col2im.
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
    let (o, wc, kh, kw) = w.dims4()?;
    if wc != c || stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
        anyhow::bail!(
            "conv2d: weight {:?}, stride {stride}, padding {pad} do not fit input {:?}",
            w.dims(),
            x.dims()
        );
    }
    let op = Conv {
        g: Geometry::new(c, h, wd, (kh, kw), stride, pad),
        n,
        o,
        keep_cols: w.track_op(),
        cols: OnceLock::new(),
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(apply_weight_op(&x, &w, b, op)?)
}

/// One convolution as a recorded op: `x [N,C,H,W]`, `w [O,C,kh,kw]`, optional `b [O]`.
/// Forward: patches (`Im2col`), `rows = patches @ w^T` (candle's GEMM), `+ b`, rows
/// `[N, OH*OW, O]` to `[N, O, OH*OW]`. Backward: each tracked input's gradient by the
/// products candle's own backward of that chain computes.
struct Conv {
    g: Geometry,
    n: usize,
    o: usize,
    /// Whether the weight is tracked: only its gradient reads the patches.
    keep_cols: bool,
    /// The patch matrix `[N*OH*OW, C*kh*kw]`, kept from the forward for the weight's
    /// gradient (only when `keep_cols`).
    cols: OnceLock<Tensor>,
}

impl Conv {
    fn im2col(&self) -> HostOp<Im2col> {
        HostOp(Im2col {
            k: self.g.k,
            stride: self.g.stride,
            pad: self.g.pad,
        })
    }

    /// `(rows, row length, output pixels per image)`.
    fn dims(&self) -> (usize, usize, usize) {
        let p = self.g.oh * self.g.ow;
        (self.n * p, self.g.row_len(), p)
    }
}

impl WeightKernel for Conv {
    const NAME: &'static str = "ldt-conv2d";

    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, rl, p) = self.dims();
        if !w.1.is_contiguous() {
            candle_core::bail!("ldt-conv2d expects a contiguous weight")
        }
        let (cols, _) = self.im2col().cpu_fwd(x.0, x.1)?;
        let cols_l = Layout::contiguous((m, rl));
        // `w.reshape((O, C*kh*kw)).t()`, as a layout over the weight's storage.
        let wt_l =
            Layout::contiguous_with_offset((self.o, rl), w.1.start_offset()).transpose(0, 1)?;
        let mut rows = cols.matmul(w.0, (1, m, self.o, rl), &cols_l, &wt_l)?;
        let rows_l = Layout::contiguous((m, self.o));
        if let Some((bs, bl)) = b {
            rows = rows.binary_impl::<Add>(bs, &rows_l, &bl.broadcast_as((m, self.o))?)?;
        }
        if self.keep_cols {
            let cols = Tensor::from_storage(Storage::Cpu(cols), (m, rl), BackpropOp::none(), false);
            // Set once: candle runs an op's forward once.
            let _ = self.cols.set(cols);
        }
        let (y, _) = HostOp(SwapLast2).cpu_fwd(&rows, &Layout::contiguous((self.n, p, self.o)))?;
        Ok((y, Shape::from((self.n, self.o, self.g.oh, self.g.ow))))
    }

    /// The gradients of the tracked inputs among `x`, `w`, `b`.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (m, rl, p) = self.dims();
        // The rows' gradient `[N*OH*OW, O]`.
        let gy = grad
            .contiguous()?
            .reshape((self.n, self.o, p))?
            .apply_op1_no_bwd(&HostOp(SwapLast2))?
            .reshape((m, self.o))?;
        let gx = if x.track_op() {
            let gcols = gy.matmul(&w.reshape((self.o, rl))?)?;
            self.im2col().bwd(x, &gcols, &gcols)?
        } else {
            None
        };
        let gw = if w.track_op() {
            let Some(cols) = self.cols.get() else {
                candle_core::bail!("ldt-conv2d: the weight became tracked after the forward")
            };
            // `gy^T cols`, the weight's `[O, C*kh*kw]` directly: the products and the
            // order of each sum over the rows of candle's `(cols^T gy)^T`, without
            // transposing a weight-sized result (6% of a resnet18 step).
            Some(gy.t()?.matmul(cols)?.reshape(w.shape())?)
        } else {
            None
        };
        let gb = match b {
            Some(b) if b.track_op() => Some(
                grad.contiguous()?
                    .reshape((self.n, self.o, p))?
                    .apply_op1_no_bwd(&HostOp(ChannelSums))?,
            ),
            _ => None,
        };
        Ok([gx, gw, gb])
    }
}

/// `[N, C, P] -> [C]`, the sum over images and pixels: a convolution's bias gradient
/// from the output's gradient, with the bits of candle's `sum_keepdim(0)` of the rows'
/// gradient `[N*P, C]` (from zero, in row order, in the element type), read in the
/// output's own layout. candle's reduction over a leading dimension computes a
/// division and a remainder per element (8% of a `cnn` step).
struct ChannelSums;

impl HostKernel<1> for ChannelSums {
    const NAME: &'static str = "ldt-channel-sums";

    fn shape(&self, x: &Shape) -> candle_core::Result<Shape> {
        Ok(Shape::from(x.dims3()?.1))
    }

    fn fwd<T: Float>(&self, [x]: [&[T]; 1], shape: &Shape) -> candle_core::Result<Vec<T>> {
        let (n, c, p) = shape.dims3()?;
        Ok(channel_sums(n, c, p, |ch, i, q| x[(i * c + ch) * p + q]))
    }

    /// Every element's gradient is its channel's.
    fn bwd<T: Float>(
        &self,
        [x]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let (_, c, _) = x.dims3()?;
        Ok([Some(
            grad.reshape((1, c, 1))?
                .broadcast_as(x.shape())?
                .contiguous()?,
        )])
    }
}

/// `[A, B, C] -> [A, C, B]`: the convolution's GEMM rows (pixel-major) to channels-first
/// and, backward, its gradient back. A copy: no arithmetic.
struct SwapLast2;

impl HostKernel<1> for SwapLast2 {
    const NAME: &'static str = "ldt-swap-last2";

    fn shape(&self, x: &Shape) -> candle_core::Result<Shape> {
        let (a, b, c) = x.dims3()?;
        Ok(Shape::from((a, c, b)))
    }

    fn fwd<T: Float>(&self, [x]: [&[T]; 1], shape: &Shape) -> candle_core::Result<Vec<T>> {
        let (_, b, c) = shape.dims3()?;
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(b * c)
            .zip(x.par_chunks(b * c))
            .for_each(|(o, x)| {
                // Tiles of 16 x 16 keep both sides in cache.
                for i0 in (0..b).step_by(16) {
                    for j0 in (0..c).step_by(16) {
                        for i in i0..(i0 + 16).min(b) {
                            for j in j0..(j0 + 16).min(c) {
                                o[j * b + i] = x[i * c + j];
                            }
                        }
                    }
                }
            });
        Ok(out)
    }

    fn bwd<T: Float>(
        &self,
        [_]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        Ok([Some(
            grad.contiguous()?.apply_op1_no_bwd(&HostOp(SwapLast2))?,
        )])
    }
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
