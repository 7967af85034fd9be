//! One optimizer step of a live network, the same for every method: the gradients of the
//! trained layers, the non-finite guard and clipping ([`RunContext::guard`]), the
//! update. With [`GradPlan::update_by_block`] each block's layers are updated as soon as
//! the block's backward has ended (their gradients checked for non-finite values first),
//! so the device never holds more than one block's gradients; the rest of the step then
//! finds nothing left to apply.

use super::step::{apply, gradients_updating, nonfinite, Batch, GradPlan, StepStats};
use super::RunContext;
use crate::config::OptimizerPlacement;
use crate::model::{Mode, NetState, TensorSpec};
use crate::optim::{Grad, Optimizer};
use anyhow::{bail, Result};

/// Who steps: the optimizer step's number and the network's name in messages.
#[derive(Clone, Copy)]
pub struct At<'a> {
    /// Optimizer step (1-based).
    pub step: usize,
    /// `model`, `pm`, `am`, or the stage-1 warm-up's name.
    pub branch: &'a str,
}

/// The gradients of `trainable` on `batch`; with the plan's block-wise update, each
/// block's layers already updated by `opt` with rates `lrs` (their gradients not
/// returned). Without it `opt` is not touched: [`finish`] applies the update. Streamed
/// weights with the optimizer on the device: the trained layers are kept on the device
/// first, where it updates them, and the frozen ones streamed ([`NetState::place`]).
pub fn gradients(
    ctx: &RunContext,
    state: &mut NetState,
    opt: &mut Optimizer,
    trainable: &[bool],
    batch: &Batch,
    lrs: &[f64],
    at: At<'_>,
) -> Result<(StepStats, Vec<Option<Grad>>)> {
    if opt.placement() == OptimizerPlacement::Device {
        state.place(trainable)?;
    }
    let plan = GradPlan::of(&ctx.cfg);
    let net = ctx.net.as_ref();
    let specs = net.params();
    let mut update = |state: &mut NetState, finals: &[Option<Grad>]| -> Result<()> {
        apply_checked(opt, state, finals, lrs, (specs, at))
    };
    gradients_updating(
        net,
        state,
        trainable,
        batch,
        Mode::Train,
        plan,
        Some(&mut update),
    )
}

/// The update of a block whose gradients `finals` are final: none of them applied when
/// one holds a non-finite value, which stops the run (the block-wise update's
/// condition: `train.on_nonfinite = "stop"`) naming the step, branch and layer.
fn apply_checked(
    opt: &mut Optimizer,
    state: &mut NetState,
    finals: &[Option<Grad>],
    lrs: &[f64],
    (specs, at): (&[TensorSpec], At<'_>),
) -> Result<()> {
    if let Some(what) = nonfinite(&StepStats::default(), finals, specs)? {
        bail!(super::run::nonfinite_stop(at.step, at.branch, &what));
    }
    apply(opt, state, finals, lrs)
}

/// The rest of the step after [`gradients`]: the guard (with clipping) and the update
/// of every layer whose gradient was returned (none where the guard skips the step).
pub fn finish(
    ctx: &mut RunContext,
    state: &mut NetState,
    opt: &mut Optimizer,
    (stats, grads): (&StepStats, &mut [Option<Grad>]),
    lrs: &[f64],
    at: At<'_>,
) -> Result<()> {
    match ctx.guard(at.step, at.branch, stats, grads)? {
        true => apply(opt, state, grads, lrs),
        false => Ok(()),
    }
}

/// A whole optimizer step: [`gradients`], then [`finish`].
pub fn step(
    ctx: &mut RunContext,
    state: &mut NetState,
    opt: &mut Optimizer,
    trainable: &[bool],
    batch: &Batch,
    lrs: &[f64],
    at: At<'_>,
) -> Result<(StepStats, Vec<Option<Grad>>)> {
    let (stats, mut grads) = gradients(ctx, state, opt, trainable, batch, lrs, at)?;
    finish(ctx, state, opt, (&stats, &mut grads), lrs, at)?;
    Ok((stats, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{mlp::Mlp, Network};
    use crate::optim::OptimSettings;
    use candle_core::{Device, Tensor};

    /// A block with a non-finite gradient is not applied, not even its finite layers,
    /// and the error names the step, the branch and the layer; a finite block is.
    #[test]
    fn a_nonfinite_block_is_not_applied() {
        let net = Mlp::new([1, 2, 2], &[3], 2).unwrap();
        let mut rng = crate::rng::Rng::new(1, 2);
        let mut state = NetState::init(&net, &mut rng, &Device::Cpu).unwrap();
        let settings = OptimSettings::from(&crate::config::Config::default().optim);
        let mut opt = Optimizer::new(settings, state.len());
        let values = |state: &NetState| -> Vec<Vec<f32>> {
            (0..state.len())
                .map(|i| {
                    let w = state.weight(i).unwrap();
                    w.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect()
        };
        let before = values(&state);
        let grad = |i: usize, bad: bool| {
            let mut v = vec![0.5f32; net.params()[i].numel()];
            if bad {
                v[1] = f32::NAN;
            }
            let t = Tensor::from_vec(v, net.params()[i].shape.as_slice(), &Device::Cpu);
            Some(Grad::Device(t.unwrap()))
        };
        let mut finals = vec![None; state.len()];
        finals[0] = grad(0, false);
        finals[1] = grad(1, true);
        let lrs = vec![0.1; state.len()];
        let at = At {
            step: 7,
            branch: "pm",
        };
        let e = apply_checked(&mut opt, &mut state, &finals, &lrs, (net.params(), at))
            .unwrap_err()
            .to_string();
        let name = &net.params()[1].name;
        assert!(
            e.starts_with("step 7 (pm): ") && e.contains(&format!("`{name}`")),
            "{e}"
        );
        assert_eq!(values(&state), before, "a weight changed");
        finals[1] = grad(1, false);
        apply_checked(&mut opt, &mut state, &finals, &lrs, (net.params(), at)).unwrap();
        let after = values(&state);
        for i in 0..state.len() {
            assert_eq!(
                after[i] != before[i],
                i < 2,
                "layer {i}: applied iff it had a gradient"
            );
        }
    }
}
