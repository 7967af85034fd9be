//! `ldt::optim::Optimizer` against an f64 recomputation of PyTorch's update rules
//! (`torch.optim.Adam` / `AdamW` / `SGD`, single-tensor path; see the fixtures README,
//! "The arithmetic, exactly"):
//!
//! - Adam:  `g' = g + wd*p` (L2, Adam only); AdamW first `p = p*(1 - lr*wd)`;
//!   `m = lerp(m, g', 1-b1)` (with b1 = 0: no buffer, `m = g'`);
//!   `v = b2*v + (1-b2)*g'^2`; `denom = sqrt(v)/sqrt(1-b2^t) + eps`;
//!   `p = p - lr/(1-b1^t) * m/denom`, with `t` the layer's own step count.
//! - SGD: `d = g + wd*p`; `buf = d` at a layer's first step, else `buf = mu*buf + d`;
//!   `p = p - lr*buf` (no momentum: `p = p - lr*d`).
//!
//! Two checks per optimizer, over several steps with a learning rate that changes per
//! step, two layers with their own step counts (layer 1 steps every other time and gets
//! its gradient as a transposed, non-contiguous view) and a third that never steps:
//!
//! 1. **Step by step**, from the implementation's own f32 state before each step:
//!    - state (`m`, `v`): `|got - want| <= 1e-6 * (sum of the magnitudes of the terms)`
//!      (f32 rounding of a few operations is ~3e-7 of that);
//!    - parameter: `|got - want| <= 1e-6 * |update| + k ulp(p)` (k = 1, AdamW 2: the
//!      result is rounded to f32 once, twice for AdamW's scaling), where `want` applies
//!      the rule to the implementation's new `m`, `v` (checked just above) in f64.
//!      The data keep `ulp(p)` far below the update, so a wrong bias correction, eps,
//!      weight decay or learning rate shows.
//! 2. **Trajectory**: a fully independent f64 run from the same start; after all steps
//!    `|got - want| <= 1e-5 * sum_k |update_k| + steps * ulp(p)`.
//!
//! It also checks which state buffers exist (beta1 = 0 keeps no first moment) and the
//! state's byte counts.
//!
//! The fused host kernel (`ldt::optim::fused`, the CPU path) against the device-generic
//! path (`Optimizer::step_generic`, candle ops), bit for bit, for every variant of its
//! loops and on any number of threads; and its refusal of mismatched jobs.

#[path = "common/testkit.rs"]
mod testkit;

use candle_core::{Device, Tensor, Var};
use ldt::config::{authors_beta2, OptimName};
use ldt::optim::fused::{self, Update};
use ldt::optim::{Grad, OptimSettings, Optimizer};
use ldt::rng::Rng;
use testkit::{f32s, f64s, ulp_f32};

/// Layer shapes: layer 0 steps every time, layer 1 on odd steps, layer 2 never.
const SHAPES: [&[usize]; 3] = [&[64], &[5, 7], &[3]];
const STEPS: u64 = 12;

/// One test setting: optimizer, base rate, parameter and gradient magnitudes.
struct Case {
    what: &'static str,
    s: OptimSettings,
    lr: f64,
    /// Parameters: random sign, magnitude uniform in this range.
    p_mag: (f64, f64),
    /// Gradients: random sign, magnitude 10^U(lo, hi); `zeros` = some entries exactly 0.
    g_exp: (f64, f64),
    zeros: bool,
}

fn settings(name: OptimName, betas: [f64; 2], weight_decay: f64, momentum: f64) -> OptimSettings {
    OptimSettings {
        name,
        betas,
        eps: 1e-8,
        weight_decay,
        momentum,
    }
}

fn lr_at(base: f64, step: u64) -> f64 {
    base * (0.5 + 0.1 * step as f64)
}

fn signed(rng: &mut Rng, mag: f64) -> f64 {
    if rng.next_u64() & 1 == 0 {
        mag
    } else {
        -mag
    }
}

fn params0(c: &Case, rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let m = c.p_mag.0 + (c.p_mag.1 - c.p_mag.0) * rng.next_f64();
            signed(rng, m) as f32
        })
        .collect()
}

