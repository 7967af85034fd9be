//! Training: one driver loop ([`driver`]) over small steppers — [`erm`] (erm, lp-ft),
//! [`dual`] (the dual branch, `ldt` and `deft`, over either branch storage of
//! [`branches`]) and [`ldt_s`] (LDT-S: alternating phases, or repeat-batch), opened by
//! [`method`] — after stage 1 ([`stage1`]; with `auto` settings, the [`search`]; LDT's
//! re-partitions during training: [`repartition`]), all sharing one run context
//! ([`run`]), one gradient step ([`step`]) and one optimizer step ([`update`]).

pub mod branches;
pub mod compare;
pub mod driver;
pub mod dual;
pub mod erm;
pub mod eval;
pub mod fetch;
pub mod ldt_s;
pub mod memory;
pub mod method;
pub mod micro;
pub mod recompute;
pub mod repartition;
pub mod report;
pub mod run;
pub mod search;
pub mod stage1;
pub mod step;
pub mod update;

pub use run::RunContext;

use anyhow::Result;
use branches::Opening;

/// Runs the configured method in `ctx` and writes the summary: from a checkpoint, or
/// after stage 1 (with `auto` settings, after the search).
pub fn run_method(ctx: &mut RunContext) -> Result<()> {
    ctx.decide_memory()?;
    let resume = ctx.take_resume()?;
    let done = resume.as_ref().map_or(0, |ck| ck.step);
    let opening = match &resume {
        Some(ck) => {
            search::restore(ctx, ck)?;
            Opening::Resume(ck)
        }
        None if ctx.cfg.stage1.searching() => Opening::Chosen(Box::new(search::run(ctx)?)),
        None => Opening::Stage1,
    };
    let mut stepper = method::open(ctx, opening)?;
    driver::drive(ctx, stepper.as_mut(), done)?;
    report::draw(&ctx.dir)?;
    ctx.write_summary()
}
