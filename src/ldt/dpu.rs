//! DPU folds between live tensors: `dst = w*dst + (1-w)*src` with the authors' f32
//! arithmetic (`dst*f32(w) + f32(1-w)*src`, no fused multiply-add), through the same
//! fused EMA the counterpart buffer uses, so every placement computes the same bits.

use crate::offload::backend::{with_slice, with_slice_mut};
use crate::offload::{fused_ema, EmaTask, HostSlice, HostSliceMut};
use anyhow::Result;
use candle_core::Tensor;

/// Folds live tensor `src` into live tensor `dst` with coefficient `w`.
pub fn fold(dst: &Tensor, src: &Tensor, w: f64) -> Result<()> {
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
