//! The dual branch (`ldt`, `deft`): PM trains the stable set with the unstable set
//! frozen, AM trains the unstable set with the stable set frozen, both on the same
//! batch; every `ldt.ema_every` steps the DPU folds `~A^S <- P^S` and `~P^U <- A^U`.

use super::erm::Meter;
use super::stage1;
use super::step::{apply, gradients, GradPlan};
use super::RunContext;
use crate::checkpoint::Writer;
use crate::ldt::partition::Partition;
use crate::ldt::{composite, dpu};
use crate::metrics::Progress;
use crate::model::{io, Mode, NetState};
use crate::optim::{schedule, OptimSettings, Optimizer};
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

/// One branch: its network, its optimizer over its trained set, and that set's mask.
pub struct Branch {
    /// Weights and buffers.
    pub state: NetState,
    /// Optimizer (state only for the trained set).
    pub opt: Optimizer,
    /// Layers this branch trains.
    pub mask: Vec<bool>,
}

/// Applies the DPU exchange between two live branches.
/// `factor` scales every coefficient (the DPU warm-up; 1 = the authors' rule).
pub fn exchange(partition: &Partition, pm: &NetState, am: &NetState, factor: f64) -> Result<()> {
    for (i, l) in partition.layers.iter().enumerate() {
        if partition.is_stable(i) {
            crate::offload::backend::fold_live(
                am.params[i].as_tensor(),
                pm.params[i].as_tensor(),
                l.coefficient * factor,
            )?;
        } else {
            crate::offload::backend::fold_live(
                pm.params[i].as_tensor(),
                am.params[i].as_tensor(),
                l.coefficient * factor,
            )?;
        }
    }
    Ok(())
}

/// Evaluates the composite (and each branch with `eval.branches`) and logs it.
fn evaluate(
    ctx: &mut RunContext,
    step: usize,
    partition: &Partition,
    pm: &NetState,
    am: &NetState,
    last: bool,
) -> Result<String> {
    let cp = composite::params(partition, pm, am);
    let r = ctx.evaluate(&cp, &pm.buffers)?;
    ctx.log_eval(step, "composite", &r)?;
    let nets = [
        ("composite", cp, pm.buffers.clone()),
        ("pm", pm.frozen_view(), pm.buffers.clone()),
        ("am", am.frozen_view(), am.buffers.clone()),
    ];
    if last {
        ctx.agree_replicas(&nets)?;
    }
    ctx.select(step, &nets)?;
    let line = r.line();
    if last {
        ctx.summary.eval.insert("composite".into(), r);
    }
    if ctx.cfg.eval.branches || last {
        for (name, s) in [("pm", pm), ("am", am)] {
            let r = ctx.evaluate(&s.frozen_view(), &s.buffers)?;
            ctx.log_eval(step, name, &r)?;
            if last {
                ctx.summary.eval.insert(name.into(), r);
            }
        }
    }
    Ok(line)
}

