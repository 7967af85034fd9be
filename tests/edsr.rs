//! `edsr` (BasicSR's EDSR) against PyTorch, number by number, and its recompute blocks.
//!
//! (a) The fixtures of `tests/sr/` (`scripts/make_sr_fixtures.py`: EDSR written after
//!     BasicSR's definitions, seeded default init, batch 2, inputs and targets uniform
//!     in [0, 1]; the references computed by torch in float64 from the stored f32
//!     values): the output, the L1 loss and the gradient of every parameter and of the
//!     input, at scales 2, 3 (res_scale 0.1) and 4, compared per tensor as
//!     `tests/backbones.rs` does: "scaled" = `max|a - ref| / max|ref|` (the loss: its
//!     absolute difference). Each bound sits a few times above the deviation measured
//!     here (quoted next to it; torch's own f32 lies as far from the f64 reference:
//!     the fixture's `torch_f32_*` metadata); the measured values are printed
//!     (`--nocapture`).
//! (b) Parameter names, order and shapes equal the fixtures' (BasicSR's `state_dict()`
//!     keys; no buffers); the EDSR baseline's parameter counts equal torch's; the
//!     output shape, the head, and the config errors naming their keys.
//! (c) Finite differences in f64 for tiny EDSRs at scales 2, 3 and 4 (pixel shuffles of
//!     2 and 3, a res_scale other than 1): every element of every parameter and of the
//!     input.
//! (d) The body's segments compose to its block bit for bit, and a backward walked
//!     segment by segment (block-wise recompute: each segment recomputed from its kept
//!     input, its outputs' gradients entered as `sum(out * g)`) gives every gradient of
//!     one backward through the whole graph, bit for bit.
//! (e) BasicSR checkpoints (`torch.save({'params': ..., 'params_ema': ...})`) load: the
//!     `params` when both are there (BasicSR's default `param_key_g`), `params_ema`
//!     when alone, each said in a note; an EDSR checkpoint given to another model names
//!     `edsr`.

mod common;
#[path = "common/testkit.rs"]
mod testkit;

use candle_core::{DType, Device, Tensor, Var};
use ldt::config::{Config, ModelConfig};
use ldt::model::{self, io, Mode, Network};
use ldt::rng::Rng;
use std::collections::HashMap;
use std::path::PathBuf;
use testkit::{bits, f64s, l1, scaled, sr_fixture, uniform, within};

fn dev() -> Device {
    Device::Cpu
}

fn fixture(name: &str) -> PathBuf {
    common::root().join("tests/sr").join(name)
}

/// An `edsr` of `scale`, `num_feat`, `num_block`, `res_scale` for `[3, h, w]` inputs.
fn edsr(
    scale: usize,
    feat: usize,
    blocks: usize,
    res_scale: f64,
    hw: [usize; 2],
) -> Box<dyn Network> {
    let cfg = ModelConfig {
        arch: "edsr".into(),
        scale: Some(scale),
        num_feat: feat,
        num_block: blocks,
        res_scale,
        ..ModelConfig::default()
    };
    model::build(&cfg, [3, hw[0], hw[1]], 0).unwrap()
}

/// The network a fixture was made with.
fn fixture_net(t: &HashMap<String, Tensor>, meta: &HashMap<String, String>) -> Box<dyn Network> {
    let num = |k: &str| meta[k].parse::<f64>().unwrap();
    let (_, _, h, w) = t["input"].dims4().unwrap();
    edsr(
        num("scale") as usize,
        num("num_feat") as usize,
        num("num_block") as usize,
        num("res_scale"),
        [h, w],
    )
}

// ------------------------------------------------------------------ (a) the fixtures

