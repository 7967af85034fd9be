//! Evaluation: accuracy and mean loss per domain (source domains on their test split,
//! target domains on all their examples), with the source and target means.

use crate::data::loader::{BatchOrder, Plan};
use crate::data::{Benchmark, Loader, Role};
use crate::metrics::{DomainScore, EvalReport};
use crate::model::{layers, Mode, Network, Weights};
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Evaluates a network given its parameters and buffers (eval mode, nothing changes).
pub fn evaluate(
    net: &dyn Network,
    params: &Weights<'_>,
    buffers: &[Tensor],
    bench: &Benchmark,
    batch: usize,
    device: &Device,
) -> Result<EvalReport> {
    let shape = net.input_shape();
    let mut domains = Vec::new();
    for d in &bench.domains {
        // Target domains are never trained on: all their examples are scored (train and
        // test splits, as DomainBed and the authors' script do); sources use their test split.
        let splits = match d.role {
            Role::Source => vec![d.test.clone()],
            Role::Target => vec![d.train.clone(), d.test.clone()],
        };
        let pool = bench.pool(splits);
        let (mut correct, mut loss) = (0usize, 0f64);
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
        for _ in 0..n.div_ceil(batch) {
            let hb = loader.next_batch()?;
            let (x, y) = hb.to_tensors(shape, device)?;
            let mut bufs = buffers.to_vec();
            let logits = params.forward(net, &mut bufs, &x, Mode::Eval)?;
            let (c, l) = layers::correct_and_loss_sum(&logits, &y)?;
            correct += c;
            loss += l;
        }
        domains.push(DomainScore {
            name: d.name.clone(),
            role: match d.role {
                Role::Source => "source".into(),
                Role::Target => "target".into(),
            },
            acc: correct as f64 / n as f64,
            loss: loss / n as f64,
            n,
        });
    }
    let mean = |role: &str| {
        let v: Vec<f64> = domains
            .iter()
            .filter(|d| d.role == role)
            .map(|d| d.acc)
            .collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(EvalReport {
        source_acc: mean("source"),
        target_acc: mean("target"),
        domains,
    })
}
