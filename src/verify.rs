//! `ldt verify-model`: one network's outputs next to a reference computed elsewhere
//! (the PyTorch fixtures under `shared/fixtures/backbones/`).
//!
//! From a weights file and an input file (`input` `[B,C,H,W]` f32, `labels` `[B]` i64)
//! it computes, with the fixture's key names: `logits_eval` (eval mode), `logits_train`
//! (train mode, from the same weights), `loss_train` (mean cross-entropy, `[1]`),
//! `grad.<param>` (every parameter trainable) and `after_train_forward.<bn>.running_mean`
//! / `running_var` (BatchNorm buffers after that one train forward). Each output that the
//! input file also holds is compared per tensor: `max|a - ref|`, that divided by
//! `max|ref|` ("scaled") and `||a - ref|| / ||ref||` ("rel-L2").

use crate::config::{Config, ModelConfig};
use crate::model::{self, io, layers, Mode, NetState, Network};
use crate::rng::Rng;
use crate::train::run::streams;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// The kinds of outputs, in report order.
pub const KINDS: [&str; 5] = [
    "logits_eval",
    "logits_train",
    "loss_train",
    "grad",
    "after_train_forward",
];

/// The kind of an output key (`grad.x` -> `grad`).
pub fn kind_of(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

/// How far one computed tensor lies from its reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Deviation {
    /// Output key, e.g. `grad.layer1.0.conv1.weight`.
    pub name: String,
    /// `max|a - ref|`.
    pub max_abs: f64,
    /// `max|a - ref| / max|ref|`.
    pub scaled: f64,
    /// `||a - ref||_2 / ||ref||_2`.
    pub rel_l2: f64,
}

/// The worst tensors of one kind.
#[derive(Clone, Debug, PartialEq)]
pub struct KindSummary {
    /// One of [`KINDS`].
    pub kind: String,
    /// Tensors compared.
    pub count: usize,
    /// Largest scaled deviation and its tensor.
    pub worst_scaled: (f64, String),
    /// Largest rel-L2 deviation and its tensor.
    pub worst_rel_l2: (f64, String),
    /// Largest absolute deviation (the loss is judged by it).
    pub worst_abs: f64,
}

/// The outcome of one verification.
#[derive(Debug)]
pub struct Report {
    /// Every computed output, fixture key names, in report order.
    pub outputs: Vec<(String, Tensor)>,
    /// One entry per output that the reference file also holds.
    pub deviations: Vec<Deviation>,
    /// rel-L2 of all gradients concatenated (when the reference has every gradient).
    pub grads_concat_rel_l2: Option<f64>,
    /// Reference keys of a compared kind that the model does not produce, and shape
    /// mismatches: the model's names or layouts differ from the reference's.
    pub problems: Vec<String>,
}

impl Report {
    /// Worst deviations per kind, in [`KINDS`] order (kinds without a reference omitted).
    pub fn summary(&self) -> Vec<KindSummary> {
        KINDS
            .iter()
            .filter_map(|&kind| {
                let devs: Vec<&Deviation> = self
                    .deviations
                    .iter()
                    .filter(|d| kind_of(&d.name) == kind)
                    .collect();
                let first = devs.first()?;
                let mut s = KindSummary {
                    kind: kind.into(),
                    count: devs.len(),
                    worst_scaled: (first.scaled, first.name.clone()),
                    worst_rel_l2: (first.rel_l2, first.name.clone()),
                    worst_abs: first.max_abs,
                };
                for d in &devs[1..] {
                    if d.scaled > s.worst_scaled.0 {
                        s.worst_scaled = (d.scaled, d.name.clone());
                    }
                    if d.rel_l2 > s.worst_rel_l2.0 {
                        s.worst_rel_l2 = (d.rel_l2, d.name.clone());
                    }
                    s.worst_abs = s.worst_abs.max(d.max_abs);
                }
                Some(s)
            })
            .collect()
    }