fn grad(c: &Case, rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if c.zeros && rng.below(20) == 0 {
                return 0.0;
            }
            let e = c.g_exp.0 + (c.g_exp.1 - c.g_exp.0) * rng.next_f64();
            signed(rng, 10f64.powf(e)) as f32
        })
        .collect()
}

/// The gradient tensor of layer `i`; layer 1's is a transposed (non-contiguous) view.
fn grad_tensor(i: usize, g: &[f32]) -> Tensor {
    let d = Device::Cpu;
    if i == 1 {
        let (r, c) = (SHAPES[1][0], SHAPES[1][1]);
        let gt: Vec<f32> = (0..c * r).map(|k| g[(k % r) * c + k / r]).collect();
        let t = Tensor::from_vec(gt, (c, r), &d).unwrap().t().unwrap();
        assert!(!t.is_contiguous());
        t
    } else {
        Tensor::from_vec(g.to_vec(), SHAPES[i], &d).unwrap()
    }
}

/// Result of one reference step: weights, state, and the update term.
type Stepped = (Vec<f64>, Option<Vec<f64>>, Option<Vec<f64>>, Vec<f64>);

/// f64 reference of one step: returns `(p, m, v, update)` where `update` is the change
/// made by the `m/denom` (or `-lr*buf`) term, the scale of the parameter tolerance.
/// `m`/`v` are the state before the step (None = not yet created).
fn reference(
    s: &OptimSettings,
    p: &[f64],
    m: Option<&[f64]>,
    v: Option<&[f64]>,
    g: &[f64],
    t: u64,
    lr: f64,
) -> Stepped {
    let n = p.len();
    match s.name {
        OptimName::Adam | OptimName::Adamw => {
            let [b1, b2] = s.betas;
            let (mut p, mut g) = (p.to_vec(), g.to_vec());
            if s.weight_decay > 0.0 {
                if s.name == OptimName::Adamw {
                    p.iter_mut().for_each(|p| *p *= 1.0 - lr * s.weight_decay);
                } else {
                    g.iter_mut()
                        .zip(&p)
                        .for_each(|(g, p)| *g += s.weight_decay * p);
                }
            }
            let m_new: Option<Vec<f64>> = (b1 > 0.0).then(|| {
                let m0 = m.map_or(vec![0.0; n], |m| m.to_vec());
                m0.iter()
                    .zip(&g)
                    .map(|(m, g)| m + (1.0 - b1) * (g - m))
                    .collect()
            });
            let v0 = v.map_or(vec![0.0; n], |v| v.to_vec());
            let v_new: Vec<f64> = v0
                .iter()
                .zip(&g)
                .map(|(v, g)| b2 * v + (1.0 - b2) * g * g)
                .collect();
            let first = m_new.clone().unwrap_or_else(|| g.clone());
            let bc1 = 1.0 - b1.powi(t as i32);
            let bc2 = (1.0 - b2.powi(t as i32)).sqrt();
            let upd: Vec<f64> = first
                .iter()
                .zip(&v_new)
                .map(|(m, v)| -(lr / bc1) * m / (v.sqrt() / bc2 + s.eps))
                .collect();
            let p_new = p.iter().zip(&upd).map(|(p, u)| p + u).collect();
            (p_new, m_new, Some(v_new), upd)
        }
        OptimName::Sgd => {
            let d: Vec<f64> = g
                .iter()
                .zip(p)
                .map(|(g, p)| g + s.weight_decay * p)
                .collect();
            let (dir, buf) = if s.momentum > 0.0 {
                let b: Vec<f64> = match m {
                    None => d.clone(),
                    Some(b) => b.iter().zip(&d).map(|(b, d)| s.momentum * b + d).collect(),
                };
                (b.clone(), Some(b))
            } else {
                (d, None)
            };
            let upd: Vec<f64> = dir.iter().map(|d| -lr * d).collect();
            let p_new = p.iter().zip(&upd).map(|(p, u)| p + u).collect();
            (p_new, buf, None, upd)
        }
    }
}

/// One layer of the independent f64 run: weights, state, step count, and the sum over
/// steps of the largest update (the scale of the trajectory tolerance).
struct Traj {
    p: Vec<f64>,
    m: Option<Vec<f64>>,
    v: Option<Vec<f64>>,
    t: u64,
    moved: f64,
}

