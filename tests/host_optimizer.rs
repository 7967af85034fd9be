//! `offload.optimizer = "host"` computes the device optimizer's bits: for erm, the dual
//! branch (resident and swap), deft and LDT-S, in f32 and bf16, with Adam (one and two
//! moments), AdamW and SGD with momentum, 50 steps with stage 1, DPU folds, evaluation
//! and selection, every exported `.safetensors` is byte-identical with the optimizer
//! state on the host and beside the weights; a host-optimizer run resumed from its
//! step-24 checkpoint ends bit-identical too (the master weights restart from the
//! checkpointed live weights). In bf16 the host-optimizer runs keep bf16 working weights
//! on the device and the network's f32 masters on the host: the same bits as the f32
//! weights cast in the forward.

mod common;
use common::*;
use std::path::Path;

const BASE: &str = r#"
seed = 5
threads = 2
[model]
arch = "cnn_bn"
[train]
steps = 50
batch_size = 16
log_every = 1000
[stage1]
warmup_steps = 4
warmup_layers = "all"
stat_batches = 4
[ldt]
ema_every = 3
[ldt_s]
p_steps = 7
a_steps = 5
[eval]
every = 25
batch_size = 512
[checkpoint]
every = 12
keep_last = 5
"#;

fn run_in(dir: &Path, overrides: &[String]) {
    let cfg = ldt::config::Config::from_toml(BASE, "host-optimizer", overrides).expect("config");
    let mut ctx = ldt::train::RunContext::open(cfg, dir).expect("open run");
    ldt::train::run_method(&mut ctx).expect("run");
}

/// The `.safetensors` files of a run directory, sorted.
fn exported(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    v.sort();
    v
}

/// Every exported file of `a` equals `b`'s byte for byte.
fn same_bytes(what: &str, a: &Path, b: &Path) {
    let (fa, fb) = (exported(a), exported(b));
    assert_eq!(fa, fb, "{what}: different files");
    assert!(!fa.is_empty(), "{what}: nothing exported");
    for f in fa {
        let (x, y) = (
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
        );
        assert!(x == y, "{what}: {f} differs");
    }
}

#[test]
fn host_optimizer_writes_the_device_optimizers_bits() {
    let cases: [(&str, &[&str]); 9] = [
        (
            "erm adam",
            &["train.method=\"erm\"", "optim.betas=[0.9, 0.999]"],
        ),
        (
            "ldt resident adamw",
            &[
                "train.method=\"ldt\"",
                "optim.name=\"adamw\"",
                "optim.betas=[0.9, 0.999]",
                "optim.weight_decay=0.05",
            ],
        ),
        (
            "ldt swap sgd",
            &[
                "train.method=\"ldt\"",
                "ldt.placement=\"swap\"",
                "optim.name=\"sgd\"",
                "optim.lr=0.01",
                "optim.momentum=0.9",
                "optim.weight_decay=0.0005",
            ],
        ),
        (
            "deft adam l2",
            &["train.method=\"deft\"", "optim.weight_decay=0.01"],
        ),
        ("ldt-s adam", &["train.method=\"ldt-s\""]),
        (
            "ldt-s adamw bf16",
            &[
                "train.method=\"ldt-s\"",
                "optim.name=\"adamw\"",
                "optim.weight_decay=0.05",
                "train.precision=\"bf16\"",
            ],
        ),
        // bf16 with the optimizer on the host: bf16 working weights on the device, f32
        // masters on the host. Micro-batches and clipping widen gradients on the device.
        (
            "erm adam bf16 accumulate clip",
            &[
                "train.method=\"erm\"",
                "optim.betas=[0.9, 0.999]",
                "train.precision=\"bf16\"",
                "train.accumulate=2",
                "train.clip_grad_norm=0.5",
            ],
        ),
        (
            "ldt resident adam bf16",
            &["train.method=\"ldt\"", "train.precision=\"bf16\""],
        ),
        (
            "ldt swap sgd bf16",
            &[
                "train.method=\"ldt\"",
                "ldt.placement=\"swap\"",
                "optim.name=\"sgd\"",
                "optim.lr=0.01",
                "optim.momentum=0.9",
                "train.precision=\"bf16\"",
            ],
        ),
    ];
    for (what, sets) in cases {
        let mut ov: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        ov.push(bundled_manifest());
        ov.push("data.val_fraction=0.1".into());
        let device = tempfile::tempdir().unwrap();
        run_in(device.path(), &ov);
        let mut host_ov = ov.clone();
        host_ov.push("offload.optimizer=\"host\"".into());
        let host = tempfile::tempdir().unwrap();
        run_in(host.path(), &host_ov);
        same_bytes(what, device.path(), host.path());
        if what.contains("bf16") {
            // The device held bf16 working weights: half the bytes of f32 weights.
            let weights = |d: &Path| {
                let s: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                        .unwrap();
                s["memory"]["live_weights"].as_u64().unwrap()
            };
            assert_eq!(
                2 * weights(host.path()),
                weights(device.path()),
                "{what}: live weight bytes"
            );
        }
        // The host run resumed from step 24 in a fresh directory.
        let resumed = only_checkpoint(host.path(), 24);
        host_ov.push("checkpoint.resume=\"auto\"".into());
        run_in(resumed.path(), &host_ov);
        same_bytes(&format!("{what} resumed"), host.path(), resumed.path());
        eprintln!("{what}: host == device, resumed == whole");
    }
}

