//! The real backbones (`resnet18/34/50/101`, `vit`) against PyTorch, number by number.
//!
//! (a) The fixtures of `../shared/fixtures/backbones/` (skipped with a message when the
//!     folder is absent): eval and train logits, the train loss, every gradient and the
//!     BatchNorm running statistics after the train forward, compared per tensor as the
//!     fixture README prescribes: "scaled" = `max|a - ref| / max|ref|`, "rel-L2" =
//!     `||a - ref|| / ||ref||`. Each bound sits a few times above the deviation measured
//!     here (quoted next to it); the measured values are printed (`--nocapture`).
//! (b) Parameter and buffer names, order and shapes equal torchvision's / timm's (the
//!     fixtures' `meta.json` key lists; torchvision's parameter counts for the others).
//! (c) Every parameter of every backbone receives a finite, non-zero gradient.
//! (d) Finite differences in f64 for `layer_norm`, `gelu_erf`, `softmax_last_dim`,
//!     `multi_head_attention` and a whole tiny ViT.
//! (e) Saved weights reload bit for bit; `model.reset_head` replaces a head of another
//!     class count; a wrong key is listed; the `verify-model` command and its exit codes.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use ldt::model::{self, io, layers, Mode, NetState, Network};
use ldt::rng::Rng;
use ldt::verify::{self, Report};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dev() -> Device {
    Device::Cpu
}

/// The fixture case directory, or None (skip) when the fixtures are absent.
fn case(name: &str) -> Option<PathBuf> {
    let p = common::fixtures()?.join("backbones").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent (it is present in CI)", p.display());
        None
    }
}

/// `verify-model` on a fixture case, through the library.
fn verify_case(dir: &Path, arch: &str, set: &[&str]) -> Report {
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    let cfg = verify::model_config(arch, &set).unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = verify::run(
        &cfg,
        &dir.join("weights.safetensors"),
        &dir.join("io.safetensors"),
        &out.path().join("out.safetensors"),
    )
    .unwrap();
    eprintln!("{arch}:\n{}", report.table());
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    report
}

/// The summary of `kind`: (count, worst scaled, worst rel-L2, worst abs).
fn kind(report: &Report, kind: &str) -> (usize, f64, f64, f64) {
    let s = report
        .summary()
        .into_iter()
        .find(|s| s.kind == kind)
        .unwrap_or_else(|| panic!("no `{kind}` was compared"));
    (s.count, s.worst_scaled.0, s.worst_rel_l2.0, s.worst_abs)
}

/// Asserts `value <= bound`, naming what and the measured value.
fn within(what: &str, value: f64, bound: f64) {
    eprintln!("{what:<40} {value:>10.3e}  (bound {bound:.0e})");
    assert!(value <= bound, "{what}: {value:e} > {bound:e}");
}

// ------------------------------------------------------------------ (a) the fixtures

#[test]
fn resnet18_matches_pytorch() {
    let Some(dir) = case("resnet18-c10-s0") else {
        return;
    };
    let r = verify_case(&dir, "resnet18", &[]);
    // Measured (x86-64, AVX2): logits_eval 7.4e-7, logits_train 5.5e-6, loss 1.4e-6 abs,
    // running statistics 1.0e-6, gradients 1.8e-5 scaled / 1.0e-5 rel-L2 (all gradients
    // together 6.2e-6) — the fixture's f64 / ±1-ulp columns.
    let (n, scaled, _, _) = kind(&r, "logits_eval");
    assert_eq!(n, 1);
    within("resnet18 logits_eval scaled", scaled, 3e-6);
    let (_, scaled, _, _) = kind(&r, "logits_train");
    within("resnet18 logits_train scaled", scaled, 2e-5);
    let (_, _, _, abs) = kind(&r, "loss_train");
    within("resnet18 loss_train abs", abs, 5e-6);
    let (n, scaled, _, _) = kind(&r, "after_train_forward");
    assert_eq!(n, 40, "20 BatchNorm layers, mean and var each");
    within("resnet18 after_train_forward scaled", scaled, 5e-6);
    let (n, scaled, rel, _) = kind(&r, "grad");
    assert_eq!(n, 62, "one gradient per parameter");
    let all = r.grads_concat_rel_l2.expect("every gradient compared");
    if scaled <= 1e-4 && rel <= 1e-4 {
        within("resnet18 grad scaled (worst tensor)", scaled, 1e-4);
        within("resnet18 grad rel-L2 (worst tensor)", rel, 1e-4);
        within("resnet18 grad rel-L2 (all concatenated)", all, 5e-5);
    } else {
        // README "ReLU kinks": a ReLU input within rounding of 0 took the other side in
        // PyTorch (other CPU kernels round differently); the train-mode BatchNorm
        // backward then spreads the difference over every layer before it, while the
        // forward outputs (checked above) stay tight. The README's fallback bound:
        eprintln!(
            "WARNING: resnet18 gradients beyond 1e-4 (scaled {scaled:e}, rel-L2 {rel:e}): a ReLU kink flipped; applying the README's fallback (all gradients within 5e-2 rel-L2, every tensor within 0.1)"
        );
        within("resnet18 grad rel-L2 (all, kink fallback)", all, 5e-2);
        within("resnet18 grad rel-L2 (worst, kink fallback)", rel, 0.1);
    }
}