/// Error bound scale of a state update: the magnitudes of its terms (`g'` counts the
/// weight-decay term of Adam/SGD by magnitude too).
fn state_scale(s: &OptimSettings, which: char, prev: f64, g: f64, p: f64) -> f64 {
    let gs = g.abs()
        + if s.name == OptimName::Adamw {
            0.0
        } else {
            s.weight_decay * p.abs()
        };
    let [b1, b2] = s.betas;
    match (s.name, which) {
        (OptimName::Sgd, _) => s.momentum * prev.abs() + gs,
        // lerp: m + (1-b1)*(g' - m)
        (_, 'm') => prev.abs() + (1.0 - b1) * (gs + prev.abs()),
        // b2*v + (1-b2)*g'^2
        _ => b2 * prev.abs() + (1.0 - b2) * gs * gs,
    }
}

fn check(c: Case) {
    let s = c.s.clone();
    let d = Device::Cpu;
    let mut rng = Rng::new(42, 0);
    let p0: Vec<Vec<f32>> = SHAPES
        .iter()
        .map(|sh| params0(&c, &mut rng, sh.iter().product()))
        .collect();
    let vars: Vec<Var> = p0
        .iter()
        .zip(SHAPES)
        .map(|(p, sh)| Var::from_tensor(&Tensor::from_vec(p.clone(), sh, &d).unwrap()).unwrap())
        .collect();
    let mut opt = Optimizer::new(s.clone(), SHAPES.len());
    // Independent f64 trajectory (state tracked here only).
    let mut traj: Vec<Traj> = p0
        .iter()
        .map(|p| Traj {
            p: p.iter().map(|&x| x as f64).collect(),
            m: None,
            v: None,
            t: 0,
            moved: 0.0,
        })
        .collect();
    let ulps = if s.name == OptimName::Adamw && s.weight_decay > 0.0 {
        2.0
    } else {
        1.0
    };
    let (mut worst_state, mut worst_p, mut worst_tol) = (0f64, 0f64, 0f64);
    for step in 1..=STEPS {
        let lr = lr_at(c.lr, step);
        for i in 0..2 {
            if i == 1 && step % 2 == 0 {
                continue;
            }
            let n = p0[i].len();
            let g32 = grad(&c, &mut rng, n);
            let g: Vec<f64> = g32.iter().map(|&x| x as f64).collect();
            let p_before = f64s(vars[i].as_tensor());
            let (m_before, v_before) = match opt.state(i) {
                None => (None, None),
                Some(st) => (st.m.as_ref().map(f64s), st.v.as_ref().map(f64s)),
            };
            let t = traj[i].t + 1;
            opt.step(i, &vars[i], &Grad::Device(grad_tensor(i, &g32)), lr)
                .unwrap();
            let st = opt.state(i).expect("state after a step");
            assert_eq!(st.step, t, "{}: layer {i} step count", c.what);
            let (m_got, v_got) = (st.m.as_ref().map(f64s), st.v.as_ref().map(f64s));
            let p_got = f64s(vars[i].as_tensor());

            // 1a. state from the implementation's previous state.
            let (_, m_want, v_want, _) = reference(
                &s,
                &p_before,
                m_before.as_deref(),
                v_before.as_deref(),
                &g,
                t,
                lr,
            );
            assert_eq!(
                m_got.is_some(),
                m_want.is_some(),
                "{}: first-moment / momentum buffer presence",
                c.what
            );
            assert_eq!(
                v_got.is_some(),
                v_want.is_some(),
                "{}: second-moment buffer presence",
                c.what
            );
            for (which, got, want, prev) in [
                ('m', &m_got, &m_want, &m_before),
                ('v', &v_got, &v_want, &v_before),
            ] {
                let (Some(got), Some(want)) = (got, want) else {
                    continue;
                };
                for j in 0..n {
                    let pv = prev.as_ref().map_or(0.0, |p| p[j]);
                    let scale = state_scale(&s, which, pv, g[j], p_before[j]);
                    let err = (got[j] - want[j]).abs();
                    let tol = 1e-6 * scale + f32::MIN_POSITIVE as f64;
                    worst_state = worst_state.max(err / scale.max(f32::MIN_POSITIVE as f64));
                    assert!(err <= tol, "{} step {step} layer {i} {which}[{j}]: {} vs f64 {} (err {err:e} > {tol:e})", c.what, got[j], want[j]);
                }
            }
            // 1b. parameter from the implementation's new state.
            let (p_want, _, _, upd) = match s.name {
                OptimName::Sgd if s.momentum > 0.0 => {
                    // p - lr*buf with the implementation's buf.
                    let b = m_got.as_ref().unwrap();
                    let upd: Vec<f64> = b.iter().map(|b| -lr * b).collect();
                    (
                        p_before.iter().zip(&upd).map(|(p, u)| p + u).collect(),
                        None,
                        None,
                        upd,
                    )
                }
                OptimName::Sgd => reference(&s, &p_before, None, None, &g, t, lr),
                _ => {
                    let [b1, b2] = s.betas;
                    let mut p = p_before.clone();
                    if s.name == OptimName::Adamw {
                        p.iter_mut().for_each(|p| *p *= 1.0 - lr * s.weight_decay);
                    }
                    let first: Vec<f64> = match &m_got {
                        Some(m) => m.clone(),
                        None => g
                            .iter()
                            .zip(&p_before)
                            .map(|(g, p)| {
                                g + if s.name == OptimName::Adam {
                                    s.weight_decay * p
                                } else {
                                    0.0
                                }
                            })
                            .collect(),
                    };
                    let (bc1, bc2) = (1.0 - b1.powi(t as i32), (1.0 - b2.powi(t as i32)).sqrt());
                    let v = v_got.as_ref().unwrap();
                    let upd: Vec<f64> = first
                        .iter()
                        .zip(v)
                        .map(|(m, v)| -(lr / bc1) * m / (v.sqrt() / bc2 + s.eps))
                        .collect();
                    (
                        p.iter().zip(&upd).map(|(p, u)| p + u).collect(),
                        None,
                        None,
                        upd,
                    )
                }
            };
            for j in 0..n {
                let err = (p_got[j] - p_want[j]).abs();
                let tol = 1e-6 * upd[j].abs() + ulps * ulp_f32(p_want[j]);
                worst_tol = worst_tol.max(err / tol);
                if upd[j].abs() >= 1e3 * ulp_f32(p_want[j]) {
                    worst_p = worst_p.max(err / upd[j].abs());
                }
                assert!(
                    err <= tol,
                    "{} step {step} layer {i} p[{j}]: {} vs f64 {} (update {:e}, err {err:e} > {tol:e})",
                    c.what,
                    p_got[j],
                    p_want[j],
                    upd[j]
                );
            }

            // 2. the independent trajectory.
            let tr = &mut traj[i];
            let (p_new, m_new, v_new, upd) =
                reference(&s, &tr.p, tr.m.as_deref(), tr.v.as_deref(), &g, t, lr);
            let moved: f64 = upd.iter().map(|u| u.abs()).fold(0.0, f64::max);
            *tr = Traj {
                p: p_new,
                m: m_new,
                v: v_new,
                t,
                moved: tr.moved + moved,
            };
        }
    }
    // 2. after all steps, against the independent f64 run.
    let mut worst_traj = 0f64;
    for (i, tr) in traj.iter().enumerate().take(2) {
        let got = f64s(vars[i].as_tensor());
        for (j, (g, w)) in got.iter().zip(&tr.p).enumerate() {
            let tol = 1e-5 * tr.moved + tr.t as f64 * ulps * ulp_f32(*w);
            worst_traj = worst_traj.max((g - w).abs() / tr.moved);
            assert!(
                (g - w).abs() <= tol,
                "{} trajectory layer {i} p[{j}]: {g} vs f64 {w} (tol {tol:e})",
                c.what
            );
        }
    }
    // Layer 2 never stepped: no state, unchanged weights.
    assert!(
        opt.state(2).is_none(),
        "{}: a layer that never stepped has state",
        c.what
    );
    assert_eq!(
        f64s(vars[2].as_tensor()),
        p0[2].iter().map(|&x| x as f64).collect::<Vec<_>>()
    );
    // State buffers and bytes.
    let buffers = match s.name {
        OptimName::Sgd => usize::from(s.momentum > 0.0),
        _ => 1 + usize::from(s.betas[0] > 0.0),
    };
    let mut total = 0;
    for (i, sh) in SHAPES.iter().enumerate().take(2) {
        let st = opt.state(i).unwrap();
        let n: usize = sh.iter().product();
        assert_eq!(
            st.bytes(),
            buffers * 4 * n,
            "{}: layer {i} state bytes",
            c.what
        );
        let roles: Vec<&str> = st.tensors().iter().map(|(r, _)| *r).collect();
        let want_roles: Vec<&str> = match (s.name, buffers) {
            (OptimName::Sgd, 0) => vec![],
            (OptimName::Sgd, _) => vec!["m"],
            (_, 1) => vec!["v"],
            _ => vec!["m", "v"],
        };
        assert_eq!(roles, want_roles, "{}: layer {i} state tensors", c.what);
        if s.name != OptimName::Sgd && s.betas[0] == 0.0 {
            assert!(
                st.m.is_none(),
                "{}: beta1 = 0 must keep no first moment",
                c.what
            );
        }
        for (_, t) in st.tensors() {
            assert_eq!(t.dims(), *sh, "{}: layer {i} state shape", c.what);
        }
        total += buffers * 4 * n;
    }
    assert_eq!(opt.bytes(), total, "{}: optimizer bytes", c.what);
    eprintln!(
        "{}: worst state error {worst_state:.2e} (of the terms' magnitude), worst parameter error {worst_p:.2e} (of the update, where it exceeds 1000 ulp) and {worst_tol:.2} of its tolerance, trajectory {worst_traj:.2e} (of the largest total update); state {} bytes",
        c.what,
        opt.bytes()
    );
}

