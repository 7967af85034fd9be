//! Adam / AdamW with PyTorch's single-tensor arithmetic, operation by operation:
//! `m = lerp(m, g, 1-b1)`, `v = v*b2 + (1-b2)*g*g`, `denom = sqrt(v)/sqrt(bc2) + eps`,
//! `p = p + (-lr/bc1 * m) / denom`; bias corrections in f64, scalars rounded to f32.
//! With beta1 = 0 there is no first-moment buffer: `m` is the gradient itself.

use super::{f32_slice, f32_slice_mut, l2_decayed, LayerState, OptimSettings};
use crate::config::OptimName;
use anyhow::Result;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

/// `m <- lerp(m, g, w)` with PyTorch's two-branch lerp formula.
struct Lerp {
    w: f32,
}

impl InplaceOp2 for Lerp {
    fn name(&self) -> &'static str {
        "ldt-adam-lerp"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let m = f32_slice_mut(dst, dl)?;
        let g = f32_slice(g, gl)?;
        let w = self.w;
        if w.abs() < 0.5 {
            m.iter_mut().zip(g).for_each(|(m, &g)| *m += w * (g - *m));
        } else {
            let u = 1.0 - w;
            m.iter_mut()
                .zip(g)
                .for_each(|(m, &g)| *m = g - (g - *m) * u);
        }
        Ok(())
    }
}

/// `v <- v*b2 + c*g*g`.
struct SecondMoment {
    b2: f32,
    c: f32,
}

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "ldt-adam-v"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let v = f32_slice_mut(dst, dl)?;
        let g = f32_slice(g, gl)?;
        let (b2, c) = (self.b2, self.c);
        v.iter_mut()
            .zip(g)
            .for_each(|(v, &g)| *v = *v * b2 + c * g * g);
        Ok(())
    }
}

/// `p <- p + (neg_step * m) / (sqrt(v)/bc2 + eps)`.
struct Update {
    neg_step: f32,
    bc2: f32,
    eps: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "ldt-adam-update"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32_slice_mut(dst, dl)?;
        let m = f32_slice(m, ml)?;
        let v = f32_slice(v, vl)?;
        let (s, bc2, eps) = (self.neg_step, self.bc2, self.eps);
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p += (s * m) / (v.sqrt() / bc2 + eps);
        }
        Ok(())
    }
}

/// `p <- p * f` (AdamW's decoupled weight decay).
struct Scale {
    f: f32,
}

impl candle_core::InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "ldt-scale"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let f = self.f;
        f32_slice_mut(s, l)?.iter_mut().for_each(|p| *p *= f);
        Ok(())
    }
}

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
    let g = decayed(s, &k, p, g, |f| {
        Ok(p.as_tensor().inplace_op1(&Scale { f })?)
    })?;
    let v = moment(&mut st.v, &g)?;
    let m = match k.w1 {
        Some(w) => {
            let m = moment(&mut st.m, &g)?;
            m.inplace_op2(&g, &Lerp { w })?;
            m
        }
        None => g.clone(),
    };
    v.inplace_op2(&g, &SecondMoment { b2: k.b2, c: k.c })?;
    p.as_tensor().inplace_op3(
        &m,
        &v,
        &Update {
            neg_step: k.neg_step,
            bc2: k.bc2,
            eps: k.eps,
        },
    )?;
    Ok(())
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
