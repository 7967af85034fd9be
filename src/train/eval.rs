//! Evaluation per domain, with the source and target means: accuracy and mean loss for
//! classification (source domains on their test split, target domains on all their
//! examples); for super-resolution PSNR and SSIM on every domain's test split (its
//! training images are never scored: a benchmark's test photographs are its own).

use crate::config::Task;
use crate::data::loader::{BatchOrder, Plan};
use crate::data::prep::upscale_bicubic;
use crate::data::{Benchmark, Loader, Role};
use crate::metrics::EvalReport;
use crate::model::{Mode, Network, Weights};
use crate::task::{self, Scoring, Tally};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// Evaluates a network given its parameters and buffers (eval mode, nothing changes),
/// scored as `scoring` says.
pub fn evaluate(
    net: &dyn Network,
    params: &Weights<'_>,
    buffers: &[Tensor],
    bench: &Benchmark,
    (batch, scoring): (usize, &Scoring),
    device: &Device,
) -> Result<EvalReport> {
    let mut forward = |x: &Tensor| {
        let mut bufs = buffers.to_vec();
        params.forward(net, &mut bufs, x, Mode::Eval)
    };
    score(bench, (batch, scoring), device, &mut forward)
}

/// The scores of bicubic upsampling (PIL's) on super-resolution data: the baseline in
/// every table beside the networks'.
pub fn bicubic(
    bench: &Benchmark,
    (batch, scoring): (usize, &Scoring),
    device: &Device,
) -> Result<EvalReport> {
    let scale = bench
        .scale
        .context("bicubic upsampling is the baseline of super-resolution data only")?;
    let shape = bench.shape();
    let mut upscale = |x: &Tensor| -> Result<Tensor> {
        let n = x.dim(0)?;
        let px = x.flatten_all()?.to_vec1::<f32>()?;
        let per: usize = shape.iter().product();
        let up: Vec<f32> = px
            .chunks_exact(per)
            .flat_map(|img| upscale_bicubic(img, shape, scale))
            .collect();
        let [c, h, w] = shape;
        Ok(Tensor::from_vec(up, (n, c, h * scale, w * scale), device)?)
    };
    score(bench, (batch, scoring), device, &mut upscale)
}

/// Scores the outputs `predict` gives for each domain's evaluated examples.
fn score(
    bench: &Benchmark,
    (batch, scoring): (usize, &Scoring),
    device: &Device,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<EvalReport> {
    let shape = bench.shape();
    let mut domains = Vec::new();
    for d in &bench.domains {
        // Target domains are never trained on: all their examples are scored (train and
        // test splits, as DomainBed and the authors' script do); sources use their test
        // split, as does every super-resolution domain.
        let splits = match (d.role, bench.task) {
            (Role::Target, Task::Classification) => vec![d.train.clone(), d.test.clone()],
            _ => vec![d.test.clone()],
        };
        let pool = bench.pool(splits);
        let idx: Vec<usize> = (0..pool.len()).collect();
        let chunks: Vec<Vec<usize>> = idx.chunks(batch).map(<[usize]>::to_vec).collect();
        let plan = Plan {
            stage: None,
            first: 0,
            count: chunks.len(),
            workers: bench.workers,
            depth: 2,
        };
        let n = pool.len();
        let mut loader = Loader::spawn(pool, BatchOrder::fixed(chunks), plan)?;
        let mut tally = Tally::default();
        for _ in 0..n.div_ceil(batch) {
            let hb = loader.next_batch()?;
            let (x, y) = hb.to_tensors(shape, device)?;
            tally.add(scoring, &predict(&x)?, &y)?;
        }
        let role = match d.role {
            Role::Source => "source",
            Role::Target => "target",
        };
        domains.push(tally.score(scoring, &d.name, role));
    }
    Ok(task::report(domains))
}