#[test]
fn adam_authors_beta1_zero() {
    check(Case {
        what: "adam (0, 0.99^0.8) lr 1e-4",
        s: settings(OptimName::Adam, [0.0, authors_beta2()], 0.0, 0.0),
        lr: 1e-4,
        p_mag: (1e-3, 1e-2),
        g_exp: (-10.0, 0.0),
        zeros: true,
    });
}

#[test]
fn adam_standard_betas() {
    check(Case {
        what: "adam (0.9, 0.999) lr 1e-3",
        s: settings(OptimName::Adam, [0.9, 0.999], 0.0, 0.0),
        lr: 1e-3,
        p_mag: (1e-3, 1e-2),
        g_exp: (-10.0, 0.0),
        zeros: true,
    });
}

#[test]
fn adam_with_l2_weight_decay() {
    // |wd * p| <= 0.1 * |g|: the decay shifts gradients by up to 10%, with no cancellation.
    check(Case {
        what: "adam L2 wd 0.1",
        s: settings(OptimName::Adam, [0.9, 0.999], 0.1, 0.0),
        lr: 1e-3,
        p_mag: (0.1, 1.0),
        g_exp: (-0.3, 0.0),
        zeros: false,
    });
}

#[test]
fn adamw_with_decoupled_weight_decay() {
    // lr*wd*|p| ~ 1e-4..1e-3: far above the tolerance (1e-6 of ~1e-2 updates + 2 ulp).
    check(Case {
        what: "adamw wd 0.1",
        s: settings(OptimName::Adamw, [0.9, 0.999], 0.1, 0.0),
        lr: 1e-2,
        p_mag: (0.1, 1.0),
        g_exp: (-10.0, 0.0),
        zeros: true,
    });
}

