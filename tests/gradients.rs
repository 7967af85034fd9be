//! Gradients of the networks and of every layer function.
//!
//! (a) every parameter of `mlp`, `cnn` and `cnn_bn` receives a finite, non-zero gradient;
//! (b) finite differences in f64 (central, `EPS` = 1e-6) against the autograd gradient of
//!     each layer function and of whole networks; per element the error is measured as
//!     `|fd - ad| / max(|ad|, max_j |ad_j|)` (the second term is the largest autograd entry
//!     of the same tensor, so entries far below the tensor's scale are compared at that
//!     scale instead of dividing by almost zero), and must stay under `FD_TOL`;
//! (c) max-pool ties send the whole gradient to the first maximum of a window (PyTorch);
//! (d) BatchNorm2d in `Train` updates the running statistics as PyTorch does (momentum
//!     0.1, unbiased variance), `Stats` and `Eval` leave them alone.

mod common;
#[path = "common/testkit.rs"]
mod testkit;

use candle_core::{DType, Device, Tensor, Var};
use ldt::config::ModelConfig;
use ldt::model::layers::{self, BnBuffers};
use ldt::model::{self, Mode, NetState};
use ldt::rng::Rng;
use testkit::{f32s, f64s};

/// Step of the central differences.
const EPS: f64 = 1e-6;
/// Largest accepted finite-difference error (relative, see the module comment). The
/// measured worst cases are printed by each test (`--nocapture`).
const FD_TOL: f64 = 1e-6;

fn dev() -> Device {
    Device::Cpu
}

/// f64 tensor of `shape` with entries uniform in [lo, hi).
fn uniform(rng: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * rng.next_f64()).collect();
    Tensor::from_vec(v, shape, &dev()).unwrap()
}

/// f64 tensor whose entries are all at least `gap` away from zero (no ReLU kink near).
fn away_from_zero(rng: &mut Rng, shape: &[usize], gap: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let m = gap + (1.0 - gap) * rng.next_f64();
            if rng.next_u64() & 1 == 0 {
                m
            } else {
                -m
            }
        })
        .collect();
    Tensor::from_vec(v, shape, &dev()).unwrap()
}

/// f64 tensor with pairwise distinct entries, spaced at least 1/(2n) apart (no ties in
/// any pooling window, and a perturbation of `EPS` never changes a window's argmax).
fn distinct(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let perm = rng.permutation(n);
    let v: Vec<f64> = perm
        .iter()
        .map(|&k| (k as f64 + 0.25 + 0.5 * rng.next_f64()) / n as f64 * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &dev()).unwrap()
}

/// The scalar value of a 0-d or 1-element tensor.
fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// `sum(y * r)` with a fixed random `r`: a scalar loss that weighs every output entry.
fn project(y: &Tensor, seed: u64) -> Tensor {
    let r = uniform(&mut Rng::new(seed, 99), y.dims(), -1.0, 1.0)
        .to_dtype(y.dtype())
        .unwrap();
    (y * r).unwrap().sum_all().unwrap()
}

/// Checks the autograd gradient of the scalar `f(inputs)` with respect to `inputs[i]`
/// for every `i` in `check`, element by element (or at `sample` random elements when
/// given). Returns the worst relative error over all checked elements.
fn fd_check(
    what: &str,
    inputs: &[Tensor],
    check: &[usize],
    sample: Option<usize>,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let live: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = f(&live);
    let grads = loss.backward().unwrap();
    let mut worst = 0f64;
    let mut rng = Rng::new(7, 7);
    for &i in check {
        let ad = f64s(
            grads
                .get(vars[i].as_tensor())
                .unwrap_or_else(|| panic!("{what}: input {i} has no gradient")),
        );
        assert_eq!(
            ad.len(),
            inputs[i].elem_count(),
            "{what}: gradient {i} has the wrong size"
        );
        let scale = ad.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale > 0.0, "{what}: input {i} has an all-zero gradient");
        let base = f64s(&inputs[i]);
        let elems: Vec<usize> = match sample {
            Some(k) if k < base.len() => (0..k).map(|_| rng.below(base.len())).collect(),
            _ => (0..base.len()).collect(),
        };
        let eval_at = |j: usize, h: f64| -> f64 {
            let mut v = base.clone();
            v[j] += h;
            let mut ins = inputs.to_vec();
            ins[i] = Tensor::from_vec(v, inputs[i].dims(), &dev()).unwrap();
            scalar(&f(&ins))
        };
        for j in elems {
            let fd = (eval_at(j, EPS) - eval_at(j, -EPS)) / (2.0 * EPS);
            let err = (fd - ad[j]).abs() / ad[j].abs().max(scale);
            if err > worst {
                worst = err;
            }
            assert!(
                err <= FD_TOL,
                "{what}: input {i} element {j}: finite difference {fd:e} vs autograd {:e} (rel {err:e} > {FD_TOL:e})",
                ad[j]
            );
        }
    }
    eprintln!("{what}: worst finite-difference error {worst:.3e}");
    worst
}