/// Worst scaled deviations of a fixture: (output, loss abs, worst parameter gradient
/// and its name, input gradient).
fn deviations(name: &str) -> (f64, f64, (f64, String), f64) {
    let (t, meta) = sr_fixture(name);
    let net = fixture_net(&t, &meta);
    let params: Vec<Var> = net
        .params()
        .iter()
        .map(|s| Var::from_tensor(&t[&s.name]).unwrap())
        .collect();
    let x = Var::from_tensor(&t["input"]).unwrap();
    let live: Vec<Tensor> = params.iter().map(|v| v.as_tensor().clone()).collect();
    let y = net
        .forward(&live, &mut [], x.as_tensor(), Mode::Train)
        .unwrap();
    assert_eq!(
        y.dims()[1..],
        net.output_shape()[..],
        "{name}: output shape"
    );
    let loss = l1(&y, &t["target"]);
    let grads = loss.backward().unwrap();
    let loss_abs = (f64s(&loss)[0] - f64s(&t["loss"])[0]).abs();
    let mut worst = (0f64, String::new());
    for (s, v) in net.params().iter().zip(&params) {
        let g = grads.get(v.as_tensor()).unwrap();
        let d = scaled(g, &t[&format!("grad.{}", s.name)]);
        if d > worst.0 {
            worst = (d, s.name.clone());
        }
    }
    let gx = scaled(grads.get(x.as_tensor()).unwrap(), &t["grad.input"]);
    eprintln!(
        "{name}: torch's own f32 vs the f64 reference: output {}, worst gradient {}",
        meta["torch_f32_output_scaled"], meta["torch_f32_grad_scaled"]
    );
    (scaled(&y, &t["output"]), loss_abs, worst, gx)
}

#[test]
fn edsr_x2_matches_pytorch() {
    let (out, loss, (grad, at), gx) = deviations("edsr_x2.safetensors");
    // Measured (x86-64): output 1.4e-7, loss 0 abs, gradients 1.6e-6 (worst tensor:
    // conv_last.bias, a sum of 640 signs / 1920 per channel), input gradient 1.7e-7;
    // torch's own f32: output 1.5e-7, gradients 1.6e-6.
    within("x2 output scaled", out, 5e-7);
    within("x2 loss abs", loss, 2e-7);
    within(&format!("x2 grad scaled (worst: {at})"), grad, 5e-6);
    within("x2 input grad scaled", gx, 1e-6);
}

#[test]
fn edsr_x3_matches_pytorch() {
    let (out, loss, (grad, at), gx) = deviations("edsr_x3.safetensors");
    // Measured (x86-64): output 9.5e-8, loss 0 abs, gradients 9.6e-7 (worst tensor:
    // conv_last.weight), input gradient 2.0e-7; torch's own f32: output 1.1e-7,
    // gradients 7.5e-7.
    within("x3 output scaled", out, 5e-7);
    within("x3 loss abs", loss, 2e-7);
    within(&format!("x3 grad scaled (worst: {at})"), grad, 5e-6);
    within("x3 input grad scaled", gx, 1e-6);
}

#[test]
fn edsr_x4_matches_pytorch() {
    let (out, loss, (grad, at), gx) = deviations("edsr_x4.safetensors");
    // Measured (x86-64): output 1.1e-7, loss 3.0e-8 abs, gradients 7.5e-7 (worst tensor:
    // conv_last.bias), input gradient 2.5e-7; torch's own f32: output 8.0e-8, gradients
    // 7.7e-7.
    within("x4 output scaled", out, 5e-7);
    within("x4 loss abs", loss, 2e-7);
    within(&format!("x4 grad scaled (worst: {at})"), grad, 5e-6);
    within("x4 input grad scaled", gx, 1e-6);
}

// ------------------------------------------------------- (b) names, order and shapes

#[test]
fn names_order_and_shapes_are_basicsrs() {
    for name in [
        "edsr_x2.safetensors",
        "edsr_x3.safetensors",
        "edsr_x4.safetensors",
    ] {
        let (t, meta) = sr_fixture(name);
        let net = fixture_net(&t, &meta);
        let want: Vec<(String, Vec<usize>)> = meta["params"]
            .split(',')
            .map(|n| (n.to_string(), t[n].dims().to_vec()))
            .collect();
        let got: Vec<(String, Vec<usize>)> = net
            .params()
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone()))
            .collect();
        assert_eq!(got, want, "{name}");
        assert!(net.buffers().is_empty(), "{name}: EDSR has no buffers");
        let grads = t.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            grads,
            want.len() + 1,
            "{name}: a gradient per parameter and the input"
        );
    }
}

