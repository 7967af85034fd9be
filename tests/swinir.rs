//! `swinir` (BasicSR's SwinIR, lightweight form) against PyTorch, number by number, its
//! recompute blocks, and a short LDT-S run.
//!
//! (a) The fixtures of `tests/sr/` (`scripts/make_swinir_fixtures.py`: SwinIR written
//!     after BasicSR's definitions — checked there against BasicSR's own module, 0
//!     difference in f64 — seeded BasicSR init, batch 2, inputs and targets uniform in
//!     [0, 1]; the references computed by torch in float64 from the stored f32 values):
//!     the output, the L1 loss and the gradient of every parameter and of the input, at
//!     scale 2 (8x8 input, window 4: shifted blocks with their masks) and scale 3 (8x12
//!     input: a non-square grid of windows), compared per tensor as `tests/edsr.rs`
//!     does: "scaled" = `max|a - ref| / max|ref|` (the loss: its absolute difference).
//!     Each bound sits a few times above the deviation measured here (quoted next to
//!     it; torch's own f32 lies as far from the f64 reference: the fixture's
//!     `torch_f32_*` metadata); the measured values are printed (`--nocapture`). The
//!     buffers the network computes (`relative_position_index`, `attn_mask`) equal the
//!     fixture's bit for bit.
//! (b) Parameter and buffer names, order, shapes and dtypes equal the fixtures'
//!     (BasicSR's `named_parameters()` / `named_buffers()`; together they are its
//!     `state_dict()` keys), and such a state_dict loads as `model.init` reads one;
//!     SwinIR-light's parameter counts equal torch's; the output
//!     shape, the head, the window cut to a small input, and the config errors naming
//!     their keys.
//! (c) Finite differences in f64 on a tiny SwinIR (two groups, shifted blocks with a
//!     mask on a 4x6 grid of 2x2 windows, several heads): every element of every
//!     parameter and of the input.
//! (d) The body's segments compose to its block bit for bit, and a backward walked
//!     segment by segment (block-wise recompute: each segment recomputed from its kept
//!     input, its outputs' gradients entered as `sum(out * g)`) gives every gradient of
//!     one backward through the whole graph, bit for bit.
//! (e) A short LDT-S run of a tiny SwinIR on `data/sr-photos` (24x24 -> 48x48, window
//!     8) through `ldt::train`: it trains, scores PSNR, and exports BasicSR's names with
//!     the buffers.

mod common;
#[path = "common/testkit.rs"]
mod testkit;

use candle_core::{DType, Device, Tensor, Var};
use ldt::config::{Config, ModelConfig};
use ldt::model::{self, Mode, Network};
use ldt::rng::Rng;
use std::collections::HashMap;
use testkit::{bits, f64s, l1, scaled, sr_fixture, uniform, within};

fn dev() -> Device {
    Device::Cpu
}

/// A `swinir` of `scale`, `embed_dim`, `depths`, `num_heads`, `window_size`,
/// `mlp_ratio` for `[3, h, w]` inputs.
fn swinir(
    scale: usize,
    embed_dim: usize,
    depths: &[usize],
    heads: &[usize],
    window: usize,
    mlp_ratio: f64,
    hw: [usize; 2],
) -> Box<dyn Network> {
    let cfg = ModelConfig {
        arch: "swinir".into(),
        scale: Some(scale),
        embed_dim,
        depths: depths.to_vec(),
        num_heads: heads.to_vec(),
        window_size: window,
        mlp_ratio: Some(mlp_ratio),
        ..ModelConfig::default()
    };
    model::build(&cfg, [3, hw[0], hw[1]], 0).unwrap()
}

/// The network a fixture was made with.
fn fixture_net(t: &HashMap<String, Tensor>, meta: &HashMap<String, String>) -> Box<dyn Network> {
    let num = |k: &str| meta[k].parse::<f64>().unwrap();
    let list = |k: &str| -> Vec<usize> { meta[k].split(',').map(|v| v.parse().unwrap()).collect() };
    let (_, _, h, w) = t["input"].dims4().unwrap();
    swinir(
        num("scale") as usize,
        num("embed_dim") as usize,
        &list("depths"),
        &list("num_heads"),
        num("window_size") as usize,
        num("mlp_ratio"),
        [h, w],
    )
}

