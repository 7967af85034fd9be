//! Optimizers written in the project, with per-layer state that can be inspected,
//! serialized and moved to the counterpart buffer (candle-nn keeps AdamW's moments
//! private). Updates run in place on the parameter storage through candle in-place ops.

mod adam;
pub mod fused;
pub mod host;
pub mod schedule;
mod sgd;

use crate::config::{OptimConfig, OptimName, OptimizerPlacement};
use crate::model::dispatch::{contiguous_slice, generic_path};
use anyhow::{Context, Result};
use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use host::HostLayer;

/// Hyper-parameters of one optimizer (a branch or a plain run has one).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimSettings {
    /// `adam`, `adamw` or `sgd`.
    pub name: OptimName,
    /// Adam betas (beta1 = 0 keeps no first moment).
    pub betas: [f64; 2],
    /// Adam epsilon.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
}

impl From<&OptimConfig> for OptimSettings {
    fn from(c: &OptimConfig) -> Self {
        OptimSettings {
            name: c.name,
            betas: c.betas,
            eps: c.eps,
            weight_decay: c.weight_decay,
            momentum: c.momentum,
        }
    }
}

/// A layer's gradient where it lives: a device tensor, or f32 values released to host
/// memory as soon as they were final (block-wise recompute with the optimizer on the
/// host), so that the device holds one block's gradients at a time.
#[derive(Clone)]
pub enum Grad {
    /// On the device: f32, or bf16 for bf16 working weights.
    Device(Tensor),
    /// f32 values in host memory (a bf16 gradient widened as the host optimizer widens
    /// it: [`host::grad_values`]).
    Host(crate::heap::HostVec),
}

impl Grad {
    /// The device tensor, when the gradient is on the device.
    pub fn device(&self) -> Option<&Tensor> {
        match self {
            Grad::Device(t) => Some(t),
            Grad::Host(_) => None,
        }
    }

    /// Bytes held on the device (none once released).
    pub fn device_bytes(&self) -> u64 {
        match self {
            Grad::Device(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            Grad::Host(_) => 0,
        }
    }

    /// Number of values.
    pub fn elem_count(&self) -> usize {
        match self {
            Grad::Device(t) => t.elem_count(),
            Grad::Host(v) => v.len(),
        }
    }
}

/// Optimizer state of one layer (one parameter tensor).
#[derive(Debug)]
pub struct LayerState {
    /// Optimizer steps this layer has taken.
    pub step: u64,
    /// Adam first moment (absent when beta1 = 0) or SGD momentum buffer.
    pub m: Option<Tensor>,
    /// Adam second moment.
    pub v: Option<Tensor>,
}

impl LayerState {
    /// Bytes held by the state tensors.
    pub fn bytes(&self) -> usize {
        [&self.m, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The state tensors with their role names (`m`, `v`), for checkpoints and buffers.
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = Vec::new();
        if let Some(m) = &self.m {
            out.push(("m", m));
        }
        if let Some(v) = &self.v {
            out.push(("v", v));
        }
        out
    }
}

/// One optimizer over a fixed list of layers; state is created at a layer's first step,
/// beside the weights or, placed on the host ([`Optimizer::placed`]), in host memory.
pub struct Optimizer {
    settings: OptimSettings,
    state: Vec<Option<LayerState>>,
    /// Every layer's state in host memory (`offload.optimizer = "host"`); `state` is
    /// then unused.
    host: Option<Vec<Option<HostLayer>>>,
}

impl Optimizer {
    /// An optimizer for `layers` layers (indices follow `Network::params()`).
    pub fn new(settings: OptimSettings, layers: usize) -> Self {
        Optimizer {
            settings,
            state: (0..layers).map(|_| None).collect(),
            host: None,
        }
    }

    /// This optimizer with its state where `placement` says: on the host, any state it
    /// holds moves there (a resumed checkpoint) and every later update runs there.
    pub fn placed(mut self, placement: OptimizerPlacement) -> Result<Self> {
        if placement == OptimizerPlacement::Host && self.host.is_none() {
            let host = self
                .state
                .iter_mut()
                .map(|s| s.take().map(|st| HostLayer::from_state(&st)).transpose())
                .collect::<Result<Vec<_>>>()?;
            self.host = Some(host);
        }
        Ok(self)
    }

