//! The host EMA fold against an independent scalar reference.
//!
//! Tolerance: none. The fold is specified bit for bit (`wf = w as f32`, `cf = (1 - w) as
//! f32`, `d * wf + cf * s` with two rounded products and a rounded add, then rounded to the
//! storage dtype), so every comparison below is on bits, except the sanity check against
//! the exact real-number value, which has a derived error bound.

use half::{bf16, f16};
use ldt::offload::{fused_ema, EmaTask, HostSlice, HostSliceMut, StorageDtype};

const DTYPES: [StorageDtype; 3] = [StorageDtype::F32, StorageDtype::BF16, StorageDtype::F16];
const SIZES: [usize; 3] = [1, 7, 1_000_003];
const THREADS: [usize; 3] = [1, 2, 3];

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A finite value of random sign, mantissa and binary exponent in `[lo, hi]`.
    fn value(&mut self, lo: i32, hi: i32) -> f32 {
        let r = self.next();
        let mantissa = 1.0 + (r >> 41) as f32 / (1u64 << 23) as f32;
        let exp = lo + ((r >> 8) % (hi - lo + 1) as u64) as i32;
        let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
        sign * mantissa * 2f32.powi(exp)
    }
}

/// A tensor in one storage dtype.
#[derive(Clone, PartialEq, Debug)]
enum Tensor {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Tensor {
    /// Random values representable in `dtype`: f16 stays well inside its range (its
    /// subnormals included), the others span 2^-30..2^30.
    fn random(dtype: StorageDtype, n: usize, rng: &mut Rng) -> Tensor {
        match dtype {
            StorageDtype::F32 => Tensor::F32((0..n).map(|_| rng.value(-30, 30)).collect()),
            StorageDtype::BF16 => {
                Tensor::BF16((0..n).map(|_| bf16::from_f32(rng.value(-30, 30))).collect())
            }
            StorageDtype::F16 => {
                Tensor::F16((0..n).map(|_| f16::from_f32(rng.value(-20, 12))).collect())
            }
        }
    }

    fn get(&self, i: usize) -> f32 {
        match self {
            Tensor::F32(v) => v[i],
            Tensor::BF16(v) => v[i].to_f32(),
            Tensor::F16(v) => v[i].to_f32(),
        }
    }

    /// Bits of element `i` in the storage dtype.
    fn bits(&self, i: usize) -> u32 {
        match self {
            Tensor::F32(v) => v[i].to_bits(),
            Tensor::BF16(v) => v[i].to_bits().into(),
            Tensor::F16(v) => v[i].to_bits().into(),
        }
    }

    /// `x` rounded to this tensor's dtype with `half`'s conversions, as bits.
    fn round_bits(&self, x: f32) -> u32 {
        match self {
            Tensor::F32(_) => x.to_bits(),
            Tensor::BF16(_) => bf16::from_f32(x).to_bits().into(),
            Tensor::F16(_) => f16::from_f32(x).to_bits().into(),
        }
    }

    fn view(&self) -> HostSlice<'_> {
        match self {
            Tensor::F32(v) => HostSlice::F32(v),
            Tensor::BF16(v) => HostSlice::BF16(v),
            Tensor::F16(v) => HostSlice::F16(v),
        }
    }

    fn view_mut(&mut self) -> HostSliceMut<'_> {
        match self {
            Tensor::F32(v) => HostSliceMut::F32(v),
            Tensor::BF16(v) => HostSliceMut::BF16(v),
            Tensor::F16(v) => HostSliceMut::F16(v),
        }
    }
}

/// The scalar reference, computed in f64: each f32 × f32 product is exact in f64 and is
/// then rounded to f32 once; the sum of the two f32 products is rounded to f64 and then to
/// f32, which equals one rounding to f32 because f64 has more than 2 × 24 + 2 bits.
/// Also returns the exact real value `w * d + (1 - w) * s` for the sanity bound.
fn reference(d: f32, s: f32, w: f64) -> (f32, f64) {
    let wf = w as f32;
    let cf = (1.0 - w) as f32;
    let p1 = (f64::from(d) * f64::from(wf)) as f32;
    let p2 = (f64::from(cf) * f64::from(s)) as f32;
    let r = (f64::from(p1) + f64::from(p2)) as f32;
    // The reference must agree with plain f32 arithmetic (two rounded products, one add).
    let plain = d * wf + cf * s;
    assert_eq!(
        r.to_bits(),
        plain.to_bits(),
        "reference self-check d={d} s={s} w={w}"
    );
    (r, w * f64::from(d) + (1.0 - w) * f64::from(s))
}

/// Checks `out == round(reference(dst0, src))` bitwise for every element, and that the
/// f32 result lies within the rounding-error bound of the exact value: 3 roundings of
/// 2^-24 relative on the terms, plus the coefficients' rounding from f64 to f32.
fn check(dst0: &Tensor, src: &Tensor, out: &Tensor, w: f64, what: &str) {
    let eps = f64::from(f32::EPSILON) / 2.0;
    let (wf, cf) = (f64::from(w as f32), f64::from((1.0 - w) as f32));
    for i in 0..src_len(src) {
        let (d, s) = (dst0.get(i), src.get(i));
        let (r, exact) = reference(d, s, w);
        let want = out.round_bits(r);
        assert_eq!(
            out.bits(i),
            want,
            "{what}: element {i}: d={d} s={s} w={w}: got {:#x}, want {want:#x}",
            out.bits(i)
        );
        let terms = (w * f64::from(d)).abs() + ((1.0 - w) * f64::from(s)).abs();
        let bound = 3.0 * eps * terms
            + (w - wf).abs() * f64::from(d).abs()
            + (1.0 - w - cf).abs() * f64::from(s).abs()
            + f64::from(f32::MIN_POSITIVE);
        assert!(
            (f64::from(r) - exact).abs() <= bound,
            "{what}: element {i}: {r} is {} from the exact {exact} (bound {bound})",
            (f64::from(r) - exact).abs()
        );
    }
}

