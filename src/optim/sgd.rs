//! SGD with momentum and L2 weight decay, as `torch.optim.SGD` (dampening 0):
//! `d = g + wd*p`; `buf = d` at the first step, else `buf = buf*mu + d`; `p = p - lr*buf`.

use super::{f32_slice, f32_slice_mut, l2_decayed, LayerState, OptimSettings};
use anyhow::Result;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};

/// `buf <- buf*mu + d`.
struct Momentum {
    mu: f32,
}

impl InplaceOp2 for Momentum {
    fn name(&self) -> &'static str {
        "ldt-sgd-momentum"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        d: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<()> {
        let mu = self.mu;
        f32_slice_mut(dst, dl)?
            .iter_mut()
            .zip(f32_slice(d, l)?)
            .for_each(|(b, &d)| *b = *b * mu + d);
        Ok(())
    }
}

/// `p <- p + neg_lr * d`.
struct Axpy {
    neg_lr: f32,
}

impl InplaceOp2 for Axpy {
    fn name(&self) -> &'static str {
        "ldt-sgd-update"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        d: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<()> {
        let a = self.neg_lr;
        f32_slice_mut(dst, dl)?
            .iter_mut()
            .zip(f32_slice(d, l)?)
            .for_each(|(p, &d)| *p += a * d);
        Ok(())
    }
}

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
                b.inplace_op2(
                    &d,
                    &Momentum {
                        mu: s.momentum as f32,
                    },
                )?;
                b.clone()
            }
        }
    } else {
        d
    };
    p.as_tensor().inplace_op2(
        &d,
        &Axpy {
            neg_lr: (-lr) as f32,
        },
    )?;
    Ok(())
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