#[test]
fn baseline_parameter_counts_are_torchs() {
    // scripts/make_sr_fixtures.py, torch 2.5.1: BasicSR's EDSR with num_feat 64,
    // num_block 16 (the defaults of `[model]`).
    for (scale, count) in [(2, 1_369_859), (3, 1_554_499), (4, 1_517_571)] {
        let cfg = ModelConfig {
            arch: "edsr".into(),
            scale: Some(scale),
            ..ModelConfig::default()
        };
        let net = model::build(&cfg, [3, 48, 48], 10).unwrap();
        assert_eq!(net.numel(), count, "x{scale}");
        // 2 + 16 blocks * 4 + 2 + one or two upsampling convolutions * 2 + 2.
        let upsample = if scale == 4 { 2 } else { 1 };
        assert_eq!(net.params().len(), 70 + 2 * upsample, "x{scale}");
        assert_eq!(net.output_shape(), vec![3, 48 * scale, 48 * scale]);
        assert_eq!(net.input_shape(), [3, 48, 48]);
        assert_eq!(net.num_classes(), 0, "not a classifier");
        let head: Vec<&str> = (0..net.params().len())
            .filter(|&i| net.is_head(i))
            .map(|i| net.params()[i].name.as_str())
            .collect();
        assert_eq!(head, ["conv_last.weight", "conv_last.bias"]);
    }
}

#[test]
fn bad_settings_name_their_key() {
    let build = |set: &[&str], input: [usize; 3]| -> String {
        let mut cfg = ModelConfig {
            arch: "edsr".into(),
            scale: Some(2),
            ..ModelConfig::default()
        };
        for s in set {
            match s.split_once('=').unwrap() {
                ("scale", "unset") => cfg.scale = None,
                ("scale", v) => cfg.scale = Some(v.parse().unwrap()),
                ("num_feat", v) => cfg.num_feat = v.parse().unwrap(),
                ("res_scale", v) => cfg.res_scale = v.parse().unwrap(),
                other => panic!("{other:?}"),
            }
        }
        match model::build(&cfg, input, 10) {
            Ok(_) => panic!("{set:?} built"),
            Err(e) => format!("{e:#}"),
        }
    };
    let rgb = [3, 8, 8];
    for (set, key) in [
        (&["scale=unset"][..], "model.scale"),
        (&["scale=8"], "model.scale"),
        (&["scale=1"], "model.scale"),
        (&["num_feat=0"], "model.num_feat"),
        (&["res_scale=NaN"], "model.res_scale"),
    ] {
        let e = build(set, rgb);
        assert!(e.contains(&format!("`{key}`")), "{set:?}: {e}");
    }
    let e = build(&[], [1, 8, 8]);
    assert!(
        e.contains("`model.arch`") && e.contains("3 channels"),
        "{e}"
    );
    // The same rules when the configuration is read (an unset scale is not an error
    // there: the data gives it).
    let parse = |extra: &str| {
        Config::from_toml(&format!("[model]\narch = \"edsr\"\n{extra}"), "test", &[])
            .map(|c| c.model)
            .map_err(|e| format!("{e:#}"))
    };
    let m = parse("").unwrap();
    assert_eq!(
        (m.scale, m.num_feat, m.num_block, m.res_scale),
        (None, 64, 16, 1.0),
        "the EDSR baseline"
    );
    for (extra, key) in [
        ("scale = 5", "model.scale"),
        ("num_feat = 0", "model.num_feat"),
        ("res_scale = inf", "model.res_scale"),
    ] {
        let e = parse(extra).unwrap_err();
        assert!(e.contains(&format!("`{key}`")), "{extra}: {e}");
    }
}

// ------------------------------------------------------- (c) finite differences in f64

/// Step of the central differences: the function checked is piecewise linear in each
/// single entry (convolutions, ReLUs, pixel shuffles, the mean shift), so the
/// differences carry no truncation error, and a step this long keeps their rounding
/// far below the gradients of the body (made small by the final `/ 255`).
const EPS: f64 = 1e-4;
/// Largest accepted error `|fd - ad| / max(|ad|, max_j |ad_j|)` (as tests/gradients.rs);
/// measured worst: 2.3e-9 (x2), 5.0e-8 (x3), 2.2e-8 (x4).
const FD_TOL: f64 = 1e-6;