// ---------------------------------------------------------------- (a) every parameter

fn all_parameters_get_gradients(arch: &str) {
    let cfg = ModelConfig {
        arch: arch.into(),
        ..ModelConfig::default()
    };
    let net = model::build(&cfg, [1, 28, 28], 10).unwrap();
    let mut rng = Rng::new(3, 1);
    let mut state = NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
    let x: Vec<f32> = (0..8 * 784).map(|_| rng.next_f64() as f32).collect();
    let x = Tensor::from_vec(x, (8, 1, 28, 28), &dev()).unwrap();
    let y = Tensor::from_vec(
        (0..8).map(|_| rng.below(10) as i64).collect::<Vec<_>>(),
        8,
        &dev(),
    )
    .unwrap();
    let all = vec![true; net.params().len()];
    let (stats, grads) = common::gradients(
        net.as_ref(),
        &mut state,
        &all,
        &ldt::train::step::Batch::whole(x.clone(), y.clone()).unwrap(),
        Mode::Train,
        ldt::train::step::GradPlan::F32,
    )
    .unwrap();
    assert!(stats.loss.is_finite() && stats.n == 8);
    assert_eq!(grads.len(), net.params().len());
    for (spec, g) in net.params().iter().zip(&grads) {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{arch}: `{}` got no gradient", spec.name));
        assert_eq!(
            g.dims(),
            &spec.shape[..],
            "{arch}: `{}` gradient shape",
            spec.name
        );
        let v = f32s(g);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{arch}: `{}` has a non-finite gradient",
            spec.name
        );
        let nonzero = v.iter().filter(|x| **x != 0.0).count();
        assert!(
            nonzero > 0,
            "{arch}: `{}` has an all-zero gradient",
            spec.name
        );
        eprintln!(
            "{arch} {:<14} {nonzero}/{} non-zero gradient entries",
            spec.name,
            v.len()
        );
    }
}

#[test]
fn every_parameter_of_mlp_gets_a_gradient() {
    all_parameters_get_gradients("mlp");
}

#[test]
fn every_parameter_of_cnn_gets_a_gradient() {
    all_parameters_get_gradients("cnn");
}

#[test]
fn every_parameter_of_cnn_bn_gets_a_gradient() {
    all_parameters_get_gradients("cnn_bn");
}

#[test]
fn frozen_layers_get_no_gradient() {
    // The mask is honoured: frozen layers yield `None`, trainable ones a gradient.
    let net = model::build(
        &ModelConfig {
            arch: "cnn".into(),
            ..ModelConfig::default()
        },
        [1, 28, 28],
        10,
    )
    .unwrap();
    let mut rng = Rng::new(4, 1);
    let mut state = NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
    let x = uniform(&mut rng, &[4, 1, 28, 28], 0.0, 1.0)
        .to_dtype(DType::F32)
        .unwrap();
    let y = Tensor::new(&[1i64, 2, 3, 4], &dev()).unwrap();
    let mask: Vec<bool> = (0..net.params().len()).map(|i| i % 2 == 1).collect();
    let (_, grads) = common::gradients(
        net.as_ref(),
        &mut state,
        &mask,
        &ldt::train::step::Batch::whole(x.clone(), y.clone()).unwrap(),
        Mode::Train,
        ldt::train::step::GradPlan::F32,
    )
    .unwrap();
    for ((spec, g), m) in net.params().iter().zip(&grads).zip(&mask) {
        assert_eq!(
            g.is_some(),
            *m,
            "`{}`: trainable {m} but gradient present {}",
            spec.name,
            g.is_some()
        );
    }
}