#[test]
fn vit_tiny_matches_pytorch() {
    let Some(dir) = case("vit-tiny-c10-s0") else {
        return;
    };
    // The model settings of the fixture (the defaults of `[model]` for `vit`, spelled out).
    let r = verify_case(
        &dir,
        "vit",
        &[
            "model.patch=4",
            "model.width=96",
            "model.depth=3",
            "model.heads=3",
            "model.mlp_ratio=4.0",
        ],
    );
    // Measured: logits 3.5e-7 scaled (both modes: no BatchNorm, no dropout), loss 2.4e-7
    // abs, gradients 9.0e-7 scaled / 7.9e-7 rel-L2 (all together 4.6e-7) — the fixture's
    // f64 column (reductions of LayerNorm, softmax and GELU run in f64 here).
    for k in ["logits_eval", "logits_train"] {
        let (_, scaled, _, _) = kind(&r, k);
        within(&format!("vit {k} scaled"), scaled, 2e-6);
    }
    let (_, _, _, abs) = kind(&r, "loss_train");
    within("vit loss_train abs", abs, 1e-6);
    let (n, scaled, rel, _) = kind(&r, "grad");
    assert_eq!(n, 44, "one gradient per parameter");
    within("vit grad scaled (worst tensor)", scaled, 5e-6);
    within("vit grad rel-L2 (worst tensor)", rel, 5e-6);
    assert!(
        r.summary().iter().all(|s| s.kind != "after_train_forward"),
        "the ViT has no buffers"
    );
}

// ------------------------------------------------------- (b) names, order and shapes

fn build(arch: &str, set: &[&str], input: [usize; 3], classes: usize) -> Box<dyn Network> {
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    model::build(&verify::model_config(arch, &set).unwrap(), input, classes).unwrap()
}