    /// Where the state lives.
    pub fn placement(&self) -> OptimizerPlacement {
        match self.host {
            Some(_) => OptimizerPlacement::Host,
            None => OptimizerPlacement::Device,
        }
    }

    /// Number of layers this optimizer indexes.
    pub fn layers(&self) -> usize {
        self.state.len()
    }

    /// The hyper-parameters.
    pub fn settings(&self) -> &OptimSettings {
        &self.settings
    }

    /// Applies one update to layer `i` with learning rate `lr`: in place through the CPU
    /// kernels on the CPU, through [`Optimizer::step_generic`] on other devices (and
    /// inside [`crate::model::dispatch::with_generic_ops`]).
    pub fn step(&mut self, i: usize, param: &Var, grad: &Grad, lr: f64) -> Result<()> {
        if let Some(host) = &mut self.host {
            return host::step(&self.settings, &mut host[i], param, grad, lr)
                .with_context(|| format!("host optimizer step of layer {i}"));
        }
        let Some(grad) = grad.device() else {
            anyhow::bail!(
                "layer {i}: a gradient released to the host needs offload.optimizer = \"host\""
            );
        };
        self.step_on(i, param, grad, lr, generic_path(param.as_tensor()))
    }

    /// Applies one update to the host master weights `master` of layer `i` (bf16
    /// working weights: the caller rounds the result back into the network). Needs the
    /// state on the host.
    pub fn step_master(
        &mut self,
        i: usize,
        master: &mut [f32],
        grad: &Grad,
        lr: f64,
    ) -> Result<()> {
        let Some(host) = &mut self.host else {
            anyhow::bail!(
                "layer {i}: its weight is a host master (bf16 working weights, or streamed), \
                 which only offload.optimizer = \"host\" updates"
            );
        };
        host::step_master(&self.settings, &mut host[i], master, grad, lr)
            .with_context(|| format!("host optimizer step of layer {i}"))
    }

    /// [`Optimizer::step`] computed with candle tensor ops (any device; the state
    /// tensors are replaced, the parameter written in place with `Var::set`). Used off
    /// the CPU; public so tests can compare it with the CPU kernels.
    #[doc(hidden)]
    pub fn step_generic(&mut self, i: usize, param: &Var, grad: &Tensor, lr: f64) -> Result<()> {
        self.step_on(i, param, grad, lr, true)
    }

    fn step_on(
        &mut self,
        i: usize,
        param: &Var,
        grad: &Tensor,
        lr: f64,
        generic: bool,
    ) -> Result<()> {
        let grad = grad.contiguous()?;
        let s = &self.settings;
        let st = self.state[i].get_or_insert_with(|| LayerState {
            step: 0,
            m: None,
            v: None,
        });
        st.step += 1;
        match (s.name, generic) {
            (OptimName::Adam | OptimName::Adamw, false) => adam::step(s, st, param, &grad, lr),
            (OptimName::Adam | OptimName::Adamw, true) => {
                adam::step_generic(s, st, param, &grad, lr)
            }
            (OptimName::Sgd, false) => sgd::step(s, st, param, &grad, lr),
            (OptimName::Sgd, true) => sgd::step_generic(s, st, param, &grad, lr),
        }
        .with_context(|| format!("optimizer step of layer {i}"))
    }

    /// Device state of layer `i`, if it has stepped (`None` on the host).
    pub fn state(&self, i: usize) -> Option<&LayerState> {
        self.state[i].as_ref()
    }

    /// The state of layer `i` wherever it lives, as tensors of the layer's `shape`
    /// (checkpoints): shared device tensors, or host copies.
    pub fn snapshot(&self, i: usize, shape: &[usize]) -> Result<Option<LayerState>> {
        match &self.host {
            Some(h) => h[i].as_ref().map(|st| st.to_state(shape)).transpose(),
            None => Ok(self.state[i].as_ref().map(|st| LayerState {
                step: st.step,
                m: st.m.clone(),
                v: st.v.clone(),
            })),
        }
    }

    /// Removes and returns the device state of layer `i` (to park it in the counterpart
    /// buffer); `None` on the host, where the state stays whatever branch is live.
    pub fn take_state(&mut self, i: usize) -> Option<LayerState> {
        self.state[i].take()
    }

