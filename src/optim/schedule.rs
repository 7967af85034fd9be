//! Learning-rate schedules: linear warm-up, then constant or cosine decay.

use crate::config::{OptimConfig, Schedule};

/// Learning rate at optimizer step `step` (1-based) of `total`, for base rate `base`.
pub fn lr_at(cfg: &OptimConfig, base: f64, step: usize, total: usize) -> f64 {
    let w = cfg.lr_warmup_steps;
    if w > 0 && step <= w {
        return base * step as f64 / w as f64;
    }
    match cfg.schedule {
        Schedule::Constant => base,
        Schedule::Cosine => {
            let span = total.saturating_sub(w).max(1) as f64;
            let t = (step - w.min(step)) as f64 / span;
            base * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
        }
    }
}

/// Per-layer base learning rates: the first `optim.groups` prefix that matches, else `optim.lr`.
pub fn layer_lrs(cfg: &OptimConfig, names: &[String]) -> Vec<f64> {
    names
        .iter()
        .map(|n| {
            cfg.groups
                .iter()
                .find(|g| n.starts_with(&g.prefix))
                .map_or(cfg.lr, |g| g.lr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let cfg = OptimConfig {
            schedule: Schedule::Cosine,
            lr_warmup_steps: 10,
            ..Default::default()
        };
        assert!((lr_at(&cfg, 1.0, 5, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(&cfg, 1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert!(lr_at(&cfg, 1.0, 110, 110).abs() < 1e-12);
    }
}
