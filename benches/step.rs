//! ms/step of one ERM optimizer step (forward, backward, Adam) at batch 32 on random
//! data: `mlp`, `cnn`, `cnn_bn` at 1x28x28, and `resnet18` and the fixture-sized `vit`
//! at 3x32x32, in f32 and bf16, with the forward and forward+backward split.
//! Threads: `RAYON_NUM_THREADS` (default all cores); `LDT_BENCH_ITERS` (default 10).

use ldt::config::Precision;

fn main() -> anyhow::Result<()> {
    let iters = std::env::var("LDT_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!(
        "threads {}, batch 32, {iters} iterations after one warm-up",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<9} {:>5} {:>11} {:>10} {:>12} {:>12}",
        "model", "prec", "params", "ms/step", "ms forward", "ms fwd+bwd"
    );
    for (arch, input) in [
        ("mlp", [1, 28, 28]),
        ("cnn", [1, 28, 28]),
        ("cnn_bn", [1, 28, 28]),
        ("resnet18", [3, 32, 32]),
        ("vit", [3, 32, 32]),
    ] {
        for (label, precision) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
            let t = ldt::bench::step_times(arch, input, 32, iters, precision)?;
            println!(
                "{arch:<9} {label:>5} {:>11} {:>10.2} {:>12.2} {:>12.2}",
                t.params, t.step_ms, t.forward_ms, t.forward_backward_ms
            );
        }
    }
    Ok(())
}