    /// Puts back the device state of layer `i` (a parked state, a checkpoint's).
    pub fn put_state(&mut self, i: usize, s: Option<LayerState>) {
        self.state[i] = s;
    }

    /// Exchanges layer `i`'s state, on the device or the host, with `other`'s: a
    /// re-partition hands a layer's moments to the branch that trains it now.
    pub fn swap_layer(&mut self, other: &mut Optimizer, i: usize) {
        std::mem::swap(&mut self.state[i], &mut other.state[i]);
        if let (Some(a), Some(b)) = (&mut self.host, &mut other.host) {
            std::mem::swap(&mut a[i], &mut b[i]);
        }
    }

    /// Bytes of all live device state tensors.
    pub fn bytes(&self) -> usize {
        self.state.iter().flatten().map(|s| s.bytes()).sum()
    }

    /// Bytes of host state: master weights and moments.
    pub fn host_bytes(&self) -> usize {
        self.host
            .iter()
            .flatten()
            .flatten()
            .map(|s| s.bytes())
            .sum()
    }
}

/// The gradient with L2 weight decay, `g + wd * p` (SGD and Adam; AdamW decays the
/// weights instead). Used by the device-generic paths (the fused kernel computes it per element).
fn l2_decayed(s: &OptimSettings, p: &Var, g: &Tensor) -> Result<Tensor> {
    if s.weight_decay > 0.0 {
        Ok((g + (p.as_tensor().detach() * s.weight_decay)?)?)
    } else {
        Ok(g.clone())
    }
}

/// Runs the host update kernel `f` in place: `f(dst, srcs)` gets the contiguous f32
/// elements of `dst` to write and those of the `N` (0, 1 or 2) `srcs` to read, through
/// candle's in-place ops (which lock the storages and refuse aliased operands). The
/// kernels take f32 CPU tensors only; any other tensor is an error.
fn f32_kernel<const N: usize>(
    name: &'static str,
    dst: &Tensor,
    srcs: [&Tensor; N],
    f: impl Fn(&mut [f32], [&[f32]; N]),
) -> Result<()> {
    let k = F32Kernel { name, f };
    match srcs.as_slice() {
        [] => dst.inplace_op1(&k)?,
        [a] => dst.inplace_op2(a, &k)?,
        [a, b] => dst.inplace_op3(a, b, &k)?,
        _ => anyhow::bail!("{name}: an update kernel reads at most two tensors"),
    }
    Ok(())
}

/// One [`f32_kernel`] as a candle in-place op of `1 + N` tensors.
struct F32Kernel<F, const N: usize> {
    name: &'static str,
    f: F,
}

impl<F: Fn(&mut [f32], [&[f32]; N]), const N: usize> F32Kernel<F, N> {
    /// Borrows the storages' f32 elements and runs the kernel.
    fn run(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        srcs: &[(&CpuStorage, &Layout)],
    ) -> candle_core::Result<()> {
        if srcs.len() != N {
            candle_core::bail!("{}: expects {N} source tensors", self.name)
        }
        let mut xs = [<&[f32]>::default(); N];
        for (x, (s, l)) in xs.iter_mut().zip(srcs) {
            *x = contiguous_slice(s, l, self.name)?;
        }
        let Some((a, b)) = dl.contiguous_offsets() else {
            candle_core::bail!("{} expects a contiguous input", self.name)
        };
        let CpuStorage::F32(d) = dst else {
            candle_core::bail!("{}: the optimizer kernels need f32 tensors", self.name)
        };
        (self.f)(&mut d[a..b], xs);
        Ok(())
    }
}

impl<F: Fn(&mut [f32], [&[f32]; N]), const N: usize> InplaceOp1 for F32Kernel<F, N> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        self.run(s, l, &[])
    }
}

impl<F: Fn(&mut [f32], [&[f32]; N]), const N: usize> InplaceOp2 for F32Kernel<F, N> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<()> {
        self.run(dst, dl, &[(s, l)])
    }
}

impl<F: Fn(&mut [f32], [&[f32]; N]), const N: usize> InplaceOp3 for F32Kernel<F, N> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        self.run(dst, dl, &[(s1, l1), (s2, l2)])
    }
}