    /// The deviation of output `name`, if it was compared.
    pub fn deviation(&self, name: &str) -> Option<&Deviation> {
        self.deviations.iter().find(|d| d.name == name)
    }

    /// The per-kind table printed by `ldt verify-model`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<20} {:>7} {:>10} {:>10}  {:<44} {:>10}  worst rel-L2 tensor",
            "kind", "tensors", "max abs", "scaled", "worst scaled tensor", "rel-L2"
        );
        for s in self.summary() {
            let _ = writeln!(
                out,
                "{:<20} {:>7} {:>10.3e} {:>10.3e}  {:<44} {:>10.3e}  {}",
                s.kind,
                s.count,
                s.worst_abs,
                s.worst_scaled.0,
                s.worst_scaled.1,
                s.worst_rel_l2.0,
                s.worst_rel_l2.1
            );
        }
        if let Some(r) = self.grads_concat_rel_l2 {
            let _ = writeln!(out, "all gradients concatenated: rel-L2 {r:.3e}");
        }
        out
    }
}

/// The model settings of `verify-model`: the defaults, `model.arch = arch`, then the
/// `--set model.key=value` overrides (any other section is refused).
pub fn model_config(arch: &str, set: &[String]) -> Result<ModelConfig> {
    if !crate::config::ARCHS.contains(&arch) {
        bail!(
            "--arch `{arch}`: unknown architecture; allowed: {}",
            crate::config::ARCHS.join(", ")
        );
    }
    let mut overrides = vec![format!("model.arch={arch}")];
    for s in set {
        let key = s.split('=').next().unwrap_or("").trim();
        if !key.starts_with("model.") || key == "model.arch" {
            bail!(
                "--set `{s}`: verify-model takes only model.* keys (the architecture from --arch)"
            );
        }
        overrides.push(s.clone());
    }
    Ok(Config::from_toml("", "verify-model", &overrides)?.model)
}

/// The class count of the head: `model.num_classes`, else the rows of the weights
/// file's head weight.
fn head_classes(
    cfg: &ModelConfig,
    input: [usize; 3],
    weights: &HashMap<String, Tensor>,
) -> Result<usize> {
    if let Some(k) = cfg.num_classes {
        return Ok(k);
    }
    let probe = model::build(cfg, input, 1)?;
    for prefix in probe.head_prefixes() {
        if let Some(t) = weights.get(&format!("{prefix}weight")) {
            return Ok(t.dim(0)?);
        }
    }
    bail!(
        "the weights hold no `{}weight` to take the class count from; set --set model.num_classes=K",
        probe.head_prefixes().join("|")
    )
}

/// Every output of `net` at `state` on `(x, y)`, with the fixture's key names. The
/// state's buffers end as after the train forward.
pub fn compute(
    net: &dyn Network,
    state: &mut NetState,
    x: &Tensor,
    y: &Tensor,
) -> Result<Vec<(String, Tensor)>> {
    let mut scratch = state.buffers.clone();
    let logits_eval = net.forward(&state.frozen_view(), &mut scratch, x, Mode::Eval)?;
    let view = state.view(&vec![true; net.params().len()]);
    let logits_train = net.forward(&view, &mut state.buffers, x, Mode::Train)?;
    let loss = layers::cross_entropy(&logits_train, y)?;
    let grads = loss.backward()?;
    let mut out = vec![
        ("logits_eval".to_string(), logits_eval),
        ("logits_train".to_string(), logits_train.detach()),
        ("loss_train".to_string(), loss.detach().reshape(1)?),
    ];
    for (spec, v) in net.params().iter().zip(&state.params) {
        let g = match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like()?,
        };
        out.push((format!("grad.{}", spec.name), g));
    }
    for (spec, b) in net.buffers().iter().zip(&state.buffers) {
        if spec.name.ends_with(".running_mean") || spec.name.ends_with(".running_var") {
            out.push((format!("after_train_forward.{}", spec.name), b.clone()));
        }
    }
    Ok(out)
}