/// Every element of every parameter and of the input of a tiny f64 EDSR: the autograd
/// gradient of `sum((y - y0) * r)` (`y0` the output at the base point, a constant that
/// keeps the sum's rounding at the size of the differences; `r` fixed random) against
/// central differences.
fn fd_edsr(scale: usize, res_scale: f64) {
    let net = edsr(scale, 2, 2, res_scale, [3, 4]);
    let mut rng = Rng::new(11, scale as u64);
    let mut state = model::NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
    let mut inputs: Vec<Tensor> = state
        .params
        .drain(..)
        .map(|v| v.as_tensor().to_dtype(DType::F64).unwrap())
        .collect();
    inputs.push(uniform(&mut rng, &[2, 3, 3, 4], 0.0, 1.0));
    let out = [2, 3, 3 * scale, 4 * scale];
    let r = uniform(&mut rng, &out, -1.0, 1.0);
    let forward = |t: &[Tensor]| -> Tensor {
        let (p, x) = t.split_at(t.len() - 1);
        net.forward(p, &mut [], &x[0], Mode::Train).unwrap()
    };
    let y0 = forward(&inputs);
    assert_eq!(y0.dims(), out);
    let f = |t: &[Tensor]| -> Tensor {
        ((forward(t) - &y0).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let live: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&live).backward().unwrap();
    let mut worst = 0f64;
    for (i, v) in vars.iter().enumerate() {
        let what = match net.params().get(i) {
            Some(s) => s.name.clone(),
            None => "input".into(),
        };
        let ad = f64s(grads.get(v.as_tensor()).unwrap());
        let scale_i = ad.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale_i > 0.0, "x{scale} `{what}`: an all-zero gradient");
        let base = f64s(&inputs[i]);
        let at = |j: usize, h: f64| -> f64 {
            let mut v = base.clone();
            v[j] += h;
            let mut ins = inputs.clone();
            ins[i] = Tensor::from_vec(v, inputs[i].dims(), &dev()).unwrap();
            f64s(&f(&ins))[0]
        };
        for (j, &g) in ad.iter().enumerate() {
            let fd = (at(j, EPS) - at(j, -EPS)) / (2.0 * EPS);
            let err = (fd - g).abs() / g.abs().max(scale_i);
            worst = worst.max(err);
            assert!(
                err <= FD_TOL,
                "x{scale} `{what}`[{j}]: finite difference {fd:e} vs autograd {g:e} (rel {err:e})"
            );
        }
    }
    eprintln!("edsr x{scale}, res_scale {res_scale}: worst finite-difference error {worst:.3e}");
}

#[test]
fn fd_edsr_x2() {
    fd_edsr(2, 1.0);
}

#[test]
fn fd_edsr_x3() {
    fd_edsr(3, 0.1);
}

#[test]
fn fd_edsr_x4() {
    fd_edsr(4, 0.5);
}

// ----------------------------------------------------------- (d) segments, recompute

/// Per parameter, the gradient of the L1 loss walked segment by segment as block-wise
/// recompute walks it (`src/train/recompute.rs`): a forward without a graph keeping each
/// segment's input, then from the top each segment recomputed with its parameters (and,
/// above the lowest, its inputs) tracked, the loss or `sum(out * g)` of its outputs'
/// gradients back-propagated.
fn walked_gradients(net: &dyn Network, params: &[Var], x: &Tensor, target: &Tensor) -> Vec<Tensor> {
    let mut units = Vec::new();
    for (k, b) in net.blocks().iter().enumerate() {
        for (j, s) in net.segments(k).into_iter().enumerate() {
            units.push((
                k,
                j,
                b.params.start + s.params.start..b.params.start + s.params.end,
            ));
        }
    }
    let mut inputs = Vec::new();
    let mut carried = vec![x.detach()];
    for (k, j, range) in &units {
        let w: Vec<Tensor> = params[range.clone()]
            .iter()
            .map(|v| v.as_tensor().detach())
            .collect();
        let out = net
            .forward_segment(*k, *j, &w, &mut [], &carried, Mode::Train)
            .unwrap();
        inputs.push(std::mem::replace(&mut carried, out));
    }
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut upstream: Option<Vec<Tensor>> = None;
    for (u, (k, j, range)) in units.iter().enumerate().rev() {
        let w: Vec<Tensor> = params[range.clone()]
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let tracked: Vec<Var> = inputs[u]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let xin: Vec<Tensor> = match u {
            0 => inputs[u].clone(),
            _ => tracked.iter().map(|v| v.as_tensor().clone()).collect(),
        };
        let out = net
            .forward_segment(*k, *j, &w, &mut [], &xin, Mode::Train)
            .unwrap();
        let root = match upstream.take() {
            None => l1(&out[0], target),
            Some(g) => {
                let mut terms = out
                    .iter()
                    .zip(&g)
                    .map(|(o, g)| (o * g).unwrap().sum_all().unwrap());
                let first = terms.next().unwrap();
                terms.fold(first, |t, v| (t + v).unwrap())
            }
        };
        let store = root.backward().unwrap();
        for i in range.clone() {
            grads[i] = store.get(params[i].as_tensor()).cloned();
        }
        if u > 0 {
            upstream = Some(
                tracked
                    .iter()
                    .map(|v| store.get(v.as_tensor()).unwrap().clone())
                    .collect(),
            );
        }
    }
    grads
        .into_iter()
        .map(|g| g.expect("every parameter"))
        .collect()
}