#[test]
fn adamw_beta1_zero_keeps_no_first_moment() {
    check(Case {
        what: "adamw (0, 0.99^0.8) wd 0.05",
        s: settings(OptimName::Adamw, [0.0, authors_beta2()], 0.05, 0.0),
        lr: 1e-2,
        p_mag: (0.1, 1.0),
        g_exp: (-6.0, 0.0),
        zeros: true,
    });
}

#[test]
fn sgd_with_momentum_and_weight_decay() {
    check(Case {
        what: "sgd momentum 0.9 wd 0.01",
        s: settings(OptimName::Sgd, [0.9, 0.999], 0.01, 0.9),
        lr: 1e-2,
        p_mag: (0.1, 1.0),
        g_exp: (-0.3, 0.0),
        zeros: false,
    });
}

#[test]
fn sgd_plain_keeps_no_state() {
    check(Case {
        what: "sgd plain",
        s: settings(OptimName::Sgd, [0.9, 0.999], 0.0, 0.0),
        lr: 1e-2,
        p_mag: (0.1, 1.0),
        g_exp: (-6.0, 0.0),
        zeros: true,
    });
}

// ------------------------------------------------------- the fused host kernel, bit for bit

/// Every variant of the fused kernel's loops: decay (none, L2, decoupled), Adam's first
/// moment (none, lerp weight below 0.5 and not), SGD's momentum (none, first, later).
fn kernel_cases() -> Vec<(&'static str, OptimSettings)> {
    use OptimName::{Adam, Adamw, Sgd};
    let b2 = authors_beta2();
    vec![
        ("adam beta1 0", settings(Adam, [0.0, b2], 0.0, 0.0)),
        ("adam", settings(Adam, [0.9, 0.999], 0.0, 0.0)),
        ("adam L2", settings(Adam, [0.9, 0.999], 0.05, 0.0)),
        ("adam beta1 0 L2", settings(Adam, [0.0, 0.99], 0.05, 0.0)),
        ("adam beta1 0.4 L2", settings(Adam, [0.4, 0.99], 0.05, 0.0)),
        ("adamw", settings(Adamw, [0.9, 0.999], 0.1, 0.0)),
        ("adamw beta1 0.4", settings(Adamw, [0.4, 0.999], 0.1, 0.0)),
        ("adamw beta1 0", settings(Adamw, [0.0, b2], 0.05, 0.0)),
        ("adamw no decay", settings(Adamw, [0.9, 0.999], 0.0, 0.0)),
        ("sgd", settings(Sgd, [0.9, 0.999], 0.0, 0.0)),
        ("sgd wd", settings(Sgd, [0.9, 0.999], 0.01, 0.0)),
        ("sgd momentum", settings(Sgd, [0.9, 0.999], 0.0, 0.9)),
        ("sgd momentum wd", settings(Sgd, [0.9, 0.999], 0.01, 0.9)),
    ]
}