// ---------------------------------------------------- (b) finite differences per layer

#[test]
fn fd_linear() {
    let mut r = Rng::new(10, 0);
    let ins = [
        uniform(&mut r, &[3, 5], -1.0, 1.0),
        uniform(&mut r, &[4, 5], -1.0, 1.0),
        uniform(&mut r, &[4], -1.0, 1.0),
    ];
    fd_check("linear", &ins, &[0, 1, 2], None, &|t| {
        project(&layers::linear(&t[0], &t[1], Some(&t[2])).unwrap(), 1)
    });
    fd_check("linear (no bias)", &ins[..2], &[0, 1], None, &|t| {
        project(&layers::linear(&t[0], &t[1], None).unwrap(), 2)
    });
}

#[test]
fn fd_conv2d_stride1_pad1() {
    let mut r = Rng::new(11, 0);
    let ins = [
        uniform(&mut r, &[2, 3, 6, 6], -1.0, 1.0),
        uniform(&mut r, &[4, 3, 3, 3], -1.0, 1.0),
        uniform(&mut r, &[4], -1.0, 1.0),
    ];
    fd_check("conv2d s1 p1", &ins, &[0, 1, 2], None, &|t| {
        project(&layers::conv2d(&t[0], &t[1], Some(&t[2]), 1, 1).unwrap(), 3)
    });
}

#[test]
fn fd_conv2d_stride2_pad0() {
    // 7x7 (the transposed convolution of the backward needs no output padding) and 8x8
    // (it needs one row and column of output padding).
    for hw in [7, 8] {
        let mut r = Rng::new(12, hw as u64);
        let ins = [
            uniform(&mut r, &[2, 3, hw, hw], -1.0, 1.0),
            uniform(&mut r, &[4, 3, 3, 3], -1.0, 1.0),
            uniform(&mut r, &[4], -1.0, 1.0),
        ];
        fd_check(
            &format!("conv2d s2 p0 {hw}x{hw}"),
            &ins,
            &[0, 1, 2],
            None,
            &|t| project(&layers::conv2d(&t[0], &t[1], Some(&t[2]), 2, 0).unwrap(), 4),
        );
    }
}

#[test]
fn fd_relu() {
    let mut r = Rng::new(13, 0);
    let ins = [away_from_zero(&mut r, &[3, 4, 5], 1e-3)];
    fd_check("relu", &ins, &[0], None, &|t| {
        project(&layers::relu(&t[0]).unwrap(), 5)
    });
}

#[test]
fn fd_max_pool2d() {
    for (k, s, p, hw) in [(2, 2, 0, 6), (3, 2, 1, 7), (3, 2, 1, 6)] {
        let mut r = Rng::new(14, hw as u64 + k as u64);
        let ins = [distinct(&mut r, &[2, 3, hw, hw])];
        fd_check(
            &format!("max_pool2d k{k} s{s} p{p} {hw}x{hw}"),
            &ins,
            &[0],
            None,
            &|t| project(&layers::max_pool2d(&t[0], k, s, p).unwrap(), 6),
        );
    }
}

/// BatchNorm2d through fresh buffers (so that every evaluation sees the same ones).
fn bn(t: &[Tensor], mode: Mode) -> Tensor {
    let c = t[0].dim(1).unwrap();
    let mut mean = Tensor::from_vec(vec![0.3f64; c], c, &dev()).unwrap();
    let mut var = Tensor::from_vec(vec![1.7f64; c], c, &dev()).unwrap();
    let mut count = Tensor::new(0i64, &dev()).unwrap();
    let b = BnBuffers {
        mean: &mut mean,
        var: &mut var,
        count: &mut count,
    };
    layers::batch_norm2d(&t[0], &t[1], &t[2], b, mode).unwrap()
}

