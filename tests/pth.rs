//! PyTorch checkpoints (`model.init = "*.pth"`) read without Python: files written by
//! torch 2.5.1 itself (`scripts/make_pth_fixtures.py`, from `tests/pth/cnn_bn.safetensors`,
//! a small cnn_bn `ldt` exported) load to the bits of the safetensors they came from.
//!
//! - plain.pth (`state_dict()`, protocol 2), wrapped.pth (a training checkpoint holding a
//!   DataParallel model's state_dict under `state_dict`: the `module.` prefix stripped),
//!   views.pth (protocol 4, non-contiguous and offset views, shared storages, float64
//!   weights, no `num_batches_tracked`: read as 0): every parameter and buffer equal
//!   bit for bit.
//! - evil.pth (a pickle that calls `os.system` in PyTorch without `weights_only`): refused
//!   naming the global, and nothing ran; the legacy format and TorchScript archives:
//!   refused saying what they are and what to do; a truncated file: an error, no panic.
//! - A head for another class count suggests `model.reset_head`; another architecture's
//!   keys name it; a run starts from wrapped.pth end to end; `ldt eval` reads one and
//!   prints JSON alone with `--json`.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use ldt::config::ModelConfig;
use ldt::model::{self, io, NetState, Network};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    root().join("tests/pth").join(name)
}

fn net(arch: &str, classes: usize) -> Box<dyn Network> {
    let cfg = ModelConfig {
        arch: arch.into(),
        channels: vec![4, 8],
        fc_hidden: 16,
        ..Default::default()
    };
    model::build(&cfg, [1, 28, 28], classes).unwrap()
}

fn bits(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn weights(state: &NetState) -> Vec<Tensor> {
    state.weights().unwrap()
}

fn error(name: &str, net: &dyn Network) -> String {
    match io::load_state(net, &fixture(name), &Device::Cpu) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn torch_checkpoints_load_to_the_bits_of_their_source() {
    let n = net("cnn_bn", 10);
    let want = io::load_state(n.as_ref(), &fixture("cnn_bn.safetensors"), &Device::Cpu).unwrap();
    for file in ["plain.pth", "wrapped.pth", "views.pth"] {
        let got = io::load_state(n.as_ref(), &fixture(file), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        for ((spec, a), b) in n.params().iter().zip(weights(&want)).zip(weights(&got)) {
            assert_eq!(bits(&a), bits(&b), "{file}: `{}`", spec.name);
        }
        for ((spec, a), b) in n.buffers().iter().zip(&want.buffers).zip(&got.buffers) {
            if file == "views.pth" && spec.name.ends_with("num_batches_tracked") {
                // Not in the file: read as 0, as PyTorch does.
                assert_eq!(b.to_vec0::<i64>().unwrap(), 0, "{file}: `{}`", spec.name);
                assert!(
                    a.to_vec0::<i64>().unwrap() > 0,
                    "the source counted batches"
                );
                continue;
            }
            assert_eq!(bits(a), bits(b), "{file}: `{}`", spec.name);
        }
    }
    // Where the state_dict was found is said.
    let (_, notes) = io::read_weights(&fixture("wrapped.pth"), &Device::Cpu).unwrap();
    assert!(
        notes.iter().any(|n| n.contains("`state_dict`")),
        "{notes:?}"
    );
    // The float64 weights of views.pth are read as float64 (converted on loading).
    let (map, _) = io::read_weights(&fixture("views.pth"), &Device::Cpu).unwrap();
    let fc = map
        .iter()
        .find(|(k, _)| k.starts_with("fc") && k.ends_with(".weight"))
        .unwrap();
    assert_eq!(fc.1.dtype(), DType::F64, "`{}`", fc.0);
}

#[test]
fn what_is_not_a_tensor_state_dict_is_refused() {
    let n = net("cnn_bn", 10);
    let marker = std::path::Path::new("/tmp/ldt-pth-evil-ran");
    let _ = std::fs::remove_file(marker);
    let e = error("evil.pth", n.as_ref());
    assert!(
        e.contains("posix.system") || e.contains("os.system"),
        "names the global: {e}"
    );
    assert!(e.contains("evil.pth"), "names the file: {e}");
    assert!(!marker.exists(), "something from the file ran");
    let e = error("legacy.pth", n.as_ref());
    assert!(
        e.contains("legacy format") && e.contains("torch.save"),
        "{e}"
    );
    let e = error("script.pt", n.as_ref());
    assert!(e.contains("TorchScript") && e.contains("state_dict"), "{e}");
    // Every truncation of a real checkpoint is an error, never a panic.
    let bytes = std::fs::read(fixture("plain.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.pth");
    for end in (0..bytes.len()).step_by(997).chain([bytes.len() - 1]) {
        std::fs::write(&cut, &bytes[..end]).unwrap();
        assert!(
            io::load_state(n.as_ref(), &cut, &Device::Cpu).is_err(),
            "{end} of {} bytes loaded",
            bytes.len()
        );
    }
}

#[test]
fn a_misfit_says_what_it_looks_like() {
    // A head for 10 classes in a 5-class model.
    let five = net("cnn_bn", 5);
    let e = error("plain.pth", five.as_ref());
    assert!(e.contains("model.reset_head = true"), "{e}");
    let mut rng = ldt::rng::Rng::new(0, 1);
    io::load_state_reset_head(five.as_ref(), &fixture("plain.pth"), &Device::Cpu, &mut rng)
        .expect("a new head for 5 classes");
    // cnn_bn's keys in a plain cnn.
    let cnn = net("cnn", 10);
    let e = error("plain.pth", cnn.as_ref());
    assert!(e.contains("look like a `cnn_bn`"), "{e}");
}

#[test]
fn a_run_starts_from_a_torch_checkpoint() {
    let toml = r#"
seed = 1
threads = 1
[model]
arch = "cnn_bn"
channels = [4, 8]
fc_hidden = 16
[train]
method = "erm"
steps = 3
batch_size = 8
"#;
    let init = format!(
        "model.init={:?}",
        fixture("wrapped.pth").display().to_string()
    );
    let (dir, _) = run(toml, &[&bundled_manifest(), &init]);
    assert!(dir.path().join("model.safetensors").exists());
}

/// `ldt eval --weights X.pth --json` prints the report as JSON alone (one line per run
/// without `--json`).
#[test]
fn eval_reads_a_torch_checkpoint_and_prints_json() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ldt"))
        .current_dir(root())
        .args(["eval", "configs/quickstart.toml", "--weights"])
        .arg(fixture("plain.pth"))
        .args([
            "--set",
            "model.arch=\"cnn_bn\"",
            "--set",
            "model.channels=[4, 8]",
            "--set",
            "model.fc_hidden=16",
            "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("stdout is JSON alone");
    assert!(v["target_acc"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["domains"].as_array().unwrap().len(), 6, "{v}");
}

/// A safetensors file is told from a PyTorch one by more than its first byte: one whose
/// header length starts with 0x80 (the pickle protocol opcode) is read as safetensors.
#[test]
fn a_safetensors_header_of_any_length_is_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
    let mut found = false;
    for n in 1..300 {
        let name = "x".repeat(n);
        let map = std::collections::HashMap::from([(name.clone(), t.clone())]);
        candle_core::safetensors::save(&map, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        if bytes[0] != 0x80 {
            continue;
        }
        found = true;
        let (got, notes) = io::read_weights(&path, &Device::Cpu).expect("read as safetensors");
        assert!(notes.is_empty());
        assert_eq!(got[&name].to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        break;
    }
    assert!(found, "no name length gave a header starting with 0x80");
}
