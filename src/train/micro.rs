//! One micro-batch's forward and backward through the whole graph, and what every way
//! of computing a step's gradients shares: the loss and stats of the logits, and
//! [`Sums`], where each layer's gradient goes the moment it is final — summed over
//! micro-batches, kept on the device or released to host memory, or handed to the
//! layer's update.

use crate::model::{Mode, NetState, Network};
use crate::optim::{host, Grad};
use crate::task::Loss;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// Loss and accuracy of one step's batch (before the update).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Mean cross-entropy.
    pub loss: f32,
    /// Correct predictions.
    pub correct: usize,
    /// Examples.
    pub n: usize,
}

impl StepStats {
    /// Accuracy on the batch (a train record's `acc`).
    pub fn acc(&self) -> f64 {
        self.correct as f64 / self.n as f64
    }
}

/// The update of layers whose final gradients have just been computed (`Some` in a
/// vector over every layer): the block-wise update of
/// [`crate::train::step::GradPlan::update_by_block`].
pub type Update<'a> = &'a mut dyn FnMut(&mut NetState, &[Option<Grad>]) -> Result<()>;

/// A step's gradients as the micro-batches deliver them, layer by layer: each weighted
/// by its micro-batch's share and added to the layer's sum (in f32, in micro-batch
/// order: the same arithmetic wherever the sum lives), kept on the device or, with
/// `release`, in host memory, so the device holds only the gradients of the block whose
/// backward is running. With an update, the last micro-batch's sums are not kept: each
/// block's go to the update together once its backward has ended ([`Sums::flush`]).
pub struct Sums<'a> {
    grads: Vec<Option<Grad>>,
    release: bool,
    /// The running micro-batch's weight in the step's mean (`None`: the whole batch,
    /// whose gradients are taken as they are), and whether it is the last.
    weight: Option<f64>,
    last: bool,
    update: Option<Update<'a>>,
    /// Final sums waiting for the update (those of the block whose backward ran).
    finals: Vec<Option<Grad>>,
}

impl<'a> Sums<'a> {
    /// Empty sums over `layers` layers for a whole batch.
    pub fn new(layers: usize, release: bool, update: Option<Update<'a>>) -> Self {
        Sums {
            grads: vec![None; layers],
            release,
            weight: None,
            last: true,
            update,
            finals: vec![None; layers],
        }
    }

    /// The next micro-batch adds its gradients times `weight`; `last`: it completes them.
    pub fn micro_batch(&mut self, weight: f64, last: bool) {
        self.weight = Some(weight);
        self.last = last;
    }

    /// Adds layer `i`'s gradient `g` of the running micro-batch.
    pub fn add(&mut self, i: usize, g: Tensor) -> Result<()> {
        let g = match self.weight {
            None => g,
            Some(w) => (widen(&g)? * w)?,
        };
        let sum = match (self.grads[i].take(), self.release) {
            (None, false) => Grad::Device(g),
            (None, true) => Grad::Host(host::grad_values(&g)?),
            (Some(Grad::Device(t)), _) => Grad::Device((t + g)?),
            (Some(Grad::Host(mut v)), _) => {
                // f32 additions as the device's `t + g`.
                host::add_grad(&g, &mut v)?;
                Grad::Host(v)
            }
        };
        match self.update.is_some() && self.last {
            true => self.finals[i] = Some(sum),
            false => self.grads[i] = Some(sum),
        }
        Ok(())
    }

    /// Hands the final sums added since the last flush to the update (a no-op without
    /// one): called when a block's backward has ended, and at the end of a backward.
    pub fn flush(&mut self, state: &mut NetState) -> Result<()> {
        let Some(update) = &mut self.update else {
            return Ok(());
        };
        if self.finals.iter().any(Option::is_some) {
            update(state, &self.finals)?;
            self.finals.iter_mut().for_each(|g| *g = None);
        }
        Ok(())
    }

    /// The gradients not handed to an update (`None` for frozen layers).
    pub fn into_grads(self) -> Vec<Option<Grad>> {
        self.grads
    }
}