#[test]
fn fd_batch_norm2d() {
    let mut r = Rng::new(15, 0);
    let ins = [
        uniform(&mut r, &[4, 3, 3, 3], -1.0, 2.0),
        uniform(&mut r, &[3], 0.5, 1.5),
        uniform(&mut r, &[3], -1.0, 1.0),
    ];
    fd_check("batch_norm2d Train", &ins, &[0, 1, 2], None, &|t| {
        project(&bn(t, Mode::Train), 7)
    });
    fd_check("batch_norm2d Stats", &ins, &[0, 1, 2], None, &|t| {
        project(&bn(t, Mode::Stats), 7)
    });
    fd_check("batch_norm2d Eval", &ins, &[0, 1, 2], None, &|t| {
        project(&bn(t, Mode::Eval), 7)
    });
}

#[test]
fn fd_log_softmax_and_cross_entropy() {
    let mut r = Rng::new(16, 0);
    let ins = [uniform(&mut r, &[3, 5], -3.0, 3.0)];
    fd_check("log_softmax", &ins, &[0], None, &|t| {
        project(&layers::log_softmax(&t[0]).unwrap(), 8)
    });
    let ins = [uniform(&mut r, &[4, 6], -3.0, 3.0)];
    let labels = Tensor::new(&[0i64, 5, 2, 2], &dev()).unwrap();
    fd_check("cross_entropy", &ins, &[0], None, &|t| {
        layers::cross_entropy(&t[0], &labels).unwrap()
    });
}

/// The whole network in f64: every parameter tensor at up to 40 random elements.
fn fd_network(arch: &str) {
    let cfg = ModelConfig {
        arch: arch.into(),
        ..ModelConfig::default()
    };
    let net = model::build(&cfg, [1, 28, 28], 10).unwrap();
    let mut rng = Rng::new(20, 0);
    let state = NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
    let params: Vec<Tensor> = state
        .params
        .iter()
        .map(|v| v.as_tensor().to_dtype(DType::F64).unwrap())
        .collect();
    let buffers: Vec<Tensor> = state
        .buffers
        .iter()
        .map(|b| {
            if b.dtype() == DType::F32 {
                b.to_dtype(DType::F64).unwrap()
            } else {
                b.clone()
            }
        })
        .collect();
    let x = uniform(&mut rng, &[4, 1, 28, 28], 0.0, 1.0);
    let y = Tensor::new(&[3i64, 1, 4, 1], &dev()).unwrap();
    let f = |p: &[Tensor]| -> Tensor {
        let mut b = buffers.clone();
        let logits = net.forward(p, &mut b, &x, Mode::Train).unwrap();
        layers::cross_entropy(&logits, &y).unwrap()
    };
    let all: Vec<usize> = (0..params.len()).collect();
    fd_check(&format!("{arch} network"), &params, &all, Some(40), &f);
}

#[test]
fn fd_mlp_network() {
    fd_network("mlp");
}

#[test]
fn fd_cnn_network() {
    fd_network("cnn");
}

#[test]
fn fd_cnn_bn_network() {
    fd_network("cnn_bn");
}

// ------------------------------------------------------------- (c) max-pool with ties

