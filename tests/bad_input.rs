//! Bad input through the real `ldt` binary: every case must end with a non-zero exit code,
//! an `error:` message on stderr that names the offending file, key or tensor, and no
//! panic.
//!
//! Exit codes (src/main.rs): **2** when the configuration or the command line is wrong
//! (the config file cannot be read, unknown key, wrong type, out-of-range value — whether
//! in the file or through `--set`); **1** when a valid configuration fails while running
//! (manifest, data files, weights file, run directory).
//!
//! Each run is tiny (`mlp`, one step, one thread) and works in its own temporary
//! directory; `control_run_succeeds` proves that the base configuration itself is fine,
//! so each failure below is caused by the one fault it injects.

#[path = "common/testkit.rs"]
mod testkit;

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use testkit::*;

/// Exit code of configuration / command-line problems.
const USAGE: i32 = 2;
/// Exit code of run failures.
const RUN_FAILED: i32 = 1;

/// A minimal valid configuration over the manifest `manifest`.
fn base_toml(manifest: &Path) -> String {
    format!(
        "seed = 0\nthreads = 1\n\n[model]\narch = \"mlp\"\n\n[data]\nmanifest = {m:?}\n\n\
         [train]\nmethod = \"erm\"\nsteps = 1\nbatch_size = 8\n",
        m = manifest.display().to_string()
    )
}

/// A scratch directory with a config file `run.toml` (text `toml`).
struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `run.toml` and returns its path.
    fn config(&self, toml: &str) -> PathBuf {
        let p = self.path("run.toml");
        std::fs::write(&p, toml).unwrap();
        p
    }

    /// `ldt train <config> --set train.steps=1 <extra...> --out <dir>/out`.
    fn train(&self, config: &Path, extra: &[&str]) -> Output {
        let out = self.path("out");
        self.train_out(config, extra, &out)
    }

    fn train_out(&self, config: &Path, extra: &[&str], out: &Path) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldt"));
        cmd.arg("train")
            .arg(config)
            .args(["--set", "train.steps=1"]);
        cmd.args(extra)
            .arg("--out")
            .arg(out)
            .current_dir(self.dir.path());
        cmd.output().expect("running the ldt binary")
    }
}

/// Asserts: exit code `code`, stderr says `error:`, names every one of `needles`, and
/// holds no panic message.
fn expect_failure(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "exit {:?}\n--- stderr:\n{stderr}\n--- stdout:\n{stdout}",
        out.status.code()
    );
    eprintln!("{ctx}");
    assert!(!stderr.contains("panicked"), "the binary panicked:\n{ctx}");
    assert_eq!(
        out.status.code(),
        Some(code),
        "wrong exit code (want {code}):\n{ctx}"
    );
    assert!(stderr.contains("error:"), "no `error:` line:\n{ctx}");
    for n in needles {
        assert!(stderr.contains(n), "stderr does not name `{n}`:\n{ctx}");
    }
}

/// A valid weights file for the `mlp` with `fc1.weight` of shape `fc1_shape`.
fn write_mlp_weights(path: &Path, fc1_shape: (usize, usize)) {
    let d = Device::Cpu;
    let t = |shape: &[usize]| Tensor::full(0.01f32, shape, &d).unwrap();
    save(
        path,
        vec![
            ("fc1.weight", t(&[fc1_shape.0, fc1_shape.1])),
            ("fc1.bias", t(&[128])),
            ("fc2.weight", t(&[64, 128])),
            ("fc2.bias", t(&[64])),
            ("fc3.weight", t(&[10, 64])),
            ("fc3.bias", t(&[10])),
        ],
    );
}

/// Rewrites `<data>/rot00_train.safetensors` with `images` and `labels` changed by `edit`.
fn edit_rot00_train(
    manifest: &Path,
    edit: impl FnOnce(Tensor, Tensor) -> (Tensor, Tensor),
) -> PathBuf {
    let f = manifest.parent().unwrap().join("rot00_train.safetensors");
    let mut m = load(&f);
    let (images, labels) = edit(m.remove("images").unwrap(), m.remove("labels").unwrap());
    std::fs::remove_file(&f).unwrap();
    save(&f, vec![("images", images), ("labels", labels)]);
    f
}

#[test]
fn control_run_succeeds() {
    let c = Case::new();
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    let out = c.train(&cfg, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the base configuration must run:\n{stderr}"
    );
    assert!(
        c.path("out/model.safetensors").exists(),
        "no model.safetensors written"
    );
}

#[test]
fn missing_config_file() {
    let c = Case::new();
    let missing = c.path("no-such-config.toml");
    let out = c.train(&missing, &[]);
    expect_failure(&out, USAGE, &["no-such-config.toml", "config"]);
}

#[test]
fn missing_manifest() {
    let c = Case::new();
    let cfg = c.config(&base_toml(&c.path("nowhere/manifest.json")));
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["nowhere/manifest.json", "data.manifest"],
    );
}

#[test]
fn missing_weights_file() {
    let c = Case::new();
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    let w = c.path("absent-weights.safetensors");
    let set = format!("model.init={:?}", w.display().to_string());
    let out = c.train(&cfg, &["--set", &set]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["absent-weights.safetensors", "model.init", "does not exist"],
    );
}

