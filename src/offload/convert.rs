//! Slice conversions between f32 and the narrow storage dtypes, written to vectorize.
//!
//! Widening is exact. Narrowing rounds to nearest, ties to even, and gives bit for bit what
//! `half`'s `bf16::from_f32` / `f16::from_f32` give (NaN payloads included; the tests check
//! every f32 bit pattern): `half` converts bf16 one branchy element at a time and f16
//! through a non-inlined call per 8 elements, which made the narrow EMA compute-bound.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// An element type the EMA kernel converts inline, one lane at a time, in a loop that
/// LLVM vectorizes (f16 has no such portable form and goes through the slice functions).
pub(super) trait Lane: Copy {
    /// Widens exactly to f32.
    fn to_f32(self) -> f32;
    /// Narrows from f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl Lane for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Lane for bf16 {
    /// A bf16 is the top half of an f32, so this is a shift (as `bf16::to_f32`).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    /// Round to nearest even; a NaN keeps its top bits with the quiet bit set. Same
    /// result as `bf16::from_f32`, written without branches.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        let b = x.to_bits();
        // Adding 0x7FFF plus the lowest kept bit carries into bit 16 exactly when the
        // dropped half is above 0x8000, or equal to it with an odd kept part. It cannot
        // overflow for a non-NaN (at most 0xFF7F_FFFF + 0x8000); for a NaN it is discarded.
        let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        let quiet_nan = ((b >> 16) | 0x0040) as u16;
        bf16::from_bits(if b & 0x7FFF_FFFF > 0x7F80_0000 {
            quiet_nan
        } else {
            rounded
        })
    }
}

/// bf16 → f32 for a whole slice (exact).
#[inline(always)]
pub(super) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16_to_f32: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// f32 → bf16 for a whole slice, round to nearest even.
#[inline(always)]
pub(super) fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_bf16: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = <bf16 as Lane>::from_f32(*s);
    }
}

/// f16 → f32, exact; 8 lanes at a time with F16C where the CPU has it.
#[inline]
pub(super) fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU supports F16C (and therefore AVX), checked just above.
        unsafe { x86::f16_to_f32(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

/// f32 → f16, round to nearest even; 8 lanes at a time with F16C where the CPU has it.
#[inline]
pub(super) fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU supports F16C (and therefore AVX), checked just above.
        unsafe { x86::f32_to_f16(src, dst) };
        return;
    }
    dst.convert_from_f32_slice(src);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
        _mm_loadu_si128, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    use half::f16;
    use half::slice::HalfFloatSliceExt;

    /// F16C widening of equal-length slices; the tail of fewer than 8 goes through `half`.
    ///
    /// # Safety
    /// The CPU must support AVX and F16C.
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        let mut s8 = src.chunks_exact(8);
        let mut d8 = dst.chunks_exact_mut(8);
        for (s, d) in (&mut s8).zip(&mut d8) {
            // SAFETY: `s` holds 8 f16 (16 bytes) and `d` 8 f32 (32 bytes); both accesses
            // are unaligned loads/stores of exactly that many bytes.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        s8.remainder().convert_to_f32_slice(d8.into_remainder());
    }

    /// F16C narrowing (round to nearest even) of equal-length slices; the tail of fewer
    /// than 8 goes through `half`.
    ///
    /// # Safety
    /// The CPU must support AVX and F16C.
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        let mut s8 = src.chunks_exact(8);
        let mut d8 = dst.chunks_exact_mut(8);
        for (s, d) in (&mut s8).zip(&mut d8) {
            // SAFETY: `s` holds 8 f32 (32 bytes) and `d` 8 f16 (16 bytes); both accesses
            // are unaligned loads/stores of exactly that many bytes.
            unsafe {
                let f = _mm256_loadu_ps(s.as_ptr());
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
                _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), h);
            }
        }
        d8.into_remainder().convert_from_f32_slice(s8.remainder());
    }
}
