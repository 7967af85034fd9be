//! The partition of all layers into the stable set S and the unstable set U, with the
//! DPU coefficient of each layer, and the partition report (`partition.json`).

use super::stats::LayerStats;
use crate::config::{Criterion, Dpu, LdtConfig};
use crate::model::Network;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which set a layer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Set {
    /// Trained by PM (phase P); its frozen copy lives in AM.
    Stable,
    /// Trained by AM (phase A); its frozen copy lives in PM.
    Unstable,
}

impl Set {
    /// `stable` or `unstable` (as in `partition.json`).
    pub fn name(self) -> &'static str {
        match self {
            Set::Stable => "stable",
            Set::Unstable => "unstable",
        }
    }
}

/// A branch of LDT, named by the phase in which it trains: PM (phase P) trains the
/// stable set with the unstable set frozen, AM (phase A) the unstable set with the stable
/// set frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// PM: trains the stable set.
    P,
    /// AM: trains the unstable set.
    A,
}

impl Phase {
    /// The set this branch trains.
    pub fn trains(self) -> Set {
        match self {
            Phase::P => Set::Stable,
            Phase::A => Set::Unstable,
        }
    }

    /// The branch's name in files, logs and records (`pm`, `am`).
    pub fn branch(self) -> &'static str {
        match self {
            Phase::P => "pm",
            Phase::A => "am",
        }
    }
}

/// One row of the partition report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Parameter name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements.
    pub numel: usize,
    /// Gradient statistics (absent for the `names` criterion without statistics).
    pub stats: Option<LayerStats>,
    /// The value sorted by the criterion.
    #[serde(with = "super::stats::non_finite")]
    pub score: f64,
    /// Set.
    pub set: Set,
    /// Position in the ascending order over all layers.
    pub rank: usize,
    /// Position in the ascending order inside its set.
    pub index_in_set: usize,
    /// Size of its set.
    pub set_size: usize,
    /// DPU EMA coefficient `w` of this layer.
    pub coefficient: f64,
}

/// What a partition is ranked by: the criterion's per-layer scores (ascending = more
/// stable) and where they came from.
#[derive(Clone, Copy, Debug)]
pub struct Ranking<'a> {
    /// Criterion.
    pub criterion: Criterion,
    /// Requested unstable fraction.
    pub unstable_ratio: f64,
    /// Per-layer statistics, when a statistics pass ran.
    pub stats: Option<&'a [LayerStats]>,
    /// Per-layer scores in model order.
    pub scores: &'a [f64],
    /// Statistics batches used.
    pub stat_batches: usize,
}

/// The result of stage 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    /// Criterion used.
    pub criterion: Criterion,
    /// Requested unstable fraction.
    pub unstable_ratio: f64,
    /// Statistics batches used (0 when none were needed).
    pub stat_batches: usize,
    /// Per layer, in model order.
    pub layers: Vec<LayerReport>,
    /// Stable layer names, ascending by score.
    pub stable: Vec<String>,
    /// Unstable layer names, ascending by score.
    pub unstable: Vec<String>,
}

/// Size of the stable set: `floor(N * (1 - ratio) + 1e-9)` (the small term keeps e.g.
/// N = 10, ratio 0.3 at 7 despite binary rounding).
pub fn stable_count(n: usize, unstable_ratio: f64) -> usize {
    ((n as f64 * (1.0 - unstable_ratio) + 1e-9).floor() as usize).min(n)
}

/// Indices sorted by score ascending, ties by model order.
pub fn ascending(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    idx
}

/// DPU coefficient of position `i` in a set of `n`: `base + slope * i / n` (f64).
pub fn dpu_coefficient(base: f64, slope: f64, i: usize, n: usize) -> f64 {
    base + slope * i as f64 / n as f64
}