/// `(name, shape, kind)` of every key of a fixture's `meta.json`, in state_dict order.
fn meta_keys(dir: &Path) -> Vec<(String, Vec<usize>, String)> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    meta["weights_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
                k["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn names_follow_meta(net: &dyn Network, dir: &Path) {
    let keys = meta_keys(dir);
    let want_p: Vec<(String, Vec<usize>)> = keys
        .iter()
        .filter(|k| k.2 == "parameter")
        .map(|k| (k.0.clone(), k.1.clone()))
        .collect();
    let want_b: Vec<(String, Vec<usize>)> = keys
        .iter()
        .filter(|k| k.2 == "buffer")
        .map(|k| (k.0.clone(), k.1.clone()))
        .collect();
    let got_p: Vec<(String, Vec<usize>)> = net
        .params()
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect();
    let got_b: Vec<(String, Vec<usize>)> = net
        .buffers()
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect();
    assert_eq!(got_p, want_p, "named_parameters() order and shapes");
    assert_eq!(got_b, want_b, "named_buffers() order and shapes");
}

#[test]
fn names_order_and_shapes_follow_the_fixtures() {
    if let Some(dir) = case("resnet18-c10-s0") {
        names_follow_meta(build("resnet18", &[], [3, 64, 64], 10).as_ref(), &dir);
    }
    if let Some(dir) = case("vit-tiny-c10-s0") {
        names_follow_meta(build("vit", &[], [3, 32, 32], 10).as_ref(), &dir);
    }
}

#[test]
fn resnets_have_torchvisions_sizes() {
    // torchvision's parameter counts with the ImageNet head (1000 classes), and its
    // BatchNorm layer counts (three buffers each).
    for (arch, params, tensors, bns) in [
        ("resnet18", 11_689_512, 62, 20),
        ("resnet34", 21_797_672, 110, 36),
        ("resnet50", 25_557_032, 161, 53),
        ("resnet101", 44_549_160, 314, 104),
    ] {
        let net = build(arch, &[], [3, 224, 224], 1000);
        assert_eq!(net.numel(), params, "{arch} parameters");
        assert_eq!(net.params().len(), tensors, "{arch} parameter tensors");
        assert_eq!(net.buffers().len(), 3 * bns, "{arch} buffers");
        assert_eq!(net.head_prefixes(), vec!["fc.".to_string()]);
        let last = net.params().len() - 1;
        assert!(net.is_head(last) && net.is_head(last - 1) && !net.is_head(last - 2));
    }
    // Bottleneck v1.5: the stride sits on the 3x3 `conv2`; layer1.0 has a downsample
    // (64 -> 256 channels) at stride 1.
    let net = build("resnet50", &[], [3, 224, 224], 1000);
    let shape = |n: &str| {
        net.params()
            .iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("no `{n}`"))
            .shape
            .clone()
    };
    assert_eq!(shape("layer1.0.downsample.0.weight"), vec![256, 64, 1, 1]);
    assert_eq!(shape("layer2.0.conv2.weight"), vec![128, 128, 3, 3]);
    assert_eq!(shape("layer4.2.conv3.weight"), vec![2048, 512, 1, 1]);
    assert_eq!(shape("fc.weight"), vec![1000, 2048]);
}

#[test]
fn vit_settings_are_checked() {
    let cfg = |set: &[&str]| {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        verify::model_config("vit", &set).unwrap()
    };
    let err = |set: &[&str], input: [usize; 3]| {
        format!(
            "{:#}",
            model::build(&cfg(set), input, 10).err().expect("must fail")
        )
    };
    assert!(err(&["model.heads=5"], [3, 32, 32]).contains("model.heads"));
    assert!(err(&["model.patch=5"], [3, 32, 32]).contains("model.patch"));
    assert!(err(&["model.depth=0"], [3, 32, 32]).contains("model.patch/width/depth/heads"));
    // timm's MLP width is int(width * mlp_ratio); the token count follows the data.
    let net = model::build(
        &cfg(&["model.width=48", "model.mlp_ratio=2.5", "model.patch=7"]),
        [1, 28, 28],
        4,
    )
    .unwrap();
    let shape = |n: &str| {
        net.params()
            .iter()
            .find(|s| s.name == n)
            .unwrap()
            .shape
            .clone()
    };
    assert_eq!(shape("blocks.0.mlp.fc1.weight"), vec![120, 48]);
    assert_eq!(shape("pos_embed"), vec![1, 17, 48]);
    assert_eq!(shape("head.weight"), vec![4, 48]);
    assert_eq!(net.head_prefixes(), vec!["head.".to_string()]);
}

// --------------------------------------------------- (c) every parameter has a gradient

