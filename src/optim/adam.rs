//! Adam / AdamW with PyTorch's single-tensor arithmetic, operation by operation:
//! `m = lerp(m, g, 1-b1)`, `v = v*b2 + (1-b2)*g*g`, `denom = sqrt(v)/sqrt(bc2) + eps`,
//! `p = p + (-lr/bc1 * m) / denom`; bias corrections in f64, scalars rounded to f32.
//! With beta1 = 0 there is no first-moment buffer: `m` is the gradient itself.

use super::{f32_kernel, l2_decayed, LayerState, OptimSettings};
use crate::config::OptimName;
use anyhow::Result;
use candle_core::{Tensor, Var};

/// The scalars of one Adam/AdamW step, rounded to f32 as PyTorch rounds them (bias
/// corrections in f64 first); the host kernels and the device-generic path both take
/// them from here, so both compute with the same numbers.
struct Scalars {
    /// AdamW's weight factor `1 - lr * wd` (None: no decoupled decay).
    adamw_scale: Option<f32>,
    /// Lerp weight of the first moment, `1 - b1` (None with b1 = 0: `m` is the gradient).
    w1: Option<f32>,
    /// Second-moment decay `b2` and gradient weight `1 - b2`.
    b2: f32,
    c: f32,
    /// `-lr / (1 - b1^t)`.
    neg_step: f32,
    /// `sqrt(1 - b2^t)`.
    bc2: f32,
    eps: f32,
}

impl Scalars {
    fn of(s: &OptimSettings, step: u64, lr: f64) -> Scalars {
        let [b1, b2] = s.betas;
        let t = step as i32;
        let adamw = s.weight_decay > 0.0 && s.name == OptimName::Adamw;
        Scalars {
            adamw_scale: adamw.then_some((1.0 - lr * s.weight_decay) as f32),
            w1: (b1 > 0.0).then_some((1.0 - b1) as f32),
            b2: b2 as f32,
            c: (1.0 - b2) as f32,
            neg_step: (-(lr / (1.0 - b1.powi(t)))) as f32,
            bc2: (1.0 - b2.powi(t)).sqrt() as f32,
            eps: s.eps as f32,
        }
    }
}

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

/// One Adam/AdamW step of one layer.
pub(super) fn step(
    s: &OptimSettings,
    st: &mut LayerState,
    p: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    let k = Scalars::of(s, st.step, lr);
    // AdamW's decoupled weight decay: `p <- p * f`.
    let g = decayed(s, &k, p, g, |f| {
        f32_kernel("ldt-scale", p.as_tensor(), [], |p, []| {
            p.iter_mut().for_each(|p| *p *= f)
        })
    })?;
    let v = moment(&mut st.v, &g)?;
    let m = match k.w1 {
        Some(w) => {
            // `m <- lerp(m, g, w)` with PyTorch's two-branch lerp formula.
            let m = moment(&mut st.m, &g)?;
            f32_kernel("ldt-adam-lerp", &m, [&g], |m, [g]| {
                if w.abs() < 0.5 {
                    m.iter_mut().zip(g).for_each(|(m, &g)| *m += w * (g - *m));
                } else {
                    let u = 1.0 - w;
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, &g)| *m = g - (g - *m) * u);
                }
            })?;
            m
        }
        None => g.clone(),
    };
    // `v <- v*b2 + c*g*g`.
    let (b2, c) = (k.b2, k.c);
    f32_kernel("ldt-adam-v", &v, [&g], |v, [g]| {
        v.iter_mut()
            .zip(g)
            .for_each(|(v, &g)| *v = *v * b2 + c * g * g)
    })?;
    // `p <- p + (neg_step * m) / (sqrt(v)/bc2 + eps)`.
    let (neg_step, bc2, eps) = (k.neg_step, k.bc2, k.eps);
    f32_kernel("ldt-adam-update", p.as_tensor(), [&m, &v], |p, [m, v]| {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p += (neg_step * m) / (v.sqrt() / bc2 + eps);
        }
    })
}

/// [`step`] from candle tensor ops, on any device: the same operations in the same order
/// on the same f32-rounded scalars (divisions stay divisions), the moments replaced in
/// `st` and the parameter written with `Var::set`. Used off the CPU.
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