impl Partition {
    /// Builds the partition from per-layer scores (ascending = more stable) given the
    /// sets as ascending index lists, and assigns the DPU coefficients.
    pub fn from_sets(
        net: &dyn Network,
        src: &Ranking<'_>,
        stable: Vec<usize>,
        unstable: Vec<usize>,
        ldt: &LdtConfig,
    ) -> Partition {
        let Ranking {
            criterion,
            unstable_ratio,
            stats,
            scores,
            stat_batches,
        } = *src;
        let order = ascending(scores);
        let mut rank = vec![0; scores.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        let mut layers: Vec<Option<LayerReport>> = vec![None; scores.len()];
        for (set, members, base, slope) in [
            (Set::Stable, &stable, ldt.stable_base, ldt.stable_slope),
            (
                Set::Unstable,
                &unstable,
                ldt.unstable_base,
                ldt.unstable_slope,
            ),
        ] {
            for (k, &i) in members.iter().enumerate() {
                let spec = &net.params()[i];
                let coefficient = match ldt.dpu {
                    Dpu::Rank => dpu_coefficient(base, slope, k, members.len()),
                    Dpu::Fixed => ldt.fixed_w,
                };
                layers[i] = Some(LayerReport {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    numel: spec.numel(),
                    stats: stats.map(|s| s[i]),
                    score: scores[i],
                    set,
                    rank: rank[i],
                    index_in_set: k,
                    set_size: members.len(),
                    coefficient,
                });
            }
        }
        let name = |i: &usize| net.params()[*i].name.clone();
        Partition {
            criterion,
            unstable_ratio,
            stat_batches,
            layers: layers
                .into_iter()
                .map(|l| l.expect("every layer is in one set"))
                .collect(),
            stable: stable.iter().map(name).collect(),
            unstable: unstable.iter().map(name).collect(),
        }
    }

    /// Splits by score: the lowest `stable_count` layers are stable.
    pub fn by_score(net: &dyn Network, src: &Ranking<'_>, ldt: &LdtConfig) -> Result<Partition> {
        let (criterion, scores) = (src.criterion, src.scores);
        if let Some(i) = scores.iter().position(|s| s.is_nan()) {
            bail!(
                "stage 1: criterion `{criterion:?}` of layer `{}` is NaN (its gradient was non-finite or constant); check the data and the warm-up",
                net.params()[i].name
            );
        }
        let order = ascending(scores);
        let ns = stable_count(order.len(), src.unstable_ratio);
        let (s, u) = order.split_at(ns);
        Ok(Self::from_sets(net, src, s.to_vec(), u.to_vec(), ldt))
    }

    /// The `names` criterion: U = layers matching `unstable` prefixes (default: the
    /// head), S = those matching `stable` prefixes (default: every other layer). Inside
    /// a set, layers keep model order.
    pub fn by_names(
        net: &dyn Network,
        stable: &[String],
        unstable: &[String],
        ldt: &LdtConfig,
    ) -> Result<Partition> {
        let head = net.head_prefixes();
        let unstable = if unstable.is_empty() { &head } else { unstable };
        let (mut s, mut u) = (Vec::new(), Vec::new());
        for (i, p) in net.params().iter().enumerate() {
            let in_u = unstable.iter().any(|x| p.name.starts_with(x));
            let in_s = stable.is_empty() || stable.iter().any(|x| p.name.starts_with(x));
            match (in_s && !in_u, in_u) {
                (_, true) if !stable.is_empty() && stable.iter().any(|x| p.name.starts_with(x)) => bail!(
                    "config keys `stage1.stable_names` and `stage1.unstable_names` both match layer `{}`",
                    p.name
                ),
                (_, true) => u.push(i),
                (true, false) => s.push(i),
                (false, false) => bail!(
                    "config key `stage1.stable_names`: layer `{}` matches neither stable nor unstable names",
                    p.name
                ),
            }
        }
        let scores: Vec<f64> = (0..net.params().len()).map(|i| i as f64).collect();
        let ratio = u.len() as f64 / scores.len().max(1) as f64;
        let src = Ranking {
            criterion: Criterion::Names,
            unstable_ratio: ratio,
            stats: None,
            scores: &scores,
            stat_batches: 0,
        };
        Ok(Self::from_sets(net, &src, s, u, ldt))
    }

    /// Layer `i` is in the stable set.
    pub fn is_stable(&self, i: usize) -> bool {
        self.layers[i].set == Set::Stable
    }

    /// Mask of the layers that branch `phase` trains.
    pub fn mask(&self, phase: Phase) -> Vec<bool> {
        let set = phase.trains();
        self.layers.iter().map(|l| l.set == set).collect()
    }

    /// Parameter elements of the stable and of the unstable set.
    pub fn set_numel(&self) -> (u64, u64) {
        let sum = |set: Set| -> u64 {
            self.layers
                .iter()
                .filter(|l| l.set == set)
                .map(|l| l.numel as u64)
                .sum()
        };
        (sum(Set::Stable), sum(Set::Unstable))
    }

    /// Writes the report as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Reads a report and checks that it names exactly the model's layers.
    pub fn load(path: &Path, net: &dyn Network) -> Result<Partition> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read partition file {} (`stage1.partition`)",
                path.display()
            )
        })?;
        let p: Partition = serde_json::from_str(&text).with_context(|| {
            format!(
                "partition file {} is not a partition report",
                path.display()
            )
        })?;
        let names: Vec<&str> = net.params().iter().map(|s| s.name.as_str()).collect();
        let got: Vec<&str> = p.layers.iter().map(|l| l.name.as_str()).collect();
        if names != got {
            let diff = names
                .iter()
                .zip(&got)
                .position(|(a, b)| a != b)
                .unwrap_or(names.len().min(got.len()));
            let show = |v: &[&str]| {
                v.get(diff)
                    .map_or("nothing".to_string(), |s| format!("`{s}`"))
            };
            bail!(
                "partition file {} was made for other layers than model `{}` has (layer {diff}: the file has {}, the model {}); rerun `ldt stats` for this model",
                path.display(),
                net.arch(),
                show(&got),
                show(&names)
            );
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_count_edges() {
        assert_eq!(stable_count(10, 0.3), 7);
        assert_eq!(stable_count(6, 0.5), 3);
        assert_eq!(stable_count(5, 0.0), 5);
        assert_eq!(stable_count(5, 1.0), 0);
        assert_eq!(stable_count(1, 0.5), 0);
        assert_eq!(stable_count(1, 0.4), 0);
        assert_eq!(stable_count(1, 0.0), 1);
    }

    #[test]
    fn ties_keep_model_order() {
        assert_eq!(ascending(&[1.0, 0.5, 1.0, 0.5]), vec![1, 3, 0, 2]);
    }

    #[test]
    fn coefficients_follow_rank() {
        assert_eq!(dpu_coefficient(0.99, 0.01, 0, 3), 0.99);
        assert_eq!(
            dpu_coefficient(0.999, 0.001, 2, 4),
            0.999 + 0.001 * 2.0 / 4.0
        );
    }
}
