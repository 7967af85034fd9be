//! The data-parallel code paths with an engine of one rank, on the CPU: what
//! `tests/nccl.rs` requires of NCCL on a GPU, shown here for the trait's own host paths.
//! `Loopback` is an engine that is not `Local`, so every collective of a data-parallel
//! run is made (the shard gradients' all-reduce as one tensor, the f64 loss/count sums,
//! the per-dtype BatchNorm broadcast, the partition and final-replica agreement, the
//! checkpoint barrier and stop agreement), each an identity over one rank.
//!
//! Compared: exported weights of erm, ldt and ldt-s on cnn_bn against the same runs
//! without an engine, bit for bit (a sum over one rank of `g * 1.0` is `g`; the buffers
//! round-trip f32 and i64 through f64 exactly), and `summary.json` names the engine.

mod common;

use anyhow::Result;
use ldt::dist::{self, Collective};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One rank that makes every call and counts them.
struct Loopback {
    calls: AtomicUsize,
}

impl Loopback {
    fn call(&self) -> Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Collective for Loopback {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        self.call()
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        self.call()
    }
    fn broadcast_f64(&self, _: &mut [f64], _: usize) -> Result<()> {
        self.call()
    }
    fn barrier(&self) -> Result<()> {
        self.call()
    }
    fn name(&self) -> &'static str {
        "loopback"
    }
}

#[test]
fn one_rank_engine_run_equals_the_run_without_an_engine() {
    let engine = Arc::new(Loopback {
        calls: AtomicUsize::new(0),
    });
    let mut seen = 0;
    common::one_rank_engine_runs(
        "cpu",
        || dist::set_group(engine.clone()),
        "loopback",
        |m| {
            let total = engine.calls.load(Ordering::Relaxed);
            let calls = total - seen;
            seen = total;
            // At least the loss sums, the gradient all-reduce and the buffer broadcasts
            // of every step.
            assert!(calls > 3 * 12, "{m}: only {calls} collective calls");
            println!("{m}: bit-identical through {calls} collective calls");
        },
    );
}
