//! Streaming per-layer gradient statistics in f64 (stage 1). Nothing per batch is kept:
//! each layer holds a running (count, mean, M2) over all its gradient entries (Chan's
//! parallel merge of per-batch two-pass moments) and, only where `var_cross` is wanted,
//! per-element Welford moments across batches (16 bytes per parameter), so memory is
//! O(1) per layer, or O(model), whatever the number of statistics batches.

use serde::{Deserialize, Serialize};

/// Running statistics of one layer's gradients over the statistics batches.
#[derive(Clone, Debug)]
pub struct LayerAccumulator {
    numel: usize,
    batches: u64,
    entries: u64,
    mean: f64,
    m2: f64,
    elem_mean: Vec<f64>,
    elem_m2: Vec<f64>,
}

/// Final statistics of one layer (the SPEC's criteria).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Unbiased variance of all entries of the stacked gradients (`torch.var(torch.stack(g))`).
    #[serde(with = "non_finite")]
    pub var: f64,
    /// Per-element unbiased variance across batches, averaged over the layer (NaN where
    /// not computed: `stage1.cross_variance` off and another criterion).
    #[serde(with = "non_finite")]
    pub var_cross: f64,
    /// Mean of all entries of the stacked gradients.
    #[serde(with = "non_finite")]
    pub mean: f64,
    /// `var / |mean|` (infinite when the mean is exactly 0).
    #[serde(with = "non_finite")]
    pub var_over_mean: f64,
}

/// JSON has no NaN or infinity: they are written as the strings "NaN", "inf", "-inf"
/// and read back, so a partition report always round-trips.
pub mod non_finite {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes finite values as numbers, others as strings.
    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else if x.is_nan() {
            s.serialize_str("NaN")
        } else if *x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    /// Reads a number or one of the strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum V {
            N(f64),
            S(String),
        }
        match V::deserialize(d)? {
            V::N(x) => Ok(x),
            V::S(s) => match s.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, got `{other}`"
                ))),
            },
        }
    }
}

impl LayerAccumulator {
    /// An empty accumulator for a layer of `numel` elements; `cross`: also the
    /// per-element moments of `var_cross`.
    pub fn new(numel: usize, cross: bool) -> Self {
        let elems = if cross { numel } else { 0 };
        LayerAccumulator {
            numel,
            batches: 0,
            entries: 0,
            mean: 0.0,
            m2: 0.0,
            elem_mean: vec![0.0; elems],
            elem_m2: vec![0.0; elems],
        }
    }

    /// Adds one batch's gradient of this layer.
    pub fn add(&mut self, g: &[f32]) {
        assert_eq!(
            g.len(),
            self.numel,
            "gradient size differs from the layer size"
        );
        let nb = g.len() as f64;
        let mean_b = g.iter().map(|&x| x as f64).sum::<f64>() / nb;
        let m2_b: f64 = g.iter().map(|&x| (x as f64 - mean_b).powi(2)).sum();
        let na = self.entries as f64;
        let n = na + nb;
        let delta = mean_b - self.mean;
        self.mean += delta * nb / n;
        self.m2 += m2_b + delta * delta * na * nb / n;
        self.entries += g.len() as u64;
        self.batches += 1;
        let k = self.batches as f64;
        for ((m, s), &x) in self.elem_mean.iter_mut().zip(&mut self.elem_m2).zip(g) {
            let x = x as f64;
            let d = x - *m;
            *m += d / k;
            *s += d * (x - *m);
        }
    }

    /// Batches seen.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The running state, to checkpoint it: `[batches, entries, mean, m2]` and the
    /// per-element means and squared deviations (empty without `cross`).
    pub fn parts(&self) -> ([f64; 4], &[f64], &[f64]) {
        let scalars = [self.batches as f64, self.entries as f64, self.mean, self.m2];
        (scalars, &self.elem_mean, &self.elem_m2)
    }

