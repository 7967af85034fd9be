//! The optimizer on the host (`offload.optimizer = "host"`, the layout of ZeRO-Offload):
//! a layer's f32 master weights and moments live in host memory ([`HostVec`], counted
//! apart from the device heap); each update brings the gradient to the host, runs the
//! fused multi-threaded kernel ([`super::fused`], the arithmetic of the device
//! optimizer) on the master weights and writes them back into the live weights.
//!
//! The master copy starts as the live weights at the layer's first update (or its first
//! after a resume) and afterwards equals them bit for bit: nothing but this update
//! writes a layer its branch trains (folds write the other set; swaps bring the same
//! bits back). On the CPU the gradient is read and the weights written in place.

use super::fused::{self, Update};
use super::{f32_kernel, LayerState, OptimSettings};
use crate::heap::HostVec;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use std::cell::{Cell, RefCell};

/// One layer's optimizer state in host memory.
pub struct HostLayer {
    /// Updates this layer has taken.
    pub step: u64,
    /// f32 master weights (`None` until the next update copies the live weights).
    master: Option<HostVec>,
    /// Adam's first moment / SGD's momentum buffer, where the settings keep one.
    m: Option<HostVec>,
    /// Adam's second moment.
    v: Option<HostVec>,
}

impl HostLayer {
    /// A device-side state moved to the host (a resumed checkpoint, a placement change);
    /// the master weights come from the live weights at the next update.
    pub fn from_state(st: &LayerState) -> Result<HostLayer> {
        let host = |t: &Option<Tensor>| -> Result<Option<HostVec>> {
            t.as_ref()
                .map(|t| Ok(HostVec::from_slice(&values(t)?)))
                .transpose()
        };
        Ok(HostLayer {
            step: st.step,
            master: None,
            m: host(&st.m)?,
            v: host(&st.v)?,
        })
    }

    /// The state as CPU tensors of `shape` (checkpoints).
    pub fn to_state(&self, shape: &[usize]) -> Result<LayerState> {
        let t = |x: &Option<HostVec>| -> Result<Option<Tensor>> {
            x.as_ref()
                .map(|x| Ok(Tensor::from_slice(x, shape, &Device::Cpu)?))
                .transpose()
        };
        Ok(LayerState {
            step: self.step,
            m: t(&self.m)?,
            v: t(&self.v)?,
        })
    }

    /// Host bytes held: master weights and moments.
    pub fn bytes(&self) -> usize {
        [&self.master, &self.m, &self.v]
            .iter()
            .filter_map(|x| x.as_ref())
            .map(|x| 4 * x.len())
            .sum()
    }
}

/// A tensor's values as f32 on the host.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// One update of layer `p` with gradient `g` at learning rate `lr`, state `st` on the
/// host (created here at the layer's first update).
pub fn step(
    s: &OptimSettings,
    st: &mut Option<HostLayer>,
    p: &Var,
    g: &Tensor,
    lr: f64,
) -> Result<()> {
    let n = p.elem_count();
    if g.elem_count() != n {
        bail!("gradient of {} values for a layer of {n}", g.elem_count());
    }
    let st = st.get_or_insert_with(|| HostLayer {
        step: 0,
        master: None,
        m: None,
        v: None,
    });
    if st.master.is_none() {
        st.master = Some(HostVec::from_slice(&values(p.as_tensor())?));
    }
    let adam = s.name != crate::config::OptimName::Sgd;
    let with_m = if adam {
        s.betas[0] > 0.0
    } else {
        s.momentum > 0.0
    };
    if with_m && st.m.is_none() {
        st.m = Some(HostVec::zeroed(n));
    }
    if adam && st.v.is_none() {
        st.v = Some(HostVec::zeroed(n));
    }
    st.step += 1;
    let step = st.step;
    let threads = candle_core::utils::get_num_threads();
    let live = p.as_tensor();
    if live.device().is_cpu() && g.device().is_cpu() {
        // The gradient read and the weights written in place; `f32_kernel` takes a `Fn`,
        // so the state is borrowed through a cell.
        let g = g.contiguous()?;
        let (state, res) = (RefCell::new(&mut *st), Cell::new(None));
        f32_kernel("ldt-host-optim", live, [&g], |w, [g]| {
            let mut st = state.borrow_mut();
            let r = apply(s, &mut st, g, step, lr, threads);
            if r.is_ok() {
                w.copy_from_slice(st.master.as_deref().expect("created above"));
            }
            res.set(Some(r));
        })?;
        return res
            .into_inner()
            .unwrap_or_else(|| bail!("ldt-host-optim: the update kernel did not run"));
    }
    apply(s, st, &values(g)?, step, lr, threads)?;
    let master = st.master.as_deref().expect("created above");
    let back = Tensor::from_slice(master, live.shape(), live.device())?.to_dtype(live.dtype())?;
    p.set(&back)?;
    Ok(())
}

/// The fused update of `st`'s master weights and moments with host gradient `g`.
fn apply(
    s: &OptimSettings,
    st: &mut HostLayer,
    g: &[f32],
    step: u64,
    lr: f64,
    threads: usize,
) -> Result<()> {
    let HostLayer { master, m, v, .. } = st;
    let job = Update {
        p: master.as_deref_mut().expect("created before the update"),
        g,
        m: m.as_deref_mut(),
        v: v.as_deref_mut(),
        step,
        lr,
    };
    fused::update(s, &mut [job], threads)
}
