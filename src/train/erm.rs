//! `erm` (all layers) and `lp-ft` (head only for `lp_steps`, then all layers), plus the
//! generic layer-subset fitting loop that warm-ups reuse.

use super::step::{apply, gradients, GradPlan, StepStats};
use super::RunContext;
use crate::checkpoint::Writer;
use crate::config::Method;
use crate::data::Loader;
use crate::metrics::Progress;
use crate::model::{io, Mode, NetState};
use crate::optim::{schedule, OptimSettings, Optimizer};
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

/// Running loss/accuracy and throughput for progress messages.
#[derive(Default)]
pub struct Meter {
    loss: f64,
    correct: usize,
    n: usize,
    steps: usize,
    examples: usize,
    since: Option<Instant>,
}

impl Meter {
    /// Adds one step.
    pub fn add(&mut self, s: &StepStats) {
        self.since.get_or_insert_with(Instant::now);
        self.loss += s.loss as f64;
        self.correct += s.correct;
        self.n += s.n;
        self.steps += 1;
        self.examples += s.n;
    }

    /// `loss ... acc ... ex/s`, then resets the window.
    pub fn take(&mut self) -> (String, f64) {
        let secs = self
            .since
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(1e-9);
        let eps = self.examples as f64 / secs;
        let msg = format!(
            "loss {:.4} acc {:.3} {:.0} ex/s",
            self.loss / self.steps.max(1) as f64,
            self.correct as f64 / self.n.max(1) as f64,
            eps
        );
        *self = Meter::default();
        (msg, eps)
    }
}

/// A warm-up: which layers, how long, with which optimizer and constant rate.
pub struct Fit<'a> {
    /// Layers trained.
    pub mask: &'a [bool],
    /// Optimizer steps.
    pub steps: usize,
    /// Optimizer hyper-parameters.
    pub settings: OptimSettings,
    /// Constant learning rate.
    pub lr: f64,
    /// Stage name in logs.
    pub stage: &'a str,
}

/// Trains the layers of `fit.mask` (used by warm-ups: head-only or all layers).
pub fn fit_layers(
    ctx: &mut RunContext,
    state: &mut NetState,
    loader: &mut Loader,
    fit: Fit<'_>,
) -> Result<()> {
    let Fit {
        mask,
        steps,
        settings,
        lr,
        stage,
    } = fit;
    let n = ctx.net.params().len();
    let mut opt = Optimizer::new(settings, n);
    let lrs = vec![lr; n];
    let progress = Progress::new(stage, steps, ctx.cfg.train.log_every);
    let mut meter = Meter::default();
    for step in 1..=steps {
        let hb = loader.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let (stats, mut grads) = gradients(
            ctx.net.as_ref(),
            state,
            mask,
            &batch,
            Mode::Train,
            GradPlan::of(&ctx.cfg),
        )?;
        if ctx.guard(step, stage, &stats, &mut grads)? {
            apply(&mut opt, state, &grads, &lrs)?;
        }
        meter.add(&stats);
        ctx.metrics.write(
            json!({"kind": "train", "stage": stage, "step": step, "loss": stats.loss,
            "acc": stats.correct as f64 / stats.n as f64, "lr": lr}),
        )?;
        if step % ctx.cfg.train.log_every == 0 || step == steps {
            let (msg, _) = meter.take();
            progress.update(step, &msg);
        }
    }
    progress.finish();
    Ok(())
}

