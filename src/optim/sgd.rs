//! SGD with momentum and L2 weight decay, as `torch.optim.SGD` (dampening 0):
//! `d = g + wd*p`; `buf = d` at the first step, else `buf = buf*mu + d`; `p = p - lr*buf`.

use super::{f32_kernel, l2_decayed, LayerState, OptimSettings};
use anyhow::Result;
use candle_core::{Tensor, Var};

/// One SGD step of one layer.
pub(super) fn step(
    s: &OptimSettings,
    st: &mut LayerState,
    p: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    let d = l2_decayed(s, p, g)?;
    let d = if s.momentum > 0.0 {
        match &st.m {
            None => {
                let b = d.copy()?;
                st.m = Some(b.clone());
                b
            }
            Some(b) => {
                // `buf <- buf*mu + d`.
                let mu = s.momentum as f32;
                f32_kernel("ldt-sgd-momentum", b, [&d], |b, [d]| {
                    b.iter_mut().zip(d).for_each(|(b, &d)| *b = *b * mu + d)
                })?;
                b.clone()
            }
        }
    } else {
        d
    };
    // `p <- p + neg_lr * d`.
    let neg_lr = (-lr) as f32;
    f32_kernel("ldt-sgd-update", p.as_tensor(), [&d], |p, [d]| {
        p.iter_mut().zip(d).for_each(|(p, &d)| *p += neg_lr * d)
    })
}

/// [`step`] from candle tensor ops, on any device: the same operations in the same order
/// on the same f32-rounded scalars, the momentum buffer replaced in `st` and the
/// parameter written with `Var::set`. Used off the CPU.
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
