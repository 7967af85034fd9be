//! One optimizer step of a live network: forward, loss, backward over the trainable
//! layers only (frozen layers are detached: no gradient is computed for them), update.

use super::micro::{micro_gradients, Sums};
pub use super::micro::{widen, StepStats, Update};
use crate::config::{Config, Precision, Recompute};
use crate::dist;
use crate::model::dispatch::{generic_path, sum_of_squares, sum_of_squares_of};
use crate::model::{Mode, NetState, Network};
use crate::optim::{Grad, Optimizer};
use crate::task::Loss;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// How a step's gradients are computed (`train.accumulate`, `train.precision`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradPlan {
    /// The loss of the run's task.
    pub loss: Loss,
    /// Micro-batches the batch is split into (at most one per example).
    pub accumulate: usize,
    /// Arithmetic of forward and backward.
    pub precision: Precision,
    /// What the forward keeps for the backward.
    pub recompute: Recompute,
    /// Hand each block's gradients to host memory as soon as they are final (block-wise
    /// recompute with the optimizer on the host: the device then holds one block's
    /// gradients at a time; micro-batch sums are kept there too). One process only: the
    /// all-reduce runs on the device.
    pub release: bool,
    /// Update each layer as soon as its final gradient exists, inside the backward
    /// (block-wise recompute with the optimizer on the device: the device then holds
    /// one block's gradients at a time, as with `release`), where nothing needs all of
    /// a step's gradients first: no clipping (`train.clip_grad_norm = 0`), a
    /// non-finite gradient stops the run (`train.on_nonfinite = "stop"`), one process.
    /// The updates are those of the whole step, bit for bit: each layer's depends only
    /// on its own gradient, and the blocks below never read the weights above.
    pub update_by_block: bool,
}

impl GradPlan {
    /// Whole batches in f32: the plan of statistics-free tools and tests.
    pub const F32: GradPlan = GradPlan {
        loss: Loss::CrossEntropy,
        accumulate: 1,
        precision: Precision::F32,
        recompute: Recompute::None,
        release: false,
        update_by_block: false,
    };

    /// The plan of a run's configuration.
    pub fn of(cfg: &Config) -> GradPlan {
        use crate::config::{OnNonFinite, OptimizerPlacement};
        let blocks = cfg.train.recompute == Recompute::Blocks;
        let host = cfg.offload.optimizer == OptimizerPlacement::Host;
        let local = dist::group().is_local();
        GradPlan {
            loss: Loss::of(cfg),
            accumulate: cfg.train.accumulate,
            precision: cfg.train.precision,
            recompute: cfg.train.recompute,
            release: blocks && host && local,
            update_by_block: blocks
                && !host
                && local
                && cfg.train.clip_grad_norm == 0.0
                && cfg.train.on_nonfinite == OnNonFinite::Stop,
        }
    }

    /// Whether the gradients of a step stay on the device until its update: neither
    /// released nor updated by block.
    pub fn keeps_gradients(&self) -> bool {
        !self.release && !self.update_by_block
    }
}

/// This process's rows of one global batch on the run's device: the whole batch for a
/// single process, or a rank's contiguous shard ([`dist::shard`]), cut in host memory so
/// that each rank uploads only its own rows.
pub struct Batch {
    /// Images of these rows, `[rows, C, H, W]`.
    pub x: Tensor,
    /// Labels of these rows.
    pub y: Tensor,
    /// Examples in the global batch (the loss is the mean over all of them).
    pub total: usize,
}

impl Batch {
    /// A whole batch (one process; tests).
    pub fn whole(x: Tensor, y: Tensor) -> Result<Batch> {
        let total = y.dim(0)?;
        Ok(Batch { x, y, total })
    }
}

