//! DPU arithmetic: the warm-up factor of the per-layer coefficients and the EMA
//! half-life a coefficient gives (the coefficients themselves come with the partition).
//! The folds run where the weights are: `crate::offload` (live tensors and the
//! counterpart buffer, one f32 arithmetic for every placement).

use crate::config::{DpuWarmup, LdtConfig};

/// Factor applied to every coefficient at the `n`-th exchange of a branch (n >= 1):
/// exactly 1 without warm-up, so the authors' arithmetic is unchanged; otherwise a
/// schedule rising to 1 that multiplies every layer's `w` alike, so the DPU ranking is
/// kept while early exchanges copy faster (short runs do not export a stale composite).
pub fn warmup_factor(cfg: &LdtConfig, n: usize) -> f64 {
    let n = n as f64;
    match cfg.dpu_warmup {
        DpuWarmup::None => 1.0,
        DpuWarmup::Timm => 1.0 - (1.0 + n / cfg.dpu_warmup_gamma).powf(-cfg.dpu_warmup_power),
        DpuWarmup::Ratio => (1.0 + n) / (10.0 + n),
    }
}

/// EMA half-life in optimizer steps of a layer folded with coefficient `w` every
/// `ema_every` steps: `ema_every * ln 0.5 / ln w` (infinite for w = 1, 0 for w = 0).
pub fn half_life(w: f64, ema_every: usize) -> f64 {
    if w <= 0.0 {
        0.0
    } else if w >= 1.0 {
        f64::INFINITY
    } else {
        ema_every as f64 * 0.5f64.ln() / w.ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_life_formula() {
        // w^(h/ema) = 1/2 exactly at the half-life.
        for (w, e) in [(0.99, 10), (0.999, 10), (0.5, 1), (0.9997, 7)] {
            let h = half_life(w, e);
            assert!((w.powf(h / e as f64) - 0.5).abs() < 1e-12, "w {w}: {h}");
        }
        assert_eq!(half_life(1.0, 10), f64::INFINITY);
        assert_eq!(half_life(0.0, 10), 0.0);
    }

    #[test]
    fn warmup_schedules_against_scalar_reference() {
        let mut c = LdtConfig::default();
        assert_eq!(warmup_factor(&c, 1), 1.0);
        c.dpu_warmup = DpuWarmup::Ratio;
        assert_eq!(warmup_factor(&c, 1), 2.0 / 11.0);
        assert_eq!(warmup_factor(&c, 90), 91.0 / 100.0);
        c.dpu_warmup = DpuWarmup::Timm;
        c.dpu_warmup_gamma = 2.0;
        c.dpu_warmup_power = 0.5;
        // 1 - (1 + 6/2)^-0.5 = 1 - 1/2
        assert!((warmup_factor(&c, 6) - 0.5).abs() < 1e-15);
        let f: Vec<f64> = (1..200).map(|n| warmup_factor(&c, n)).collect();
        assert!(
            f.windows(2).all(|p| p[0] < p[1] && p[1] < 1.0),
            "rises towards 1"
        );
    }
}