#[test]
fn segments_fold_and_recompute_to_the_whole_graphs_bits() {
    for (scale, blocks, res_scale) in [(4, 3, 1.0), (3, 2, 0.1), (2, 0, 1.0)] {
        let net = edsr(scale, 4, blocks, res_scale, [5, 6]);
        let case = format!("x{scale}, {blocks} blocks, res_scale {res_scale}");
        // conv_first, the body, each upsampling stage, conv_last.
        let stages = if scale == 4 { 2 } else { 1 };
        assert_eq!(net.blocks().len(), 3 + stages, "{case}");
        assert_eq!(
            net.segments(1).len(),
            blocks + 1,
            "{case}: the body's segments"
        );
        let mut rng = Rng::new(5, scale as u64);
        let state = model::NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
        let x = uniform(&mut rng, &[2, 3, 5, 6], 0.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let target = uniform(&mut rng, &[2, 3, 5 * scale, 6 * scale], 0.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        // Each block's segments in order against the block's forward.
        let live: Vec<Tensor> = state.params.iter().map(|v| v.as_tensor().clone()).collect();
        let mut h = x.clone();
        for (k, b) in net.blocks().iter().enumerate() {
            let p = &live[b.params.clone()];
            let whole = net.forward_block(k, p, &mut [], &h, Mode::Train).unwrap();
            let folded =
                model::fold_segments(net.as_ref(), k, p, &mut [], &h, Mode::Train).unwrap();
            assert_eq!(bits(&whole), bits(&folded), "{case}: block {k}");
            h = whole;
        }
        // The whole graph's gradients against the walk's.
        let y = net.forward(&live, &mut [], &x, Mode::Train).unwrap();
        assert_eq!(bits(&y), bits(&h), "{case}: forward = the blocks in order");
        let store = l1(&y, &target).backward().unwrap();
        let walked = walked_gradients(net.as_ref(), &state.params, &x, &target);
        for ((s, v), g) in net.params().iter().zip(&state.params).zip(&walked) {
            let whole = store.get(v.as_tensor()).unwrap();
            assert!(
                bits(whole) == bits(g),
                "{case}: `{}` gradient differs",
                s.name
            );
        }
        eprintln!("{case}: segments and the recomputed walk give the whole graph's bits");
    }
}

// ---------------------------------------------------------- (e) BasicSR checkpoints

#[test]
fn basicsr_checkpoints_load() {
    let net = edsr(2, 2, 1, 1.0, [4, 4]);
    let both = fixture("edsr_basicsr.pth");
    let ema = fixture("edsr_basicsr_ema.pth");
    let a = io::load_state(net.as_ref(), &both, &dev())
        .unwrap()
        .weights()
        .unwrap();
    let b = io::load_state(net.as_ref(), &ema, &dev())
        .unwrap()
        .weights()
        .unwrap();
    // edsr_basicsr_ema.pth holds, under `params_ema`, the `params` of edsr_basicsr.pth
    // (whose own `params_ema` are those plus 1).
    for ((s, a), b) in net.params().iter().zip(&a).zip(&b) {
        assert_eq!(bits(a), bits(b), "`{}`", s.name);
    }
    let (_, notes) = io::read_weights(&both, &dev()).unwrap();
    assert_eq!(
        notes,
        ["read the state_dict under `params` (BasicSR's default; the `params_ema` beside it was not read)"]
    );
    let (_, notes) = io::read_weights(&ema, &dev()).unwrap();
    assert_eq!(notes, ["read the state_dict under `params_ema`"]);
    // Given to another RGB model, the keys name `edsr`.
    let cfg = ModelConfig {
        arch: "resnet18".into(),
        ..ModelConfig::default()
    };
    let other = model::build(&cfg, [3, 16, 16], 10).unwrap();
    let e = match io::load_state(other.as_ref(), &both, &dev()) {
        Ok(_) => panic!("an EDSR checkpoint loaded into resnet18"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("model.arch = \"edsr\""), "{e}");
}