fn every_parameter_gets_a_gradient(arch: &str, set: &[&str], input: [usize; 3]) {
    let net = build(arch, set, input, 10);
    let mut rng = Rng::new(5, 1);
    let mut state = NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
    let n = 4;
    let numel = n * input.iter().product::<usize>();
    let x = Tensor::from_vec(
        rng.uniform_vec(numel, -1.0, 1.0),
        (n, input[0], input[1], input[2]),
        &dev(),
    )
    .unwrap();
    let y = Tensor::new(&[1i64, 7, 3, 0], &dev()).unwrap();
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
    assert!(stats.loss.is_finite());
    let mut fewest = (usize::MAX, String::new());
    for (spec, g) in net.params().iter().zip(&grads) {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{arch}: `{}` got no gradient", spec.name));
        assert_eq!(g.dims(), &spec.shape[..], "{arch}: `{}`", spec.name);
        // A gradient that still records ops holds its backward graph, and with it every
        // activation that graph references, until the step ends (a custom op whose
        // backward multiplies a tracked input into a variable's gradient).
        assert!(
            !g.track_op(),
            "{arch}: `{}`'s gradient records ops (it keeps activations alive)",
            spec.name
        );
        let v = common::values(g);
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
        if nonzero < fewest.0 {
            fewest = (nonzero, spec.name.clone());
        }
    }
    eprintln!(
        "{arch}: {} parameter tensors, all with non-zero gradients (fewest non-zero entries: {} in `{}`)",
        grads.len(),
        fewest.0,
        fewest.1
    );
}

#[test]
fn every_parameter_of_the_small_networks_gets_a_gradient() {
    for arch in ["mlp", "cnn", "cnn_bn"] {
        every_parameter_gets_a_gradient(arch, &[], [1, 28, 28]);
    }
}

#[test]
fn every_parameter_of_resnet18_gets_a_gradient() {
    every_parameter_gets_a_gradient("resnet18", &[], [3, 32, 32]);
}

#[test]
fn every_parameter_of_resnet34_gets_a_gradient() {
    every_parameter_gets_a_gradient("resnet34", &[], [3, 32, 32]);
}

#[test]
fn every_parameter_of_resnet50_gets_a_gradient() {
    every_parameter_gets_a_gradient("resnet50", &[], [3, 32, 32]);
}

#[test]
fn every_parameter_of_resnet101_gets_a_gradient() {
    every_parameter_gets_a_gradient("resnet101", &[], [3, 32, 32]);
}

#[test]
fn every_parameter_of_vit_gets_a_gradient() {
    every_parameter_gets_a_gradient(
        "vit",
        &["model.width=24", "model.depth=2", "model.heads=2"],
        [3, 16, 16],
    );
}

// ----------------------------------------------------------- (d) finite differences

/// Step of the central differences.
const EPS: f64 = 1e-6;
/// Largest accepted error `|fd - ad| / max(|ad|, max_j |ad_j|)` (as tests/gradients.rs).
const FD_TOL: f64 = 1e-6;

/// f64 tensor of `shape`, entries uniform in [lo, hi).
fn uniform(rng: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * rng.next_f64()).collect();
    Tensor::from_vec(v, shape, &dev()).unwrap()
}

/// `sum(y * r)` with a fixed random `r`: a scalar that weighs every output entry.
fn project(y: &Tensor, seed: u64) -> Tensor {
    let r = uniform(&mut Rng::new(seed, 99), y.dims(), -1.0, 1.0)
        .to_dtype(y.dtype())
        .unwrap();
    (y * r).unwrap().sum_all().unwrap()
}

/// Autograd against central differences for every input (all elements, or `sample`
/// random ones per input); returns the worst error.
fn fd_check(
    what: &str,
    inputs: &[Tensor],
    sample: Option<usize>,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let live: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&live).backward().unwrap();
    let mut rng = Rng::new(8, 8);
    let mut worst = 0f64;
    for (i, v) in vars.iter().enumerate() {
        let ad = common::values(
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what}: input {i} has no gradient")),
        );
        let scale = ad.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale > 0.0, "{what}: input {i} has an all-zero gradient");
        let base = common::values(&inputs[i]);
        let elems: Vec<usize> = match sample {
            Some(k) if k < base.len() => (0..k).map(|_| rng.below(base.len())).collect(),
            _ => (0..base.len()).collect(),
        };
        for j in elems {
            let at = |h: f64| {
                let mut x = base.clone();
                x[j] += h;
                let mut ins = inputs.to_vec();
                ins[i] = Tensor::from_vec(x, inputs[i].dims(), &dev()).unwrap();
                common::values(&f(&ins))[0]
            };
            let fd = (at(EPS) - at(-EPS)) / (2.0 * EPS);
            let err = (fd - ad[j]).abs() / ad[j].abs().max(scale);
            worst = worst.max(err);
            assert!(
                err <= FD_TOL,
                "{what}: input {i} element {j}: finite difference {fd:e} vs autograd {:e} (rel {err:e})",
                ad[j]
            );
        }
    }
    eprintln!("{what}: worst finite-difference error {worst:.3e}");
    worst
}