/// A gradient in f32 where f32 arithmetic follows on the device (micro-batch sums,
/// the all-reduce, clipping). A bf16 gradient (of bf16 working weights) becomes exactly
/// the f32 gradient the recorded cast of f32 weights delivers: candle's backward adds the
/// widened gradient to zeros.
pub fn widen(g: &Tensor) -> Result<Tensor> {
    if g.dtype() == DType::F32 {
        return Ok(g.clone());
    }
    let w = g.to_dtype(DType::F32)?;
    Ok(w.zeros_like()?.add(&w)?)
}

/// One forward and backward on a micro-batch with the working copies `view`, the
/// gradients of `trainable` layers added to `sums` (none when the loss is not finite);
/// the logits are cast to f32 for the loss (a no-op in f32).
pub fn micro_gradients(
    net: &dyn Network,
    state: &mut NetState,
    view: &[Tensor],
    trainable: &[bool],
    (x, y, loss): (&Tensor, &Tensor, Loss),
    mode: Mode,
    sums: &mut Sums,
) -> Result<StepStats> {
    if state.stream.is_some() {
        anyhow::bail!(
            "streamed weights (offload.params = \"stream\") are fetched block by block: \
             set train.recompute = \"blocks\""
        );
    }
    let logits = net
        .forward(view, &mut state.buffers, x, mode)?
        .to_dtype(DType::F32)?;
    let (loss, stats) = loss_and_stats(loss, &logits, y)?;
    let loss_v = stats.loss;
    // A non-finite loss gives no gradients; the caller's guard decides what happens.
    let grads = if trainable.iter().any(|&t| t) && loss_v.is_finite() {
        Some(loss.backward()?)
    } else {
        None
    };
    let Some(mut grads) = grads else {
        return Ok(stats);
    };
    for (i, _) in trainable.iter().enumerate().filter(|(_, &t)| t) {
        if let Some(g) = take_grad(&mut grads, Some(state.params[i].as_tensor()), &view[i])? {
            sums.add(i, g)?;
        }
    }
    drop(grads);
    sums.flush(state)?;
    Ok(stats)
}

/// Layer `i`'s gradient out of a backward's store, given its weight `param` (`None` for
/// a fetched layer) and its working copy `w` in the forward. A working copy that is a
/// variable of its own (a fetched copy; in bf16, the rounding of an f32 weight) has the
/// gradient, widened to the weight's dtype; otherwise the weight has it (a recorded
/// cast delivers it there).
pub fn take_grad(
    grads: &mut candle_core::backprop::GradStore,
    param: Option<&Tensor>,
    w: &Tensor,
) -> Result<Option<Tensor>> {
    if w.is_variable() {
        return Ok(match (grads.remove(w), param) {
            (Some(g), Some(p)) if g.dtype() != p.dtype() => Some(g.to_dtype(p.dtype())?),
            (g, _) => g,
        });
    }
    Ok(param.and_then(|p| grads.remove(p)))
}

/// The mean `loss` of f32 outputs `out` against the truth `y` (tracked where the outputs
/// are) and the batch's stats (the correct count for classification). The loss decides
/// on the host whether to go on: one transfer brings both numbers.
pub fn loss_and_stats(loss: Loss, out: &Tensor, y: &Tensor) -> Result<(Tensor, StepStats)> {
    let value = loss.mean(out, y)?;
    let correct = match loss.is_classification() {
        true => out
            .detach()
            .argmax(candle_core::D::Minus1)?
            .to_dtype(DType::I64)?
            .eq(y)?
            .to_dtype(DType::F32)?
            .sum_all()?,
        false => value.detach().zeros_like()?,
    };
    let host = Tensor::stack(&[&value.detach(), &correct], 0)?.to_vec1::<f32>()?;
    let stats = StepStats {
        loss: host[0],
        correct: host[1] as usize,
        n: y.dim(0)?,
    };
    Ok((value, stats))
}
