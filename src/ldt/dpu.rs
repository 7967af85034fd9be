//! DPU folds: `dst = w*dst + (1-w)*src` with the authors' f32 arithmetic
//! (`dst*f32(w) + f32(1-w)*src`, no fused multiply-add), applied in place.

use anyhow::Result;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};

/// The scalar rule every placement must reproduce bit for bit.
#[inline]
pub fn ema_f32(dst: &mut [f32], src: &[f32], w: f64) {
    let (wf, cf) = (w as f32, (1.0 - w) as f32);
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = *d * wf + cf * s;
    }
}

struct Fold {
    w: f64,
}

impl InplaceOp2 for Fold {
    fn name(&self) -> &'static str {
        "ldt-dpu-fold"
    }
    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, s: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        let (Some((a, b)), Some((c, e))) = (dl.contiguous_offsets(), sl.contiguous_offsets()) else {
            candle_core::bail!("DPU fold needs contiguous tensors")
        };
        let src = &s.as_slice::<f32>()?[c..e];
        match d {
            CpuStorage::F32(v) => ema_f32(&mut v[a..b], src, self.w),
            _ => candle_core::bail!("DPU fold needs f32 tensors"),
        }
        Ok(())
    }
}

/// Folds live tensor `src` into live tensor `dst` with coefficient `w`.
pub fn fold(dst: &Tensor, src: &Tensor, w: f64) -> Result<()> {
    dst.inplace_op2(src, &Fold { w })?;
    Ok(())
}
