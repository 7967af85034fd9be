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
//!
//! With bf16 working weights the network keeps its own f32 masters on the host
//! ([`crate::model::NetState::masters`]): [`step_master`] updates one of those with the
//! gradient brought down ([`grad_values`]) and the caller rounds it back to the device.

use super::fused::{self, Update};
use super::{f32_kernel, Grad, LayerState, OptimSettings};
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

    /// The state of a layer of `n` values about to take its next update with gradient
    /// `g`: created at the first, its moments as `s` keeps them, the step counted.
    fn begin<'a>(
        st: &'a mut Option<HostLayer>,
        s: &OptimSettings,
        n: usize,
        g: &Grad,
    ) -> Result<&'a mut HostLayer> {
        if g.elem_count() != n {
            bail!("gradient of {} values for a layer of {n}", g.elem_count());
        }
        let st = st.get_or_insert_with(|| HostLayer {
            step: 0,
            master: None,
            m: None,
            v: None,
        });
        st.prepare(s, n);
        st.step += 1;
        Ok(st)
    }

    /// Creates the moments `s` keeps (zeros) for a layer of `n` values, where missing.
    fn prepare(&mut self, s: &OptimSettings, n: usize) {
        let adam = s.name != crate::config::OptimName::Sgd;
        let with_m = if adam {
            s.betas[0] > 0.0
        } else {
            s.momentum > 0.0
        };
        if with_m && self.m.is_none() {
            self.m = Some(HostVec::zeroed(n));
        }
        if adam && self.v.is_none() {
            self.v = Some(HostVec::zeroed(n));
        }
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
    g: &Grad,
    lr: f64,
) -> Result<()> {
    let st = HostLayer::begin(st, s, p.elem_count(), g)?;
    if st.master.is_none() {
        st.master = Some(HostVec::from_slice(&values(p.as_tensor())?));
    }
    let step = st.step;
    let threads = candle_core::utils::get_num_threads();
    let live = p.as_tensor();
    if live.device().is_cpu() {
        // The gradient read and the weights written in place; `f32_kernel` takes a `Fn`,
        // so the state is borrowed through a cell.
        let (state, res) = (RefCell::new(&mut *st), Cell::new(None));
        let update = |w: &mut [f32], g: &[f32]| {
            let mut st = state.borrow_mut();
            let r = apply(s, &mut st, g, step, lr, threads);
            if r.is_ok() {
                w.copy_from_slice(st.master.as_deref().expect("created above"));
            }
            res.set(Some(r));
        };
        match g {
            Grad::Device(g) if g.device().is_cpu() => {
                let g = g.contiguous()?;
                f32_kernel("ldt-host-optim", live, [&g], |w, [g]| update(w, g))?;
            }
            Grad::Device(g) => {
                let g = values(g)?;
                f32_kernel("ldt-host-optim", live, [], |w, []| update(w, &g))?;
            }
            Grad::Host(g) => f32_kernel("ldt-host-optim", live, [], |w, []| update(w, g))?,
        }
        return res
            .into_inner()
            .unwrap_or_else(|| bail!("ldt-host-optim: the update kernel did not run"));
    }
    match g {
        Grad::Device(g) => apply(s, st, &values(g)?, step, lr, threads)?,
        Grad::Host(g) => apply(s, st, g, step, lr, threads)?,
    }
    let master = st.master.as_deref().expect("created above");
    let back = Tensor::from_slice(master, live.shape(), live.device())?.to_dtype(live.dtype())?;
    p.set(&back)?;
    Ok(())
}

/// One update of host master weights `master` with gradient `g` (f32 or bf16, on any
/// device) at learning rate `lr`; the state is created here at the layer's first update.
/// The network's masters are the master copy: the layer's own stays empty.
pub fn step_master(
    s: &OptimSettings,
    st: &mut Option<HostLayer>,
    master: &mut [f32],
    g: &Grad,
    lr: f64,
) -> Result<()> {
    let st = HostLayer::begin(st, s, master.len(), g)?;
    let widened;
    let g: &[f32] = match g {
        Grad::Host(g) => g,
        Grad::Device(t) => {
            widened = grad_values(t)?;
            &widened
        }
    };
    let HostLayer { m, v, step, .. } = st;
    let job = Update {
        p: master,
        g,
        m: m.as_deref_mut(),
        v: v.as_deref_mut(),
        step: *step,
        lr,
    };
    fused::update(s, &mut [job], candle_core::utils::get_num_threads())
}

/// A gradient's values as f32 in a host arena ([`HostVec`]). A bf16 gradient widens
/// exactly, plus zero: the f32 gradient the bf16 cast's backward delivers is
/// `0 + widen(g)` (candle accumulates into zeros), which turns -0 into +0; the same bits
/// come out here.
pub fn grad_values(g: &Tensor) -> Result<HostVec> {
    let mut out = HostVec::zeroed(g.elem_count());
    write_grad(g, &mut out)?;
    Ok(out)
}

/// [`grad_values`] in an ordinary vector (stage 1's statistics read every layer's).
pub fn grad_vec(g: &Tensor) -> Result<Vec<f32>> {
    let mut out = vec![0f32; g.elem_count()];
    write_grad(g, &mut out)?;
    Ok(out)
}

/// Adds gradient `g`'s values, as [`grad_values`] defines them, to `sum` in f32 (a
/// micro-batch's gradient into the step's sum on the host, without a copy between).
pub fn add_grad(g: &Tensor, sum: &mut [f32]) -> Result<()> {
    combine_grad(g, sum, |o, x| *o += x)
}

/// Writes gradient `g`'s values into `out` as [`grad_values`] defines them.
fn write_grad(g: &Tensor, out: &mut [f32]) -> Result<()> {
    combine_grad(g, out, |o, x| *o = x)
}

/// Combines gradient `g`'s values as [`grad_values`] defines them into `out` with `f`,
/// read from the tensor's host storage in one pass (bf16 widened as `0 + widen(x)`).
fn combine_grad(g: &Tensor, out: &mut [f32], f: impl Fn(&mut f32, f32)) -> Result<()> {
    use candle_core::{CpuStorage, DType, Storage};
    let g = g.to_device(&Device::Cpu)?;
    let g = match g.dtype() {
        DType::F32 | DType::BF16 => g.contiguous()?,
        _ => g.to_dtype(DType::F32)?.contiguous()?,
    };
    let (storage, layout) = g.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        bail!("a contiguous gradient has no contiguous offsets");
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) if v[a..b].len() == out.len() => {
            out.iter_mut().zip(&v[a..b]).for_each(|(o, &x)| f(o, x));
        }
        Storage::Cpu(CpuStorage::BF16(v)) if v[a..b].len() == out.len() => {
            out.iter_mut()
                .zip(&v[a..b])
                .for_each(|(o, x)| f(o, x.to_f32() + 0.0));
        }
        Storage::Cpu(CpuStorage::F32(_) | CpuStorage::BF16(_)) => {
            bail!("a gradient of {} values for {} slots", b - a, out.len())
        }
        _ => bail!("gradient of dtype {:?} on the host", g.dtype()),
    }
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