/// The network's initial buffers (computed, as a fresh network's).
fn fresh_buffers(net: &dyn Network) -> Vec<Tensor> {
    let mut rng = Rng::new(0, 0);
    model::NetState::init(net, &mut rng, &dev())
        .unwrap()
        .buffers
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

// ------------------------------------------------------------------ (a) the fixtures

/// Worst scaled deviations of a fixture: (output, loss abs, worst parameter gradient
/// and its name, input gradient).
fn deviations(name: &str) -> (f64, f64, (f64, String), f64) {
    let (t, meta) = sr_fixture(name);
    let net = fixture_net(&t, &meta);
    // The buffers as stored by torch, which the computed ones equal.
    let mut buffers: Vec<Tensor> = net.buffers().iter().map(|s| t[&s.name].clone()).collect();
    for (s, (mine, theirs)) in net
        .buffers()
        .iter()
        .zip(fresh_buffers(net.as_ref()).iter().zip(&buffers))
    {
        assert_eq!(mine.dtype(), theirs.dtype(), "{name}: `{}`", s.name);
        match s.dtype {
            DType::I64 => assert_eq!(i64s(mine), i64s(theirs), "{name}: `{}`", s.name),
            _ => assert_eq!(bits(mine), bits(theirs), "{name}: `{}`", s.name),
        }
    }
    let params: Vec<Var> = net
        .params()
        .iter()
        .map(|s| Var::from_tensor(&t[&s.name]).unwrap())
        .collect();
    let x = Var::from_tensor(&t["input"]).unwrap();
    let live: Vec<Tensor> = params.iter().map(|v| v.as_tensor().clone()).collect();
    let y = net
        .forward(&live, &mut buffers, x.as_tensor(), Mode::Train)
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
fn swinir_x2_matches_pytorch() {
    let (out, loss, (grad, at), gx) = deviations("swinir_x2.safetensors");
    // Measured (x86-64): output 2.9e-7, loss 0 abs, gradients 4.3e-7 (worst tensor:
    // conv_first.weight), input gradient 2.6e-7; torch's own f32: output 2.7e-7,
    // gradients 4.6e-7.
    within("x2 output scaled", out, 1e-6);
    within("x2 loss abs", loss, 2e-7);
    within(&format!("x2 grad scaled (worst: {at})"), grad, 2e-6);
    within("x2 input grad scaled", gx, 1e-6);
}

#[test]
fn swinir_x3_matches_pytorch() {
    let (out, loss, (grad, at), gx) = deviations("swinir_x3.safetensors");
    // Measured (x86-64): output 3.1e-7, loss 3.0e-8 abs, gradients 7.3e-7 (worst
    // tensor: conv_first.bias), input gradient 3.4e-7; torch's own f32: output 2.2e-7,
    // gradients 5.7e-7.
    within("x3 output scaled", out, 1e-6);
    within("x3 loss abs", loss, 2e-7);
    within(&format!("x3 grad scaled (worst: {at})"), grad, 3e-6);
    within("x3 input grad scaled", gx, 1e-6);
}

// ------------------------------------------------------- (b) names, order and shapes

#[test]
fn names_order_shapes_and_buffers_are_basicsrs() {
    for name in ["swinir_x2.safetensors", "swinir_x3.safetensors"] {
        let (t, meta) = sr_fixture(name);
        let net = fixture_net(&t, &meta);
        let want = |key: &str| -> Vec<(String, Vec<usize>, DType)> {
            meta[key]
                .split(',')
                .map(|n| (n.to_string(), t[n].dims().to_vec(), t[n].dtype()))
                .collect()
        };
        let params: Vec<_> = net
            .params()
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone(), DType::F32))
            .collect();
        let buffers: Vec<_> = net
            .buffers()
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone(), s.dtype))
            .collect();
        assert_eq!(params, want("params"), "{name}: parameters");
        assert_eq!(buffers, want("buffers"), "{name}: buffers");
        // The state_dict holds exactly these, each list in its own order.
        let sd: Vec<&str> = meta["state_dict"].split(',').collect();
        let keep = |names: &[(String, Vec<usize>, DType)]| -> Vec<String> {
            let set: std::collections::HashSet<&str> = names.iter().map(|n| n.0.as_str()).collect();
            sd.iter()
                .filter(|k| set.contains(*k))
                .map(|k| k.to_string())
                .collect()
        };
        assert_eq!(sd.len(), params.len() + buffers.len(), "{name}");
        let names = |v: &[(String, Vec<usize>, DType)]| -> Vec<String> {
            v.iter().map(|n| n.0.clone()).collect()
        };
        assert_eq!(keep(&params), names(&params), "{name}");
        assert_eq!(keep(&buffers), names(&buffers), "{name}");
        let shifted = buffers
            .iter()
            .filter(|b| b.0.ends_with("attn_mask"))
            .count();
        assert!(shifted > 0, "{name}: shifted blocks register their masks");
        let grads = t.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            grads,
            params.len() + 1,
            "{name}: a gradient per parameter and the input"
        );
    }
}

