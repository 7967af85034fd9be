//! DPU folds between live tensors: `dst = w*dst + (1-w)*src` with the authors' f32
//! arithmetic (`dst*f32(w) + f32(1-w)*src`, no fused multiply-add), through the same
//! fused EMA the counterpart buffer uses, so every placement computes the same bits.

use crate::config::{DpuWarmup, LdtConfig};
use crate::offload::backend::{with_slice, with_slice_mut};
use crate::offload::{fused_ema, EmaTask, HostSlice, HostSliceMut};
use anyhow::Result;
use candle_core::Tensor;

/// Folds live tensor `src` into live tensor `dst` with coefficient `w`: the host's fused
/// EMA for CPU tensors, [`fold_generic`] on other devices (and inside
/// [`crate::model::layers::with_generic_ops`]).
pub fn fold(dst: &Tensor, src: &Tensor, w: f64) -> Result<()> {
    if crate::model::layers::generic_path(dst) {
        return fold_generic(dst, src, w);
    }
    with_slice(src, |s| {
        with_slice_mut(dst, |d| {
            fused_ema(
                &mut [EmaTask {
                    dst: HostSliceMut::F32(d),
                    src: HostSlice::F32(s),
                    w,
                }],
                1,
            )
        })
    })?
}

/// The fold in tensor ops for any device, written into `dst` in place: `f32(w)*dst` and
/// `f32(1-w)*src` rounded separately, then added — the host fold's arithmetic (checked
/// bit for bit against it on the CPU).
#[doc(hidden)]
pub fn fold_generic(dst: &Tensor, src: &Tensor, w: f64) -> Result<()> {
    let new = (dst.affine(w, 0.0)? + src.affine(1.0 - w, 0.0)?)?;
    dst.slice_set(&new, 0, 0)?;
    Ok(())
}

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
    #[test]
    fn generic_fold_computes_the_host_bits() {
        use candle_core::{Device, Tensor};
        let n = 1003;
        let mut r = crate::rng::Rng::new(9, 9);
        let mk = |r: &mut crate::rng::Rng| {
            let v: Vec<f32> = (0..n).map(|_| (r.next_f64() * 8.0 - 4.0) as f32).collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let (a, src) = (mk(&mut r), mk(&mut r));
        let b = a.copy().unwrap();
        for w in [0.99, 0.999, 0.9997, 0.5, 0.0] {
            super::fold(&a, &src, w).unwrap();
            super::fold_generic(&b, &src, w).unwrap();
            let (x, y) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "w = {w}"
            );
        }
    }

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