/// Runs `erm` or `lp-ft` and writes `model.safetensors`.
pub fn train(ctx: &mut RunContext) -> Result<()> {
    let cfg = ctx.cfg.clone();
    let net_n = ctx.net.params().len();
    let head: Vec<bool> = (0..net_n).map(|i| ctx.net.is_head(i)).collect();
    let all = vec![true; net_n];
    let resume = ctx.take_resume()?;
    let mut state = match &resume {
        Some(ck) => ck.net("model", ctx.net.as_ref())?,
        None => ctx.initial_state()?,
    };
    if cfg.train.head_warmup_steps > 0 && resume.is_none() {
        let order = ctx.train_order()?;
        let mut l = ctx.loader(order, cfg.train.head_warmup_steps)?;
        let s = OptimSettings {
            betas: cfg.stage1.warmup_betas,
            ..OptimSettings::from(&cfg.optim)
        };
        let fit = Fit {
            mask: &head,
            steps: cfg.train.head_warmup_steps,
            settings: s,
            lr: cfg.stage1.warmup_lr,
            stage: "warmup",
        };
        fit_layers(ctx, &mut state, &mut l, fit)?;
    }
    let names: Vec<String> = ctx.net.params().iter().map(|s| s.name.clone()).collect();
    let base = schedule::layer_lrs(&cfg.optim, &names);
    let settings = OptimSettings::from(&cfg.optim);
    let (mut opt, start) = match &resume {
        Some(ck) => (ck.optimizer("opt", settings, net_n)?, ck.step),
        None => (Optimizer::new(settings, net_n), 0),
    };
    let mut meter_mem = super::memory::LiveMeter::default();
    let wbytes = super::memory::weight_bytes(&state);
    let mut loader = ctx.train_loader(start, cfg.train.steps - start)?;
    let progress = Progress::new(
        cfg.train.method.name(),
        cfg.train.steps,
        cfg.train.log_every,
    );
    let mut meter = Meter::default();
    let t0 = Instant::now();
    for step in start + 1..=cfg.train.steps {
        let lp = cfg.train.method == Method::LpFt && step <= cfg.train.lp_steps;
        let mask = if lp { &head } else { &all };
        let hb = loader.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let (stats, mut grads) = gradients(
            ctx.net.as_ref(),
            &mut state,
            mask,
            &batch,
            Mode::Train,
            GradPlan::of(&ctx.cfg),
        )?;
        let lrs: Vec<f64> = base
            .iter()
            .map(|&b| schedule::lr_at(&cfg.optim, b, step, cfg.train.steps))
            .collect();
        if ctx.guard(step, "model", &stats, &mut grads)? {
            apply(&mut opt, &state, &grads, &lrs)?;
        }
        meter_mem.observe(wbytes, &grads, opt.bytes() as u64);
        meter.add(&stats);
        ctx.metrics.write(json!({"kind": "train", "stage": "train", "step": step, "loss": stats.loss,
            "acc": stats.correct as f64 / stats.n as f64, "lr": schedule::lr_at(&cfg.optim, cfg.optim.lr, step, cfg.train.steps)}))?;
        if step % cfg.train.log_every == 0 || step == cfg.train.steps {
            let (msg, _) = meter.take();
            progress.update(step, &msg);
        }
        if cfg.snapshots.at_steps.contains(&step) {
            io::save_state(
                ctx.net.as_ref(),
                &state,
                &ctx.dir.join(format!("step{step}.safetensors")),
            )?;
        }
        if cfg.eval.every > 0 && step % cfg.eval.every == 0 && step < cfg.train.steps {
            let r = ctx.evaluate(&state.frozen_view(), &state.buffers)?;
            progress.println(&format!("eval @{step}: {}", r.line()));
            ctx.log_eval(step, "model", &r)?;
            ctx.select(
                step,
                &[("model", state.frozen_view(), state.buffers.clone())],
            )?;
        }
        if ctx.checkpoint_due(step)? {
            let mut w = Writer::default();
            w.net("model", ctx.net.as_ref(), &state);
            w.optimizer("opt", &opt);
            ctx.checkpoint(step, w)?;
        }
    }
    progress.finish();
    let train_secs = t0.elapsed().as_secs_f64();
    io::save_state(ctx.net.as_ref(), &state, &ctx.dir.join("model.safetensors"))?;
    let r = ctx.evaluate(&state.frozen_view(), &state.buffers)?;
    ctx.log_eval(cfg.train.steps, "model", &r)?;
    let finals = [("model", state.frozen_view(), state.buffers.clone())];
    ctx.agree_replicas(&finals)?;
    ctx.select(cfg.train.steps, &finals)?;
    ctx.summary.eval.insert("model".into(), r);
    let total = ctx.net.numel() as u64;
    let mut mem = super::memory::report(
        super::memory::Layout::Full,
        (total, 0),
        super::memory::state_tensors(opt.settings()),
        (0, 0),
        0,
    );
    mem.measured_live_peak = meter_mem.peak;
    ctx.record_training(&mem, train_secs, cfg.train.steps - start)
}