/// Runs stage 1 and the resident dual branch, writing the snapshots, `pm`, `am` and
/// `composite` safetensors.
pub fn train(ctx: &mut RunContext) -> Result<()> {
    let cfg = ctx.cfg.clone();
    let n = ctx.net.params().len();
    let settings = OptimSettings::from(&cfg.optim);
    let (partition, mut pm, mut am, done) = match ctx.take_resume()? {
        Some(ck) => {
            let partition = super::single::resume_partition(ctx, &ck)?;
            let net = ctx.net.as_ref();
            let pm = Branch {
                state: ck.net("pm", net)?,
                opt: ck.optimizer("opt_p", settings.clone(), n)?,
                mask: partition.stable_mask(),
            };
            let am = Branch {
                state: ck.net("am", net)?,
                opt: ck.optimizer("opt_a", settings, n)?,
                mask: partition.unstable_mask(),
            };
            (partition, pm, am, ck.step)
        }
        None => {
            let mut start = ctx.initial_state()?;
            let partition = stage1::run(ctx, &mut start)?;
            let pm = Branch {
                state: start.deep_clone()?,
                opt: Optimizer::new(settings.clone(), n),
                mask: partition.stable_mask(),
            };
            let am = Branch {
                state: start,
                opt: Optimizer::new(settings, n),
                mask: partition.unstable_mask(),
            };
            (partition, pm, am, 0)
        }
    };
    ctx.agree_partition(&partition)?;
    ctx.report_lag(&partition, None)?;
    let names: Vec<String> = ctx.net.params().iter().map(|s| s.name.clone()).collect();
    let base = schedule::layer_lrs(&cfg.optim, &names);
    let mut loader = ctx.train_loader(done, cfg.train.steps - done)?;
    let progress = Progress::new(
        cfg.train.method.name(),
        cfg.train.steps,
        cfg.train.log_every,
    );
    let mut meter = Meter::default();
    let mut meter_mem = super::memory::LiveMeter::default();
    let wbytes = 2 * super::memory::weight_bytes(&pm.state);
    let mut live_opt = [0u64; 2];
    let t0 = Instant::now();
    for step in done + 1..=cfg.train.steps {
        let hb = loader.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let lrs: Vec<f64> = base
            .iter()
            .map(|&b| schedule::lr_at(&cfg.optim, b, step, cfg.train.steps))
            .collect();
        let mut losses = [0f32; 2];
        for (k, br) in [&mut pm, &mut am].into_iter().enumerate() {
            let (stats, mut grads) = gradients(
                ctx.net.as_ref(),
                &mut br.state,
                &br.mask,
                &batch,
                Mode::Train,
                GradPlan::of(&ctx.cfg),
            )?;
            if ctx.guard(step, ["pm", "am"][k], &stats, &mut grads)? {
                apply(&mut br.opt, &br.state, &grads, &lrs)?;
            }
            live_opt[k] = br.opt.bytes() as u64;
            meter_mem.observe(wbytes, &grads, live_opt[0] + live_opt[1]);
            losses[k] = stats.loss;
            if k == 0 {
                meter.add(&stats);
            }
        }
        if step % cfg.ldt.ema_every == 0 {
            let factor = dpu::warmup_factor(&cfg.ldt, step / cfg.ldt.ema_every);
            exchange(&partition, &pm.state, &am.state, factor)?;
        }
        ctx.metrics.write(json!({"kind": "train", "stage": "train", "step": step, "loss_pm": losses[0], "loss_am": losses[1],
            "lr": schedule::lr_at(&cfg.optim, cfg.optim.lr, step, cfg.train.steps)}))?;
        if step % cfg.train.log_every == 0 || step == cfg.train.steps {
            progress.update(step, &meter.take().0);
        }
        if cfg.snapshots.at_steps.contains(&step) {
            io::save_state(
                ctx.net.as_ref(),
                &pm.state,
                &ctx.dir.join(format!("step{step}_pm.safetensors")),
            )?;
            io::save_state(
                ctx.net.as_ref(),
                &am.state,
                &ctx.dir.join(format!("step{step}_am.safetensors")),
            )?;
        }
        if cfg.eval.every > 0 && step % cfg.eval.every == 0 && step < cfg.train.steps {
            let line = evaluate(ctx, step, &partition, &pm.state, &am.state, false)?;
            progress.println(&format!("eval @{step}: composite {line}"));
        }
        if ctx.checkpoint_due(step)? {
            let mut w = Writer::default();
            w.net("pm", ctx.net.as_ref(), &pm.state);
            w.net("am", ctx.net.as_ref(), &am.state);
            w.optimizer("opt_p", &pm.opt);
            w.optimizer("opt_a", &am.opt);
            w.meta("partition", serde_json::to_value(&partition)?);
            ctx.checkpoint(step, w)?;
        }
    }
    progress.finish();
    let train_secs = t0.elapsed().as_secs_f64();
    let net = ctx.net.as_ref();
    io::save_state(net, &pm.state, &ctx.dir.join("pm.safetensors"))?;
    io::save_state(net, &am.state, &ctx.dir.join("am.safetensors"))?;
    io::save_tensors(
        &composite::named(net, &partition, &pm.state, &am.state),
        &ctx.dir.join("composite.safetensors"),
    )?;
    evaluate(ctx, cfg.train.steps, &partition, &pm.state, &am.state, true)?;
    let numel = |m: &[bool]| -> u64 {
        ctx.net
            .params()
            .iter()
            .zip(m)
            .filter(|(_, t)| **t)
            .map(|(s, _)| s.numel() as u64)
            .sum()
    };
    let (s, u) = (numel(&pm.mask), numel(&am.mask));
    let mut mem = super::memory::report(
        super::memory::Layout::Resident,
        (s, u),
        super::memory::state_tensors(pm.opt.settings()),
        (0, 0),
        0,
    );
    mem.measured_live_peak = meter_mem.peak;
    ctx.record_training(&mem, train_secs, cfg.train.steps - done)
}
