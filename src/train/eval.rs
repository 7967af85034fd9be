//! Evaluation: accuracy and mean loss per domain (source domains on their test split,
//! target domains on all their examples), with the source and target means.

use crate::data::{Benchmark, Role};
use crate::model::{layers, Mode, Network};
use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Score of one domain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DomainScore {
    /// Domain name.
    pub name: String,
    /// `source` or `target`.
    pub role: String,
    /// Accuracy in [0, 1].
    pub acc: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Examples scored.
    pub n: usize,
}

/// Scores of one network on all domains.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// Per domain, manifest order.
    pub domains: Vec<DomainScore>,
    /// Mean accuracy over source domains.
    pub source_acc: f64,
    /// Mean accuracy over target domains (NaN when there are none).
    pub target_acc: f64,
}

impl EvalReport {
    /// One line: source mean, target mean (when there are target domains), each domain.
    pub fn line(&self) -> String {
        let mut s = format!("source {:.4}", self.source_acc);
        if !self.target_acc.is_nan() {
            s.push_str(&format!("  target {:.4}", self.target_acc));
        }
        s.push_str(" |");
        for d in &self.domains {
            s.push_str(&format!(" {} {:.4}", d.name, d.acc));
        }
        s
    }
}

/// Evaluates a network given its parameters and buffers (eval mode, nothing changes).
pub fn evaluate(
    net: &dyn Network,
    params: &[Tensor],
    buffers: &[Tensor],
    bench: &Benchmark,
    batch: usize,
    device: &Device,
) -> Result<EvalReport> {
    let shape = net.input_shape();
    let image_len: usize = shape.iter().product();
    let mut domains = Vec::new();
    for d in &bench.domains {
        // Target domains are never trained on: all their examples are scored (train and
        // test splits, as DomainBed and the authors' script do); sources use their test split.
        let splits = match d.role {
            Role::Source => vec![d.test.clone()],
            Role::Target => vec![d.train.clone(), d.test.clone()],
        };
        let pool = crate::data::dataset::Pool::new(splits);
        let (mut correct, mut loss) = (0usize, 0f64);
        let idx: Vec<usize> = (0..pool.len()).collect();
        for chunk in idx.chunks(batch) {
            let hb = pool.gather(chunk, image_len)?;
            let (x, y) = hb.to_tensors(shape, device)?;
            let mut bufs = buffers.to_vec();
            let logits = net.forward(params, &mut bufs, &x, Mode::Eval)?;
            let (c, l) = layers::correct_and_loss_sum(&logits, &y)?;
            correct += c;
            loss += l;
        }
        let n = pool.len();
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
