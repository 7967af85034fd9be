//! ms/step of one ERM optimizer step (forward, backward, Adam) of `resnet18` and the
//! fixture-sized `vit` (patch 4, width 96, depth 3, heads 3) on CPU, batch 32, 32x32x3
//! random input, f32; with the forward alone and forward+backward for the split, and
//! the process CPU time per step (Linux `/proc/self/stat`; on a shared machine it shows
//! the work when the wall clock also counts waiting for a core).
//! Threads: `RAYON_NUM_THREADS` (default all cores); `LDT_BENCH_ITERS` timed iterations
//! (default 10); `LDT_BENCH_ARCHS` a comma-separated subset (default `resnet18,vit`).

use candle_core::{Device, Tensor};
use ldt::config::{ModelConfig, OptimConfig};
use ldt::model::{build, Mode, NetState};
use ldt::optim::{OptimSettings, Optimizer};
use ldt::rng::Rng;
use ldt::train::step::{apply, gradients};
use std::time::Instant;

/// CPU time of this process so far (user + system), in ms; None off Linux.
fn cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux configuration in use.
    Some(ticks * 10.0)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let iters: usize = std::env::var("LDT_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!(
        "threads {}, batch 32, 3x32x32, {iters} iterations after one warm-up",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<9} {:>11} {:>10} {:>12} {:>12} {:>12}",
        "model", "params", "ms/step", "ms forward", "ms fwd+bwd", "cpu ms/step"
    );
    let archs = std::env::var("LDT_BENCH_ARCHS").unwrap_or_else(|_| "resnet18,vit".into());
    for arch in archs.split(',').map(str::trim) {
        let cfg = ModelConfig {
            arch: arch.into(),
            ..Default::default()
        };
        let net = build(&cfg, [3, 32, 32], 10)?;
        let mut rng = Rng::new(0, 0);
        let mut state = NetState::init(net.as_ref(), &mut rng, &dev)?;
        let x = Tensor::from_vec(
            rng.uniform_vec(32 * 3 * 32 * 32, -1.0, 1.0),
            (32, 3, 32, 32),
            &dev,
        )?;
        let y = Tensor::from_vec((0..32).map(|i| i % 10).collect::<Vec<i64>>(), 32, &dev)?;
        let all = vec![true; net.params().len()];
        let mut opt = Optimizer::new(OptimSettings::from(&OptimConfig::default()), all.len());
        let lrs = vec![1e-4; all.len()];
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
        let cpu0 = cpu_ms();
        let step = time(&mut || {
            let (_, g) = gradients(net.as_ref(), &mut state, &all, &x, &y, Mode::Train)?;
            apply(&mut opt, &state, &g, &lrs)
        })?;
        // `time` runs iters + 1 steps (one warm-up).
        let cpu = match (cpu0, cpu_ms()) {
            (Some(a), Some(b)) => format!("{:.1}", (b - a) / (iters + 1) as f64),
            _ => "-".into(),
        };
        println!(
            "{arch:<9} {:>11} {step:>10.1} {fwd:>12.1} {fb:>12.1} {cpu:>12}",
            net.numel()
        );
    }
    Ok(())
}