/// A checkpoint of the counterpart buffer written with the optimizer state on the
/// device does not resume into a host-optimizer run (the buffer's slots differ): a clear
/// error, not a silently wrong restore.
#[test]
fn a_checkpoint_resumes_only_with_its_buffer_layout() {
    let mut ov = vec![
        "train.method=\"ldt-s\"".to_string(),
        "train.steps=12".into(),
        bundled_manifest(),
    ];
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), &ov);
    ov.push("offload.optimizer=\"host\"".into());
    ov.push("checkpoint.resume=\"auto\"".into());
    ov.push("train.steps=50".into());
    let cfg = ldt::config::Config::from_toml(BASE, "host-optimizer", &ov).expect("config");
    let mut ctx = ldt::train::RunContext::open(cfg, dir.path()).expect("open run");
    let err = format!("{:#}", ldt::train::run_method(&mut ctx).unwrap_err());
    assert!(
        err.contains("offload.optimizer") && err.contains("slots"),
        "unexpected error: {err}"
    );
}

/// Streamed weights (`offload.params = "stream"`, block-wise recompute) write the bits
/// of resident weights with the optimizer on the device: every layer streamed with the
/// host optimizer (ldt-s in f32, the dual branch swapped in bf16), the frozen set
/// streamed with the device optimizer (ldt-s, the sets trading places at every phase
/// switch), 50 steps with stage 1, folds, evaluation and selection; the
/// streamed run resumed from its step-24 checkpoint (its weights read back into host
/// masters) ends bit-identical; and a run starting from a weights file (`model.init`,
/// read into host masters) equals the resident run from the same file.
#[test]
fn streamed_weights_write_the_resident_bits() {
    let stream = [
        "offload.optimizer=\"host\"",
        "offload.params=\"stream\"",
        "train.recompute=\"blocks\"",
    ];
    let frozen = ["offload.params=\"stream\"", "train.recompute=\"blocks\""];
    let cases: [(&str, &[&str], &[&str]); 3] = [
        ("ldt-s adam", &["train.method=\"ldt-s\""], &stream),
        (
            "ldt swap adamw bf16",
            &[
                "train.method=\"ldt\"",
                "ldt.placement=\"swap\"",
                "optim.name=\"adamw\"",
                "optim.weight_decay=0.05",
                "train.precision=\"bf16\"",
            ],
            &stream,
        ),
        (
            "ldt-s adam, frozen set streamed",
            &["train.method=\"ldt-s\""],
            &frozen,
        ),
    ];
    for (what, sets, stream) in cases {
        let mut ov: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        ov.push(bundled_manifest());
        ov.push("data.val_fraction=0.1".into());
        let resident = tempfile::tempdir().unwrap();
        run_in(resident.path(), &ov);
        let mut streamed_ov = ov.clone();
        streamed_ov.extend(stream.iter().map(|s| s.to_string()));
        let streamed = tempfile::tempdir().unwrap();
        run_in(streamed.path(), &streamed_ov);
        same_bytes(what, resident.path(), streamed.path());
        let resumed = only_checkpoint(streamed.path(), 24);
        streamed_ov.push("checkpoint.resume=\"auto\"".into());
        run_in(resumed.path(), &streamed_ov);
        same_bytes(&format!("{what} resumed"), streamed.path(), resumed.path());
        eprintln!("{what}: streamed == resident, resumed == whole");
    }
    // Fine-tuning a weights file: erm from the ldt-s composite above, 10 steps.
    let first = tempfile::tempdir().unwrap();
    let mut ov = vec![bundled_manifest(), "train.method=\"ldt-s\"".to_string()];
    run_in(first.path(), &ov);
    let init = first.path().join("composite.safetensors");
    ov = vec![
        bundled_manifest(),
        "train.method=\"erm\"".into(),
        "train.steps=10".into(),
        format!("model.init={:?}", init.display().to_string()),
    ];
    let resident = tempfile::tempdir().unwrap();
    run_in(resident.path(), &ov);
    ov.extend(stream.iter().map(|s| s.to_string()));
    let streamed = tempfile::tempdir().unwrap();
    run_in(streamed.path(), &ov);
    same_bytes("erm from model.init", resident.path(), streamed.path());
}