#[test]
fn fd_layer_norm() {
    let mut r = Rng::new(40, 0);
    let ins = [
        uniform(&mut r, &[2, 3, 7], -2.0, 3.0),
        uniform(&mut r, &[7], 0.5, 1.5),
        uniform(&mut r, &[7], -0.5, 0.5),
    ];
    fd_check("layer_norm", &ins, None, &|t| {
        project(&layers::layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap(), 1)
    });
    // The forward against the textbook formula in f64.
    let y = common::values(&layers::layer_norm(&ins[0], &ins[1], &ins[2], 1e-6).unwrap());
    let (x, w, b) = (
        common::values(&ins[0]),
        common::values(&ins[1]),
        common::values(&ins[2]),
    );
    for (row, yr) in x.chunks(7).zip(y.chunks(7)) {
        let m = row.iter().sum::<f64>() / 7.0;
        let v = row.iter().map(|a| (a - m).powi(2)).sum::<f64>() / 7.0;
        for k in 0..7 {
            let want = (row[k] - m) / (v + 1e-6).sqrt() * w[k] + b[k];
            assert!((yr[k] - want).abs() < 1e-13, "{} vs {want}", yr[k]);
        }
    }
}

#[test]
fn fd_linear_rows_and_add_bias() {
    // A Linear over the last dimension of a 3-D input, the bias through `add_bias`.
    let mut r = Rng::new(45, 0);
    let ins = [
        uniform(&mut r, &[2, 3, 5], -1.0, 1.0),
        uniform(&mut r, &[4, 5], -1.0, 1.0),
        uniform(&mut r, &[4], -1.0, 1.0),
    ];
    fd_check("linear_rows", &ins, None, &|t| {
        project(&layers::linear_rows(&t[0], &t[1], Some(&t[2])).unwrap(), 5)
    });
    // The same numbers as layers::linear on the flattened rows.
    let a = layers::linear_rows(&ins[0], &ins[1], Some(&ins[2])).unwrap();
    let b = layers::linear(&ins[0].reshape((6, 5)).unwrap(), &ins[1], Some(&ins[2])).unwrap();
    assert_eq!(a.dims(), &[2, 3, 4]);
    assert_eq!(common::values(&a), common::values(&b));
}

#[test]
fn fd_gelu_erf() {
    let mut r = Rng::new(41, 0);
    let ins = [uniform(&mut r, &[3, 11], -4.0, 4.0)];
    fd_check("gelu_erf", &ins, None, &|t| {
        project(&layers::gelu_erf(&t[0]).unwrap(), 2)
    });
    // The exact form, not the tanh approximation: at 1, 0.5 (1 + erf(1/sqrt 2)).
    let g = layers::gelu_erf(&Tensor::new(&[1.0f64, -1.0, 0.0], &dev()).unwrap()).unwrap();
    let g = common::values(&g);
    assert!((g[0] - 0.841_344_746_068_542_9).abs() < 1e-15, "{}", g[0]);
    assert!((g[1] + 0.158_655_253_931_457_05).abs() < 1e-15, "{}", g[1]);
    assert_eq!(g[2], 0.0);
}

#[test]
fn fd_softmax_last_dim() {
    let mut r = Rng::new(42, 0);
    let ins = [uniform(&mut r, &[2, 3, 6], -3.0, 3.0)];
    fd_check("softmax_last_dim", &ins, None, &|t| {
        project(&layers::softmax_last_dim(&t[0]).unwrap(), 3)
    });
    // Rows sum to one, and a shift of a row changes nothing.
    let y = layers::softmax_last_dim(&ins[0]).unwrap();
    for s in common::values(&y.sum(2).unwrap()) {
        assert!((s - 1.0).abs() < 1e-15);
    }
    let shifted = layers::softmax_last_dim(&(&ins[0] + 100.0).unwrap()).unwrap();
    let d = common::rel_l2(&shifted, &y);
    assert!(d < 1e-13, "{d}");
}

