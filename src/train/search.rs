//! The search of `auto` stage-1 settings (`stage1.unstable_ratio`, `stage1.criterion`):
//! stage 1's warm-up and ONE statistics pass serve every candidate; each distinct
//! candidate partition is then probed — the run's own first `stage1.probe_steps` steps
//! with it, through the run's method and memory machinery (LDT-S over the counterpart
//! store) — and scored on the source validation hold-out of `data.val_fraction`; no
//! target example is read. The best candidate opens the run, which from there is the
//! run with those settings fixed, bit for bit.

use super::branches::{Choice, Opening};
use super::driver::{Feed, Rates};
use super::{method, stage1, RunContext};
use crate::checkpoint::Checkpoint;
use crate::ldt::partition::Partition;
use crate::ldt::search::{candidates, choose, first_equal, ProbeResult, SearchReport};
use crate::metrics::Record;
use crate::model::NetState;
use anyhow::{bail, Context, Result};
use std::time::Instant;

/// Runs stage 1 and the search, writes `search.json` and the partition, and returns the
/// chosen partition with the network it starts from.
pub fn run(ctx: &mut RunContext) -> Result<Choice> {
    if !ctx.selecting() {
        bail!(
            "config key `data.val_fraction`: holds out no source example (too small for the \
             source domains' sizes), so the search of `auto` settings has nothing to score \
             its candidates on; raise it, e.g. to 0.1"
        );
    }
    let mut start = ctx.start_state(ctx.stage1_resume.as_ref())?;
    ctx.plan_memory(&start)?;
    let evidence = stage1::prepare(ctx, &mut start)?;
    let c = ctx.cfg.stage1.clone();
    let list = candidates(&c.criteria(), &c.ratios());
    let parts = list
        .iter()
        .map(|k| {
            evidence.partition(
                ctx.net.as_ref(),
                k.criterion,
                k.unstable_ratio,
                &ctx.cfg.ldt,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let sets: Vec<_> = parts.iter().map(|p| (&p.stable, &p.unstable)).collect();
    let same_as = first_equal(&sets);
    let distinct = same_as.iter().filter(|s| s.is_none()).count();
    let metric = match ctx.classifies() {
        true => "accuracy",
        false => "psnr_y_db",
    };
    println!(
        "search: {} candidates ({} criteria x {} ratios), {distinct} distinct partitions x \
         {} probe steps = {} steps, each scored by {metric} on {} held-out source examples",
        list.len(),
        c.criteria().len(),
        c.ratios().len(),
        c.probe_steps,
        distinct * c.probe_steps,
        ctx.val.iter().map(|(_, v)| v.len()).sum::<usize>()
    );
    ctx.stages.enter("search");
    let t0 = Instant::now();
    let mut results: Vec<ProbeResult> = Vec::with_capacity(list.len());
    let mut k = 0;
    for (i, (cand, part)) in list.iter().zip(&parts).enumerate() {
        let score = match same_as[i] {
            Some(j) => results[j].score,
            None => {
                k += 1;
                let t = Instant::now();
                let score = probe(ctx, &start, part.clone()).with_context(|| {
                    format!(
                        "search probe of criterion `{}`, unstable ratio {}",
                        cand.criterion.name(),
                        cand.unstable_ratio
                    )
                })?;
                println!(
                    "  probe {k}/{distinct}: {} @ {} ({} stable / {} unstable): {metric} {score:.4} ({:.1} s)",
                    cand.criterion.name(),
                    cand.unstable_ratio,
                    part.stable.len(),
                    part.unstable.len(),
                    t.elapsed().as_secs_f64()
                );
                score
            }
        };
        ctx.metrics.write(&Record::Probe {
            criterion: cand.criterion,
            unstable_ratio: cand.unstable_ratio,
            score: Some(score).filter(|s| s.is_finite()),
        })?;
        results.push(ProbeResult {
            candidate: *cand,
            stable: part.stable.len(),
            unstable: part.unstable.len(),
            score,
            same_as: same_as[i],
        });
    }
    ctx.stages.exit();
    ctx.summary.search_seconds = Some(t0.elapsed().as_secs_f64());
    let scores: Vec<f64> = results.iter().map(|r| r.score).collect();
    let Some(chosen) = choose(&scores) else {
        bail!(
            "search: every probe's validation score is NaN (every candidate diverged); \
             lower optim.lr or set fixed stage1.unstable_ratio and stage1.criterion"
        );
    };
    let report = SearchReport {
        metric: metric.into(),
        probe_steps: c.probe_steps,
        probes_run: distinct,
        candidates: results,
        chosen,
    };
    let pick = report.choice();
    println!(
        "search: chose {} @ {} ({metric} {:.4})",
        pick.candidate.criterion.name(),
        pick.candidate.unstable_ratio,
        pick.score
    );
    save(&ctx.dir.join("search.json"), &report)?;
    ctx.summary.search = Some(report);
    let partition = parts
        .into_iter()
        .nth(chosen)
        .expect("the chosen index is a candidate's");
    stage1::settle(ctx, &partition)?;
    Ok(Choice {
        start,
        partition,
        probe: false,
    })
}

/// The search report of the run checkpoint `ck` continues (none without `auto`
/// settings), into `summary.json`.
pub fn restore(ctx: &mut RunContext, ck: &Checkpoint) -> Result<()> {
    let Ok(v) = ck.field("search") else {
        return Ok(());
    };
    let report: SearchReport = serde_json::from_value(v.clone())
        .with_context(|| format!("checkpoint {}: unreadable search report", ck.dir.display()))?;
    ctx.summary.search = Some(report);
    ctx.summary.search_seconds = ck.field("search_seconds").ok().and_then(|v| v.as_f64());
    Ok(())
}

/// One probe: the run's first `stage1.probe_steps` steps from `start` with `partition`
/// (the run's batches, rates and method), then the score of `stage1.probe_network` on
/// the source validation hold-out. `start` is not changed.
fn probe(ctx: &mut RunContext, start: &NetState, partition: Partition) -> Result<f64> {
    let opening = Opening::Chosen(Box::new(Choice {
        start: start.deep_clone()?,
        partition,
        probe: true,
    }));
    let mut m = method::open(ctx, opening)?;
    let steps = ctx.cfg.stage1.probe_steps;
    let cfg = ctx.cfg.clone();
    let names: Vec<String> = ctx.net.params().iter().map(|s| s.name.clone()).collect();
    let rates = Rates::new(&cfg, &names);
    let mut loader = ctx.train_loader(0, steps)?;
    let mut feed = Feed::new(&mut loader, &rates);
    for step in 1..=steps {
        m.step(ctx, step, &mut feed)?;
    }
    m.finish()?;
    let mut score = f64::NAN;
    m.visit_probe(ctx.cfg.stage1.probe_network, &mut |params, buffers| {
        score = ctx.validate(params, buffers)?.unwrap_or(f64::NAN);
        Ok(())
    })?;
    Ok(score)
}

/// Writes `report` to `path` atomically.
fn save(path: &std::path::Path, report: &SearchReport) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
