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
use crate::model::{Mode, NetState, Network, Segment};
use anyhow::{anyhow, bail, Context, Result};
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
///
/// Within a block the walk goes by its segments ([`crate::model::Network::segments`]):
/// the forward keeps each segment's carried tensors, and the backward recomputes and
/// back-propagates one segment at a time, from the lowest segment with a trained layer
/// up; below it nothing is kept.
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
    let segments: Vec<Vec<Segment>> = (0..blocks.len()).map(|k| net.segments(k)).collect();
    let mut source = match state.stream {
        Some(_) => Source::Streamed(Window::new(state.fetcher()?, blocks, trainable)?),
        None => Source::Resident(view),
    };
    // The lowest segment `(block, segment)` with a trained layer: below it no gradient
    // is needed.
    let lowest = segments.iter().enumerate().find_map(|(k, segs)| {
        let at = blocks[k].params.start;
        segs.iter()
            .position(|s| trainable[at + s.params.start..at + s.params.end].contains(&true))
            .map(|j| (k, j))
    });
    // The forward without a graph: each segment's carried tensors from the lowest
    // trained one up, and each block's buffers as it found them.
    let mut inputs: Vec<Vec<Vec<Tensor>>> = Vec::with_capacity(blocks.len());
    let mut found = Vec::with_capacity(blocks.len());
    let mut carried = vec![x.detach()];
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
        let mut kept = Vec::with_capacity(segments[k].len());
        for (j, s) in segments[k].iter().enumerate() {
            let (p, bu) = (&w[s.params.clone()], &mut bufs[s.buffers.clone()]);
            let out = net.forward_segment(k, j, p, bu, &carried, mode)?;
            let input = std::mem::replace(&mut carried, out);
            kept.push(if lowest.is_some_and(|l| (k, j) >= l) {
                input
            } else {
                Vec::new()
            });
        }
        inputs.push(kept);
    }
    let [h] = <[Tensor; 1]>::try_from(carried).map_err(|c| {
        anyhow!(
            "the network's last block carries {} tensors out, not one",
            c.len()
        )
    })?;
    let (loss, stats) = loss_and_stats(&h.to_dtype(DType::F32)?, y)?;
    drop((h, loss));
    let Some(lowest) = lowest.filter(|_| stats.loss.is_finite()) else {
        return Ok(stats);
    };
    let mut upstream: Option<Vec<Tensor>> = None;
    for k in (lowest.0..blocks.len()).rev() {
        let b = &blocks[k];
        let w = source.block(k, b.params.clone(), true)?;
        let mut kept = inputs.pop().expect("one entry per block");
        let mut bufs = std::mem::take(&mut found[k]);
        let first = if k == lowest.0 { lowest.1 } else { 0 };
        for j in (first..segments[k].len()).rev() {
            let s = &segments[k][j];
            let input = kept.pop().expect("one entry per segment");
            // The carried tensors are tracked where the segments below need their
            // gradients.
            let tracked: Option<Vec<Var>> = if (k, j) > lowest {
                Some(
                    input
                        .iter()
                        .map(Var::from_tensor)
                        .collect::<Result<_, _>>()?,
                )
            } else {
                None
            };
            let xin: Vec<Tensor> = match &tracked {
                Some(vars) => vars.iter().map(|v| v.as_tensor().clone()).collect(),
                None => input,
            };
            let (p, bu) = (&w[s.params.clone()], &mut bufs[s.buffers.clone()]);
            let out = net.forward_segment(k, j, p, bu, &xin, mode)?;
            drop(xin);
            let target = match upstream.take() {
                // The top segment: the loss itself.
                None => {
                    let [logits] = &out[..] else {
                        bail!("the network's last block carries {} tensors out", out.len());
                    };
                    loss_and_stats(&logits.to_dtype(DType::F32)?, y)?.0
                }
                // Each carried tensor's gradient enters as `sum(out * g)`.
                Some(g) => {
                    let mut terms = out.iter().zip(&g).map(|(o, g)| (o * g)?.sum_all());
                    let first = terms.next().context("a segment carries nothing out")??;
                    terms.try_fold(first, |t, u| t + u?)?
                }
            };
            drop(out);
            let mut grads = target.backward()?;
            // The block below is fetched once this backward's temporaries are gone
            // (they are several times its gradients), overlapping the hand-over of its
            // gradients.
            if j == first && k > lowest.0 {
                source.prefetch(k - 1, true);
            }
            let at = b.params.start;
            for (i, wi) in (at + s.params.start..at + s.params.end).zip(p) {
                if trainable[i] {
                    // Resident: the parameter itself (in bf16 without masters `w` holds
                    // its recorded cast, whose backward delivers the f32 gradient).
                    let key = match &source {
                        Source::Resident(_) => state.params[i].as_tensor(),
                        Source::Streamed(_) => wi,
                    };
                    if let Some(g) = grads.remove(key) {
                        sums.add(i, g)?;
                    }
                }
            }
            if let Some(vars) = &tracked {
                let mut g = Vec::with_capacity(vars.len());
                for (c, v) in vars.iter().enumerate() {
                    let gc = grads.remove(v.as_tensor()).with_context(|| {
                        format!("recompute: block {k} segment {j}'s input {c} has no gradient")
                    })?;
                    g.push(gc.detach());
                }
                upstream = Some(g);
            }
            drop((grads, target));
        }
        // The block's gradients go to their update, if there is one, once its graph and
        // weights are gone.
        drop(w);
        sums.flush(state)?;
    }
    Ok(stats)
}
