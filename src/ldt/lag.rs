//! The composite's lag made visible: the composite is built only from the EMA-fed frozen
//! copies, so a layer folded with coefficient `w` every `ema_every` steps follows its
//! trained copy with a half-life of `ema_every * ln 0.5 / ln w` steps. With the authors'
//! unstable coefficients (~0.999) that is ~7,000 steps: a short run exports a composite
//! whose unstable layers (often the new head) are still nearly their starting values.

use super::dpu::half_life;
use super::partition::{Partition, Set};
use crate::config::Config;
use serde::{Deserialize, Serialize};

/// Half-lives of one set, in steps of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetLag {
    /// The set.
    pub set: Set,
    /// Layers in the set.
    pub layers: usize,
    /// Shortest half-life in run steps.
    pub min_half_life: f64,
    /// Longest half-life in run steps.
    pub max_half_life: f64,
    /// Planned steps of the run.
    pub planned_steps: usize,
}

/// The lag of a run: each set's half-lives and the warnings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LagReport {
    /// Per set (a set without layers is left out).
    pub sets: Vec<SetLag>,
    /// One line per set whose longest half-life exceeds 10% of the run.
    pub warnings: Vec<String>,
}

/// Half-lives per set for this run, and a warning for each set whose longest half-life
/// exceeds 10% of the run. In `ldt-s` (without `repeat_batch`) a set is folded only in
/// its own phase, so its half-life in run steps is stretched by `(p+a)/p` or `(p+a)/a`.
pub fn report(
    cfg: &Config,
    partition: &Partition,
    single_phases: Option<(usize, usize)>,
) -> LagReport {
    let steps = cfg.train.steps;
    let mut lags = Vec::new();
    let mut warnings = Vec::new();
    for (set, name, key) in [
        (Set::Stable, "stable", "stable_base"),
        (Set::Unstable, "unstable", "unstable_base"),
    ] {
        let ws: Vec<f64> = partition
            .layers
            .iter()
            .filter(|l| l.set == set)
            .map(|l| l.coefficient)
            .collect();
        if ws.is_empty() {
            continue;
        }
        let stretch = match single_phases {
            Some((p, a)) if set == Set::Stable => (p + a) as f64 / p as f64,
            Some((p, a)) => (p + a) as f64 / a as f64,
            None => 1.0,
        };
        let h: Vec<f64> = ws
            .iter()
            .map(|&w| half_life(w, cfg.ldt.ema_every) * stretch)
            .collect();
        let lag = SetLag {
            set,
            layers: ws.len(),
            min_half_life: h.iter().cloned().fold(f64::INFINITY, f64::min),
            max_half_life: h.iter().cloned().fold(0.0, f64::max),
            planned_steps: steps,
        };
        if lag.max_half_life > 0.1 * steps as f64 {
            let fix = if cfg.ldt.dpu_warmup == crate::config::DpuWarmup::None {
                format!("Train longer, lower `ldt.{key}`, or set `ldt.dpu_warmup = \"ratio\"`.")
            } else {
                format!("(steady state; the DPU warm-up shortens the early exchanges.) Train longer or lower `ldt.{key}`.")
            };
            warnings.push(format!(
                "warning: the {name} set's EMA half-life reaches {:.0} steps ({:.0}% of the {steps}-step run): the composite's {name} layers will lag their trained copies. {fix}",
                lag.max_half_life,
                100.0 * lag.max_half_life / steps as f64
            ));
        }
        lags.push(lag);
    }
    LagReport {
        sets: lags,
        warnings,
    }
}
