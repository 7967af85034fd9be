//! Multi-head self-attention (timm's `Attention`): on the CPU the heads' split, the
//! scaled product, the softmax, the product with the values and the heads' merge are
//! one recorded op ([`Heads`]) with the bits of the chain of candle ops it replaces.
//!
//! The chain ([`heads_recorded`]) is about fifteen graph nodes between the `qkv` and
//! `proj` linears. In candle's backward each node costs a zero-filled gradient and an
//! add, and the chain kept the scaled queries, contiguous keys and values and the
//! scores alive for it. The op keeps the attention probabilities only (the queries,
//! keys and values are copied again from its input in the backward).

use super::dispatch::{generic_path, Float, HostKernel, HostOp};
use super::layers::{linear_rows, softmax_last_dim, SoftmaxLastDim};
use anyhow::Result;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cpu_backend::CpuDevice;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, D};
use parking_lot::Mutex;
use rayon::prelude::*;

/// Textbook scaled dot-product attention over `[B, heads, N, d]` tensors:
/// `softmax((q / sqrt(d)) k^T) v` (q is scaled before the product, as timm's eager path).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let q = (q * scale(d))?;
    let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let a = softmax_last_dim(&scores)?;
    Ok(a.matmul(&v.contiguous()?)?)
}

/// The queries' scale `1 / sqrt(d)` for head width `d`.
fn scale(d: usize) -> f64 {
    1.0 / (d as f64).sqrt()
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
    let dim = x.dim(D::Minus1)?;
    if heads == 0 || !dim.is_multiple_of(heads) {
        anyhow::bail!("multi_head_attention: width {dim} is not divisible by {heads} heads");
    }
    let o = self_attention_heads(&linear_rows(x, qkv_w, qkv_b)?, heads)?;
    linear_rows(&o, proj_w, proj_b)
}

