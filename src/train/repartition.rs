//! Re-partition during training (`stage1.repartition_every = N`): after every N-th
//! optimizer step (not after the last), the stage-1 statistics pass runs again on the
//! composite, over fresh batches of D2, and ranks the layers by the run's criterion and
//! unstable ratio. Layers whose set changed move between the stable set S and the
//! unstable set U with their optimizer state ([`Branches::move_layers`]); the composite
//! does not change, and the DPU coefficients follow the new ranks.

use super::branches::Branches;
use super::stage1;
use super::RunContext;
use crate::config::Criterion;
use crate::ldt::partition::{Partition, Set};
use crate::metrics::Record;
use anyhow::{bail, Result};

/// Which re-partition, if any, is due after optimizer step `step`: `Some(k)` for the
/// `k`-th (k = 1, 2, ...).
fn due(ctx: &RunContext, step: usize) -> Option<usize> {
    let n = ctx.cfg.stage1.repartition_every;
    (n > 0 && step.is_multiple_of(n) && step < ctx.cfg.train.steps).then(|| step / n)
}

/// Re-partitions after optimizer step `step` when one is due: the new partition
/// (`next`), agreed by every rank, its moves applied to `b`, then recorded — a
/// `repartition` record, `partition.json` and `summary.json`'s partition. Returns the
/// line that says what moved, for the step's
/// [`Outcome::note`](super::driver::Outcome::note).
pub fn after_step(
    ctx: &mut RunContext,
    b: &mut dyn Branches,
    partition: &mut Partition,
    step: usize,
) -> Result<Option<String>> {
    let Some(k) = due(ctx, step) else {
        return Ok(None);
    };
    ctx.stages.enter("repartition");
    let new = next(ctx, b, partition, k);
    ctx.stages.exit();
    let new = new?;
    ctx.agree_partition(&new)?;
    let moved: Vec<usize> = (0..new.layers.len())
        .filter(|&i| new.layers[i].set != partition.layers[i].set)
        .collect();
    b.move_layers(&moved)?;
    let names = |set: Set| -> Vec<String> {
        moved
            .iter()
            .filter(|&&i| new.layers[i].set == set)
            .map(|&i| new.layers[i].name.clone())
            .collect()
    };
    let (to_stable, to_unstable) = (names(Set::Stable), names(Set::Unstable));
    let note = format!(
        "re-partition {k} after step {step}: {} layers to the stable set {to_stable:?}, {} to the unstable set {to_unstable:?}",
        to_stable.len(),
        to_unstable.len()
    );
    ctx.metrics.write(&Record::Repartition {
        step,
        to_stable,
        to_unstable,
        stable: new.stable.clone(),
        unstable: new.unstable.clone(),
    })?;
    stage1::settle(ctx, &new)?;
    *partition = new;
    Ok(Some(note))
}

/// The `k`-th re-partition of `current`: its criterion and unstable ratio on
/// statistics of the composite ([`stage1::restatistics`]). The `random` criterion's
/// scores come from the seed alone, not from the weights: its redraw is `current`.
fn next(
    ctx: &mut RunContext,
    b: &mut dyn Branches,
    current: &Partition,
    k: usize,
) -> Result<Partition> {
    let criterion = current.criterion;
    match criterion {
        Criterion::Random => return Ok(current.clone()),
        Criterion::Names => bail!("the `names` criterion's sets cannot be re-partitioned"),
        _ => {}
    }
    let cross = ctx.cfg.stage1.cross_variance || criterion == Criterion::VarCross;
    let mut stats = Vec::new();
    b.with_composite(current, &mut |state| {
        stats = stage1::restatistics(ctx, state, cross, k)?;
        Ok(())
    })?;
    stage1::Evidence::of(ctx, stats).partition(
        ctx.net.as_ref(),
        criterion,
        current.unstable_ratio,
        &ctx.cfg.ldt,
    )
}