/// Random sign, magnitude 10^U(-8, 0); one in 10 exactly zero (with `neg_zeros` half of
/// them `-0`, else all `+0`) and one in 50 subnormal.
fn kernel_values(rng: &mut Rng, n: usize, neg_zeros: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let sign = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
            match rng.below(50) {
                0..=4 if neg_zeros => sign * 0.0,
                0..=4 => 0.0,
                5 => sign * 1e-40 * (1.0 + rng.next_f64() as f32),
                _ => sign * 10f64.powf(-8.0 * rng.next_f64()) as f32,
            }
        })
        .collect()
}

/// `(zeros of opposite sign, first other difference)` between the bits of `a` and `b`.
fn differences(a: &[f32], b: &[f32]) -> (usize, Option<String>) {
    assert_eq!(a.len(), b.len());
    let mut signed_zeros = 0;
    for (j, (x, y)) in a.iter().zip(b).enumerate() {
        if x.to_bits() == y.to_bits() {
            continue;
        }
        if *x == 0.0 && *y == 0.0 {
            signed_zeros += 1;
        } else {
            return (signed_zeros, Some(format!("[{j}]: {x:e} vs {y:e}")));
        }
    }
    (signed_zeros, None)
}

/// One run of `fused::update` on plain vectors: weights and state per layer.
struct Direct {
    threads: usize,
    p: Vec<Vec<f32>>,
    m: Vec<Option<Vec<f32>>>,
    v: Vec<Option<Vec<f32>>>,
}

