//! Adam / AdamW with PyTorch's single-tensor arithmetic, operation by operation:
//! `m = lerp(m, g, 1-b1)`, `v = v*b2 + (1-b2)*g*g`, `denom = sqrt(v)/sqrt(bc2) + eps`,
//! `p = p + (-lr/bc1 * m) / denom`; bias corrections in f64, scalars rounded to f32.
//! With beta1 = 0 there is no first-moment buffer: `m` is the gradient itself.
//!
//! On the CPU, [`step`] is one pass of the fused host kernel (`fused.rs`, which holds the
//! per-element arithmetic and the [`Scalars`]); [`step_generic`] computes the same from
//! candle tensor ops, off the CPU.

use super::fused::{self, Scalars};
use super::{l2_decayed, LayerState, OptimSettings};
use anyhow::Result;
use candle_core::{Tensor, Var};

/// The gradient Adam works on: AdamW decays the weights (through `scale`) and keeps the
/// gradient; Adam adds L2 decay to the gradient (nothing without weight decay).
fn decayed(
    s: &OptimSettings,
    k: &Scalars,
    p: &Var,
    g: &Tensor,
    scale: impl FnOnce(f32) -> Result<()>,
) -> Result<Tensor> {
    match k.adamw_scale {
        Some(f) => {
            scale(f)?;
            Ok(g.clone())
        }
        None => l2_decayed(s, p, g),
    }
}

/// `slot`'s tensor, or zeros like `g` stored there first.
fn moment(slot: &mut Option<Tensor>, g: &Tensor) -> Result<Tensor> {
    Ok(match slot {
        Some(t) => t.clone(),
        None => slot.insert(g.zeros_like()?).clone(),
    })
}

/// One Adam/AdamW step of one layer on the CPU: the moments (zeros at first) and the
/// weights updated in place by the fused host kernel, in one pass.
pub(super) fn step(
    s: &OptimSettings,
    st: &mut LayerState,
    p: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    let v = moment(&mut st.v, g)?;
    let m = match Scalars::of(s, st.step, lr).w1 {
        Some(_) => Some(moment(&mut st.m, g)?),
        None => None,
    };
    fused::update_layer(s, p, g, m.as_ref(), Some(&v), st.step, lr)
}

/// [`step`] from candle tensor ops, on any device: the same operations in the same order
/// on the same f32-rounded scalars (divisions stay divisions), the moments replaced in
/// `st` and the parameter written with `Var::set`. Used off the CPU. The bits are the
/// host kernel's but for the sign of a zero: candle's `Tensor * f64` is `x * f + 0`,
/// which gives `+0` where the host keeps a `-0` (seen only with a `-0` weight or
/// gradient among the inputs: tests/optim.rs).
pub(super) fn step_generic(
    s: &OptimSettings,
    st: &mut LayerState,
    p: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    let k = Scalars::of(s, st.step, lr);
    let g = decayed(s, &k, p, g, |f| {
        Ok(p.set(&(p.as_tensor().detach() * f as f64)?)?)
    })?;
    let v = moment(&mut st.v, &g)?;
    let m = match k.w1 {
        Some(w) => {
            let m = moment(&mut st.m, &g)?;
            let m = if w.abs() < 0.5 {
                (&m + ((&g - &m)? * w as f64)?)?
            } else {
                (&g - ((&g - &m)? * (1.0 - w) as f64)?)?
            };
            st.m = Some(m.clone());
            m
        }
        None => g.clone(),
    };
    let v = ((v * k.b2 as f64)? + ((&g * k.c as f64)? * &g)?)?;
    st.v = Some(v.clone());
    // Filled on the device (no host-to-device copy per layer and step).
    let bc2 = Tensor::full(k.bc2, (), v.device())?.to_dtype(v.dtype())?;
    let denom = (v.sqrt()?.broadcast_div(&bc2)? + k.eps as f64)?;
    let upd = ((m * k.neg_step as f64)? / denom)?;
    p.set(&(p.as_tensor().detach() + upd)?)?;
    Ok(())
}