#[test]
fn fd_multi_head_attention() {
    let mut r = Rng::new(43, 0);
    let (b, n, d, h) = (2, 5, 6, 2);
    let ins = [
        uniform(&mut r, &[b, n, d], -1.0, 1.0),
        uniform(&mut r, &[3 * d, d], -0.8, 0.8),
        uniform(&mut r, &[3 * d], -0.3, 0.3),
        uniform(&mut r, &[d, d], -0.5, 0.5),
        uniform(&mut r, &[d], -0.3, 0.3),
    ];
    let f = |t: &[Tensor]| {
        model::attention::multi_head_attention(&t[0], &t[1], Some(&t[2]), &t[3], Some(&t[4]), h)
            .unwrap()
    };
    fd_check("multi_head_attention", &ins, None, &|t| project(&f(t), 4));
    // The forward against a per-head loop in f64 (the README's textbook attention).
    let y = common::values(&f(&ins));
    let (x, wq, bq, wp, bp) = (
        common::values(&ins[0]),
        common::values(&ins[1]),
        common::values(&ins[2]),
        common::values(&ins[3]),
        common::values(&ins[4]),
    );
    let dh = d / h;
    for bi in 0..b {
        // qkv[t][r] = sum_c x[t][c] W[r][c] + b[r]
        let qkv: Vec<Vec<f64>> = (0..n)
            .map(|t| {
                (0..3 * d)
                    .map(|row| {
                        (0..d)
                            .map(|c| x[(bi * n + t) * d + c] * wq[row * d + c])
                            .sum::<f64>()
                            + bq[row]
                    })
                    .collect()
            })
            .collect();
        let mut concat = vec![vec![0f64; d]; n];
        for hi in 0..h {
            for t in 0..n {
                let q = |c: usize| qkv[t][hi * dh + c] / (dh as f64).sqrt();
                let s: Vec<f64> = (0..n)
                    .map(|u| (0..dh).map(|c| q(c) * qkv[u][d + hi * dh + c]).sum())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dh {
                    concat[t][hi * dh + c] =
                        (0..n).map(|u| e[u] / z * qkv[u][2 * d + hi * dh + c]).sum();
                }
            }
        }
        for t in 0..n {
            for o in 0..d {
                let want = (0..d).map(|c| concat[t][c] * wp[o * d + c]).sum::<f64>() + bp[o];
                let got = y[(bi * n + t) * d + o];
                assert!((got - want).abs() < 1e-12, "[{bi},{t},{o}] {got} vs {want}");
            }
        }
    }
}

#[test]
fn fd_vit_network() {
    // A whole tiny ViT in f64: every parameter tensor at up to 12 random elements.
    let net = build(
        "vit",
        &[
            "model.width=8",
            "model.depth=2",
            "model.heads=2",
            "model.patch=2",
        ],
        [2, 4, 4],
        3,
    );
    let mut rng = Rng::new(44, 0);
    // Non-trivial values everywhere (timm's init has zero biases and unit norms).
    let params: Vec<Tensor> = net
        .params()
        .iter()
        .map(|s| uniform(&mut rng, &s.shape, -0.7, 0.7))
        .collect();
    let x = uniform(&mut rng, &[3, 2, 4, 4], -1.0, 1.0);
    let y = Tensor::new(&[2i64, 0, 1], &dev()).unwrap();
    let f = |p: &[Tensor]| -> Tensor {
        let logits = net.forward(p, &mut [], &x, Mode::Train).unwrap();
        layers::cross_entropy(&logits, &y).unwrap()
    };
    fd_check("vit network", &params, Some(12), &f);
}

// ------------------------------------------- (e) weights in and out, verify-model CLI

