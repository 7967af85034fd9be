//! The device-generic paths (candle tensor ops, taken off the CPU) against the CPU custom
//! ops, run on the CPU in f32 with seeded random inputs.
//!
//! Each layer function: forward values and the gradients of `sum(y * r)` (random `r`)
//! for every input. Deviation per tensor: `max |generic - custom| / max |custom|`
//! (scale-relative), bounded per op below; the CPU ops reduce in f64 and round once,
//! the generic ones reduce in f32, so the bounds are a few f32 ulps of the scale
//! (exact where the arithmetic is the same). Max-pool is also checked on inputs full
//! of ties (ReLU zeros): the first maximum of a window takes the whole gradient on both
//! paths. The optimizer's generic update keeps the kernels' operation order and f32
//! scalars, so parameters and state must be bit-identical over several steps. Whole
//! networks (`cnn`, `resnet18`, a small `vit`) run forward and backward with every layer
//! function on its generic path (`with_generic_ops`) and on the custom path, both
//! against the custom path in f64: logits, loss and every parameter's gradient of the
//! generic path must deviate at most 4x as much as the custom path's (plus 1e-6).

use candle_core::{DType, Device, Tensor, Var};
use ldt::config::OptimName;
use ldt::model::{dispatch, layers, Mode, NetState};
use ldt::optim::{Grad, OptimSettings, Optimizer};
use ldt::rng::Rng;
use ldt::verify;