/// Flat f64 values of a tensor.
fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// The deviation of `got` from `want` (same number of elements).
pub fn deviation(name: &str, got: &[f64], want: &[f64]) -> Deviation {
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let max_abs = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    let diff2: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let ref2: f64 = want.iter().map(|v| v * v).sum();
    Deviation {
        name: name.into(),
        max_abs,
        scaled: max_abs / max_ref.max(f64::MIN_POSITIVE),
        rel_l2: (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt(),
    }
}

/// Compares `outputs` with the tensors of `reference` that share their names.
pub fn compare(
    outputs: &[(String, Tensor)],
    reference: &HashMap<String, Tensor>,
) -> Result<Report> {
    let mut deviations = Vec::new();
    let mut problems = Vec::new();
    let (mut d2, mut r2, mut grads_seen) = (0f64, 0f64, 0usize);
    for (name, t) in outputs {
        let Some(r) = reference.get(name) else {
            continue;
        };
        if r.dims() != t.dims() {
            problems.push(format!(
                "`{name}`: computed shape {:?}, reference shape {:?}",
                t.dims(),
                r.dims()
            ));
            continue;
        }
        let (a, b) = (values(t)?, values(r)?);
        if kind_of(name) == "grad" {
            grads_seen += 1;
            d2 += a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
            r2 += b.iter().map(|y| y * y).sum::<f64>();
        }
        deviations.push(deviation(name, &a, &b));
    }
    let mut unmatched: Vec<&String> = reference
        .keys()
        .filter(|k| KINDS.contains(&kind_of(k)) && !outputs.iter().any(|(n, _)| n == *k))
        .collect();
    unmatched.sort();
    for k in unmatched {
        problems.push(format!(
            "reference `{k}` has no counterpart in the model's outputs"
        ));
    }
    let grads_total = outputs.iter().filter(|(n, _)| kind_of(n) == "grad").count();
    let grads_concat_rel_l2 = (grads_seen > 0 && grads_seen == grads_total)
        .then(|| (d2 / r2.max(f64::MIN_POSITIVE)).sqrt());
    Ok(Report {
        outputs: outputs.to_vec(),
        deviations,
        grads_concat_rel_l2,
        problems,
    })
}

/// The whole command: loads `weights` into the model `cfg` sized by `input`'s tensor,
/// computes every output, writes them to `out` and compares them with `input`'s
/// reference tensors. A head re-initialized by `model.reset_head` uses seed 0.
pub fn run(cfg: &ModelConfig, weights: &Path, input: &Path, out: &Path) -> Result<Report> {
    let dev = Device::Cpu;
    let io_file = io::read_safetensors(input, &dev).context("--input")?;
    let x = io_file
        .get("input")
        .with_context(|| format!("{} has no `input` tensor", input.display()))?
        .to_dtype(DType::F32)?;
    let y = io_file
        .get("labels")
        .with_context(|| format!("{} has no `labels` tensor", input.display()))?
        .to_dtype(DType::I64)?;
    let (b, c, h, w) = x
        .dims4()
        .with_context(|| format!("{}: `input` must be [B,C,H,W]", input.display()))?;
    if y.dims() != [b] {
        bail!(
            "{}: `labels` has shape {:?}, `input` needs [{b}]",
            input.display(),
            y.dims()
        );
    }
    let shape = [c, h, w];
    let wmap = io::read_safetensors(weights, &dev).context("--weights")?;
    let classes = head_classes(cfg, shape, &wmap)?;
    drop(wmap);
    let net = model::build(cfg, shape, classes)?;
    let mut state = if cfg.reset_head {
        io::load_state_reset_head(net.as_ref(), weights, &dev, &mut Rng::new(0, streams::INIT))
    } else {
        io::load_state(net.as_ref(), weights, &dev)
    }
    .context("--weights")?;
    let outputs = compute(net.as_ref(), &mut state, &x, &y)?;
    io::save_tensors(&outputs, out).with_context(|| format!("--out {}", out.display()))?;
    compare(&outputs, &io_file)
}
