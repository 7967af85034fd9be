//! Training loops: ERM and LP-FT, the dual branch (`ldt`, `deft`) and the single
//! branch (`ldt-s`), over one shared run context.

pub mod compare;
pub mod dual;
pub mod erm;
pub mod eval;
pub mod memory;
pub mod report;
pub mod run;
pub mod single;
pub mod stage1;
pub mod step;

pub use run::{RunContext, Summary};

use crate::config::{Method, Placement};
use anyhow::Result;

/// Runs the configured method in `ctx` and writes the summary.
pub fn run_method(ctx: &mut RunContext) -> Result<()> {
    match ctx.cfg.train.method {
        Method::Erm | Method::LpFt => erm::train(ctx)?,
        Method::Ldt | Method::Deft if ctx.cfg.ldt.placement == Placement::Resident => {
            dual::train(ctx)?
        }
        Method::Ldt | Method::Deft | Method::LdtS => single::train(ctx)?,
    }
    if ctx.dir.join("partition.json").exists() {
        report::draw(&ctx.dir)?;
    }
    ctx.write_summary()
}