/// The attention between the `qkv` and `proj` linears: `qkv` `[B, N, 3D]` (q, k, v, each
/// `heads` heads of `D / heads`) to the heads' outputs concatenated, `[B, N, D]`. On the
/// CPU one op ([`Heads`]), elsewhere [`heads_recorded`].
pub fn self_attention_heads(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, three_dim) = qkv.dims3()?;
    let geometry = Geometry {
        b,
        n,
        heads,
        d: three_dim / 3 / heads.max(1),
    };
    if heads == 0 || three_dim != 3 * heads * geometry.d {
        anyhow::bail!("attention: {three_dim} qkv features are not 3 x {heads} heads");
    }
    if generic_path(qkv) || b * n * three_dim == 0 {
        return heads_recorded(qkv, heads);
    }
    let op = Heads {
        geometry,
        probabilities: Mutex::new(None),
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

/// [`self_attention_heads`] as the chain of candle ops (any device): split, [`attention`],
/// merge. Public so tests can compare the CPU op with it.
#[doc(hidden)]
pub fn heads_recorded(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, three_dim) = qkv.dims3()?;
    let dim = three_dim / 3;
    let qkv = qkv
        .reshape((b, n, 3, heads, dim / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let o = attention(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?)?;
    Ok(o.transpose(1, 2)?.reshape((b, n, dim))?)
}

/// The sizes of one attention: batch, tokens, heads, head width.
#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    n: usize,
    heads: usize,
    d: usize,
}

impl Geometry {
    /// `[B, heads, N, width]`.
    fn per_head(&self, width: usize) -> Shape {
        Shape::from((self.b, self.heads, self.n, width))
    }

    /// The layout of part `i` (0 q, 1 k, 2 v) of a contiguous `[B, N, 3D]` input starting
    /// at `offset`, as `[B, heads, N, d]`: what `reshape`, `permute` and `get(i)` give.
    fn part(&self, i: usize, offset: usize) -> Layout {
        let Geometry { n, heads, d, .. } = *self;
        let dim = heads * d;
        Layout::new(
            self.per_head(d),
            vec![n * 3 * dim, d, 3 * dim, 1],
            offset + i * dim,
        )
    }

    /// The `(batch, m, n, k)` of a product of `[B, heads, m, k]` by `[B, heads, k, n]`.
    fn bmnk(&self, m: usize, n: usize, k: usize) -> (usize, usize, usize, usize) {
        (self.b * self.heads, m, n, k)
    }

    /// The scaled queries, contiguous keys and contiguous values, `[B, heads, N, d]`
    /// each, from the `[B, N, 3D]` input: the storages the chain's `q * scale`,
    /// `k.contiguous()` and `v.contiguous()` compute.
    fn split(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<[CpuStorage; 3]> {
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("attention expects a contiguous qkv input")
        };
        let q = s.affine(&self.part(0, start), scale(self.d), 0.0)?;
        let copy = |i| -> candle_core::Result<CpuStorage> {
            let mut dst = CpuDevice.zeros_impl(&self.per_head(self.d), s.dtype())?;
            s.copy_strided_src(&mut dst, 0, &self.part(i, start))?;
            Ok(dst)
        };
        Ok([q, copy(1)?, copy(2)?])
    }
}

/// [`self_attention_heads`] on the CPU as one recorded op of the `[B, N, 3D]` input.
///
/// Forward: the chain's storage operations in its order and on its layouts (the scale,
/// the copies, candle's product kernel, [`SoftmaxLastDim`], the product, the merge), so
/// the bits are the chain's. The probabilities are kept for the backward.
///
/// Backward: the products candle's backward computes for the chain, on the same
/// layouts, without its zero-fills and adds. Adding a gradient to zeros changes at most
/// the sign of a zero (`-0 + 0 = +0`), and a sum or product that takes such a value
/// changes at most the sign of a zero in turn; the input gradient is therefore the
/// chain's once every element has had zero added (the queries' by the scale's `+ 0`,
/// the keys' and values' in [`MergeGradients`]).
struct Heads {
    geometry: Geometry,
    /// `softmax(q k^T / sqrt(d))`, `[B, heads, N, N]`, from the forward until the
    /// backward takes it.
    probabilities: Mutex<Option<Tensor>>,
}

/// A CPU storage of `shape` as a tensor that records nothing.
fn untracked(s: CpuStorage, shape: Shape) -> Tensor {
    Tensor::from_storage(Storage::Cpu(s), shape, BackpropOp::none(), false)
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "ldt-attention-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let [q, k, v] = g.split(s, l)?;
        let per_head = Layout::contiguous(g.per_head(g.d));
        let scores = q.matmul(
            &k,
            g.bmnk(g.n, g.n, g.d),
            &per_head,
            &per_head.transpose(2, 3)?,
        )?;
        let square = Layout::contiguous(g.per_head(g.n));
        let (a, _) = HostOp(SoftmaxLastDim).cpu_fwd(&scores, &square)?;
        drop(scores);
        let o = a.matmul(&v, g.bmnk(g.n, g.d, g.n), &square, &per_head)?;
        *self.probabilities.lock() = Some(untracked(a, g.per_head(g.n)));
        let merged = Shape::from((g.b, g.n, g.heads * g.d));
        let mut y = CpuDevice.zeros_impl(&merged, s.dtype())?;
        o.copy_strided_src(&mut y, 0, &per_head.transpose(1, 2)?)?;
        Ok((y, merged))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = self.geometry;
        let Some(a) = self.probabilities.lock().take() else {
            candle_core::bail!(
                "attention: the probabilities were taken by an earlier backward of this graph"
            )
        };
        let [q, k, v] = {
            let (s, l) = arg.storage_and_layout();
            let Storage::Cpu(s) = &*s else {
                candle_core::bail!("attention's backward expects a CPU input")
            };
            g.split(s, l)?.map(|part| untracked(part, g.per_head(g.d)))
        };
        // The output's gradient per head, contiguous, as the chain's merge passes it on.
        let go = grad
            .contiguous()?
            .reshape((g.b, g.n, g.heads, g.d))?
            .transpose(1, 2)?
            .contiguous()?;
        let ga = go.matmul(&v.t()?)?;
        let gv = a.t()?.matmul(&go)?;
        let Some(gs) = HostOp(SoftmaxLastDim).bwd(&a, &a, &ga)? else {
            candle_core::bail!("attention: the softmax's backward gave no gradient")
        };
        let gq = gs.matmul(&k)?.affine(scale(g.d), 0.0)?;
        let gk_t = q.t()?.matmul(&gs)?;
        let merge = MergeGradients { geometry: g };
        Ok(Some(gq.apply_op3_no_bwd(&gk_t, &gv, &HostOp(merge))?))
    }
}

/// The input gradient of [`Heads`], `[B, N, 3D]`, from the queries' `[B, heads, N, d]`,
/// the keys' transposed `[B, heads, d, N]` and the values' `[B, heads, N, d]`, each
/// element plus zero (as candle's accumulation into zeros gives it).
struct MergeGradients {
    geometry: Geometry,
}

impl HostKernel<3> for MergeGradients {
    const NAME: &'static str = "ldt-attention-merge-gradients";

    fn shape(&self, _: &Shape) -> candle_core::Result<Shape> {
        let g = self.geometry;
        Ok(Shape::from((g.b, g.n, 3 * g.heads * g.d)))
    }

    fn fwd<T: Float>(&self, [gq, gk_t, gv]: [&[T]; 3], _: &Shape) -> candle_core::Result<Vec<T>> {
        let Geometry { b: _, n, heads, d } = self.geometry;
        let dim = heads * d;
        let mut out = vec![T::zero(); gq.len() * 3];
        // One token's row per task: [q heads | k heads | v heads].
        out.par_chunks_mut(3 * dim)
            .enumerate()
            .for_each(|(row, o)| {
                let (bi, t) = (row / n, row % n);
                for h in 0..heads {
                    let head = (bi * heads + h) * n * d;
                    for j in 0..d {
                        let at = head + t * d + j;
                        o[h * d + j] = gq[at] + T::zero();
                        o[dim + h * d + j] = gk_t[head + j * n + t] + T::zero();
                        o[2 * dim + h * d + j] = gv[at] + T::zero();
                    }
                }
            });
        Ok(out)
    }

    fn bwd<T: Float>(
        &self,
        _: [&Tensor; 3],
        _: &Tensor,
        _: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        candle_core::bail!("attention's gradient merge is not differentiated")
    }
}