fn src_len(t: &Tensor) -> usize {
    match t {
        Tensor::F32(v) => v.len(),
        Tensor::BF16(v) => v.len(),
        Tensor::F16(v) => v.len(),
    }
}

/// Runs one fused call over `dsts`/`srcs` with per-tensor coefficients.
fn run(dsts: &mut [Tensor], srcs: &[Tensor], ws: &[f64], threads: usize) {
    let mut tasks: Vec<EmaTask<'_>> = dsts
        .iter_mut()
        .zip(srcs)
        .zip(ws)
        .map(|((d, s), &w)| EmaTask {
            dst: d.view_mut(),
            src: s.view(),
            w,
        })
        .collect();
    fused_ema(&mut tasks, threads);
}

/// Every dst/src dtype pair, sizes 1, 7 and 1_000_003, threads 1, 2 and 3: bitwise equal
/// to the reference, and bitwise equal across thread counts.
#[test]
fn every_dtype_pair_size_and_thread_count_matches_reference() {
    let mut rng = Rng(0x5EED_0001);
    for dd in DTYPES {
        for sd in DTYPES {
            for n in SIZES {
                let dst0 = Tensor::random(dd, n, &mut rng);
                let src = Tensor::random(sd, n, &mut rng);
                let w = 0.99 + 0.01 * (rng.next() % 1000) as f64 / 1000.0;
                let mut first: Option<Tensor> = None;
                for t in THREADS {
                    let mut out = [dst0.clone()];
                    run(&mut out, std::slice::from_ref(&src), &[w], t);
                    let [out] = out;
                    let what = format!("dst {dd:?} src {sd:?} n {n} threads {t}");
                    check(&dst0, &src, &out, w, &what);
                    match &first {
                        None => first = Some(out),
                        Some(f) => assert!(*f == out, "{what}: differs from 1 thread"),
                    }
                }
            }
        }
    }
}

/// Many tensors of mixed dtypes, sizes and DPU coefficients (stable-set and unstable-set
/// ranges, plus 0, 0.5 and 1) in one call: each equals the reference bitwise, for 1, 2, 3
/// and 8 threads, and all thread counts agree bitwise.
#[test]
fn many_tensors_in_one_call() {
    let mut rng = Rng(0x5EED_0002);
    let mut dsts = Vec::new();
    let mut srcs = Vec::new();
    let mut ws = Vec::new();
    let n_tensors = 40;
    for k in 0..n_tensors {
        let n = match k % 5 {
            0 => 1,
            1 => 7,
            2 => 300_017,
            3 => 0,
            _ => (rng.next() % 50_000) as usize,
        };
        dsts.push(Tensor::random(DTYPES[k % 3], n, &mut rng));
        srcs.push(Tensor::random(DTYPES[(k / 3) % 3], n, &mut rng));
        ws.push(match k {
            0 => 0.0,
            1 => 0.5,
            2 => 1.0,
            k if k % 2 == 0 => 0.99 + 0.01 * k as f64 / n_tensors as f64,
            k => 0.999 + 0.001 * k as f64 / n_tensors as f64,
        });
    }
    let mut first: Option<Vec<Tensor>> = None;
    for t in [1, 2, 3, 8] {
        let mut out = dsts.clone();
        run(&mut out, &srcs, &ws, t);
        for k in 0..n_tensors {
            let what = format!("tensor {k} threads {t}");
            check(&dsts[k], &srcs[k], &out[k], ws[k], &what);
        }
        match &first {
            None => first = Some(out),
            Some(f) => assert!(*f == out, "threads {t} differ from 1 thread"),
        }
    }
}

/// A call with no tasks, or only empty tensors, does nothing and does not panic.
#[test]
fn empty_calls() {
    fused_ema(&mut [], 4);
    let mut d: Vec<f32> = Vec::new();
    let mut tasks = [EmaTask {
        dst: HostSliceMut::F32(&mut d),
        src: HostSlice::F32(&[]),
        w: 0.5,
    }];
    fused_ema(&mut tasks, 4);
}

/// Mismatched lengths are refused before anything is written.
#[test]
fn length_mismatch_panics_without_writing() {
    let mut a = vec![1.0f32; 4];
    let mut b = vec![1.0f32; 3];
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut tasks = [
            EmaTask {
                dst: HostSliceMut::F32(&mut a),
                src: HostSlice::F32(&[0.0; 4]),
                w: 0.0,
            },
            EmaTask {
                dst: HostSliceMut::F32(&mut b),
                src: HostSlice::F32(&[0.0; 4]),
                w: 0.0,
            },
        ];
        fused_ema(&mut tasks, 1);
    }));
    assert!(result.is_err());
    assert_eq!(a, vec![1.0; 4], "first task must not have been folded");
}