/// Gradient of `sum(max_pool2d(x) * r)` for a one-plane `x` (`h` x `w`), and the output.
fn pool_grad(
    x: &[f32],
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    dtype: DType,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let x = Tensor::from_vec(x.to_vec(), (1, 1, h, w), &dev())
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let v = Var::from_tensor(&x).unwrap();
    let y = layers::max_pool2d(v.as_tensor(), k, s, p).unwrap();
    let n = y.elem_count();
    // r = 1, 2, 3, ...: each output cell's gradient is recognisable.
    let r = Tensor::from_vec(
        (1..=n).map(|i| i as f32).collect::<Vec<_>>(),
        y.dims(),
        &dev(),
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    (f64s(g.get(v.as_tensor()).unwrap()), f64s(&y), f64s(&r))
}

#[test]
fn max_pool_ties_go_to_the_first_maximum() {
    for dtype in [DType::F32, DType::F64] {
        // 2x2 stride 2 on a constant 4x4 plane: each window's top-left element.
        let (g, y, _) = pool_grad(&[1.0; 16], 4, 4, 2, 2, 0, dtype);
        assert_eq!(y, vec![1.0; 4]);
        #[rustfmt::skip]
        let want = vec![1.0, 0.0, 2.0, 0.0,
                        0.0, 0.0, 0.0, 0.0,
                        3.0, 0.0, 4.0, 0.0,
                        0.0, 0.0, 0.0, 0.0];
        assert_eq!(g, want, "{dtype:?}: 2x2 s2 constant plane");

        // A tie that is not at the window's first element: the first of the two 2s
        // (row-major) takes everything, the second nothing.
        let (g, y, _) = pool_grad(&[0.0, 2.0, 2.0, 1.0], 2, 2, 2, 2, 0, dtype);
        assert_eq!(y, vec![2.0]);
        assert_eq!(
            g,
            vec![0.0, 1.0, 0.0, 0.0],
            "{dtype:?}: tie at positions 1 and 2"
        );

        // 3x3 stride 2 padding 1 on a constant 5x5 plane: output 3x3, windows overlap;
        // the padding never wins, so each window's first in-bounds element is at row/col
        // max(2*o - 1, 0) = 0, 1, 3.
        let (g, y, _) = pool_grad(&[0.5; 25], 5, 5, 3, 2, 1, dtype);
        assert_eq!(y, vec![0.5; 9]);
        let mut want = vec![0.0; 25];
        for (oy, iy) in [0, 1, 3].into_iter().enumerate() {
            for (ox, ix) in [0, 1, 3].into_iter().enumerate() {
                want[iy * 5 + ix] += (oy * 3 + ox + 1) as f64;
            }
        }
        assert_eq!(g, want, "{dtype:?}: 3x3 s2 p1 constant plane");

        // Overlapping windows whose shared element is the unique maximum: its gradient
        // is the sum of both windows' gradients (3x3 stride 2 on 3x5: windows share
        // column 2).
        #[rustfmt::skip]
        let x = [0.0, 0.0, 0.0, 0.0, 0.0,
                 0.0, 0.0, 9.0, 0.0, 0.0,
                 0.0, 0.0, 0.0, 0.0, 0.0];
        let (g, y, _) = pool_grad(&x, 3, 5, 3, 2, 0, dtype);
        assert_eq!(y, vec![9.0, 9.0]);
        let mut want = vec![0.0; 15];
        want[7] = 1.0 + 2.0;
        assert_eq!(g, want, "{dtype:?}: shared maximum");
    }
}

/// The 2x2 stride-2 max-pool (the `cnn`s' pooling, a path of its own) against the rule
/// written out here in f64, window by window: the output is the window's first NaN in
/// reading order, else its first maximum, and that element alone takes the output's
/// gradient (`0 + g`), every other element `+0`. Inputs from {NaN, -1, -0, +0, 0.5, 1} put ties,
/// NaNs and signed zeros in every window slot; a 7x9 plane leaves a row and a column no
/// window reads. Compared exactly (bits of the gradient) in f32, bf16 and f64.
#[test]
fn max_pool_2x2_follows_the_first_maximum_rule() {
    let (n, c, h, w) = (2, 3, 7, 9);
    let (oh, ow) = (h / 2, w / 2);
    let pool = [f64::NAN, -1.0, -0.0, 0.0, 0.5, 1.0];
    let mut rng = Rng::new(17, 0);
    let x: Vec<f64> = (0..n * c * h * w)
        .map(|_| pool[(rng.next_f64() * pool.len() as f64) as usize % pool.len()])
        .collect();
    // Output gradients: signed zeros and small integers (exact in bf16).
    let r: Vec<f64> = (0..n * c * oh * ow)
        .map(|i| match i % 5 {
            0 => -0.0,
            k => k as f64 - 2.0,
        })
        .collect();
    // The rule: (output, position of the element that takes the gradient) per cell.
    let mut want_y = vec![0f64; r.len()];
    let mut want_g = vec![0f64; x.len()];
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let at = |dy: usize, dx: usize| plane * h * w + (2 * oy + dy) * w + 2 * ox + dx;
                let window = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
                let first_nan = window.iter().find(|&&i| x[i].is_nan());
                let pick = *first_nan.unwrap_or(&window.into_iter().fold(window[0], |b, i| {
                    if x[i] > x[b] {
                        i
                    } else {
                        b
                    }
                }));
                let cell = plane * oh * ow + oy * ow + ox;
                want_y[cell] = x[pick];
                want_g[pick] = 0.0 + r[cell];
            }
        }
    }
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let xt = Tensor::from_vec(x.clone(), (n, c, h, w), &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let v = Var::from_tensor(&xt).unwrap();
        let y = layers::max_pool2d(v.as_tensor(), 2, 2, 0).unwrap();
        let rt = Tensor::from_vec(r.clone(), y.dims(), &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let g = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
        let (got_y, got_g) = (f64s(&y), f64s(g.get(v.as_tensor()).unwrap()));
        for (i, (a, b)) in got_y.iter().zip(&want_y).enumerate() {
            let same = (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits();
            assert!(same, "{dtype:?}: output {i} is {a}, the rule gives {b}");
        }
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got_g), bits(&want_g), "{dtype:?}: input gradient");
    }
}

