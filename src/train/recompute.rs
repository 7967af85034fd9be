//! Block-wise recompute (`train.recompute = "blocks"`): the forward runs without a
//! graph and keeps only each block's input ([`crate::model::BlockSpec`]); the backward
//! walks the blocks from the top, recomputing one block's forward with its trained
//! layers tracked and back-propagating through it, so the device holds one block's
//! activations at a time instead of the network's.
//!
//! The bits are those of one backward through the whole graph: a block's output
//! gradient enters as `sum(out * g)` (whose backward hands `1 * g = g` to `out`), every
//! other node accumulates from zeros as in the whole graph, and BatchNorm recomputes the
//! batch statistics of the same input; the recompute's running statistics are thrown
//! away, so they move exactly once per forward.

use super::fetch::Window;
use super::micro::{loss_and_stats, StepStats, Sums};
use crate::model::{Mode, NetState, Network};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};

/// Where a walk's block weights come from: the resident working copies, or fetches
/// from the host masters ([`Window`]).
enum Source<'a> {
    /// The forward's weights (`state.view`: trained layers tracked, frozen detached).
    Resident(&'a [Tensor]),
    /// A streamed state's fetches.
    Streamed(Window<'a>),
}

impl Source<'_> {
    /// Starts making block `k`'s weights ready (a fetch on the copy stream).
    fn prefetch(&mut self, k: usize, tracked: bool) {
        if let Source::Streamed(w) = self {
            w.start(k, tracked);
        }
    }

    /// Block `k`'s weights of `range`: with `tracked` the trained layers record
    /// gradients, without every layer is detached.
    fn block(
        &mut self,
        k: usize,
        range: std::ops::Range<usize>,
        tracked: bool,
    ) -> Result<Vec<Tensor>> {
        match self {
            Source::Resident(view) if tracked => Ok(view[range].to_vec()),
            Source::Resident(view) => Ok(view[range].iter().map(|t| t.detach()).collect()),
            Source::Streamed(w) => w.take(k, tracked),
        }
    }
}

/// [`super::micro::micro_gradients`], block by block: the loss and stats of `x`, `y`,
/// and the gradient of every layer of `trainable` added to `sums` (none when the loss
/// is not finite) as soon as its block's backward ends — so that, released to host
/// memory or handed to its update there, the device holds one block's gradients at a
/// time. `view` holds the forward's weights (trained layers tracked, frozen ones
/// detached), or is empty for a streamed state, whose blocks are fetched from its
/// masters one ahead of the block running (the forward walks up while the block below
/// runs; the backward walks down and fetches the next block once a block's backward is
/// done, so the fetch and the backward's temporaries do not meet).
pub fn block_gradients(
    net: &dyn Network,
    state: &mut NetState,
    view: &[Tensor],
    trainable: &[bool],
    (x, y): (&Tensor, &Tensor),
    mode: Mode,
    sums: &mut Sums,
) -> Result<StepStats> {
    let blocks = net.blocks();
    let mut source = match state.stream {
        Some(_) => Source::Streamed(Window::new(state.fetcher()?, blocks, trainable)),
        None => Source::Resident(view),
    };
    // The lowest block with a trained layer: below it no gradient is needed.
    let lowest = blocks
        .iter()
        .position(|b| trainable[b.params.clone()].iter().any(|&t| t));
    // The forward without a graph: each block's input, and its buffers as it found them.
    let mut inputs = Vec::with_capacity(blocks.len());
    let mut found = Vec::with_capacity(blocks.len());
    let mut h = x.detach();
    for (k, b) in blocks.iter().enumerate() {
        match k + 1 < blocks.len() {
            true => source.prefetch(k + 1, false),
            // The top block runs again first in the backward, tracked.
            false if lowest.is_some() => source.prefetch(k, true),
            false => {}
        }
        let w = source.block(k, b.params.clone(), false)?;
        let bufs = &mut state.buffers[b.buffers.clone()];
        found.push(bufs.to_vec());
        let out = net.forward_block(k, &w, bufs, &h, mode)?;
        inputs.push(std::mem::replace(&mut h, out));
    }
    let (loss, stats) = loss_and_stats(&h.to_dtype(DType::F32)?, y)?;
    drop((h, loss));
    let Some(lowest) = lowest.filter(|_| stats.loss.is_finite()) else {
        return Ok(stats);
    };
    let mut upstream: Option<Tensor> = None;
    for k in (lowest..blocks.len()).rev() {
        let b = &blocks[k];
        let w = source.block(k, b.params.clone(), true)?;
        let input = inputs.pop().expect("one input per block");
        // The block's input is tracked where the blocks below need its gradient.
        let tracked = if k > lowest {
            Some(Var::from_tensor(&input)?)
        } else {
            None
        };
        let xin = tracked.as_ref().map_or(&input, |v| v.as_tensor());
        let mut bufs = std::mem::take(&mut found[k]);
        let y_k = net.forward_block(k, &w, &mut bufs, xin, mode)?;
        let target = match upstream.take() {
            // The top block: the loss itself.
            None => loss_and_stats(&y_k.to_dtype(DType::F32)?, y)?.0,
            Some(g) => (y_k * g)?.sum_all()?,
        };
        let mut grads = target.backward()?;
        // The block below is fetched once this backward's temporaries are gone (they
        // are several times its gradients), overlapping the hand-over of its gradients.
        if k > lowest {
            source.prefetch(k - 1, true);
        }
        for (i, wi) in b.params.clone().zip(&w) {
            if trainable[i] {
                // Resident: the parameter itself (in bf16 without masters `w` holds its
                // recorded cast, whose backward delivers the f32 gradient).
                let key = match &source {
                    Source::Resident(_) => state.params[i].as_tensor(),
                    Source::Streamed(_) => wi,
                };
                if let Some(g) = grads.remove(key) {
                    sums.add(i, g)?;
                }
            }
        }
        if let Some(v) = &tracked {
            let g = grads
                .remove(v.as_tensor())
                .with_context(|| format!("recompute: block {k}'s input has no gradient"))?;
            upstream = Some(g.detach());
        }
        // The block's gradients go to their update, if there is one, once its graph and
        // weights are gone.
        drop((grads, target, w));
        sums.flush(state)?;
    }
    Ok(stats)
}