/// A state of `net` with non-trivial buffers (one train-mode forward) and i64 counters.
fn trained_state(net: &dyn Network, seed: u64) -> NetState {
    let mut rng = Rng::new(seed, 1);
    let mut state = NetState::init(net, &mut rng, &dev()).unwrap();
    let [c, h, w] = net.input_shape();
    let x = Tensor::from_vec(
        rng.uniform_vec(2 * c * h * w, -1.0, 1.0),
        (2, c, h, w),
        &dev(),
    )
    .unwrap();
    net.forward(&state.frozen_view(), &mut state.buffers, &x, Mode::Train)
        .unwrap();
    state
}

fn bits(t: &Tensor) -> Vec<u64> {
    match t.dtype() {
        DType::I64 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u64)
            .collect(),
        _ => t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
    }
}

#[test]
fn saved_weights_reload_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, set, input) in [
        ("resnet18", vec![], [3, 32, 32]),
        (
            "vit",
            vec!["model.width=24", "model.depth=2", "model.heads=2"],
            [3, 16, 16],
        ),
    ] {
        let net = build(arch, &set, input, 10);
        let state = trained_state(net.as_ref(), 6);
        let path = dir.path().join(format!("{arch}.safetensors"));
        io::save_state(net.as_ref(), &state, &path).unwrap();
        let back = io::load_state(net.as_ref(), &path, &dev()).unwrap();
        for ((spec, a), b) in net.params().iter().zip(&state.params).zip(&back.params) {
            assert_eq!(
                bits(a.as_tensor()),
                bits(b.as_tensor()),
                "{arch} `{}`",
                spec.name
            );
        }
        for ((spec, a), b) in net.buffers().iter().zip(&state.buffers).zip(&back.buffers) {
            assert_eq!(a.dtype(), b.dtype(), "{arch} `{}`", spec.name);
            assert_eq!(bits(a), bits(b), "{arch} `{}`", spec.name);
        }
        if arch == "resnet18" {
            let i = net
                .buffers()
                .iter()
                .position(|b| b.name == "bn1.num_batches_tracked")
                .unwrap();
            assert_eq!(back.buffers[i].to_scalar::<i64>().unwrap(), 1);
        }
    }
}

#[test]
fn head_reset_and_wrong_keys() {
    let dir = tempfile::tempdir().unwrap();
    let src = build("resnet18", &[], [3, 32, 32], 10);
    let state = trained_state(src.as_ref(), 7);
    let path = dir.path().join("r18-c10.safetensors");
    io::save_state(src.as_ref(), &state, &path).unwrap();

    // Another class count: without the reset both head tensors are listed.
    let net = build("resnet18", &["model.num_classes=5"], [3, 32, 32], 10);
    assert_eq!(
        net.num_classes(),
        5,
        "model.num_classes overrides the data's"
    );
    let e = format!(
        "{:#}",
        io::load_state(net.as_ref(), &path, &dev()).err().unwrap()
    );
    assert!(
        e.contains("`fc.weight` has shape [10, 512], the model needs [5, 512]"),
        "{e}"
    );
    assert!(e.contains("`fc.bias` has shape [10]"), "{e}");

    // With the reset: the backbone is the checkpoint's bit for bit, the head is new,
    // seeded (same seed, same head; another seed, another head).
    let load = |seed: u64| {
        io::load_state_reset_head(net.as_ref(), &path, &dev(), &mut Rng::new(seed, 1)).unwrap()
    };
    let (a, b, c) = (load(0), load(0), load(1));
    for (i, spec) in net.params().iter().enumerate() {
        if net.is_head(i) {
            assert_eq!(a.params[i].dims(), &spec.shape[..]);
            assert_eq!(bits(a.params[i].as_tensor()), bits(b.params[i].as_tensor()));
            assert_ne!(bits(a.params[i].as_tensor()), bits(c.params[i].as_tensor()));
        } else {
            assert_eq!(
                bits(a.params[i].as_tensor()),
                bits(state.params[i].as_tensor()),
                "`{}`",
                spec.name
            );
        }
    }
    // The head's default init: fc is a PyTorch Linear, |w| <= 1/sqrt(512).
    let fc = common::values(a.params[net.params().len() - 2].as_tensor());
    assert!(fc.iter().all(|v| v.abs() <= 1.0 / 512f64.sqrt()) && fc.iter().any(|v| *v != 0.0));

    // A wrong key is listed (missing and unexpected), with or without the reset.
    let mut map = common::load(&path);
    let t = map.remove("layer2.0.downsample.0.weight").unwrap();
    map.insert("layer2.0.downsample.0.weights".into(), t);
    let bad = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&map, &bad).unwrap();
    for e in [
        io::load_state(src.as_ref(), &bad, &dev()).err().unwrap(),
        io::load_state_reset_head(net.as_ref(), &bad, &dev(), &mut Rng::new(0, 1))
            .err()
            .unwrap(),
    ] {
        let e = format!("{e:#}");
        assert!(e.contains("missing `layer2.0.downsample.0.weight`"), "{e}");
        assert!(
            e.contains("unexpected `layer2.0.downsample.0.weights`"),
            "{e}"
        );
    }
}

