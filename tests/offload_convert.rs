//! The storage conversions against `half`.
//!
//! The offload module narrows f32 to bf16/f16 with its own vectorizable code (branch-free
//! bf16, F16C f16). Compared: the bits it stores for f32 inputs against `half`'s scalar
//! `bf16::from_f32` / `f16::from_f32`. Tolerance: none, bits must be equal. The default
//! tests take every pattern of the bits that select the result's exponent and mantissa,
//! combined with every rounding class of the dropped bits (zero, smallest, just below half,
//! exactly half, just above half, all ones, plus random ones), so NaNs, infinities,
//! subnormals and ties are all covered; `--ignored` runs all 2^32 inputs (about 25 s).
//! Widening is compared over all 2^16 bf16 and f16 patterns.

use half::{bf16, f16};
use ldt::offload::{HostSlice, HostSliceMut};

/// Inputs per chunk (4 MiB of f32).
const CHUNK: u64 = 1 << 20;

/// Runs `check(chunk)` over all 2^32 f32 patterns, on 2 threads.
fn sweep_all(check: impl Fn(&[f32]) + Sync) {
    let chunks = (1u64 << 32) / CHUNK;
    std::thread::scope(|s| {
        for part in 0..2 {
            let check = &check;
            s.spawn(move || {
                let mut input = vec![0f32; CHUNK as usize];
                for c in (part..chunks).step_by(2) {
                    let start = c * CHUNK;
                    for (k, x) in input.iter_mut().enumerate() {
                        *x = f32::from_bits((start + k as u64) as u32);
                    }
                    check(&input);
                }
            });
        }
    });
}

/// Every value of the top `32 - dropped` bits, each combined with the rounding classes of
/// the `dropped` low bits and two pseudo-random low parts.
fn classes(dropped: u32) -> Vec<f32> {
    let half = 1u32 << (dropped - 1);
    let all = (1u32 << dropped) - 1;
    let mut x = 0x9E37_79B9u32;
    let mut out = Vec::new();
    for top in 0..(1u32 << (32 - dropped)) {
        for _ in 0..2 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push(f32::from_bits(top << dropped | (x & all)));
        }
        for low in [0, 1, half - 1, half, half + 1, all] {
            out.push(f32::from_bits(top << dropped | low));
        }
    }
    out
}

/// Compares the stored bf16 bits of `input` with `bf16::from_f32`.
fn check_bf16(input: &[f32]) {
    let mut out = vec![bf16::ZERO; input.len()];
    HostSliceMut::BF16(&mut out).copy_from_f32(input);
    for (x, y) in input.iter().zip(&out) {
        let want = bf16::from_f32(*x);
        assert_eq!(
            y.to_bits(),
            want.to_bits(),
            "f32 bits {:#010x}",
            x.to_bits()
        );
    }
}

/// Compares the stored f16 bits of `input` with `f16::from_f32`.
fn check_f16(input: &[f32]) {
    let mut out = vec![f16::ZERO; input.len()];
    HostSliceMut::F16(&mut out).copy_from_f32(input);
    for (x, y) in input.iter().zip(&out) {
        let want = f16::from_f32(*x);
        assert_eq!(
            y.to_bits(),
            want.to_bits(),
            "f32 bits {:#010x}",
            x.to_bits()
        );
    }
}

/// bf16 keeps the top 16 bits: all 2^16 of them × the classes of the low 16.
#[test]
fn bf16_narrowing_equals_half() {
    check_bf16(&classes(16));
}

/// f16 keeps 10 of the 23 mantissa bits (fewer for its subnormals): all 2^19 top
/// patterns × the classes of the low 13, which covers every normal rounding case and
/// every exponent; subnormal rounding also depends on higher bits, which vary over all
/// their values here.
#[test]
fn f16_narrowing_equals_half() {
    check_f16(&classes(13));
}

#[test]
#[ignore = "all 2^32 inputs, about 25 s; run with --ignored"]
fn bf16_narrowing_equals_half_for_every_f32() {
    sweep_all(check_bf16);
}

#[test]
#[ignore = "all 2^32 inputs, about 25 s; run with --ignored"]
fn f16_narrowing_equals_half_for_every_f32() {
    sweep_all(check_f16);
}

#[test]
fn widening_equals_half_for_every_pattern() {
    let b: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let h: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let mut out = vec![0f32; b.len()];
    HostSlice::BF16(&b).to_f32_into(&mut out);
    for (x, y) in b.iter().zip(&out) {
        assert_eq!(
            y.to_bits(),
            x.to_f32().to_bits(),
            "bf16 bits {:#06x}",
            x.to_bits()
        );
    }
    HostSlice::F16(&h).to_f32_into(&mut out);
    for (x, y) in h.iter().zip(&out) {
        assert_eq!(
            y.to_bits(),
            x.to_f32().to_bits(),
            "f16 bits {:#06x}",
            x.to_bits()
        );
    }
}
