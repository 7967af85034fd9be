//! SGD with momentum and L2 weight decay, as `torch.optim.SGD` (dampening 0):
//! `d = g + wd*p`; `buf = d` at the first step, else `buf = buf*mu + d`; `p = p - lr*buf`.
//! On the CPU, [`step`] is one pass of the fused host kernel (`fused.rs`, which holds the
//! per-element arithmetic); [`step_generic`] computes the same from candle tensor ops.

use super::{fused, l2_decayed, LayerState, OptimSettings};
use anyhow::Result;
use candle_core::{Tensor, Var};

/// One SGD step of one layer on the CPU: the momentum buffer (created at its first
/// step) and the weights updated in place by the fused host kernel, in one pass.
pub(super) fn step(
    s: &OptimSettings,
    st: &mut LayerState,
    p: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    // The kernel sets `buf = d` at step 1. A buffer created now starts that way whatever
    // the layer's step count (a resumed state that had no buffer), as `step_generic` does.
    let (buf, step) = match (s.momentum > 0.0, &st.m) {
        (false, _) => (None, st.step),
        (true, Some(b)) => (Some(b.clone()), st.step),
        (true, None) => (Some(st.m.insert(g.zeros_like()?).clone()), 1),
    };
    fused::update_layer(s, p, g, buf.as_ref(), None, step, lr)
}

/// [`step`] from candle tensor ops, on any device: the same operations in the same order
/// on the same f32-rounded scalars, the momentum buffer replaced in `st` and the
/// parameter written with `Var::set`. Used off the CPU. The bits are the host kernel's
/// but for the sign of a zero (candle's `Tensor * f64` is `x * f + 0`, see `adam.rs`).
pub(super) fn step_generic(
    s: &OptimSettings,
    st: &mut LayerState,
    p: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    let d = l2_decayed(s, p, g)?;
    let d = if s.momentum > 0.0 {
        let b = match &st.m {
            None => d.copy()?,
            Some(b) => ((b * s.momentum as f32 as f64)? + d)?,
        };
        st.m = Some(b.clone());
        b
    } else {
        d
    };
    let neg_lr = (-lr) as f32;
    p.set(&(p.as_tensor().detach() + (d * neg_lr as f64)?)?)?;
    Ok(())
}