/// The fixture's `state_dict` (parameters and buffers, the int64 indices included)
/// saved alone loads through `model.init`'s reader, every tensor as stored.
#[test]
fn a_basicsr_state_dict_loads_with_its_buffers() {
    let (t, meta) = sr_fixture("swinir_x3.safetensors");
    let net = fixture_net(&t, &meta);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swinir.safetensors");
    let sd: Vec<(&str, Tensor)> = meta["state_dict"]
        .split(',')
        .map(|k| (k, t[k].clone()))
        .collect();
    testkit::save(&path, sd);
    let state = model::io::load_state(net.as_ref(), &path, &dev()).unwrap();
    for (s, w) in net.params().iter().zip(state.weights().unwrap()) {
        assert_eq!(bits(&w), bits(&t[&s.name]), "`{}`", s.name);
    }
    for (s, b) in net.buffers().iter().zip(&state.buffers) {
        assert_eq!(b.dtype(), s.dtype, "`{}`", s.name);
        assert_eq!(f64s(b), f64s(&t[&s.name]), "`{}`", s.name);
    }
}

#[test]
fn swinir_light_parameter_counts_are_torchs() {
    // scripts/make_swinir_fixtures.py, torch 2.5.1 (equal to BasicSR's SwinIR with
    // upsampler 'pixelshuffledirect'): embed_dim 60, depths and heads [6, 6, 6, 6],
    // window 8, mlp_ratio 2 (the defaults of `[model]`), img_size 64.
    for (scale, count) in [(2, 910_152), (3, 918_267), (4, 929_628)] {
        let cfg = ModelConfig {
            arch: "swinir".into(),
            scale: Some(scale),
            ..ModelConfig::default()
        };
        let net = model::build(&cfg, [3, 64, 64], 10).unwrap();
        assert_eq!(net.numel(), count, "x{scale}");
        // conv_first 2, patch_embed.norm 2, 24 Swin blocks of 13, 4 group convs of 2,
        // norm 2, conv_after_body 2, upsample.0 2.
        assert_eq!(net.params().len(), 2 + 2 + 24 * 13 + 4 * 2 + 2 + 2 + 2);
        // An index per block, a mask per odd block.
        assert_eq!(net.buffers().len(), 24 + 12);
        assert_eq!(net.output_shape(), vec![3, 64 * scale, 64 * scale]);
        assert_eq!(net.num_classes(), 0, "not a classifier");
        let head: Vec<&str> = (0..net.params().len())
            .filter(|&i| net.is_head(i))
            .map(|i| net.params()[i].name.as_str())
            .collect();
        assert_eq!(head, ["upsample.0.weight", "upsample.0.bias"]);
    }
    // BasicSR: a window not smaller than the image becomes the image, without shift.
    let net = swinir(2, 6, &[2], &[2], 8, 2.0, [6, 6]);
    let shapes: Vec<(&str, &[usize])> = net
        .buffers()
        .iter()
        .map(|b| (b.name.as_str(), b.shape.as_slice()))
        .collect();
    assert_eq!(
        shapes,
        [
            (
                "layers.0.residual_group.blocks.0.attn.relative_position_index",
                &[36, 36][..]
            ),
            (
                "layers.0.residual_group.blocks.1.attn.relative_position_index",
                &[36, 36]
            )
        ]
    );
    assert_eq!(
        net.params()[6].name,
        "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"
    );
    assert_eq!(net.params()[6].shape, [121, 2]);
}