/// f32 tensor of `shape` uniform in [lo, hi).
fn uniform(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(rng.uniform_vec(n, lo, hi), shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// `max |a - b| / max |b|` (0 when both are all zero).
fn deviation(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    if diff == 0.0 {
        0.0
    } else {
        diff / scale
    }
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Tensor;

/// Runs `custom` and `generic` on Vars of `inputs`, returns the worst deviation of the
/// forward value and of each input's gradient of `sum(y * r)`.
fn compare(rng: &mut Rng, inputs: &[Tensor], custom: Op, generic: Op) -> (f64, Vec<f64>) {
    let run = |f: Op| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        (y, vars)
    };
    let (yc, vc) = run(custom);
    let (yg, vg) = run(generic);
    // In the outputs' dtype (bf16 for the bf16 checks).
    let r = uniform(rng, yc.dims(), -1.0, 1.0)
        .to_dtype(yc.dtype())
        .unwrap();
    let gc = (&yc * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (&yg * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vc
        .iter()
        .zip(&vg)
        .map(|(c, g)| {
            deviation(
                gg.get(g.as_tensor()).expect("generic gradient"),
                gc.get(c.as_tensor()).expect("custom gradient"),
            )
        })
        .collect();
    (deviation(&yg, &yc), grads)
}

fn check(name: &str, (fwd, grads): (f64, Vec<f64>), fwd_tol: f64, grad_tol: f64) {
    println!("{name}: forward {fwd:.3e}, gradients {grads:?}");
    assert!(
        fwd <= fwd_tol,
        "{name}: forward deviation {fwd:e} > {fwd_tol:e}"
    );
    for g in grads {
        assert!(
            g <= grad_tol,
            "{name}: gradient deviation {g:e} > {grad_tol:e}"
        );
    }
}

#[test]
fn relu_matches_exactly() {
    let mut rng = Rng::new(1, 0);
    // Soft-thresholded: positive, negative and exact zeros (both gradients are 0 there).
    let u = uniform(&mut rng, &[4, 8, 9, 9], -1.0, 1.0);
    let pos = layers::relu(&(&u - 0.3).unwrap()).unwrap();
    let neg = layers::relu(&(u.neg().unwrap() - 0.3).unwrap()).unwrap();
    let x = (pos - neg).unwrap();
    let r = compare(&mut rng, &[x], &|t| layers::relu(&t[0]).unwrap(), &|t| {
        layers::relu_generic(&t[0]).unwrap()
    });
    check("relu", r, 0.0, 0.0);
}

/// BatchNorm2d in `Mode::Train` (with `relu`, `batch_norm2d_relu`) on fresh running
/// buffers (mean 0, variance 1, count 0): the output and the buffers after it.
fn bn_train(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> (Tensor, [Tensor; 3]) {
    let c = x.dims()[1];
    let mut mean = Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
    let mut var = Tensor::ones(c, DType::F32, &Device::Cpu).unwrap();
    let mut count = Tensor::new(0i64, &Device::Cpu).unwrap();
    let buffers = layers::BnBuffers {
        mean: &mut mean,
        var: &mut var,
        count: &mut count,
    };
    let y = match relu {
        true => layers::batch_norm2d_relu(x, w, b, buffers, Mode::Train).unwrap(),
        false => layers::batch_norm2d(x, w, b, buffers, Mode::Train).unwrap(),
    };
    (y, [mean, var, count.to_dtype(DType::F32).unwrap()])
}

/// BatchNorm2d in `Mode::Train` (`model::batch_norm`, one op on the CPU that rounds
/// candle's graph step by step) against that graph (the generic path): output, the
/// gradients of the input, scale and shift, and the running mean, variance and count,
/// all bit-identical. Also with a frozen scale and shift (the input's gradient alone),
/// and with one pixel per channel and image (`m = 2`) and a large offset (cancellation).
#[test]
fn batch_norm_matches_exactly() {
    let mut rng = Rng::new(3, 0);
    let bn = |x: &Tensor, w: &Tensor, b: &Tensor| bn_train(x, w, b, false);
    for (shape, offset) in [
        ([4, 3, 5, 7], 0.0),
        ([2, 8, 1, 1], 0.0),
        ([3, 5, 6, 6], 100.0),
        ([16, 4, 9, 9], 0.0),
    ] {
        let c = shape[1];
        let x = (uniform(&mut rng, &shape, -2.0, 3.0) + offset).unwrap();
        let w = uniform(&mut rng, &[c], 0.5, 1.5);
        let b = uniform(&mut rng, &[c], -0.5, 0.5);
        let host = |t: &[Tensor]| bn(&t[0], &t[1], &t[2]).0;
        let generic = |t: &[Tensor]| dispatch::with_generic_ops(|| bn(&t[0], &t[1], &t[2]).0);
        let r = compare(
            &mut rng,
            &[x.clone(), w.clone(), b.clone()],
            &host,
            &generic,
        );
        check(&format!("batch_norm2d {shape:?} + {offset}"), r, 0.0, 0.0);
        let frozen = |t: &[Tensor]| bn(&t[0], &w, &b).0;
        let frozen_generic = |t: &[Tensor]| dispatch::with_generic_ops(|| bn(&t[0], &w, &b).0);
        let r = compare(&mut rng, std::slice::from_ref(&x), &frozen, &frozen_generic);
        check(
            &format!("batch_norm2d {shape:?}, frozen scale"),
            r,
            0.0,
            0.0,
        );
        let (host_buffers, generic_buffers) = (
            bn(&x, &w, &b).1,
            dispatch::with_generic_ops(|| bn(&x, &w, &b).1),
        );
        for (h, g) in host_buffers.iter().zip(&generic_buffers) {
            let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(h), bits(g), "running buffers of {shape:?}");
        }
    }
}

/// The fused ops against the ops apart, bit for bit (deviation 0): BatchNorm2d + ReLU
/// (`batch_norm2d_relu`) against `relu(batch_norm2d(..))` and against the generic path,
/// and `add_relu(a, b)` against `relu(a + b)`; each in f32 and in bf16. In bf16 the
/// reference is the chain the fused op replaces: the inputs widened to f32, normalized
/// by the f32 op, rounded to bf16, then the ReLU, every cast a recorded node (and the
/// bf16 sum candle's own add). The inputs are f32 Vars, cast to bf16 inside both sides,
/// so the gradients compared have passed through the bf16 rounding.
#[test]
fn fused_relu_ops_match_exactly() {
    let mut rng = Rng::new(5, 0);
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let bn = |x: &Tensor, w: &Tensor, b: &Tensor, relu: bool| bn_train(x, w, b, relu).0;
    for shape in [[4, 3, 5, 7], [2, 8, 1, 1], [8, 4, 6, 6]] {
        let c = shape[1];
        let x = uniform(&mut rng, &shape, -2.0, 3.0);
        let w = uniform(&mut rng, &[c], -1.5, 1.5);
        let b = uniform(&mut rng, &[c], -0.5, 0.5);
        let inputs = [x.clone(), w, b];
        let fused = |t: &[Tensor]| bn(&t[0], &t[1], &t[2], true);
        let apart = |t: &[Tensor]| layers::relu(&bn(&t[0], &t[1], &t[2], false)).unwrap();
        let generic = |t: &[Tensor]| dispatch::with_generic_ops(|| fused(t));
        let r = compare(&mut rng, &inputs, &fused, &apart);
        check(&format!("batch_norm2d_relu {shape:?} f32"), r, 0.0, 0.0);
        let r = compare(&mut rng, &inputs, &fused, &generic);
        check(&format!("batch_norm2d_relu {shape:?} generic"), r, 0.0, 0.0);
        let fused = |t: &[Tensor]| bn(&bf16(&t[0]), &bf16(&t[1]), &bf16(&t[2]), true);
        let apart = |t: &[Tensor]| {
            let [x, w, b] = [0, 1, 2].map(|i| f32(&bf16(&t[i])));
            layers::relu(&bf16(&bn(&x, &w, &b, false))).unwrap()
        };
        let r = compare(&mut rng, &inputs, &fused, &apart);
        check(&format!("batch_norm2d_relu {shape:?} bf16"), r, 0.0, 0.0);
        // Without the ReLU, bf16 against the chain of casts.
        let fused = |t: &[Tensor]| bn(&bf16(&t[0]), &bf16(&t[1]), &bf16(&t[2]), false);
        let apart = |t: &[Tensor]| {
            let [x, w, b] = [0, 1, 2].map(|i| f32(&bf16(&t[i])));
            bf16(&bn(&x, &w, &b, false))
        };
        let r = compare(&mut rng, &inputs, &fused, &apart);
        check(&format!("batch_norm2d {shape:?} bf16"), r, 0.0, 0.0);

        let y = uniform(&mut rng, &shape, -1.0, 1.0);
        let pair = [x, y];
        for half in [false, true] {
            let cast = |t: &Tensor| if half { bf16(t) } else { t.clone() };
            let fused = |t: &[Tensor]| layers::add_relu(&cast(&t[0]), &cast(&t[1])).unwrap();
            let apart = |t: &[Tensor]| layers::relu(&(cast(&t[0]) + cast(&t[1])).unwrap()).unwrap();
            let generic = |t: &[Tensor]| dispatch::with_generic_ops(|| fused(t));
            let r = compare(&mut rng, &pair, &fused, &apart);
            check(&format!("add_relu {shape:?} bf16 {half}"), r, 0.0, 0.0);
            let r = compare(&mut rng, &pair, &fused, &generic);
            check(
                &format!("add_relu {shape:?} bf16 {half}, generic"),
                r,
                0.0,
                0.0,
            );
        }
    }
}

/// `linear_rows` (one op on the CPU) against the chain it replaces, built from the
/// public ops: reshape to rows, product with `W^T`, `add_bias` (the CPU bias op, f64
/// bias gradient), reshape back. Forward and every gradient bit-identical (deviation 0),
/// in f32 and in bf16 (f32 Vars cast inside both sides), with and without a bias, and
/// with the weight frozen (the input's gradient alone).
#[test]
fn linear_rows_matches_exactly() {
    let mut rng = Rng::new(6, 0);
    let chain = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
        let mut dims = x.dims().to_vec();
        let last = dims.pop().unwrap();
        let rows: usize = dims.iter().product();
        let y = x
            .reshape((rows, last))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap();
        let y = match b {
            Some(b) => layers::add_bias(&y, b).unwrap(),
            None => y,
        };
        dims.push(w.dim(0).unwrap());
        y.reshape(dims).unwrap()
    };
    for half in [false, true] {
        let cast = |t: &Tensor| match half {
            true => t.to_dtype(DType::BF16).unwrap(),
            false => t.clone(),
        };
        let x = uniform(&mut rng, &[3, 5, 7], -1.0, 1.0);
        let w = uniform(&mut rng, &[6, 7], -1.0, 1.0);
        let b = uniform(&mut rng, &[6], -1.0, 1.0);
        let inputs = [x.clone(), w.clone(), b];
        let fused = |t: &[Tensor]| {
            layers::linear_rows(&cast(&t[0]), &cast(&t[1]), Some(&cast(&t[2]))).unwrap()
        };
        let apart = |t: &[Tensor]| chain(&cast(&t[0]), &cast(&t[1]), Some(&cast(&t[2])));
        let r = compare(&mut rng, &inputs, &fused, &apart);
        check(&format!("linear_rows bf16 {half}"), r, 0.0, 0.0);
        let pair = [x.clone(), w.clone()];
        let fused = |t: &[Tensor]| layers::linear_rows(&cast(&t[0]), &cast(&t[1]), None).unwrap();
        let apart = |t: &[Tensor]| chain(&cast(&t[0]), &cast(&t[1]), None);
        let r = compare(&mut rng, &pair, &fused, &apart);
        check(&format!("linear_rows, no bias, bf16 {half}"), r, 0.0, 0.0);
        let fused = |t: &[Tensor]| layers::linear_rows(&cast(&t[0]), &cast(&w), None).unwrap();
        let apart = |t: &[Tensor]| chain(&cast(&t[0]), &cast(&w), None);
        let r = compare(&mut rng, std::slice::from_ref(&x), &fused, &apart);
        check(
            &format!("linear_rows, frozen weight, bf16 {half}"),
            r,
            0.0,
            0.0,
        );
    }
}

/// The f32 bit patterns of `t`'s elements (bf16 widens exactly, signs of zeros kept).
fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|v| v.to_bits()).collect()
}

/// The attention between the linears (`self_attention_heads`, one op on the CPU)
/// against the chain of candle ops it replaces (`heads_recorded`: split, scale, products,
/// the CPU softmax, merge): the output and the input's gradient bit for bit, signs of
/// zeros included, in f32, bf16 (cast inside both sides) and f64. The input has a
/// head's values and a token's queries set to exact zeros and the output's weights have
/// exact zeros, so zero gradients occur; two heads of width 4, 5 tokens, batch 2.
#[test]
fn attention_heads_match_exactly() {
    use ldt::model::attention::{heads_recorded, self_attention_heads};
    let mut rng = Rng::new(8, 0);
    let (b, n, heads, d) = (2, 5, 2, 4);
    let dim = heads * d;
    let mut x = rng.uniform_vec(b * n * 3 * dim, -2.0, 2.0);
    for t in 0..n {
        for j in 0..d {
            x[t * 3 * dim + 2 * dim + j] = 0.0; // batch 0, head 0's values
        }
    }
    for j in 0..dim {
        x[(n + 1) * 3 * dim + j] = 0.0; // batch 1, token 1's queries
    }
    let x = Tensor::from_vec(x, (b, n, 3 * dim), &Device::Cpu).unwrap();
    let mut r = rng.uniform_vec(b * n * dim, -1.0, 1.0);
    for v in r.iter_mut().step_by(3) {
        *v = 0.0;
    }
    let r = Tensor::from_vec(r, (b, n, dim), &Device::Cpu).unwrap();
    for dt in [DType::F32, DType::BF16, DType::F64] {
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let v = Var::from_tensor(&x).unwrap();
            let y = f(&v.as_tensor().to_dtype(dt).unwrap());
            let loss = (&y * &r.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            (y, g.get(v.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&|t| self_attention_heads(t, heads).unwrap());
        let (y2, g2) = run(&|t| heads_recorded(t, heads).unwrap());
        assert_eq!(bits(&y1), bits(&y2), "{dt:?}: attention output");
        assert_eq!(bits(&g1), bits(&g2), "{dt:?}: attention input gradient");
        let zeros = values(&g1).iter().filter(|v| **v == 0.0).count();
        assert!(zeros > 0, "{dt:?}: no zero gradient exercised");
        println!("{dt:?}: output and gradient identical ({zeros} zero gradients)");
    }
}

#[test]
fn max_pool_matches_exactly() {
    let mut rng = Rng::new(2, 0);
    // (kernel, stride, padding): the ResNet stem, kernel == stride, overlapping windows
    // without padding, a wide padded kernel.
    for (k, s, p) in [(3, 2, 1), (2, 2, 0), (3, 1, 0), (5, 3, 2)] {
        for ties in [false, true] {
            let x = uniform(&mut rng, &[3, 4, 13, 11], -1.0, 1.0);
            // ReLU output: about half the entries are tied zeros.
            let x = if ties { layers::relu(&x).unwrap() } else { x };
            let r = compare(
                &mut rng,
                &[x],
                &|t| layers::max_pool2d(&t[0], k, s, p).unwrap(),
                &|t| layers::max_pool2d_generic(&t[0], k, s, p).unwrap(),
            );
            // Overlapping windows add their gradients in another order: a few ulps.
            check(
                &format!("max_pool2d k{k} s{s} p{p} ties {ties}"),
                r,
                0.0,
                3e-7,
            );
        }
    }
}

#[test]
fn conv2d_matches() {
    let mut rng = Rng::new(3, 0);
    // ResNet's stem, 3x3 stride 1 and 2, and the 1x1 stride-2 downsample.
    for (c, o, k, s, p, bias) in [
        (3, 8, 7, 2, 3, false),
        (8, 8, 3, 1, 1, true),
        (8, 16, 3, 2, 1, false),
        (8, 16, 1, 2, 0, true),
    ] {
        let x = uniform(&mut rng, &[2, c, 15, 14], -1.0, 1.0);
        let w = uniform(&mut rng, &[o, c, k, k], -0.5, 0.5);
        let mut inputs = vec![x, w];
        if bias {
            inputs.push(uniform(&mut rng, &[o], -0.5, 0.5));
        }
        let r = compare(
            &mut rng,
            &inputs,
            &|t| layers::conv2d(&t[0], &t[1], t.get(2), s, p).unwrap(),
            &|t| layers::conv2d_generic(&t[0], &t[1], t.get(2), s, p).unwrap(),
        );
        // Another summation order of the same products (im2col GEMM vs candle's direct
        // convolution).
        check(&format!("conv2d {c}->{o} k{k} s{s} p{p}"), r, 2e-6, 2e-6);
    }
}

#[test]
fn layer_norm_matches() {
    let mut rng = Rng::new(4, 0);
    let x = uniform(&mut rng, &[5, 7, 48], -2.0, 3.0);
    let w = uniform(&mut rng, &[48], 0.5, 1.5);
    let b = uniform(&mut rng, &[48], -0.5, 0.5);
    let r = compare(
        &mut rng,
        &[x, w, b],
        &|t| layers::layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap(),
        &|t| layers::layer_norm_generic(&t[0], &t[1], &t[2], 1e-6).unwrap(),
    );
    check("layer_norm", r, 1e-6, 1e-6);
}

#[test]
fn add_bias_matches() {
    let mut rng = Rng::new(5, 0);
    let y = uniform(&mut rng, &[64, 40], -1.0, 1.0);
    let b = uniform(&mut rng, &[40], -1.0, 1.0);
    let r = compare(
        &mut rng,
        &[y.clone(), b.clone()],
        &|t| layers::add_bias(&t[0], &t[1]).unwrap(),
        &|t| layers::add_bias_generic(&t[0], &t[1]).unwrap(),
    );
    // The same f32 addition forward; the bias gradient is summed in f32, not f64.
    check("add_bias", r, 0.0, 1e-6);
    let x = uniform(&mut rng, &[2, 32, 24], -1.0, 1.0);
    let w = uniform(&mut rng, &[40, 24], -0.5, 0.5);
    let r = compare(
        &mut rng,
        &[x, w, b],
        &|t| layers::linear_rows(&t[0], &t[1], Some(&t[2])).unwrap(),
        &|t| {
            let y = t[0].reshape((64, 24)).unwrap().matmul(&t[1].t().unwrap());
            layers::add_bias_generic(&y.unwrap(), &t[2])
                .unwrap()
                .reshape((2, 32, 40))
                .unwrap()
        },
    );
    check("linear_rows", r, 0.0, 1e-6);
}

#[test]
fn gelu_erf_matches() {
    let mut rng = Rng::new(6, 0);
    let x = uniform(&mut rng, &[16, 300], -5.0, 5.0);
    let r = compare(
        &mut rng,
        &[x],
        &|t| layers::gelu_erf(&t[0]).unwrap(),
        &|t| layers::gelu_erf_generic(&t[0]).unwrap(),
    );
    check("gelu_erf", r, 1e-6, 1e-6);
}

#[test]
fn softmax_matches() {
    let mut rng = Rng::new(7, 0);
    let x = uniform(&mut rng, &[3, 4, 17, 17], -6.0, 6.0);
    let r = compare(
        &mut rng,
        &[x],
        &|t| layers::softmax_last_dim(&t[0]).unwrap(),
        &|t| layers::softmax_last_dim_generic(&t[0]).unwrap(),
    );
    check("softmax_last_dim", r, 1e-6, 1e-6);
}

#[test]
fn optimizer_generic_update_is_bit_identical() {
    let settings = |name, betas, weight_decay, momentum| OptimSettings {
        name,
        betas,
        eps: 1e-8,
        weight_decay,
        momentum,
    };
    let cases = [
        settings(OptimName::Adam, [0.9, 0.999], 0.0, 0.0),
        settings(OptimName::Adam, [0.9, 0.999], 5e-4, 0.0),
        settings(OptimName::Adamw, [0.9, 0.95], 0.05, 0.0),
        settings(OptimName::Adam, [0.0, 0.99], 0.0, 0.0),
        // beta1 = 0.4: lerp weight 0.6 >= 0.5 takes the kernel's other branch.
        settings(OptimName::Adamw, [0.4, 0.999], 0.01, 0.0),
        settings(OptimName::Sgd, [0.9, 0.999], 5e-4, 0.9),
        settings(OptimName::Sgd, [0.9, 0.999], 0.0, 0.0),
    ];
    for s in cases {
        let mut rng = Rng::new(8, 0);
        let p0 = uniform(&mut rng, &[37, 23], -1.0, 1.0);
        let (pc, pg) = (
            Var::from_tensor(&p0).unwrap(),
            Var::from_tensor(&p0).unwrap(),
        );
        let mut oc = Optimizer::new(s.clone(), 1);
        let mut og = Optimizer::new(s.clone(), 1);
        for step in 0..6 {
            let g = uniform(&mut rng, &[37, 23], -0.1, 0.1);
            let lr = 1e-3 * (1.0 + step as f64);
            oc.step(0, &pc, &Grad::Device(g.clone()), lr).unwrap();
            og.step_generic(0, &pg, &g, lr).unwrap();
            assert_eq!(
                values(pc.as_tensor()),
                values(pg.as_tensor()),
                "{s:?} step {step}"
            );
            let (sc, sg) = (oc.state(0).unwrap(), og.state(0).unwrap());
            let (tc, tg) = (sc.tensors(), sg.tensors());
            assert_eq!(tc.len(), tg.len());
            for ((nc, c), (ng, g)) in tc.iter().zip(&tg) {
                assert_eq!(nc, ng);
                assert_eq!(values(c), values(g), "{s:?} step {step} state {nc}");
            }
        }
        assert_ne!(values(pc.as_tensor()), values(&p0));
    }
}

/// Logits, loss and parameter gradients of one train forward/backward of `arch`.
fn network_pass(
    net: &dyn ldt::model::Network,
    state: &NetState,
    x: &Tensor,
    y: &Tensor,
) -> (Tensor, Tensor, Vec<Tensor>) {
    let mut state = state.deep_clone().unwrap();
    let all = vec![true; state.params.len()];
    let logits = net
        .forward(&state.view(&all), &mut state.buffers, x, Mode::Train)
        .unwrap();
    let loss = layers::cross_entropy(&logits, y).unwrap();
    let grads = loss.backward().unwrap();
    let g = state
        .params
        .iter()
        .map(|p| grads.get(p.as_tensor()).expect("gradient").clone())
        .collect();
    (logits, loss, g)
}

/// A copy of `state` in f64 (integer buffers kept).
fn to_f64(state: &NetState) -> NetState {
    NetState {
        params: state
            .params
            .iter()
            .map(|p| Var::from_tensor(&p.as_tensor().to_dtype(DType::F64).unwrap()).unwrap())
            .collect(),
        buffers: state
            .buffers
            .iter()
            .map(|b| match b.dtype() {
                DType::F32 => b.to_dtype(DType::F64).unwrap(),
                _ => b.clone(),
            })
            .collect(),
        masters: None,
        stream: None,
    }
}

/// Whole network, generic vs custom path in f32, both measured against the custom path
/// in f64: the generic path's worst deviation (logits, loss, each gradient) must stay
/// within `factor` times the custom f32 path's own (plus 1e-6 of the scale), i.e. the
/// two differ by f32 rounding, not by arithmetic; and generic vs custom directly within
/// `direct`.
fn whole_network(arch: &str, set: &[&str], input: [usize; 3], factor: f64, direct: f64) {
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    let net = ldt::model::build(&verify::model_config(arch, &set).unwrap(), input, 10).unwrap();
    let mut rng = Rng::new(9, 0);
    let state = NetState::init(net.as_ref(), &mut rng, &Device::Cpu).unwrap();
    let n = 4;
    let x = uniform(&mut rng, &[n, input[0], input[1], input[2]], -1.0, 1.0);
    let labels: Vec<i64> = (0..n).map(|_| rng.below(10) as i64).collect();
    let y = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();
    let x64 = x.to_dtype(DType::F64).unwrap();
    let reference = network_pass(net.as_ref(), &to_f64(&state), &x64, &y);
    let custom = network_pass(net.as_ref(), &state, &x, &y);
    let generic = dispatch::with_generic_ops(|| network_pass(net.as_ref(), &state, &x, &y));
    let worst = |(l, s, g): &(Tensor, Tensor, Vec<Tensor>)| {
        let grad = g
            .iter()
            .zip(&reference.2)
            .map(|(a, r)| deviation(a, r))
            .fold(0f64, f64::max);
        [deviation(l, &reference.0), deviation(s, &reference.1), grad]
    };
    let (c, g) = (worst(&custom), worst(&generic));
    for (i, what) in ["logits", "loss", "worst gradient"].iter().enumerate() {
        let d = match i {
            0 => deviation(&generic.0, &custom.0),
            1 => deviation(&generic.1, &custom.1),
            _ => custom
                .2
                .iter()
                .zip(&generic.2)
                .map(|(c, g)| deviation(g, c))
                .fold(0f64, f64::max),
        };
        println!(
            "{arch} {what} vs f64: custom {:.3e}, generic {:.3e}; generic vs custom {d:.3e}",
            c[i], g[i]
        );
        assert!(
            d <= direct,
            "{arch} {what}: generic vs custom {d:e} > {direct:e}"
        );
        assert!(
            g[i] <= factor * c[i] + 1e-6,
            "{arch} {what}: generic {:e} vs custom {:e} (factor {factor})",
            g[i],
            c[i]
        );
    }
}

#[test]
fn cnn_generic_matches() {
    whole_network("cnn", &[], [1, 28, 28], 4.0, 2e-6);
}

#[test]
fn resnet18_generic_matches() {
    // 64x64 inputs: the last stage's BatchNorm normalizes 16 values per channel (batch 4,
    // 2x2). At 32x32 it normalized 4 (1x1), which amplifies f32 rounding chaotically:
    // one path's worst gradient came out 0.36 of the scale off the f64 one and the other's
    // 5e-4, which of the two depending on the machine's matrix kernels.
    whole_network("resnet18", &[], [3, 64, 64], 4.0, 1e-4);
}

#[test]
fn vit_generic_matches() {
    whole_network(
        "vit",
        &["model.width=24", "model.depth=2", "model.heads=2"],
        [3, 16, 16],
        4.0,
        2e-6,
    );
}
