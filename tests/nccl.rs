//! The NCCL engine on one GPU (feature `nccl`; without a GPU it says SKIPPED):
//! `scripts/gpu-check.sh` runs it on a lent machine, which has one GPU, so the world is
//! one rank (NCCL refuses two ranks on one GPU). One rank still makes every call of a
//! data-parallel run: the engine's self-test at start, the f32 gradient all-reduce in
//! device memory, the f64 loss/count sums, the BatchNorm buffer broadcast (f32 and i64 in
//! device memory), the partition and final-replica agreement and the checkpoint barrier.
//!
//! Compared: training through the engine against the same run without one, exported
//! weights bit for bit (a sum over one rank of `g * 1.0` is `g`, and the buffer
//! broadcast round-trips f32 through f64 exactly).
#![cfg(feature = "nccl")]

mod common;

use ldt::dist::{self, Launch};
use ldt::offload::cuda;

#[test]
fn one_rank_nccl_run_equals_the_run_without_an_engine() {
    let device = match cuda::open(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: no CUDA GPU: {e:#}");
            return;
        }
    };
    let rendezvous = tempfile::tempdir().unwrap();
    let one = Launch {
        rank: 0,
        world: 1,
        local_rank: 0,
        launcher: "test",
    };
    let install = || {
        dist::start_nccl(&device, &one, rendezvous.path()).expect("NCCL on one GPU");
        assert_eq!(dist::group().name(), "nccl");
    };
    common::one_rank_engine_runs("cuda:0", install, "nccl", |_| {});
}