#[test]
fn training_from_a_checkpoint_with_another_head() {
    // `ldt train` with model.init + model.reset_head: a 3-class ViT checkpoint fine-tuned
    // on the bundled 10-class data; without reset_head the run refuses the checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let vit = [
        "model.width=16",
        "model.depth=1",
        "model.heads=2",
        "model.patch=7",
    ];
    let net = build("vit", &vit, [1, 28, 28], 3);
    let ckpt = dir.path().join("vit-c3.safetensors");
    io::save_state(net.as_ref(), &trained_state(net.as_ref(), 9), &ckpt).unwrap();
    let man = common::root().join("data/rotmnist5k/manifest.json");
    let toml = format!(
        "threads = 1\n[model]\narch = \"vit\"\nwidth = 16\ndepth = 1\nheads = 2\npatch = 7\ninit = {:?}\n\
         [data]\nmanifest = {:?}\n[train]\nsteps = 2\nbatch_size = 4\n[eval]\nbatch_size = 512\n",
        ckpt.display().to_string(),
        man.display().to_string()
    );
    let (_d, ctx) = common::run(&toml, &["model.reset_head=true"]);
    assert_eq!(ctx.net.num_classes(), 10);
    let cfg = ldt::config::Config::from_toml(&toml, "test", &[]).unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let ctx = ldt::train::RunContext::open(cfg, run_dir.path()).unwrap();
    let e = format!("{:#}", ctx.initial_state().err().unwrap());
    assert!(
        e.contains("model.init") && e.contains("`head.weight` has shape [3, 16]"),
        "{e}"
    );
}

fn ldt_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_ldt"))
}

#[test]
fn verify_model_command() {
    let Some(fx) = case("vit-tiny-c10-s0") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let run = |arch: &str, set: &[&str], weights: &Path| {
        let mut c = ldt_bin();
        c.args(["verify-model", "--arch", arch]);
        for s in set {
            c.args(["--set", s]);
        }
        c.arg("--weights")
            .arg(weights)
            .arg("--input")
            .arg(fx.join("io.safetensors"))
            .arg("--out")
            .arg(&out)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap()
    };
    let o = run("vit", &[], &fx.join("weights.safetensors"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for k in ["logits_eval", "logits_train", "loss_train", "grad "] {
        assert!(stdout.contains(k), "{stdout}");
    }
    // The written file holds the fixture's keys, with the same shapes.
    let (got, want): (HashMap<String, Tensor>, HashMap<String, Tensor>) =
        (common::load(&out), common::load(&fx.join("io.safetensors")));
    for (k, t) in &want {
        if k == "input" || k == "labels" {
            continue;
        }
        assert_eq!(got[k].dims(), t.dims(), "`{k}`");
    }
    assert_eq!(got.len(), want.len() - 2);

    // Bad command line / settings: exit 2.
    let o = run("vit", &["train.steps=3"], &fx.join("weights.safetensors"));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("model.*"));
    let o = run("vgg16", &[], &fx.join("weights.safetensors"));
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Weights that do not fit the model: exit 1, every wrong key listed.
    let o = run("vit", &["model.depth=2"], &fx.join("weights.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unexpected `blocks.2.attn.qkv.weight`"),
        "{err}"
    );
    let o = run("vit", &[], &dir.path().join("absent.safetensors"));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("absent.safetensors"));
}