    /// An accumulator continuing from [`LayerAccumulator::parts`] of a layer of `numel`
    /// elements.
    ///
    /// # Errors
    /// Parts that do not fit the layer or `cross` (counts not whole, entries not
    /// `batches * numel`, per-element parts of another length).
    pub fn restore(
        numel: usize,
        cross: bool,
        scalars: &[f64],
        elem_mean: Vec<f64>,
        elem_m2: Vec<f64>,
    ) -> anyhow::Result<Self> {
        let [batches, entries, mean, m2] = scalars else {
            anyhow::bail!("{} scalars, expected 4", scalars.len());
        };
        let whole = |x: f64| x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53);
        let elems = if cross { numel } else { 0 };
        if !whole(*batches)
            || !whole(*entries)
            || *entries != batches * numel as f64
            || elem_mean.len() != elems
            || elem_m2.len() != elems
        {
            anyhow::bail!(
                "the saved statistics do not fit a layer of {numel} elements (batches {batches}, entries {entries}, {} per-element moments; cross variance {cross})",
                elem_mean.len()
            );
        }
        Ok(LayerAccumulator {
            numel,
            batches: *batches as u64,
            entries: *entries as u64,
            mean: *mean,
            m2: *m2,
            elem_mean,
            elem_m2,
        })
    }

    /// The statistics; needs at least two batches (checked by the caller).
    pub fn finish(&self) -> LayerStats {
        let var = if self.entries > 1 {
            self.m2 / (self.entries - 1) as f64
        } else {
            f64::NAN
        };
        let k = self.batches as f64;
        let var_cross = if self.batches > 1 && !self.elem_m2.is_empty() {
            self.elem_m2.iter().map(|s| s / (k - 1.0)).sum::<f64>() / self.elem_m2.len() as f64
        } else {
            f64::NAN
        };
        LayerStats {
            var,
            var_cross,
            mean: self.mean,
            var_over_mean: var / self.mean.abs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Two-pass f64 reference over the explicitly stacked batches.
    fn reference(batches: &[Vec<f32>]) -> LayerStats {
        let all: Vec<f64> = batches.iter().flatten().map(|&x| x as f64).collect();
        let n = all.len() as f64;
        let mean = all.iter().sum::<f64>() / n;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let k = batches.len() as f64;
        let numel = batches[0].len();
        let mut vc = 0.0;
        for e in 0..numel {
            let m = batches.iter().map(|b| b[e] as f64).sum::<f64>() / k;
            vc += batches
                .iter()
                .map(|b| (b[e] as f64 - m).powi(2))
                .sum::<f64>()
                / (k - 1.0);
        }
        LayerStats {
            var,
            var_cross: vc / numel as f64,
            mean,
            var_over_mean: var / mean.abs(),
        }
    }

    fn check(batches: &[Vec<f32>], tol: f64) {
        let mut acc = LayerAccumulator::new(batches[0].len(), true);
        for b in batches {
            acc.add(b);
        }
        let (got, want) = (acc.finish(), reference(batches));
        // Streaming vs two-pass f64: both are f64 and differ only in summation order.
        for (g, w, what) in [
            (got.var, want.var, "var"),
            (got.var_cross, want.var_cross, "var_cross"),
            (got.mean, want.mean, "mean"),
            (got.var_over_mean, want.var_over_mean, "var_over_mean"),
        ] {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1e-300),
                "{what}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn streaming_matches_two_pass_on_random_data() {
        let mut r = Rng::new(3, 0);
        let batches: Vec<Vec<f32>> = (0..37).map(|_| r.uniform_vec(101, -1.0, 1.0)).collect();
        // Measured ~1e-15 relative.
        check(&batches, 1e-12);
    }

    #[test]
    fn without_cross_moments_the_other_statistics_are_the_same_bits() {
        let mut r = Rng::new(5, 0);
        let batches: Vec<Vec<f32>> = (0..9).map(|_| r.uniform_vec(33, -1.0, 1.0)).collect();
        let (mut with, mut without) = (
            LayerAccumulator::new(33, true),
            LayerAccumulator::new(33, false),
        );
        for b in &batches {
            with.add(b);
            without.add(b);
        }
        let (a, b) = (with.finish(), without.finish());
        assert_eq!(
            (a.var, a.mean, a.var_over_mean),
            (b.var, b.mean, b.var_over_mean)
        );
        assert!(a.var_cross.is_finite() && b.var_cross.is_nan());
    }

    #[test]
    fn one_element_layer_many_batches_large_magnitude() {
        let mut r = Rng::new(4, 0);
        let batches: Vec<Vec<f32>> = (0..5000)
            .map(|_| vec![1e6 + r.uniform_vec(1, -1.0, 1.0)[0]])
            .collect();
        // Values ~1e6 with spread ~1 over 5000 batches: rounding of the running mean
        // (~1e-10 absolute) shows up relative to the small variance; measured 3e-11.
        check(&batches, 1e-9);
    }
}
