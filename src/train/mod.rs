//! Training: one driver loop ([`driver`]) over small steppers — [`erm`] (erm, lp-ft),
//! [`dual`] (the dual branch, `ldt` and `deft`, over either branch storage of
//! [`branches`]) and [`ldt_s`] (LDT-S: alternating phases, or repeat-batch) — after stage 1
//! ([`stage1`]; LDT's re-partitions during training: [`repartition`]), all sharing one run context ([`run`]), one gradient step ([`step`]) and one
//! optimizer step ([`update`]).

pub mod branches;
pub mod compare;
pub mod driver;
pub mod dual;
pub mod erm;
pub mod eval;
pub mod fetch;
pub mod ldt_s;
pub mod memory;
pub mod micro;
pub mod recompute;
pub mod repartition;
pub mod report;
pub mod run;
pub mod stage1;
pub mod step;
pub mod update;

pub use run::RunContext;

use crate::config::Method;
use anyhow::Result;
use driver::Stepper;

/// Runs the configured method in `ctx` and writes the summary.
pub fn run_method(ctx: &mut RunContext) -> Result<()> {
    ctx.decide_memory()?;
    let resume = ctx.take_resume()?;
    let done = resume.as_ref().map_or(0, |ck| ck.step);
    let r = resume.as_ref();
    let mut stepper: Box<dyn Stepper> = match ctx.cfg.train.method {
        Method::Erm | Method::LpFt => Box::new(erm::Erm::start(ctx, r)?),
        Method::Ldt | Method::Deft => Box::new(dual::Dual::start(ctx, r)?),
        Method::LdtS => Box::new(ldt_s::LdtS::start(ctx, r)?),
    };
    driver::drive(ctx, stepper.as_mut(), done)?;
    report::draw(&ctx.dir)?;
    ctx.write_summary()
}