#[test]
fn truncated_data_file() {
    let c = Case::new();
    let manifest = copy_bundled_data(c.dir.path());
    let f = manifest.parent().unwrap().join("rot30_train.safetensors");
    let full = std::fs::metadata(&f).unwrap().len();
    let cfg = c.config(&base_toml(&manifest));
    // Half the file (header intact, data cut) and 5 bytes (not even a header length).
    for len in [full / 2, 5] {
        truncate(&f, len);
        let out = c.train(&cfg, &[]);
        expect_failure(
            &out,
            RUN_FAILED,
            &["rot30_train.safetensors", "rot30", "truncated"],
        );
    }
}

#[test]
fn truncated_weights_file() {
    let c = Case::new();
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    let w = c.path("weights.safetensors");
    write_mlp_weights(&w, (128, 784));
    // The intact file is accepted (so the failure below is the truncation's).
    let set = format!("model.init={:?}", w.display().to_string());
    let ok = c.train_out(&cfg, &["--set", &set], &c.path("out-ok"));
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let full = std::fs::metadata(&w).unwrap().len();
    truncate(&w, full / 2);
    let out = c.train(&cfg, &["--set", &set]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["weights.safetensors", "model.init", "truncated"],
    );
}

#[test]
fn weights_tensor_with_the_wrong_shape() {
    let c = Case::new();
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    let w = c.path("wide.safetensors");
    write_mlp_weights(&w, (128, 700));
    let set = format!("model.init={:?}", w.display().to_string());
    let out = c.train(&cfg, &["--set", &set]);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "wide.safetensors",
            "model.init",
            "fc1.weight",
            "[128, 700]",
            "[128, 784]",
        ],
    );
}

#[test]
fn label_out_of_range() {
    let c = Case::new();
    let manifest = copy_bundled_data(c.dir.path());
    edit_rot00_train(&manifest, |images, labels| {
        let mut l = labels.to_vec1::<i64>().unwrap();
        l[5] = 10; // num_classes = 10: valid labels are 0..=9
        let n = l.len();
        (images, Tensor::from_vec(l, n, &Device::Cpu).unwrap())
    });
    let cfg = c.config(&base_toml(&manifest));
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["rot00_train.safetensors", "label 10", "index 5"],
    );
}

#[test]
fn non_finite_f32_images() {
    for bad in [f32::NAN, f32::INFINITY] {
        let c = Case::new();
        let manifest = copy_bundled_data(c.dir.path());
        edit_rot00_train(&manifest, |images, labels| {
            let shape = images.dims().to_vec();
            let mut x = f32s(&(images.to_dtype(DType::F32).unwrap() / 255.0).unwrap());
            x[3 * 784 + 400] = bad; // example 3
            (Tensor::from_vec(x, shape, &Device::Cpu).unwrap(), labels)
        });
        let cfg = c.config(&base_toml(&manifest));
        let out = c.train(&cfg, &[]);
        expect_failure(
            &out,
            RUN_FAILED,
            &[
                "rot00_train.safetensors",
                "images",
                "non-finite",
                "example 3",
            ],
        );
    }
}

#[test]
fn unknown_key_in_the_file() {
    let c = Case::new();
    let toml = base_toml(&bundled_data().join("manifest.json"))
        .replace("steps = 1", "steps = 1\nstepz = 3");
    let cfg = c.config(&toml);
    let out = c.train(&cfg, &[]);
    expect_failure(&out, USAGE, &["stepz", "run.toml"]);
}

#[test]
fn unknown_key_via_set() {
    let c = Case::new();
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    let out = c.train(&cfg, &["--set", "optim.learning_rate=0.1"]);
    expect_failure(&out, USAGE, &["learning_rate"]);
    // An unknown section is rejected as well.
    let out = c.train(&cfg, &["--set", "trainer.steps=3"]);
    expect_failure(&out, USAGE, &["trainer"]);
}

#[test]
fn wrong_value_type() {
    let c = Case::new();
    let toml =
        base_toml(&bundled_data().join("manifest.json")).replace("steps = 1", "steps = \"many\"");
    let cfg = c.config(&toml);
    // In the file (no --set train.steps, which would replace the bad value).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldt"));
    let out = cmd
        .arg("train")
        .arg(&cfg)
        .arg("--out")
        .arg(c.path("out"))
        .output()
        .unwrap();
    expect_failure(&out, USAGE, &["steps", "many"]);
    // Through --set (a bare word is taken as a string).
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    let out = c.train(&cfg, &["--set", "train.steps=many"]);
    expect_failure(&out, USAGE, &["steps", "many"]);
}

#[test]
fn out_of_range_value() {
    let c = Case::new();
    let toml = format!(
        "{}\n[stage1]\nunstable_ratio = 1.5\n",
        base_toml(&bundled_data().join("manifest.json"))
    );
    let cfg = c.config(&toml);
    let out = c.train(&cfg, &[]);
    expect_failure(&out, USAGE, &["stage1.unstable_ratio", "[0, 1]"]);
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    let out = c.train(&cfg, &["--set", "stage1.unstable_ratio=1.5"]);
    expect_failure(&out, USAGE, &["stage1.unstable_ratio", "[0, 1]"]);
}

#[test]
fn unwritable_output_directory() {
    let c = Case::new();
    let cfg = c.config(&base_toml(&bundled_data().join("manifest.json")));
    // A directory below a regular file cannot be created, whoever runs the test (root
    // included, for whom permission bits would not stop anything).
    let file = c.path("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let out_dir = file.join("run");
    let out = c.train_out(&cfg, &[], &out_dir);
    expect_failure(
        &out,
        RUN_FAILED,
        &["plain-file/run", "run directory", "--out"],
    );
}
