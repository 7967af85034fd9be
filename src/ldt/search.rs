//! The search of stage 1's `auto` settings (`stage1.unstable_ratio` and
//! `stage1.criterion`), as pure functions: the candidates, the choice among their probe
//! scores and its report (`search.json`). The paper leaves the unstable ratio to be
//! tuned per task; users have no target data to tune it on, so each candidate is scored
//! on held-out source data only (DomainBed's training-domain validation).

use crate::config::Criterion;
use serde::{Deserialize, Serialize};

/// One setting the search may choose: a criterion and an unstable ratio.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The ranking criterion.
    pub criterion: Criterion,
    /// The fraction of layers in the unstable set.
    pub unstable_ratio: f64,
}

/// Every criterion with every ratio, criteria outermost, each list in its order (the
/// order ties are broken in).
pub fn candidates(criteria: &[Criterion], ratios: &[f64]) -> Vec<Candidate> {
    criteria
        .iter()
        .flat_map(|&criterion| {
            ratios.iter().map(move |&unstable_ratio| Candidate {
                criterion,
                unstable_ratio,
            })
        })
        .collect()
}

/// For each item, the first earlier one equal to it (`None`: the first of its kind):
/// candidates whose partitions are equal train the same bits, so only the first is
/// probed.
pub fn first_equal<T: PartialEq>(items: &[T]) -> Vec<Option<usize>> {
    (0..items.len())
        .map(|i| items[..i].iter().position(|x| *x == items[i]))
        .collect()
}

/// The index of the best score: the highest, ties to the earliest; NaN is never
/// chosen (`None` when every score is NaN).
pub fn choose(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if !s.is_nan() && best.is_none_or(|b| s > scores[b]) {
            best = Some(i);
        }
    }
    best
}

/// One candidate's probe in the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The candidate.
    #[serde(flatten)]
    pub candidate: Candidate,
    /// Layers in the stable set.
    pub stable: usize,
    /// Layers in the unstable set.
    pub unstable: usize,
    /// The probe network's score (`stage1.probe_network`) on the source validation
    /// hold-out after the probe
    /// (accuracy, or Y-channel PSNR in dB for super-resolution).
    #[serde(with = "super::stats::non_finite")]
    pub score: f64,
    /// The earlier candidate with the same partition, whose probe score this one shares
    /// (it was not probed again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<usize>,
}

/// `search.json` (and `summary.json`'s `search`): every candidate and the choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchReport {
    /// What the scores are: `accuracy` or `psnr_y_db`.
    pub metric: String,
    /// Optimizer steps of each probe.
    pub probe_steps: usize,
    /// Probes run: one per distinct partition.
    pub probes_run: usize,
    /// Every candidate, in search order.
    pub candidates: Vec<ProbeResult>,
    /// The index of the chosen candidate.
    pub chosen: usize,
}

impl SearchReport {
    /// The chosen candidate.
    pub fn choice(&self) -> &ProbeResult {
        &self.candidates[self.chosen]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_criteria_outermost() {
        let c = candidates(&[Criterion::Var, Criterion::Mean], &[0.3, 0.5]);
        let got: Vec<(Criterion, f64)> =
            c.iter().map(|c| (c.criterion, c.unstable_ratio)).collect();
        assert_eq!(
            got,
            [
                (Criterion::Var, 0.3),
                (Criterion::Var, 0.5),
                (Criterion::Mean, 0.3),
                (Criterion::Mean, 0.5)
            ]
        );
    }

    #[test]
    fn choice_is_the_highest_ties_to_the_earliest_never_nan() {
        assert_eq!(choose(&[0.5, 0.7, 0.7, 0.1]), Some(1));
        assert_eq!(choose(&[f64::NAN, 0.2, f64::NAN, 0.3]), Some(3));
        assert_eq!(choose(&[f64::NAN, f64::NAN]), None);
        assert_eq!(choose(&[]), None);
        assert_eq!(choose(&[f64::NEG_INFINITY, f64::NAN]), Some(0));
    }

    #[test]
    fn equal_items_point_to_the_first() {
        assert_eq!(
            first_equal(&[1, 2, 1, 3, 2, 1]),
            [None, None, Some(0), None, Some(1), Some(0)]
        );
    }
}