// ------------------------------------------------- (d) BatchNorm running statistics

/// Per-channel batch mean and (biased, unbiased) variance in f64, for x [N,C,H,W].
fn channel_stats(x: &[f64], n: usize, c: usize, hw: usize) -> Vec<(f64, f64, f64)> {
    (0..c)
        .map(|ch| {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| x[(i * c + ch) * hw..(i * c + ch + 1) * hw].to_vec())
                .collect();
            let m = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / m;
            let ss: f64 = vals.iter().map(|v| (v - mean).powi(2)).sum();
            (mean, ss / m, ss / (m - 1.0))
        })
        .collect()
}

#[test]
fn batch_norm_running_statistics_follow_pytorch() {
    let (n, c, h, w) = (5, 3, 4, 4);
    let mut rng = Rng::new(30, 0);
    let wgt = uniform(&mut rng, &[c], 0.5, 1.5)
        .to_dtype(DType::F32)
        .unwrap();
    let bias = uniform(&mut rng, &[c], -1.0, 1.0)
        .to_dtype(DType::F32)
        .unwrap();
    let mut mean = Tensor::new(&[0.5f32, -1.0, 2.0], &dev()).unwrap();
    let mut var = Tensor::new(&[1.5f32, 0.7, 3.0], &dev()).unwrap();
    let mut count = Tensor::new(7i64, &dev()).unwrap();
    // Running statistics in f64, updated by PyTorch's rule.
    let mut rm: Vec<f64> = f64s(&mean);
    let mut rv: Vec<f64> = f64s(&var);
    let mut worst_buf = 0f64;
    let mut worst_y = 0f64;
    for batch in 0..2 {
        // Channels with different offsets and spreads.
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|i| {
                let ch = (i / (h * w)) % c;
                (ch as f64 * 1.5 - 1.0 + (0.5 + ch as f64) * (rng.next_f64() - 0.5)) as f32
            })
            .collect();
        let xt = Tensor::from_vec(x.clone(), (n, c, h, w), &dev()).unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let st = channel_stats(&x64, n, c, h * w);
        let y = layers::batch_norm2d(
            &xt,
            &wgt,
            &bias,
            BnBuffers {
                mean: &mut mean,
                var: &mut var,
                count: &mut count,
            },
            Mode::Train,
        )
        .unwrap();
        for ch in 0..c {
            rm[ch] = 0.9 * rm[ch] + 0.1 * st[ch].0;
            rv[ch] = 0.9 * rv[ch] + 0.1 * st[ch].2;
        }
        // Buffers: relative 2e-6 per channel (f32 sums over N*H*W = 80 values).
        for (got, want, what) in [
            (f64s(&mean), &rm, "running_mean"),
            (f64s(&var), &rv, "running_var"),
        ] {
            for ch in 0..c {
                let rel = (got[ch] - want[ch]).abs() / want[ch].abs();
                worst_buf = worst_buf.max(rel);
                assert!(
                    rel < 2e-6,
                    "batch {batch} {what}[{ch}]: {} vs f64 {} (rel {rel:e})",
                    got[ch],
                    want[ch]
                );
            }
        }
        assert_eq!(
            count.to_scalar::<i64>().unwrap(),
            8 + batch,
            "num_batches_tracked"
        );
        // The output uses the biased batch variance: absolute 1e-5 (|y| is O(1)).
        let (wv, bv) = (f64s(&wgt), f64s(&bias));
        for (i, got) in f64s(&y).iter().enumerate() {
            let ch = (i / (h * w)) % c;
            let want = (x64[i] - st[ch].0) / (st[ch].1 + 1e-5).sqrt() * wv[ch] + bv[ch];
            worst_y = worst_y.max((got - want).abs());
            assert!(
                (got - want).abs() < 1e-5,
                "batch {batch} y[{i}]: {got} vs f64 {want}"
            );
        }
    }
    eprintln!("batch_norm2d Train: worst running-statistic rel error {worst_buf:.3e}, worst output abs error {worst_y:.3e}");
}