#[test]
fn bad_settings_name_their_key() {
    let build = |set: &[&str], input: [usize; 3]| -> String {
        let mut cfg = ModelConfig {
            arch: "swinir".into(),
            scale: Some(2),
            ..ModelConfig::default()
        };
        for s in set {
            match s.split_once('=').unwrap() {
                ("scale", "unset") => cfg.scale = None,
                ("scale", v) => cfg.scale = Some(v.parse().unwrap()),
                ("embed_dim", v) => cfg.embed_dim = v.parse().unwrap(),
                ("depths", v) => cfg.depths = serde_json::from_str(v).unwrap(),
                ("num_heads", v) => cfg.num_heads = serde_json::from_str(v).unwrap(),
                ("window_size", v) => cfg.window_size = v.parse().unwrap(),
                ("mlp_ratio", v) => cfg.mlp_ratio = Some(v.parse().unwrap()),
                other => panic!("{other:?}"),
            }
        }
        match model::build(&cfg, input, 10) {
            Ok(_) => panic!("{set:?} built"),
            Err(e) => format!("{e:#}"),
        }
    };
    let rgb = [3, 16, 16];
    for (set, key) in [
        (&["scale=unset"][..], "model.scale"),
        (&["scale=8"], "model.scale"),
        (&["embed_dim=0"], "model.embed_dim"),
        (&["depths=[]"], "model.depths"),
        (&["depths=[6, 0]", "num_heads=[6, 6]"], "model.depths"),
        (&["num_heads=[6, 6]"], "model.num_heads"),
        (&["num_heads=[6, 6, 7, 6]"], "model.num_heads"),
        (&["window_size=0"], "model.window_size"),
        (&["window_size=6"], "model.window_size"),
        (&["mlp_ratio=0.001"], "model.mlp_ratio"),
    ] {
        let e = build(set, rgb);
        assert!(e.contains(&format!("`{key}`")), "{set:?}: {e}");
    }
    let e = build(&[], [3, 16, 12]);
    assert!(e.contains("`model.window_size`"), "{e}");
    let e = build(&[], [1, 16, 16]);
    assert!(
        e.contains("`model.arch`") && e.contains("3 channels"),
        "{e}"
    );
    // An input of another size than the network's is refused, naming both.
    let net = swinir(2, 4, &[2], &[2], 2, 2.0, [4, 4]);
    let mut rng = Rng::new(1, 1);
    let mut state = model::NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
    let x = Tensor::zeros((1, 3, 6, 4), DType::F32, &dev()).unwrap();
    let e = match net.forward(&state.frozen_view(), &mut state.buffers, &x, Mode::Eval) {
        Ok(_) => panic!("a 6x4 input into a network for 4x4"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("[3, 4, 4]") && e.contains("[3, 6, 4]"), "{e}");
    // The same rules when the configuration is read (an unset scale is not an error
    // there: the data gives it); the defaults are SwinIR-light's.
    let parse = |extra: &str| {
        Config::from_toml(&format!("[model]\narch = \"swinir\"\n{extra}"), "test", &[])
            .map(|c| c.model)
            .map_err(|e| format!("{e:#}"))
    };
    let m = parse("").unwrap();
    assert_eq!(
        (
            m.scale,
            m.embed_dim,
            m.depths.clone(),
            m.num_heads.clone(),
            m.window_size,
            m.mlp_ratio
        ),
        (None, 60, vec![6; 4], vec![6; 4], 8, None),
        "SwinIR-light"
    );
    for (extra, key) in [
        ("scale = 5", "model.scale"),
        ("embed_dim = 0", "model.embed_dim"),
        ("depths = [6, 6]", "model.num_heads"),
        ("num_heads = [7, 6, 6, 6]", "model.num_heads"),
        ("window_size = 0", "model.window_size"),
        ("mlp_ratio = inf", "model.mlp_ratio"),
    ] {
        let e = parse(extra).unwrap_err();
        assert!(e.contains(&format!("`{key}`")), "{extra}: {e}");
    }
}

// ------------------------------------------------------- (c) finite differences in f64

/// Step of the central differences: the function is smooth (convolutions, LayerNorm,
/// softmax, GELU; no ReLU), so their truncation error is O(EPS^2).
const EPS: f64 = 1e-5;
/// Largest accepted error `|fd - ad| / max(|ad|, max_j |ad_j|)` (as tests/gradients.rs);
/// measured worst: 1.2e-7 (conv_first.bias).
const FD_TOL: f64 = 1e-6;

/// Every element of every parameter and of the input of a tiny f64 SwinIR: the autograd
/// gradient of `sum((y - y0) * r)` (`y0` the output at the base point, `r` fixed
/// random) against central differences. The weights are drawn wider than the init
/// (LayerNorm gains and biases, bias tables and Linear weights of order 0.5) so that
/// attention, its bias and its mask shape the output.
#[test]
fn finite_differences_f64() {
    let (h, w, scale) = (4, 6, 2);
    let net = swinir(scale, 4, &[2, 1], &[2, 1], 2, 1.5, [h, w]);
    // Shifted blocks: one mask.
    assert_eq!(net.buffers().len(), 4);
    let mut rng = Rng::new(11, 3);
    let state = model::NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
    let buffers = state.buffers.clone();
    let mut inputs: Vec<Tensor> = net
        .params()
        .iter()
        .map(|s| match s.init {
            model::Init::FanIn(_) => uniform(&mut rng, &s.shape, -0.3, 0.3),
            model::Init::Ones => uniform(&mut rng, &s.shape, 0.5, 1.5),
            _ => uniform(&mut rng, &s.shape, -0.5, 0.5),
        })
        .collect();
    inputs.push(uniform(&mut rng, &[2, 3, h, w], 0.0, 1.0));
    let out = [2, 3, h * scale, w * scale];
    let r = uniform(&mut rng, &out, -1.0, 1.0);
    let forward = |t: &[Tensor]| -> Tensor {
        let (p, x) = t.split_at(t.len() - 1);
        let mut b = buffers.clone();
        net.forward(p, &mut b, &x[0], Mode::Train).unwrap()
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
    let mut worst = (0f64, String::new());
    for (i, v) in vars.iter().enumerate() {
        let what = match net.params().get(i) {
            Some(s) => s.name.clone(),
            None => "input".into(),
        };
        let ad = f64s(grads.get(v.as_tensor()).unwrap());
        let scale_i = ad.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale_i > 0.0, "`{what}`: an all-zero gradient");
        let base = f64s(&inputs[i]);
        let at = |j: usize, d: f64| -> f64 {
            let mut v = base.clone();
            v[j] += d;
            let mut ins = inputs.clone();
            ins[i] = Tensor::from_vec(v, inputs[i].dims(), &dev()).unwrap();
            f64s(&f(&ins))[0]
        };
        for (j, &g) in ad.iter().enumerate() {
            let fd = (at(j, EPS) - at(j, -EPS)) / (2.0 * EPS);
            let err = (fd - g).abs() / g.abs().max(scale_i);
            if err > worst.0 {
                worst = (err, format!("{what}[{j}]"));
            }
            assert!(
                err <= FD_TOL,
                "`{what}`[{j}]: finite difference {fd:e} vs autograd {g:e} (rel {err:e})"
            );
        }
    }
    eprintln!(
        "swinir: worst finite-difference error {:.3e} at {}",
        worst.0, worst.1
    );
}

// ----------------------------------------------------------- (d) segments, recompute

/// Per parameter, the gradient of the L1 loss walked segment by segment as block-wise
/// recompute walks it (`src/train/recompute.rs`): a forward without a graph keeping each
/// segment's input, then from the top each segment recomputed with its parameters (and,
/// above the lowest, its inputs) tracked, the loss or `sum(out * g)` of its outputs'
/// gradients back-propagated.
fn walked_gradients(
    net: &dyn Network,
    params: &[Var],
    buffers: &mut [Tensor],
    x: &Tensor,
    target: &Tensor,
) -> Vec<Tensor> {
    let mut units = Vec::new();
    for (k, b) in net.blocks().iter().enumerate() {
        for (j, s) in net.segments(k).into_iter().enumerate() {
            units.push((
                k,
                j,
                b.params.start + s.params.start..b.params.start + s.params.end,
                b.buffers.start + s.buffers.start..b.buffers.start + s.buffers.end,
            ));
        }
    }
    let mut inputs = Vec::new();
    let mut carried = vec![x.detach()];
    for (k, j, range, bufs) in &units {
        let w: Vec<Tensor> = params[range.clone()]
            .iter()
            .map(|v| v.as_tensor().detach())
            .collect();
        let out = net
            .forward_segment(
                *k,
                *j,
                &w,
                &mut buffers[bufs.clone()],
                &carried,
                Mode::Train,
            )
            .unwrap();
        inputs.push(std::mem::replace(&mut carried, out));
    }
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut upstream: Option<Vec<Tensor>> = None;
    for (u, (k, j, range, bufs)) in units.iter().enumerate().rev() {
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
            .forward_segment(*k, *j, &w, &mut buffers[bufs.clone()], &xin, Mode::Train)
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
    for (scale, depths, heads, window, hw) in [
        (2, &[2, 3][..], &[2, 4][..], 4, [8, 12]),
        (4, &[1], &[2], 2, [4, 4]),
        (3, &[3, 2], &[1, 2], 8, [8, 8]),
    ] {
        let net = swinir(scale, 8, depths, heads, window, 2.0, hw);
        let case = format!("x{scale}, depths {depths:?}, window {window}, {hw:?}");
        assert_eq!(net.blocks().len(), 3, "{case}");
        let blocks: usize = depths.iter().sum();
        assert_eq!(
            net.segments(1).len(),
            1 + 2 * blocks + depths.len() + 1,
            "{case}: the body's segments"
        );
        let mut rng = Rng::new(5, scale as u64);
        let mut state = model::NetState::init(net.as_ref(), &mut rng, &dev()).unwrap();
        // Weights wider than the init, so that every path carries weight.
        let params: Vec<Var> = net
            .params()
            .iter()
            .map(|s| {
                let t = uniform(&mut rng, &s.shape, -0.5, 0.5)
                    .to_dtype(DType::F32)
                    .unwrap();
                Var::from_tensor(&t).unwrap()
            })
            .collect();
        let x = uniform(&mut rng, &[2, 3, hw[0], hw[1]], 0.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let target = uniform(&mut rng, &[2, 3, hw[0] * scale, hw[1] * scale], 0.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let buffers = &mut state.buffers;
        // Each block's segments in order against the block's forward.
        let live: Vec<Tensor> = params.iter().map(|v| v.as_tensor().clone()).collect();
        let mut h = x.clone();
        for (k, b) in net.blocks().iter().enumerate() {
            let p = &live[b.params.clone()];
            let bu = &mut buffers[b.buffers.clone()];
            let whole = net.forward_block(k, p, bu, &h, Mode::Train).unwrap();
            let folded = model::fold_segments(net.as_ref(), k, p, bu, &h, Mode::Train).unwrap();
            assert_eq!(bits(&whole), bits(&folded), "{case}: block {k}");
            h = whole;
        }
        // The whole graph's gradients against the walk's.
        let y = net.forward(&live, buffers, &x, Mode::Train).unwrap();
        assert_eq!(bits(&y), bits(&h), "{case}: forward = the blocks in order");
        let store = l1(&y, &target).backward().unwrap();
        let walked = walked_gradients(net.as_ref(), &params, buffers, &x, &target);
        for ((s, v), g) in net.params().iter().zip(&params).zip(&walked) {
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

// ---------------------------------------------------------------- (e) a short run

/// LDT-S with a tiny SwinIR (embed_dim 8, two groups of two blocks, window 8 on the
/// 24x24 inputs: 3x3 windows, shifted blocks masked) on `data/sr-photos`: the run
/// trains and evaluates (the AM's L1 on every domain below the first evaluation's, a
/// finite PSNR), block-wise recompute on, and
/// its exported weights carry BasicSR's names, buffers included, the computed buffers
/// unchanged by training.
#[test]
fn ldt_s_trains_a_tiny_swinir_on_sr_photos() {
    let manifest = common::root().join("data/sr-photos/manifest.json");
    let toml = format!(
        r#"
[model]
arch = "swinir"
embed_dim = 8
depths = [2, 2]
num_heads = [2, 2]
window_size = 8
[data]
manifest = "{}"
[train]
method = "ldt-s"
steps = 8
batch_size = 8
log_every = 1000
recompute = "blocks"
[optim]
lr = 1e-3
[stage1]
warmup_steps = 2
stat_batches = 2
[ldt_s]
p_steps = 2
a_steps = 2
[eval]
every = 4
batch_size = 32
"#,
        manifest.display()
    );
    let (dir, _ctx) = common::run(&toml, &[]);
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    eprintln!("run files: {files:?}");
    let finals = ["pm.safetensors", "am.safetensors", "composite.safetensors"];
    for f in finals {
        assert!(files.iter().any(|x| x == f), "{f} exported: {files:?}");
    }
    let cfg = ModelConfig {
        arch: "swinir".into(),
        scale: Some(2),
        embed_dim: 8,
        depths: vec![2, 2],
        num_heads: vec![2, 2],
        window_size: 8,
        ..ModelConfig::default()
    };
    let net = model::build(&cfg, [3, 24, 24], 0).unwrap();
    let fresh = fresh_buffers(net.as_ref());
    for f in finals {
        let t = common::load(&dir.path().join(f));
        for s in net.params() {
            let v = f64s(&t[&s.name]);
            assert!(v.iter().all(|x| x.is_finite()), "{f}: `{}`", s.name);
        }
        for (s, b) in net.buffers().iter().zip(&fresh) {
            let got = &t[&s.name];
            match s.dtype {
                DType::I64 => assert_eq!(i64s(got), i64s(b), "{f}: `{}`", s.name),
                _ => assert_eq!(bits(got), bits(b), "{f}: `{}`", s.name),
            }
        }
    }
    // The run's first evaluation (step 4) against the final AM's.
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v.get("domains").is_some())
        .expect("an evaluation in metrics.jsonl");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["arch"], "swinir");
    for d in summary["eval"]["am"]["domains"].as_array().unwrap() {
        let name = d["name"].as_str().unwrap();
        let (loss, psnr) = (
            d["loss"].as_f64().unwrap(),
            d["image"]["psnr"].as_f64().unwrap(),
        );
        let start = first["domains"][name]["loss"].as_f64().unwrap();
        eprintln!("{name}: L1 {start:.4} -> {loss:.4}, PSNR-Y {psnr:.2} dB");
        assert!(psnr.is_finite() && psnr > 10.0, "{name}: PSNR {psnr}");
        assert!(loss < start, "{name}: L1 {start} -> {loss}");
    }
}
