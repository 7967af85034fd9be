//! `ldt`: Layer-Decomposition Training (LDT, ICLR 2026) for one machine.
//!
//! The pipeline, one module per stage: [`data`] (manifest, memory-mapped splits, loader)
//! -> [`model`] (networks with exact gradients) -> [`ldt::stats`] (stage-1 gradient
//! statistics) -> [`ldt::partition`] (stable / unstable sets, DPU coefficients) ->
//! [`train`] (ERM, the dual branch and LDT-S over the [`offload`] counterpart buffer)
//! -> [`ldt::composite`] (the one network that is kept).

#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod heap;
pub mod integrity;
pub mod ldt;
pub mod lock;
pub mod metrics;
pub mod model;
pub mod offload;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod task;
pub mod train;
pub mod verify;

use anyhow::{bail, Result};

/// The compute device named by `device`: `cpu`, or `cuda:N` with the `cuda` feature (GPU
/// N on a stream of its own).
pub fn device(cfg: &config::Config) -> Result<candle_core::Device> {
    match config::DeviceSpec::parse(&cfg.device) {
        Some(config::DeviceSpec::Cpu) => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        Some(config::DeviceSpec::Cuda(n)) => offload::cuda::open(n),
        #[cfg(not(feature = "cuda"))]
        Some(config::DeviceSpec::Cuda(_)) => bail!(
            "config key `device` = `{}`: this build has no CUDA support; use `cpu` or rebuild with `--features cuda`",
            cfg.device
        ),
        None => bail!(
            "config key `device` = `{}`: must be `cpu` or `cuda:N`",
            cfg.device
        ),
    }
}

/// Fixes the CPU thread count for candle and rayon (`threads`, 0 = all cores). Must run
/// before the first tensor operation.
///
/// candle's element-wise ops run on a pool of their own beside rayon's (which runs the
/// GEMMs and the host kernels); by default its workers spin 25,000 rounds after every
/// op before they sleep, taking a core from rayon's threads. They sleep at once here
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0` unless the environment sets it): resnet18 at 2
/// threads took 28% less time per step (docs/torch-compare.md).
pub fn init_threads(threads: usize) {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    if threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .ok();
    }
}
