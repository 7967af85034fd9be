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
    let toml = r#"
seed = 3
device = "cuda:0"
[model]
arch = "cnn_bn"
[train]
steps = 12
batch_size = 16
[optim]
lr = 1e-3
[stage1]
warmup_steps = 2
stat_batches = 2
stat_batch_size = 4
[ldt]
ema_every = 3
[ldt_s]
p_steps = 3
a_steps = 3
[checkpoint]
every = 6
"#;
    let man = common::bundled_manifest();
    let cases = [
        ("erm", "model.safetensors"),
        ("ldt", "composite.safetensors"),
        ("ldt-s", "composite.safetensors"),
    ];
    let method = |m: &str| format!("train.method=\"{m}\"");
    let local: Vec<_> = cases
        .iter()
        .map(|(m, _)| common::run(toml, &[&man, &method(m)]).0)
        .collect();
    let rendezvous = tempfile::tempdir().unwrap();
    let one = Launch {
        rank: 0,
        world: 1,
        local_rank: 0,
        launcher: "test",
    };
    dist::start_nccl(&device, &one, rendezvous.path()).expect("NCCL on one GPU");
    assert_eq!(dist::group().name(), "nccl");
    for ((m, file), l) in cases.iter().zip(&local) {
        let (n, _) = common::run(toml, &[&man, &method(m)]);
        let same = common::identical(&n.path().join(file), &l.path().join(file));
        let (worst, key) = common::worst_rel_l2(&n.path().join(file), &l.path().join(file));
        println!("nccl {m}: bit-identical {same}, worst relative L2 {worst:.2e} ({key})");
        assert!(
            same,
            "{m}: the one-rank NCCL run differs from the local run"
        );
        let summary = std::fs::read_to_string(n.path().join("summary.json")).unwrap();
        assert!(summary.contains("\"engine\": \"nccl\""), "{m}: {summary}");
        assert!(
            summary.contains("\"replicas_agreed_ranks\": 1"),
            "{m}: {summary}"
        );
    }
}