/// The CPU path (`Optimizer::step`, one `fused::update` per layer) and `fused::update` on
/// plain vectors with 1, 2 and 7 threads, all jobs at once, must agree bit for bit; both
/// against the device-generic path (`Optimizer::step_generic`, candle ops). Layers of 1,
/// 35 and 200003 elements (large enough to be split between threads, at odd offsets), 5
/// steps with a changing rate, data with zeros and subnormals.
///
/// Against the generic path the bits are identical when no input holds a `-0`. With `-0`
/// inputs they may differ in the sign of a zero, and only there: candle's `Tensor * f64`
/// is `x * f + 0` (`affine`), so where PyTorch's arithmetic (the host kernel) keeps a
/// `-0` (`-0 * f`, `p + -0`) the generic path gives `+0` — e.g. a `-0` weight whose
/// update is zero, or SGD's `buf*mu + d` with `buf = d = -0`.
#[test]
fn fused_kernel_matches_the_generic_path_bit_for_bit() {
    let sizes = [1usize, 35, 200_003];
    let cpu = Device::Cpu;
    for (what, s) in kernel_cases() {
        for neg_zeros in [false, true] {
            let mut rng = Rng::new(11, u64::from(neg_zeros));
            let p0: Vec<Vec<f32>> = sizes
                .iter()
                .map(|&n| kernel_values(&mut rng, n, neg_zeros))
                .collect();
            let vars = || -> Vec<Var> {
                p0.iter()
                    .map(|p| Var::from_tensor(&Tensor::new(p.as_slice(), &cpu).unwrap()).unwrap())
                    .collect()
            };
            let (host, generic) = (vars(), vars());
            let mut oh = Optimizer::new(s.clone(), sizes.len());
            let mut og = Optimizer::new(s.clone(), sizes.len());
            let adam = s.name != OptimName::Sgd;
            let has_m = if adam {
                s.betas[0] > 0.0
            } else {
                s.momentum > 0.0
            };
            let zeros = |on: bool| -> Vec<Option<Vec<f32>>> {
                sizes.iter().map(|&n| on.then(|| vec![0.0; n])).collect()
            };
            let mut direct: Vec<Direct> = [1, 2, 7]
                .into_iter()
                .map(|threads| Direct {
                    threads,
                    p: p0.clone(),
                    m: zeros(has_m),
                    v: zeros(adam),
                })
                .collect();
            let mut signed_zeros = 0;
            for step in 1..=5u64 {
                let lr = lr_at(1e-2, step);
                let grads: Vec<Vec<f32>> = sizes
                    .iter()
                    .map(|&n| kernel_values(&mut rng, n, neg_zeros))
                    .collect();
                for (i, g) in grads.iter().enumerate() {
                    let g = Tensor::new(g.as_slice(), &cpu).unwrap();
                    oh.step(i, &host[i], &Grad::Device(g.clone()), lr).unwrap();
                    og.step_generic(i, &generic[i], &g, lr).unwrap();
                }
                for d in &mut direct {
                    let mut jobs: Vec<Update<'_>> =
                        d.p.iter_mut()
                            .zip(&grads)
                            .zip(d.m.iter_mut().zip(d.v.iter_mut()))
                            .map(|((p, g), (m, v))| Update {
                                p,
                                g,
                                m: m.as_deref_mut(),
                                v: v.as_deref_mut(),
                                step,
                                lr,
                            })
                            .collect();
                    fused::update(&s, &mut jobs, d.threads).unwrap();
                }
                for i in 0..sizes.len() {
                    let (sh, sg) = (oh.state(i).unwrap(), og.state(i).unwrap());
                    let roles = |st: &ldt::optim::LayerState| -> Vec<&str> {
                        st.tensors().iter().map(|(r, _)| *r).collect()
                    };
                    assert_eq!(roles(sh), roles(sg), "{what}: state tensors");
                    let mut got = vec![("p", f32s(host[i].as_tensor()))];
                    let mut want = vec![("p", f32s(generic[i].as_tensor()))];
                    got.extend(sh.tensors().into_iter().map(|(r, t)| (r, f32s(t))));
                    want.extend(sg.tensors().into_iter().map(|(r, t)| (r, f32s(t))));
                    for ((role, h), (_, g)) in got.iter().zip(&want) {
                        let at = format!(
                            "{what}, -0 inputs {neg_zeros}, step {step}, layer {i} `{role}`"
                        );
                        for d in &direct {
                            let x = match *role {
                                "p" => &d.p[i],
                                "m" => d.m[i].as_ref().unwrap(),
                                _ => d.v[i].as_ref().unwrap(),
                            };
                            let (z, other) = differences(h, x);
                            assert!(
                                z == 0 && other.is_none(),
                                "{at}: the CPU path and fused::update on {} threads differ ({z} signed zeros, {other:?})",
                                d.threads
                            );
                        }
                        let (z, other) = differences(h, g);
                        assert!(
                            other.is_none(),
                            "{at}: host and generic paths differ at {other:?}"
                        );
                        assert!(
                            neg_zeros || z == 0,
                            "{at}: {z} zeros of opposite signs without -0 inputs"
                        );
                        signed_zeros += z;
                    }
                }
            }
            assert!(
                p0.iter()
                    .zip(&host)
                    .any(|(p, h)| differences(p, &f32s(h.as_tensor())).1.is_some()),
                "{what}: the weights did not move"
            );
            if neg_zeros {
                eprintln!("{what}: with -0 inputs, {signed_zeros} zeros of opposite sign (host vs generic), no other difference");
            }
        }
    }
}

