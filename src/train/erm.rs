//! `erm` (all layers) and `lp-ft` (head only for `train.lp_steps`, then all layers): one
//! network, one optimizer.

use super::driver::{Feed, Outcome, Stepper, Visitor};
use super::memory::{self, LiveMeter};
use super::stage1::{fit_layers, Fit};
use super::update;
use super::RunContext;
use crate::checkpoint::{Checkpoint, Writer};
use crate::config::Method;
use crate::metrics::MemoryReport;
use crate::model::NetState;
use crate::optim::{OptimSettings, Optimizer};
use anyhow::Result;

/// The ERM / LP-FT step over one network.
pub struct Erm {
    state: NetState,
    opt: Optimizer,
    head: Vec<bool>,
    all: Vec<bool>,
    /// Head-only steps (`lp-ft`); 0 for `erm`.
    lp_steps: usize,
    meter: LiveMeter,
}

impl Erm {
    /// From the checkpoint, or from the initial weights after the head warm-up
    /// (`train.head_warmup_steps`).
    pub fn start(ctx: &mut RunContext, resume: Option<&Checkpoint>) -> Result<Self> {
        let cfg = ctx.cfg.clone();
        let n = ctx.net.params().len();
        let head: Vec<bool> = (0..n).map(|i| ctx.net.is_head(i)).collect();
        let settings = OptimSettings::from(&cfg.optim);
        let (state, opt) = match resume {
            Some(ck) => {
                let state = ctx.restore_net(ck, "model")?;
                ctx.plan_memory(&state)?;
                let opt = ck.optimizer("opt", settings, n)?;
                (state, opt.placed(cfg.offload.optimizer)?)
            }
            None => {
                let resume = ctx.stage1_resume.take();
                let mut state = ctx.start_state(resume.as_ref())?;
                ctx.plan_memory(&state)?;
                if cfg.train.head_warmup_steps > 0 {
                    let order = ctx.train_order()?;
                    let fit = Fit {
                        mask: &head,
                        steps: cfg.train.head_warmup_steps,
                        settings: OptimSettings {
                            betas: cfg.stage1.warmup_betas,
                            ..OptimSettings::from(&cfg.optim)
                        },
                        lr: cfg.stage1.warmup_lr,
                        stage: "warmup",
                        key: "train.head_warmup_steps",
                    };
                    ctx.stages.enter("stage1");
                    fit_layers(ctx, &mut state, order, fit, resume.as_ref())?;
                    ctx.stages.exit();
                } else {
                    super::stage1::no_warmup(resume.as_ref(), "train.head_warmup_steps")?;
                }
                (
                    state,
                    Optimizer::new(settings, n).placed(cfg.offload.optimizer)?,
                )
            }
        };
        let lp_steps = match cfg.train.method {
            Method::LpFt => cfg.train.lp_steps,
            _ => 0,
        };
        Ok(Erm {
            state,
            opt,
            all: vec![true; n],
            head,
            lp_steps,
            meter: LiveMeter::default(),
        })
    }
}

impl Stepper for Erm {
    fn step(&mut self, ctx: &mut RunContext, step: usize, feed: &mut Feed) -> Result<Outcome> {
        let mask = if step <= self.lp_steps {
            &self.head
        } else {
            &self.all
        };
        let hb = feed.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let lrs = feed.rates.at(step);
        let at = update::At {
            step,
            branch: "model",
        };
        let (stats, grads) =
            update::step(ctx, &mut self.state, &mut self.opt, mask, &batch, &lrs, at)?;
        let weights = memory::weight_bytes(&self.state);
        self.meter.observe(weights, &grads, self.opt.bytes() as u64);
        Ok(Outcome {
            meter: vec![stats],
            loss: Some(stats.loss),
            acc: ctx.classifies().then(|| stats.acc()),
            ..Outcome::default()
        })
    }

    fn networks(&self) -> &'static [&'static str] {
        &["model"]
    }

    fn visit(&mut self, _: usize, f: &mut Visitor) -> Result<()> {
        f(&self.state.weight_refs(), &self.state.buffers)
    }

    fn save(&mut self, ctx: &RunContext, w: &mut Writer) -> Result<()> {
        w.net("model", ctx.net.as_ref(), &self.state)?;
        w.optimizer("opt", &self.opt, ctx.net.as_ref())?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        let total = self
            .state
            .shapes()
            .iter()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum();
        let k = memory::device_state_tensors(&self.opt);
        let mut r = memory::report(
            (
                memory::Layout::Full,
                memory::working_bytes(&self.state, self.opt.placement()),
            ),
            (total, 0),
            k,
            (0, 0),
            0,
        );
        r.measured_live_peak = self.meter.peak;
        r.host_optimizer = self.opt.host_bytes() as u64 + self.state.master_bytes();
        r
    }
}
