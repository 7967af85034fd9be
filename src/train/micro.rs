//! One micro-batch's forward and backward through the whole graph, and what every way
//! of computing a step's gradients shares: the loss and stats of the logits, and a
//! final gradient kept on the device or released to host memory.

use crate::model::{layers, Mode, NetState, Network};
use crate::optim::{host, Grad};
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

/// A layer's final gradient, on the device or (`release`) moved to host memory at once.
pub fn released(g: Tensor, release: bool) -> Result<Grad> {
    Ok(if release {
        Grad::Host(host::grad_values(&g)?)
    } else {
        Grad::Device(g)
    })
}

/// One forward and backward on a micro-batch with the working copies `view`; the logits
/// are cast to f32 for the loss (a no-op in f32).
pub fn micro_gradients(
    net: &dyn Network,
    state: &mut NetState,
    view: &[Tensor],
    trainable: &[bool],
    (x, y): (&Tensor, &Tensor),
    mode: Mode,
    release: bool,
) -> Result<(StepStats, Vec<Option<Grad>>)> {
    if state.stream.is_some() {
        anyhow::bail!(
            "streamed weights (offload.params = \"stream\") are fetched block by block: \
             set train.recompute = \"blocks\""
        );
    }
    let logits = net
        .forward(view, &mut state.buffers, x, mode)?
        .to_dtype(DType::F32)?;
    let (loss, stats) = loss_and_stats(&logits, y)?;
    let loss_v = stats.loss;
    // A non-finite loss gives no gradients; the caller's guard decides what happens.
    let mut grads = if trainable.iter().any(|&t| t) && loss_v.is_finite() {
        Some(loss.backward()?)
    } else {
        None
    };
    let out = state
        .params
        .iter()
        .zip(trainable)
        .map(|(v, &t)| match grads.as_mut().filter(|_| t) {
            Some(g) => g
                .remove(v.as_tensor())
                .map(|g| released(g, release))
                .transpose(),
            None => Ok(None),
        })
        .collect::<Result<_>>()?;
    Ok((stats, out))
}

/// The mean cross-entropy of f32 `logits` against labels `y` (tracked where the logits
/// are) and the batch's stats. The loss decides on the host whether to go on: one
/// transfer brings both numbers.
pub fn loss_and_stats(logits: &Tensor, y: &Tensor) -> Result<(Tensor, StepStats)> {
    let loss = layers::cross_entropy(logits, y)?;
    let correct = logits
        .detach()
        .argmax(candle_core::D::Minus1)?
        .to_dtype(DType::I64)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    let host = Tensor::stack(&[&loss.detach(), &correct], 0)?.to_vec1::<f32>()?;
    let stats = StepStats {
        loss: host[0],
        correct: host[1] as usize,
        n: y.dim(0)?,
    };
    Ok((loss, stats))
}
