//! The stepper of the configured training method, opened from stage 1, the search's
//! choice or a checkpoint: the one place a method name becomes its stepper.

use super::branches::Opening;
use super::driver::Stepper;
use super::{dual, erm, ldt_s, RunContext};
use crate::config::Method;
use anyhow::{bail, Result};

/// The stepper of `train.method`, opened from `opening`.
pub fn open(ctx: &mut RunContext, opening: Opening<'_>) -> Result<Box<dyn Stepper>> {
    Ok(match ctx.cfg.train.method {
        Method::Erm | Method::LpFt => match opening {
            Opening::Chosen(_) => bail!(
                "{} trains one network: it has no partition to choose",
                ctx.cfg.train.method.name()
            ),
            o => Box::new(erm::Erm::start(ctx, o.checkpoint())?),
        },
        Method::Ldt | Method::Deft => Box::new(dual::Dual::start(ctx, opening)?),
        Method::LdtS => Box::new(ldt_s::LdtS::start(ctx, opening)?),
    })
}
