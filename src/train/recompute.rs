//! Block-wise recompute (`train.recompute = "blocks"`): the forward runs without a
//! graph and keeps only each segment's input ([`crate::model::Network::segments`]: a
//! block, or a piece of one — resnet's convolution units, a transformer's attention and
//! MLP halves); the backward walks the segments from the top, recomputing one
//! segment's forward with its trained layers tracked and back-propagating through it,
//! so the device holds one segment's activations at a time instead of the network's.
//! Streamed weights are fetched by segment too.
//!
//! The bits are those of one backward through the whole graph: a segment's output
//! gradients enter as `sum(out * g)` (whose backward hands `1 * g = g` to `out`), every
//! other node accumulates from zeros as in the whole graph, and BatchNorm recomputes the
//! batch statistics of the same input; the recompute's running statistics are thrown
//! away, so they move exactly once per forward.

use super::fetch::Window;
use super::micro::{loss_and_stats, take_grad, StepStats, Sums};
use crate::model::{Mode, NetState, Network};
use crate::task::Loss;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::ops::Range;

/// One segment of the walk: block `k`'s segment `j`.
struct Unit {
    k: usize,
    j: usize,
    /// Its parameters (network indices).
    params: Range<usize>,
    /// Its buffers, relative to its block's.
    buffers: Range<usize>,
}

/// Where a walk's segment weights come from: the resident working copies, or fetches
/// from the host masters ([`Window`]).
enum Source<'a> {
    /// The forward's weights (`state.view`: trained layers tracked, frozen detached).
    Resident(&'a [Tensor]),
    /// A streamed state's fetches.
    Streamed(Window),
}

impl Source<'_> {
    /// Starts making unit `u`'s weights ready (a fetch on the copy stream).
    fn prefetch(&mut self, u: usize, tracked: bool) {
        if let Source::Streamed(w) = self {
            w.start(u, tracked);
        }
    }

    /// Unit `u`'s weights of `range`: with `tracked` the trained layers record
    /// gradients, without every layer is detached.
    fn unit(&mut self, u: usize, range: Range<usize>, tracked: bool) -> Result<Vec<Tensor>> {
        match self {
            Source::Resident(view) if tracked => Ok(view[range].to_vec()),
            Source::Resident(view) => Ok(view[range].iter().map(|t| t.detach()).collect()),
            Source::Streamed(w) => w.take(u, tracked),
        }
    }
}

