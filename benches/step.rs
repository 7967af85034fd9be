//! ms/step of one ERM optimizer step (forward, backward, Adam) for `mlp` and `cnn` at
//! batch 32 on random data, and the split between forward and backward.

use candle_core::{Device, Tensor};
use ldt::config::ModelConfig;
use ldt::model::{build, Mode, NetState};
use ldt::optim::{OptimSettings, Optimizer};
use ldt::rng::Rng;
use ldt::train::step::{apply, gradients};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    println!(
        "{:<8} {:>10} {:>12} {:>12}",
        "model", "ms/step", "ms forward", "ms fwd+bwd"
    );
    for arch in ["mlp", "cnn", "cnn_bn"] {
        let cfg = ModelConfig {
            arch: arch.into(),
            ..Default::default()
        };
        let net = build(&cfg, [1, 28, 28], 10)?;
        let mut rng = Rng::new(0, 0);
        let mut state = NetState::init(net.as_ref(), &mut rng, &dev)?;
        let x = Tensor::from_vec(rng.uniform_vec(32 * 784, 0.0, 1.0), (32, 1, 28, 28), &dev)?;
        let y = Tensor::from_vec((0..32).map(|i| i % 10).collect::<Vec<i64>>(), 32, &dev)?;
        let all = vec![true; net.params().len()];
        let mut opt = Optimizer::new(
            OptimSettings::from(&ldt::config::OptimConfig::default()),
            all.len(),
        );
        let lrs = vec![1e-4; all.len()];
        let iters = 30;
        let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            f()?;
            let t = Instant::now();
            for _ in 0..iters {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
        };
        let fwd = time(&mut || {
            let mut b = state.buffers.clone();
            net.forward(&state.frozen_view(), &mut b, &x, Mode::Train)?;
            Ok(())
        })?;
        let fb = time(&mut || {
            gradients(net.as_ref(), &mut state, &all, &x, &y, Mode::Train)?;
            Ok(())
        })?;
        let step = time(&mut || {
            let (_, g) = gradients(net.as_ref(), &mut state, &all, &x, &y, Mode::Train)?;
            apply(&mut opt, &state, &g, &lrs)
        })?;
        println!("{arch:<8} {step:>10.2} {fwd:>12.2} {fb:>12.2}");
    }
    Ok(())
}