/// Forward and backward of `state` on `batch` with gradients for `trainable` layers.
/// Returns the stats and each trainable layer's gradient (`None` for frozen layers).
///
/// With `plan.accumulate = N` the batch is split into N contiguous micro-batches (sizes
/// differ by at most one); each runs its own forward and backward (BatchNorm running
/// statistics are updated once per micro-batch, as PyTorch does when accumulating), and
/// the gradients are averaged weighted by micro-batch size, so the result is the gradient
/// of the whole batch's mean loss. A non-finite micro-batch loss ends the step with that
/// loss and no gradients.
///
/// With several ranks ([`crate::dist`]) `batch` holds this rank's shard (cut by
/// [`crate::train::RunContext::batch`]), and the shard gradients, weighted by the
/// shard's share of `batch.total`, are summed across ranks: every rank gets the
/// gradient of the whole batch's mean loss (two ranks give exactly the numbers of
/// `accumulate = 2` on one). The loss and the correct count are summed the same way, a
/// non-finite loss on any rank is seen by all, and in `Train` mode rank 0's BatchNorm
/// running statistics are copied to every rank (PyTorch DDP's buffer broadcast).
pub fn gradients(
    net: &dyn Network,
    state: &mut NetState,
    trainable: &[bool],
    batch: &Batch,
    mode: Mode,
    plan: GradPlan,
) -> Result<(StepStats, Vec<Option<Grad>>)> {
    let plan = GradPlan {
        update_by_block: false,
        ..plan
    };
    gradients_updating(net, state, trainable, batch, mode, plan, None)
}

/// [`gradients`] where, with `plan.update_by_block`, each layer's final gradient goes
/// to `update` as soon as it exists instead of being returned (`None` in its place).
pub fn gradients_updating(
    net: &dyn Network,
    state: &mut NetState,
    trainable: &[bool],
    batch: &Batch,
    mode: Mode,
    plan: GradPlan,
    update: Option<Update<'_>>,
) -> Result<(StepStats, Vec<Option<Grad>>)> {
    let group = dist::group();
    let update = update.filter(|_| plan.update_by_block);
    if group.is_local() {
        return local_gradients(
            net,
            state,
            trainable,
            (&batch.x, &batch.y),
            mode,
            plan,
            update,
        );
    }
    let plan = GradPlan {
        release: false,
        update_by_block: false,
        ..plan
    };
    let local = if batch.y.dim(0)? > 0 {
        local_gradients(
            net,
            state,
            trainable,
            (&batch.x, &batch.y),
            mode,
            plan,
            None,
        )?
    } else {
        let none = StepStats {
            loss: 0.0,
            correct: 0,
            n: 0,
        };
        (none, vec![None; trainable.len()])
    };
    let out = dist::timed(|| all_reduce(net, batch.x.device(), trainable, local, batch.total))?;
    if mode == Mode::Train && !state.buffers.is_empty() {
        dist::timed(|| broadcast_buffers(&mut state.buffers))?;
    }
    Ok(out)
}

/// Sums shard gradients (each scaled by its share of the batch), losses and correct
/// counts across ranks. A rank without gradients (empty shard, non-finite loss)
/// contributes zeros so that every rank makes the same calls.
fn all_reduce(
    net: &dyn Network,
    device: &candle_core::Device,
    trainable: &[bool],
    (stats, grads): (StepStats, Vec<Option<Grad>>),
    n: usize,
) -> Result<(StepStats, Vec<Option<Grad>>)> {
    let group = dist::group();
    let finite = stats.loss.is_finite();
    let share = stats.n as f64 / n as f64;
    let mut parts = Vec::new();
    let mut spans = Vec::new();
    let mut len = 0;
    for (i, (g, &t)) in grads.iter().zip(trainable).enumerate() {
        if !t {
            continue;
        }
        let numel = net.params()[i].numel();
        parts.push(match g.as_ref().and_then(Grad::device) {
            Some(g) if finite => (widen(g)? * share)?.flatten_all()?,
            _ => Tensor::zeros(numel, DType::F32, device)?,
        });
        spans.push((i, len));
        len += numel;
    }
    let local_loss = if finite && stats.n > 0 {
        f64::from(stats.loss) * stats.n as f64
    } else {
        0.0
    };
    let mut sums = [
        local_loss,
        stats.correct as f64,
        f64::from(u8::from(!finite)),
    ];
    group.all_reduce_sum_f64(&mut sums)?;
    // One reduction of all the trained set's gradients, in device memory where the
    // engine allows (NCCL), then views of it per tensor.
    let flat = match parts.len() {
        0 => None,
        _ => Some(group.all_reduce_sum(&Tensor::cat(&parts, 0)?)?),
    };
    let total = StepStats {
        loss: if sums[2] > 0.0 {
            f32::NAN
        } else {
            (sums[0] / n as f64) as f32
        },
        correct: sums[1] as usize,
        n,
    };
    let mut out = vec![None; trainable.len()];
    if let Some(flat) = flat.as_ref().filter(|_| sums[2] == 0.0) {
        for (i, start) in spans {
            let shape = net.params()[i].shape.as_slice();
            let g = flat
                .narrow(0, start, net.params()[i].numel())?
                .reshape(shape)?;
            out[i] = Some(Grad::Device(g));
        }
    }
    Ok((total, out))
}

