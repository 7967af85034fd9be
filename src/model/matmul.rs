//! The matrix product and the broadcast scale/shift of the layers, differentiated only
//! where a gradient is needed.
//!
//! candle's `matmul` backward always computes both operands' gradients and keeps them to
//! the end of the backward pass, tracked or not: with a frozen weight (LDT's other set,
//! a linear probe's backbone) it computed and held a gradient as large as the weight,
//! and with an untracked input (the image at the first layer) the gradient of its patch
//! matrix. [`matmul`] records the product as its own op whose backward yields only the
//! tracked operand's gradient, by the same product candle uses, so every gradient that
//! is used keeps its bits (and the forward is candle's own kernel on the same layouts).

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// `a @ b` (the rules of `Tensor::matmul`); its backward yields the gradient of `a`
/// only when `a` is tracked and that of `b` only when `b` is.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ta, tb) = (a.track_op(), b.track_op());
    if ta == tb || a.elem_count() == 0 || b.elem_count() == 0 {
        return Ok(a.matmul(b)?);
    }
    Ok(a.apply_op2(b, OneSided { grad_a: ta })?)
}

/// `a * b` with `b` broadcast to `a`'s shape (BatchNorm's and LayerNorm's scale), as
/// `Tensor::broadcast_mul`. With `b` untracked (a frozen scale) its backward yields only
/// `a`'s gradient: candle's computes an activation-sized gradient for the broadcast `b`
/// too and keeps it to the end of the backward pass.
pub fn broadcast_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.track_op() && !b.track_op() && a.elem_count() > 0 {
        return Ok(a.apply_op2(b, Broadcast { add: false })?);
    }
    Ok(a.broadcast_mul(b)?)
}

/// `a + b` with `b` broadcast to `a`'s shape (a shift, a bias), as
/// `Tensor::broadcast_add`; with `b` untracked, only `a`'s gradient (see
/// [`broadcast_mul`]).
pub fn broadcast_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.track_op() && !b.track_op() && a.elem_count() > 0 {
        return Ok(a.apply_op2(b, Broadcast { add: true })?);
    }
    Ok(a.broadcast_add(b)?)
}

/// `a + b` or `a * b`, `b` broadcast to `a`'s shape, differentiated for `a` only.
struct Broadcast {
    add: bool,
}

impl Broadcast {
    /// candle's own kernel on the layouts `Tensor::broadcast_*` gives it, on any backend.
    fn forward<S: BackendStorage>(
        &self,
        s1: &S,
        l1: &Layout,
        s2: &S,
        l2: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let l2 = l2.broadcast_as(l1.shape())?;
        let out = if self.add {
            s1.binary_impl::<Add>(s2, l1, &l2)?
        } else {
            s1.binary_impl::<Mul>(s2, l1, &l2)?
        };
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for Broadcast {
    fn name(&self) -> &'static str {
        "ldt-broadcast-one-sided"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.forward(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // What candle's backward gives the left operand.
        Ok(if self.add {
            (Some(grad.clone()), None)
        } else {
            (Some(grad.broadcast_mul(b)?), None)
        })
    }
}

/// A product with exactly one tracked operand: `a` when `grad_a`, else `b`.
struct OneSided {
    grad_a: bool,
}

/// `(batch, m, n, k)` and the result's shape, as `Tensor::matmul` derives them.
fn geometry(
    l1: &Layout,
    l2: &Layout,
) -> candle_core::Result<((usize, usize, usize, usize), Shape)> {
    let (a, b) = (l1.dims(), l2.dims());
    let d = a.len();
    if d < 2 || b.len() != d {
        candle_core::bail!("matmul: shapes {a:?} and {b:?} differ in rank or are not matrices")
    }
    let (m, k, k2, n) = (a[d - 2], a[d - 1], b[d - 2], b[d - 1]);
    let batch: usize = a[..d - 2].iter().product();
    if k != k2 || batch != b[..d - 2].iter().product::<usize>() {
        candle_core::bail!("matmul: shapes {a:?} and {b:?} do not multiply")
    }
    Ok(((batch, m, n, k), Shape::from(&a[..d - 2]).extend(&[m, n])))
}

/// candle's matrix product kernel on any backend, with `Tensor::matmul`'s geometry.
fn product<S: BackendStorage>(
    s1: &S,
    l1: &Layout,
    s2: &S,
    l2: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (bmnk, shape) = geometry(l1, l2)?;
    Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
}

impl CustomOp2 for OneSided {
    fn name(&self) -> &'static str {
        "ldt-matmul-one-sided"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        product(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        product(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The products candle's own backward computes.
        Ok(if self.grad_a {
            (Some(grad.matmul(&b.t()?)?), None)
        } else {
            (None, Some(a.t()?.matmul(grad)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A frozen scale and shift: the result and the input's gradient equal candle's bit
    /// for bit, and the scale and shift get no gradient.
    #[test]
    fn one_sided_broadcasts_equal_candles() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (1, 3, 1, 1), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (1, 3, 1, 1), &dev).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let ours = broadcast_add(&broadcast_mul(xv.as_tensor(), &g).unwrap(), &b).unwrap();
        let theirs = xv
            .as_tensor()
            .broadcast_mul(&g)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&ours), bits(&theirs), "forward");
        let w = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let (go, gt) = (
            (ours * &w).unwrap().sum_all().unwrap().backward().unwrap(),
            (theirs * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap(),
        );
        assert_eq!(
            bits(go.get(xv.as_tensor()).unwrap()),
            bits(gt.get(xv.as_tensor()).unwrap()),
            "input gradient"
        );
        assert!(go.get(&g).is_none() && go.get(&b).is_none());
    }

    /// The gradient of the tracked operand and the product equal candle's bit for bit;
    /// the untracked operand gets no gradient.
    #[test]
    fn one_sided_gradients_equal_candles() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        for grad_x in [true, false] {
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let (xa, wa) = if grad_x {
                (xv.as_tensor().clone(), w.clone())
            } else {
                (x.clone(), wv.as_tensor().clone())
            };
            let ours = matmul(&xa, &wa.t().unwrap()).unwrap();
            let theirs = xv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&ours), bits(&theirs), "forward");
            let (g_ours, g_theirs) = (
                ours.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
                theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
            );
            let (tracked, other) = if grad_x { (&xv, &w) } else { (&wv, &x) };
            assert_eq!(
                bits(g_ours.get(tracked.as_tensor()).unwrap()),
                bits(g_theirs.get(tracked.as_tensor()).unwrap()),
                "gradient of the tracked operand"
            );
            assert!(
                g_ours.get(other).is_none(),
                "no gradient for the untracked one"
            );
        }
    }
}