/// `fused::update` refuses, naming what differs and writing nothing, jobs whose lengths
/// differ, buffers the settings need but lack (or have but do not use), and step 0.
#[test]
fn fused_update_rejects_mismatched_jobs() {
    let adam = settings(OptimName::Adam, [0.9, 0.999], 0.0, 0.0);
    let adam0 = settings(OptimName::Adam, [0.0, 0.999], 0.0, 0.0);
    let sgd = settings(OptimName::Sgd, [0.9, 0.999], 0.0, 0.9);
    let run = |s: &OptimSettings, lens: [Option<usize>; 3], step: u64| -> String {
        let mut p = vec![1.0f32; 8];
        let g = vec![1.0f32; lens[0].unwrap_or(8)];
        let mut m = lens[1].map(|n| vec![0.0f32; n]);
        let mut v = lens[2].map(|n| vec![0.0f32; n]);
        let (mut p2, g2, mut m2, mut v2) =
            (vec![1.0f32; 4], vec![1.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
        let adam = s.name != OptimName::Sgd;
        let ok = Update {
            p: &mut p2,
            g: &g2,
            m: (!adam || s.betas[0] > 0.0).then_some(&mut m2[..]),
            v: adam.then_some(&mut v2[..]),
            step: 1,
            lr: 0.1,
        };
        let bad = Update {
            p: &mut p,
            g: &g,
            m: m.as_deref_mut(),
            v: v.as_deref_mut(),
            step,
            lr: 0.1,
        };
        let e = fused::update(s, &mut [ok, bad], 3).unwrap_err().to_string();
        assert_eq!(
            p2, [1.0; 4],
            "{e}: a job was written before the check failed"
        );
        assert_eq!(
            p, [1.0; 8],
            "{e}: a job was written before the check failed"
        );
        e
    };
    let cases: [(&OptimSettings, [Option<usize>; 3], u64, &str); 8] = [
        (
            &adam,
            [Some(7), Some(8), Some(8)],
            1,
            "the gradient has 7 elements, the weights 8",
        ),
        (
            &adam,
            [None, Some(9), Some(8)],
            1,
            "the state `m` has 9 elements, the weights 8",
        ),
        (
            &adam,
            [None, Some(8), Some(3)],
            1,
            "the state `v` has 3 elements, the weights 8",
        ),
        (
            &adam,
            [None, None, Some(8)],
            1,
            "needs the state `m`, none was given",
        ),
        (
            &adam0,
            [None, Some(8), Some(8)],
            1,
            "keeps no state `m`, one was given",
        ),
        (
            &adam,
            [None, Some(8), None],
            1,
            "needs the state `v`, none was given",
        ),
        (
            &sgd,
            [None, Some(8), Some(8)],
            1,
            "keeps no state `v`, one was given",
        ),
        (&sgd, [None, Some(8), None], 0, "step 0"),
    ];
    for (s, lens, step, want) in cases {
        let e = run(s, lens, step);
        assert!(e.starts_with("optimizer update 1: "), "{e}");
        assert!(e.contains(want), "`{e}` should say `{want}`");
    }
}