#[test]
fn batch_norm_stats_and_eval_leave_buffers_alone() {
    let mut rng = Rng::new(31, 0);
    let x = uniform(&mut rng, &[4, 2, 3, 3], -1.0, 3.0)
        .to_dtype(DType::F32)
        .unwrap();
    let wgt = Tensor::new(&[1.2f32, 0.8], &dev()).unwrap();
    let bias = Tensor::new(&[0.1f32, -0.2], &dev()).unwrap();
    let init = (
        Tensor::new(&[0.25f32, -0.5], &dev()).unwrap(),
        Tensor::new(&[2.0f32, 0.5], &dev()).unwrap(),
        Tensor::new(3i64, &dev()).unwrap(),
    );
    let run = |mode: Mode| {
        let (mut m, mut v, mut k) = (
            init.0.copy().unwrap(),
            init.1.copy().unwrap(),
            init.2.copy().unwrap(),
        );
        let y = layers::batch_norm2d(
            &x,
            &wgt,
            &bias,
            BnBuffers {
                mean: &mut m,
                var: &mut v,
                count: &mut k,
            },
            mode,
        )
        .unwrap();
        (f32s(&y), f32s(&m), f32s(&v), k.to_scalar::<i64>().unwrap())
    };
    let (y_train, m_train, _, k_train) = run(Mode::Train);
    let (y_stats, m_stats, v_stats, k_stats) = run(Mode::Stats);
    let (y_eval, m_eval, v_eval, k_eval) = run(Mode::Eval);
    // Train does change the buffers (so the comparisons below can fail).
    assert_ne!(m_train, f32s(&init.0));
    assert_eq!(k_train, 4);
    // Stats: batch statistics (the same output as Train, bit for bit), buffers untouched.
    assert_eq!(y_stats, y_train);
    assert_eq!(
        (m_stats, v_stats, k_stats),
        (f32s(&init.0), f32s(&init.1), 3)
    );
    // Eval: running statistics, buffers untouched.
    assert_eq!((m_eval, v_eval, k_eval), (f32s(&init.0), f32s(&init.1), 3));
    let xs = f32s(&x);
    for (i, got) in y_eval.iter().enumerate() {
        let ch = (i / 9) % 2;
        let (rm, rv) = ([0.25f64, -0.5][ch], [2.0f64, 0.5][ch]);
        let want = (xs[i] as f64 - rm) / (rv + 1e-5).sqrt() * [1.2, 0.8][ch] + [0.1, -0.2][ch];
        assert!(
            (*got as f64 - want).abs() < 1e-5,
            "eval y[{i}]: {got} vs {want}"
        );
    }
}

#[test]
fn relu_gradient_at_exactly_zero_is_zero() {
    // PyTorch: threshold_backward(grad, relu(x), 0) is 0 wherever relu(x) <= 0.
    let x = Var::from_tensor(&Tensor::new(&[-1.0f32, 0.0, 2.0], &dev()).unwrap()).unwrap();
    let g = layers::relu(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(f32s(g.get(x.as_tensor()).unwrap()), vec![0.0, 0.0, 1.0]);
}
