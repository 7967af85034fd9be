//! Optimizers written in the project, with per-layer state that can be inspected,
//! serialized and moved to the counterpart buffer (candle-nn keeps AdamW's moments
//! private). Updates run in place on the parameter storage through candle in-place ops.

mod adam;
pub mod schedule;
mod sgd;

use crate::config::{OptimConfig, OptimName};
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

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

/// One optimizer over a fixed list of layers; state is created at a layer's first step.
pub struct Optimizer {
    settings: OptimSettings,
    state: Vec<Option<LayerState>>,
}

impl Optimizer {
    /// An optimizer for `layers` layers (indices follow `Network::params()`).
    pub fn new(settings: OptimSettings, layers: usize) -> Self {
        Optimizer {
            settings,
            state: (0..layers).map(|_| None).collect(),
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
    /// inside [`crate::model::layers::with_generic_ops`]).
    pub fn step(&mut self, i: usize, param: &Var, grad: &Tensor, lr: f64) -> Result<()> {
        let generic = crate::model::layers::generic_path(param.as_tensor());
        self.step_on(i, param, grad, lr, generic)
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

    /// State of layer `i`, if it has stepped.
    pub fn state(&self, i: usize) -> Option<&LayerState> {
        self.state[i].as_ref()
    }

    /// Removes and returns the state of layer `i` (to park it in the counterpart buffer).
    pub fn take_state(&mut self, i: usize) -> Option<LayerState> {
        self.state[i].take()
    }

    /// Puts back the state of layer `i`.
    pub fn put_state(&mut self, i: usize, s: Option<LayerState>) {
        self.state[i] = s;
    }

    /// Bytes of all live state tensors.
    pub fn bytes(&self) -> usize {
        self.state.iter().flatten().map(|s| s.bytes()).sum()
    }
}

/// The gradient with L2 weight decay, `g + wd * p` (SGD and Adam; AdamW decays the
/// weights instead). Shared by the host kernels and the device-generic paths.
fn l2_decayed(s: &OptimSettings, p: &Var, g: &Tensor) -> Result<Tensor> {
    if s.weight_decay > 0.0 {
        Ok((g + (p.as_tensor().detach() * s.weight_decay)?)?)
    } else {
        Ok(g.clone())
    }
}

/// Borrows the f32 slice of a contiguous CPU storage (helper for the update kernels).
fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    crate::model::layers::contiguous_slice::<f32>(s, l, "optimizer kernel")
}

/// Mutably borrows the f32 slice of a contiguous CPU storage.
fn f32_slice_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("optimizer kernels need contiguous tensors")
    };
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("optimizer kernels need f32 tensors"),
    }
}