/// Copies rank 0's buffers (BatchNorm running statistics and counts) to every rank.
fn broadcast_buffers(buffers: &mut [Tensor]) -> Result<()> {
    let group = dist::group();
    let mut dtypes: Vec<DType> = Vec::new();
    for b in buffers.iter() {
        if !dtypes.contains(&b.dtype()) {
            dtypes.push(b.dtype());
        }
    }
    // One broadcast per dtype (f32 statistics, i64 counts), of all such buffers at once.
    for dtype in dtypes {
        let of: Vec<usize> = (0..buffers.len())
            .filter(|&i| buffers[i].dtype() == dtype)
            .collect();
        let parts = of
            .iter()
            .map(|&i| buffers[i].flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = group.broadcast(&Tensor::cat(&parts, 0)?, 0)?;
        let mut at = 0;
        for i in of {
            let (k, shape) = (buffers[i].elem_count(), buffers[i].shape().clone());
            // A buffer of its own (a copy), not a view into the broadcast.
            buffers[i] = flat.narrow(0, at, k)?.reshape(shape)?.copy()?;
            at += k;
        }
    }
    Ok(())
}

/// [`gradients`] of this process's rows, in micro-batches.
fn local_gradients(
    net: &dyn Network,
    state: &mut NetState,
    trainable: &[bool],
    (x, y): (&Tensor, &Tensor),
    mode: Mode,
    plan: GradPlan,
    update: Option<Update<'_>>,
) -> Result<(StepStats, Vec<Option<Grad>>)> {
    let n = y.dim(0)?;
    let parts = plan.accumulate.clamp(1, n.max(1));
    // Weights and input are cast once per step, shared by the micro-batches.
    let (view, x) = working_copies(state, trainable, x, plan.precision)?;
    let micro = match plan.recompute {
        // `auto` is decided before stage 1 (`RunContext::plan_memory`); undecided, it
        // keeps every activation.
        Recompute::None | Recompute::Auto => micro_gradients,
        Recompute::Blocks => super::recompute::block_gradients,
    };
    let mut sums = Sums::new(trainable.len(), plan.release, update);
    if parts == 1 {
        let stats = micro(
            net,
            state,
            &view,
            trainable,
            (&x, y, plan.loss),
            mode,
            &mut sums,
        )?;
        return Ok((stats, sums.into_grads()));
    }
    let (mut loss, mut correct) = (0f64, 0usize);
    for k in 0..parts {
        let (a, b) = (k * n / parts, (k + 1) * n / parts);
        let (xk, yk) = (x.narrow(0, a, b - a)?, y.narrow(0, a, b - a)?);
        sums.micro_batch((b - a) as f64 / n as f64, k + 1 == parts);
        let s = micro(
            net,
            state,
            &view,
            trainable,
            (&xk, &yk, plan.loss),
            mode,
            &mut sums,
        )?;
        correct += s.correct;
        if !s.loss.is_finite() {
            let stats = StepStats {
                loss: s.loss,
                correct,
                n,
            };
            return Ok((stats, vec![None; trainable.len()]));
        }
        loss += f64::from(s.loss) * (b - a) as f64;
    }
    let stats = StepStats {
        loss: (loss / n as f64) as f32,
        correct,
        n,
    };
    Ok((stats, sums.into_grads()))
}

/// The forward's weights (`state.view`: frozen layers detached) and input in the working
/// precision. In bf16 a trained f32 weight's working copy is a variable of its own, its
/// bf16 rounding: its gradient is widened to f32 once after the backward
/// ([`super::micro::take_grad`]), the bits of recording the cast, without the cast's
/// node (an f32 zero-filled, accumulated gradient of every weight). bf16 working
/// weights (host masters) are used as they are and their gradients stay bf16 until the
/// host widens them.
fn working_copies(
    state: &NetState,
    trainable: &[bool],
    x: &Tensor,
    precision: Precision,
) -> Result<(Vec<Tensor>, Tensor)> {
    let view = state.view(trainable);
    Ok(match precision {
        Precision::F32 => (view, x.clone()),
        Precision::Bf16 => (
            view.iter()
                .zip(trainable)
                .map(|(t, &tracked)| -> Result<Tensor> {
                    let w = t.to_dtype(DType::BF16)?;
                    Ok(match tracked && t.dtype() != DType::BF16 {
                        true => candle_core::Var::from_tensor(&w.detach())?
                            .as_tensor()
                            .clone(),
                        false => w,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            x.to_dtype(DType::BF16)?,
        ),
    })
}

/// Scales the gradients so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)`, applied only
/// when below 1; norm accumulated in f64). Returns the norm before clipping. The layers'
/// squared norms are summed where the gradients are, in layer order, and read once.
pub fn clip_grad_norm(grads: &mut [Option<Grad>], max_norm: f64) -> Result<f64> {
    let mut sq: Option<Tensor> = None;
    for g in grads.iter().flatten() {
        let s = match g {
            Grad::Device(g) if generic_path(g) => g.to_dtype(DType::F64)?.sqr()?.sum_all()?,
            // On the host in one pass, the same bits as the ops above.
            Grad::Device(g) => Tensor::new(sum_of_squares(g)?, g.device())?,
            Grad::Host(v) => Tensor::new(sum_of_squares_of(v), &candle_core::Device::Cpu)?,
        };
        sq = Some(match sq {
            Some(acc) => (acc.to_device(s.device())? + s)?,
            None => s,
        });
    }
    let norm = match sq {
        Some(s) => s.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    };
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            match g {
                Grad::Device(t) => *t = (widen(t)? * coef)?,
                Grad::Host(v) => {
                    let scaled = (host_tensor(v)? * coef)?.to_vec1::<f32>()?;
                    v.copy_from_slice(&scaled);
                }
            }
        }
    }
    Ok(norm)
}

/// Host gradient values as a 1-D CPU tensor (a copy), for the ops the device path uses.
fn host_tensor(v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &candle_core::Device::Cpu)?)
}

/// Applies the optimizer to every layer that has a gradient, with per-layer rates. With
/// host masters the update runs on the master, which is then rounded into the working
/// copy.
pub fn apply(
    opt: &mut Optimizer,
    state: &mut NetState,
    grads: &[Option<Grad>],
    lrs: &[f64],
) -> Result<()> {
    for (i, g) in grads.iter().enumerate() {
        if let Some(g) = g {
            apply_layer(opt, state, i, g, lrs[i])?;
        }
    }
    Ok(())
}

/// [`apply`] for layer `i` alone.
pub fn apply_layer(
    opt: &mut Optimizer,
    state: &mut NetState,
    i: usize,
    g: &Grad,
    lr: f64,
) -> Result<()> {
    if let crate::model::Held::Device(v) = state.held(i) {
        return opt.step(i, v, g, lr);
    }
    match state.masters_mut()? {
        Some(m) => {
            opt.step_master(i, &mut m[i], g, lr)?;
            state.refresh(i)
        }
        None => bail!("layer {i} has neither a device tensor nor a master"),
    }
}

/// Where a step went non-finite, if it did: the loss, or the first layer whose gradient
/// holds NaN or Inf, with the offending value (one reduction per gradient, the sums read
/// in one transfer; the exact element is looked up only when a sum is non-finite).
pub fn nonfinite(
    stats: &StepStats,
    grads: &[Option<Grad>],
    specs: &[crate::model::TensorSpec],
) -> Result<Option<String>> {
    if !stats.loss.is_finite() {
        return Ok(Some(format!("the loss is {}", stats.loss)));
    }
    let sums = grads
        .iter()
        .flatten()
        .filter_map(Grad::device)
        .map(|g| g.sum_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut sums = match sums.is_empty() {
        true => Vec::new(),
        false => Tensor::stack(&sums, 0)?.to_vec1::<f32>()?,
    }
    .into_iter();
    for (g, spec) in grads.iter().zip(specs) {
        let name = &spec.name;
        let bad = |v: &[f32]| {
            v.iter()
                .enumerate()
                .find(|(_, x)| !x.is_finite())
                .map(|(i, x)| format!("the gradient of `{name}` is {x} at flat index {i}"))
        };
        match g {
            None => {}
            Some(Grad::Host(v)) => {
                if let Some(what) = bad(v) {
                    return Ok(Some(what));
                }
            }
            Some(Grad::Device(g)) => {
                if sums.next().is_some_and(f32::is_finite) {
                    continue;
                }
                let v = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if let Some(what) = bad(&v) {
                    return Ok(Some(what));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nonfinite_names_the_first_bad_layer() {
        let d = Device::Cpu;
        let spec = |name: &str| crate::model::TensorSpec {
            name: name.into(),
            shape: vec![3],
            init: crate::model::Init::Zeros,
        };
        let specs = [spec("a"), spec("b"), spec("c"), spec("d")];
        let stats = StepStats {
            loss: 1.0,
            correct: 0,
            n: 1,
        };
        // `a` overflows its sum but holds only finite values; `b` is frozen; `c` is bad.
        let g = |v: [f32; 3]| Some(Grad::Device(Tensor::new(&v, &d).unwrap()));
        let h = |v: [f32; 3]| Some(Grad::Host(crate::heap::HostVec::from_slice(&v)));
        let grads = [
            g([3e38, 3e38, 0.0]),
            None,
            g([0.0, 1.0, f32::NAN]),
            g([f32::INFINITY, 0.0, 0.0]),
        ];
        let what = nonfinite(&stats, &grads, &specs).unwrap();
        assert_eq!(
            what.as_deref(),
            Some("the gradient of `c` is NaN at flat index 2")
        );
        let fine = [g([1.0, 2.0, 3.0]), None, g([0.0; 3]), None];
        assert_eq!(nonfinite(&stats, &fine, &specs).unwrap(), None);
        // Released to the host: the same answers.
        let grads = [h([3e38, 3e38, 0.0]), None, h([0.0, 1.0, f32::NAN]), None];
        let what = nonfinite(&stats, &grads, &specs).unwrap();
        assert_eq!(
            what.as_deref(),
            Some("the gradient of `c` is NaN at flat index 2")
        );
        let fine = [h([1.0, 2.0, 3.0]), None, g([0.0; 3]), None];
        assert_eq!(nonfinite(&stats, &fine, &specs).unwrap(), None);
    }

    /// The values of a gradient wherever it lives.
    fn values(g: &Option<Grad>) -> Vec<f32> {
        match g.as_ref().unwrap() {
            Grad::Device(t) => t.to_vec1::<f32>().unwrap(),
            Grad::Host(v) => v.to_vec(),
        }
    }

    #[test]
    fn clip_grad_norm_as_torch() {
        let d = Device::Cpu;
        let mut g = vec![
            Some(Grad::Device(Tensor::new(&[3f32], &d).unwrap())),
            None,
            Some(Grad::Host(crate::heap::HostVec::from_slice(&[4f32]))),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert_eq!(n, 5.0);
        let c = 1.0 / (5.0 + 1e-6);
        let (a, b) = (values(&g[0])[0], values(&g[2])[0]);
        // f32 products of the f64 coefficient: within 1 ulp of 3c and 4c.
        assert!(
            (a as f64 - 3.0 * c).abs() < 1e-7 && (b as f64 - 4.0 * c).abs() < 1e-7,
            "{a} {b}"
        );
        let before: Vec<Vec<f32>> = [0, 2].iter().map(|&i| values(&g[i])).collect();
        clip_grad_norm(&mut g, 10.0).unwrap();
        let after: Vec<Vec<f32>> = [0, 2].iter().map(|&i| values(&g[i])).collect();
        assert_eq!(after, before, "no clip below max_norm");
    }
}