/// [`super::micro::micro_gradients`], segment by segment: the loss and stats of `x`,
/// `y`, and the gradient of every layer of `trainable` added to `sums` (none when the
/// loss is not finite) as soon as its segment's backward ends — so that, released to
/// host memory (or, at the end of its block, handed to its update), the device holds
/// one segment's gradients at a time. `view` holds the forward's weights (trained
/// layers tracked, frozen ones detached), or is empty for a streamed state, whose
/// segments are fetched from its masters one ahead of the segment running (the forward
/// walks up while the segment below runs; the backward walks down and fetches the next
/// segment once a segment's backward is done, so the fetch and the backward's
/// temporaries do not meet). The walk starts at the lowest segment with a trained
/// layer; below it nothing is kept.
pub fn block_gradients(
    net: &dyn Network,
    state: &mut NetState,
    view: &[Tensor],
    trainable: &[bool],
    (x, y, objective): (&Tensor, &Tensor, Loss),
    mode: Mode,
    sums: &mut Sums,
) -> Result<StepStats> {
    let blocks = net.blocks();
    let units: Vec<Unit> = blocks
        .iter()
        .enumerate()
        .flat_map(|(k, b)| {
            let at = b.params.start;
            net.segments(k)
                .into_iter()
                .enumerate()
                .map(move |(j, s)| Unit {
                    k,
                    j,
                    params: at + s.params.start..at + s.params.end,
                    buffers: s.buffers,
                })
        })
        .collect();
    let mut source = match state.stream {
        Some(_) => {
            let ranges = units.iter().map(|u| u.params.clone()).collect();
            let resident = state.resident_view(trainable)?;
            Source::Streamed(Window::new(state.fetcher()?, ranges, trainable, resident)?)
        }
        None => Source::Resident(view),
    };
    // The lowest unit with a trained layer: below it no gradient is needed.
    let lowest = units
        .iter()
        .position(|u| trainable[u.params.clone()].contains(&true));
    // The forward without a graph: each unit's carried tensors from the lowest trained
    // one up, and each block's buffers as it found them.
    let mut inputs: Vec<Vec<Tensor>> = Vec::with_capacity(units.len());
    let mut found: Vec<Vec<Tensor>> = Vec::with_capacity(blocks.len());
    let mut carried = vec![x.detach()];
    for (u, unit) in units.iter().enumerate() {
        match u + 1 < units.len() {
            true => source.prefetch(u + 1, false),
            // The top unit runs again first in the backward, tracked.
            false if lowest.is_some() => source.prefetch(u, true),
            false => {}
        }
        let w = source.unit(u, unit.params.clone(), false)?;
        let bufs = &mut state.buffers[blocks[unit.k].buffers.clone()];
        if unit.j == 0 {
            found.push(bufs.to_vec());
        }
        let bufs = &mut bufs[unit.buffers.clone()];
        let out = net.forward_segment(unit.k, unit.j, &w, bufs, &carried, mode)?;
        let input = std::mem::replace(&mut carried, out);
        inputs.push(match lowest.is_some_and(|l| u >= l) {
            true => input,
            false => Vec::new(),
        });
    }
    let [h] = <[Tensor; 1]>::try_from(carried).map_err(|c| {
        anyhow!(
            "the network's last block carries {} tensors out, not one",
            c.len()
        )
    })?;
    let (loss, stats) = loss_and_stats(objective, &h.to_dtype(DType::F32)?, y)?;
    drop((h, loss));
    let Some(lowest) = lowest.filter(|_| stats.loss.is_finite()) else {
        return Ok(stats);
    };
    let mut upstream: Option<Vec<Tensor>> = None;
    for u in (lowest..units.len()).rev() {
        let unit = &units[u];
        let w = source.unit(u, unit.params.clone(), true)?;
        let input = inputs.pop().expect("one entry per unit");
        // The carried tensors are tracked where the units below need their gradients.
        let tracked: Option<Vec<Var>> = if u > lowest {
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
        let bufs = &mut found[unit.k][unit.buffers.clone()];
        let out = net.forward_segment(unit.k, unit.j, &w, bufs, &xin, mode)?;
        drop(xin);
        let target = match upstream.take() {
            // The top unit: the loss itself.
            None => {
                let [logits] = &out[..] else {
                    bail!("the network's last block carries {} tensors out", out.len());
                };
                loss_and_stats(objective, &logits.to_dtype(DType::F32)?, y)?.0
            }
            // Each carried tensor's gradient enters as `sum(out * g)`.
            Some(g) => {
                let mut terms = out.iter().zip(&g).map(|(o, g)| (o * g)?.sum_all());
                let first = terms.next().context("a segment carries nothing out")??;
                terms.try_fold(first, |t, v| t + v?)?
            }
        };
        drop(out);
        let mut grads = target.backward()?;
        // The unit below is fetched once this backward's temporaries are gone (they are
        // several times its gradients), overlapping the hand-over of its gradients.
        if u > lowest {
            source.prefetch(u - 1, true);
        }
        for (i, wi) in unit.params.clone().zip(&w) {
            if trainable[i] {
                // A layer on the device: the tensor itself, or in bf16 its working copy
                // (a variable of its own, or a streamed state's recorded cast, whose
                // backward delivers the f32 gradient); a fetched one: its working copy.
                let param = state.var(i).map(|v| v.as_tensor());
                if let Some(g) = take_grad(&mut grads, param, wi)? {
                    sums.add(i, g)?;
                }
            }
        }
        if let Some(vars) = &tracked {
            let mut g = Vec::with_capacity(vars.len());
            for (c, v) in vars.iter().enumerate() {
                let gc = grads.remove(v.as_tensor()).with_context(|| {
                    format!(
                        "recompute: block {} segment {}'s input {c} has no gradient",
                        unit.k, unit.j
                    )
                })?;
                g.push(gc.detach());
            }
            upstream = Some(g);
        }
        drop((grads, target, w));
        // A block's gradients are complete once its lowest walked unit is done: they go
        // to their update, if there is one, once its graph and weights are gone.
        if unit.j == 0 || u == lowest {
            sums.flush(state)?;
        }
    }
    Ok(stats)
}
