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
//! so each failure below is caused by the one fault it injects. Configuration errors must
//! also stop before the run directory exists; run failures must leave no model behind.
//! A run that does not end within two minutes fails its test (a bad value that hangs
//! instead of failing is a bug too).
//!
//! The catalogue, by area: configuration (file and `--set`), manifest and data files,
//! weights (`model.init`), batch schedule (`data.schedule`), counterpart buffer
//! (`offload.*`), partition report (`stage1.partition`), command line. The parsers are
//! also fuzzed: `tests/fuzz_parsers.rs` (seeded, stable) and `fuzz/` (cargo-fuzz).

#[path = "common/testkit.rs"]
mod testkit;

use candle_core::{DType, Device, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
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
        output_within(&mut cmd)
    }
}

/// Longest a single bad-input run may take: every case fails within a second or two, so a
/// run that is still going has hung (a bad value that stalls instead of failing).
const HANG: Duration = Duration::from_secs(120);

/// Runs `cmd` to completion like `Command::output`, but kills it and fails the test if
/// it runs longer than [`HANG`].
fn output_within(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the ldt binary");
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                r.read_to_end(&mut v).ok();
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for ldt") {
            break s;
        }
        if start.elapsed() > HANG {
            child.kill().ok();
            child.wait().ok();
            let stderr = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!(
                "ldt {:?} ran longer than {HANG:?} (hung?):\n{stderr}",
                cmd.get_args().collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
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

/// The tensors of a valid `mlp` weights file, with `fc1.weight` of shape `fc1_shape`.
fn mlp_tensors(fc1_shape: (usize, usize)) -> Vec<(&'static str, Tensor)> {
    let d = Device::Cpu;
    let t = |shape: &[usize]| Tensor::full(0.01f32, shape, &d).unwrap();
    vec![
        ("fc1.weight", t(&[fc1_shape.0, fc1_shape.1])),
        ("fc1.bias", t(&[128])),
        ("fc2.weight", t(&[64, 128])),
        ("fc2.bias", t(&[64])),
        ("fc3.weight", t(&[10, 64])),
        ("fc3.bias", t(&[10])),
    ]
}

/// A valid weights file for the `mlp` with `fc1.weight` of shape `fc1_shape`.
fn write_mlp_weights(path: &Path, fc1_shape: (usize, usize)) {
    save(path, mlp_tensors(fc1_shape));
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

// ---------------------------------------------------------------------------------------
// The catalogue, continued: one fault per test. Helpers first.
// ---------------------------------------------------------------------------------------

impl Case {
    /// `ldt <args...>` in the case directory (no implicit arguments).
    fn ldt(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldt"));
        cmd.args(args).current_dir(self.dir.path());
        output_within(&mut cmd)
    }

    /// The base configuration over the bundled data, written as `run.toml`.
    fn bundled_config(&self) -> PathBuf {
        self.config(&base_toml(&bundled_data().join("manifest.json")))
    }

    /// A copy of the bundled data in this case, with its configuration.
    fn copied_data(&self) -> (PathBuf, PathBuf) {
        let manifest = copy_bundled_data(self.dir.path());
        let cfg = self.config(&base_toml(&manifest));
        (manifest, cfg)
    }

    /// Asserts that no run output (weights, summary) was written.
    fn assert_no_model(&self) {
        for f in ["out/model.safetensors", "out/summary.json"] {
            assert!(!self.path(f).exists(), "{f} written by a failed run");
        }
    }
}

/// `--set` with a TOML string value for a path.
fn set_path(key: &str, p: &Path) -> String {
    format!("{key}={:?}", p.display().to_string())
}

/// Edits the JSON of a manifest in place.
fn edit_manifest(manifest: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(manifest, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// One tensor of a raw safetensors file: name, dtype, shape, little-endian bytes.
type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Every tensor of a safetensors file, raw.
fn read_raw(path: &Path) -> Vec<RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect()
}

/// Writes raw tensors (any safetensors dtype, e.g. i32, which candle cannot write).
fn write_raw(path: &Path, tensors: &[RawTensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A schedule file with tensor `train_batches` = `rows` (i64 [S, B]).
fn write_schedule(path: &Path, rows: &[Vec<i64>]) {
    let b = rows[0].len();
    let flat: Vec<i64> = rows.concat();
    let t = Tensor::from_vec(flat, (rows.len(), b), &Device::Cpu).unwrap();
    save(path, vec![("train_batches", t)]);
}

// --- configuration (exit 2, before any run directory exists) ----------------------------

/// Asserts a usage failure that left no run directory behind.
fn expect_usage(c: &Case, out: &Output, needles: &[&str]) {
    expect_failure(out, USAGE, needles);
    assert!(
        !c.path("out").exists(),
        "a configuration error must stop before the run directory is created"
    );
}

/// Configuration errors given through `--set` on the bundled configuration: each case's
/// overrides and what its message must name. Every one exits 2 before the run directory
/// exists.
const SET_ERRORS: &[(&[&str], &[&str])] = &[
    (
        &["train.steps=-5"],
        &["run.toml", "--set `train.steps=-5`", "-5"],
    ),
    (
        &["train.accumulate=0"],
        &["train.accumulate", "train.batch_size (8)", "micro-batches"],
    ),
    (
        &["train.accumulate=9"],
        &["train.accumulate", "train.batch_size (8)", "micro-batches"],
    ),
    (
        &["train.precision=\"fp16\""],
        &["train.precision", "fp16", "bf16"],
    ),
    // The upper side (1.5) is `out_of_range_value`.
    (
        &["stage1.unstable_ratio=-0.25"],
        &["stage1.unstable_ratio", "[0, 1]"],
    ),
    (&["optim.betas=[0.9, 1.0]"], &["optim.betas[1]", "[0, 1)"]),
    (&["optim.betas=[1.5, 0.99]"], &["optim.betas[0]", "[0, 1)"]),
    (
        &["stage1.warmup_betas=[0.9, 1.0]"],
        &["stage1.warmup_betas[1]", "[0, 1)"],
    ),
    (
        &["model.arch=resnet51"],
        &["model.arch", "resnet51", "mlp, cnn, cnn_bn, resnet18"],
    ),
    (&["train.steps"], &["--set `train.steps`", "key=value"]),
    (
        &["seed.x=1"],
        &["seed.x=1", "`seed` is a value, not a section"],
    ),
    // An empty list used to train a linear model without a word.
    (
        &["model.hidden=[]"],
        &["model.hidden", "at least one hidden width"],
    ),
    (
        &["model.hidden=[128, 0]"],
        &["model.hidden", "[128, 0]", "positive"],
    ),
    (
        &["model.arch=cnn", "model.channels=[16, 0]"],
        &["model.channels", "[16, 0]"],
    ),
    (
        &["model.arch=cnn_bn", "model.fc_hidden=0"],
        &["model.fc_hidden"],
    ),
    (
        &["snapshots.at_steps=[1, 5]"],
        &["snapshots.at_steps", "step 5", "1..=1", "train.steps"],
    ),
    (
        &["snapshots.at_steps=[0]"],
        &["snapshots.at_steps", "step 0"],
    ),
    (
        &[
            "train.method=ldt-s",
            "ldt_s.repeat_batch=true",
            "ldt_s.p_steps=2",
            "ldt_s.a_steps=3",
        ],
        &[
            "ldt_s.repeat_batch",
            "ldt_s.p_steps` (2)",
            "ldt_s.a_steps` (3)",
        ],
    ),
    (
        &["train.method=ldt", "stage1.stat_batches=1"],
        &["stage1.stat_batches", "at least 2"],
    ),
    // Infinite values passed a plain `> 0` check and trained NaN weights.
    (&["optim.eps=inf"], &["optim.eps"]),
    (&["optim.weight_decay=inf"], &["optim.weight_decay"]),
    (&["optim.lr=nan"], &["optim.lr"]),
    (&["stage1.warmup_lr=inf"], &["stage1.warmup_lr"]),
    (
        &["optim.groups=[{prefix = \"fc3.\", lr = inf}]"],
        &["optim.groups[0].lr (prefix `fc3.`)"],
    ),
    // An extra zero or three used to stall the machine (100 000 threads) or be killed
    // for memory (a prefetch queue of 10^11 slots) without a word.
    (&["threads=100000"], &["`threads`", "1024"]),
    (&["offload.threads=100000"], &["`offload.threads`", "1024"]),
    (
        &["data.prefetch=100000000000"],
        &["`data.prefetch`", "1024"],
    ),
    // Streamed weights are fetched segment by segment, which needs the recompute walk.
    (
        &["offload.params=\"stream\""],
        &["`offload.params`", "train.recompute = \"blocks\""],
    ),
];

#[test]
fn configuration_errors_through_set() {
    let c = Case::new();
    let cfg = c.bundled_config();
    for (sets, needles) in SET_ERRORS {
        let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
        eprintln!("case: --set {}", sets.join(" --set "));
        let out = c.train(&cfg, &args);
        expect_usage(&c, &out, needles);
    }
}

#[test]
fn zero_batch_size() {
    let c = Case::new();
    let cfg = c.config(
        &base_toml(&bundled_data().join("manifest.json"))
            .replace("batch_size = 8", "batch_size = 0"),
    );
    let out = c.train(&cfg, &[]);
    expect_usage(&c, &out, &["train.batch_size", "at least 1", "run.toml"]);
}

#[test]
fn unknown_method() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let out = c.train(&cfg, &["--set", "train.method=ldt2"]);
    expect_usage(&c, &out, &["train.method=ldt2", "ldt2", "ldt-s"]);
    // The same in the file: the message points at the line.
    let cfg = c.config(
        &base_toml(&bundled_data().join("manifest.json"))
            .replace("method = \"erm\"", "method = \"sam\""),
    );
    let out = c.train(&cfg, &[]);
    expect_usage(&c, &out, &["run.toml", "method = \"sam\"", "erm"]);
}

#[test]
fn unknown_section_in_the_file() {
    let c = Case::new();
    let toml = format!(
        "{}\n[optimizer]\nlr = 0.1\n",
        base_toml(&bundled_data().join("manifest.json"))
    );
    let cfg = c.config(&toml);
    let out = c.train(&cfg, &[]);
    expect_usage(&c, &out, &["run.toml", "optimizer", "optim"]);
}

#[test]
fn malformed_toml_syntax() {
    let c = Case::new();
    let toml =
        base_toml(&bundled_data().join("manifest.json")).replace("[train]", "[train\nwhat = ");
    let cfg = c.config(&toml);
    let out = c.train(&cfg, &[]);
    expect_usage(&c, &out, &["run.toml", "line", "[train"]);
}

#[test]
fn batch_larger_than_the_data() {
    // A huge batch used to grow without bound in the loader thread (no message, the run
    // hung until killed); a batch above the pool would repeat examples.
    let c = Case::new();
    let cfg = c.bundled_config();
    let out = c.train(&cfg, &["--set", "train.batch_size=1000000000000"]);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "batch of 1000000000000 examples",
            "larger than the 2670",
            "train.batch_size",
        ],
    );
    c.assert_no_model();
    let out = c.train(
        &cfg,
        &[
            "--set",
            "train.method=ldt",
            "--set",
            "stage1.stat_batches=2",
            "--set",
            "stage1.stat_batch_size=100000",
        ],
    );
    expect_failure(
        &out,
        RUN_FAILED,
        &["batch of 100000 examples", "stage1.stat_batch_size"],
    );
}

// --- manifest and data files (exit 1) ---------------------------------------------------

#[test]
fn malformed_manifest_json() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["data/manifest.json", "not a valid", "line"],
    );
    c.assert_no_model();
}

#[test]
fn wrong_manifest_format() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    edit_manifest(&manifest, |v| v["format"] = "dg-benchmark/v2".into());
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "data/manifest.json",
            "`format`",
            "dg-benchmark/v2",
            "dg-benchmark/v1",
        ],
    );
}

#[test]
fn manifest_without_a_source_domain() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    edit_manifest(&manifest, |v| {
        for d in v["domains"].as_array_mut().unwrap() {
            d["role"] = "target".into();
        }
    });
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["data/manifest.json", "role `source`", "at least one"],
    );
}

#[test]
fn duplicate_domain_names() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    edit_manifest(&manifest, |v| v["domains"][3]["name"] = "rot15".into());
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["data/manifest.json", "`rot15` appears twice", "unique"],
    );
}

#[test]
fn empty_domain_split() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    edit_manifest(&manifest, |v| {
        v["domains"][4]["splits"]["test"]["n"] = 0.into()
    });
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["data/manifest.json", "`rot60`", "empty test split", "n = 0"],
    );
}

#[test]
fn manifest_n_differs_from_the_file() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    let mut n = 0;
    edit_manifest(&manifest, |v| {
        let e = &mut v["domains"][1]["splits"]["train"]["n"];
        n = e.as_u64().unwrap();
        *e = (n + 1).into();
    });
    let out = c.train(&cfg, &[]);
    let holds = format!("holds {n} examples");
    let says = format!("`n` = {}", n + 1);
    expect_failure(
        &out,
        RUN_FAILED,
        &["rot15_train.safetensors", "rot15", &holds, &says],
    );
}

#[test]
fn missing_split_file() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    std::fs::remove_file(manifest.parent().unwrap().join("rot75_test.safetensors")).unwrap();
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["rot75_test.safetensors", "`rot75`", "data/manifest.json"],
    );
}

#[test]
fn image_shape_does_not_match_the_manifest() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    // Same bytes, other shape: 28x28 stored as 14x56.
    edit_rot00_train(&manifest, |images, labels| {
        let n = images.dims()[0];
        (images.reshape((n, 1, 14, 56)).unwrap(), labels)
    });
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["rot00_train.safetensors", "images", "14, 56", "image_shape"],
    );
}

#[test]
fn wrong_image_dtype() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    let f = manifest.parent().unwrap().join("rot00_train.safetensors");
    let raw: Vec<RawTensor> = read_raw(&f)
        .into_iter()
        .map(|(n, d, s, b)| {
            if n == "images" {
                let wide = b.iter().flat_map(|&p| (p as i32).to_le_bytes()).collect();
                (n, safetensors::Dtype::I32, s, wide)
            } else {
                (n, d, s, b)
            }
        })
        .collect();
    write_raw(&f, &raw);
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["rot00_train.safetensors", "images", "I32", "f32", "u8"],
    );
}

#[test]
fn labels_not_i64() {
    let c = Case::new();
    let (manifest, cfg) = c.copied_data();
    let f = manifest.parent().unwrap().join("rot00_train.safetensors");
    let raw: Vec<RawTensor> = read_raw(&f)
        .into_iter()
        .map(|(n, d, s, b)| {
            if n == "labels" {
                let narrow = b
                    .chunks_exact(8)
                    .flat_map(|c| (i64::from_le_bytes(c.try_into().unwrap()) as i32).to_le_bytes())
                    .collect();
                (n, safetensors::Dtype::I32, s, narrow)
            } else {
                (n, d, s, b)
            }
        })
        .collect();
    write_raw(&f, &raw);
    let out = c.train(&cfg, &[]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["rot00_train.safetensors", "labels", "I32", "expected i64"],
    );
}

// --- weights (`model.init`, exit 1) -----------------------------------------------------

#[test]
fn nan_in_a_weight() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let w = c.path("nan.safetensors");
    let mut t = mlp_tensors((128, 784));
    let mut v = f32s(&t[2].1);
    v[77] = f32::NAN;
    t[2].1 = Tensor::from_vec(v, (64, 128), &Device::Cpu).unwrap();
    save(&w, t);
    let out = c.train(&cfg, &["--set", &set_path("model.init", &w)]);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "nan.safetensors",
            "model.init",
            "fc2.weight",
            "non-finite",
            "index 77",
        ],
    );
    c.assert_no_model();
}

#[test]
fn nan_in_a_batchnorm_buffer() {
    // Buffers were not checked: a NaN running variance gave NaN evaluations silently.
    let c = Case::new();
    let cfg = c.bundled_config();
    let cnn_bn = [
        "--set",
        "model.arch=cnn_bn",
        "--set",
        "model.channels=[4]",
        "--set",
        "model.fc_hidden=8",
    ];
    let ok = c.train_out(&cfg, &cnn_bn, &c.path("out-ok"));
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let mut t = load(&c.path("out-ok/model.safetensors"));
    let key = t
        .keys()
        .find(|k| k.ends_with("running_var"))
        .expect("cnn_bn has a running_var buffer")
        .clone();
    let rv = &t[&key];
    let mut v = f32s(rv);
    v[1] = f32::NAN;
    let shape = rv.dims().to_vec();
    t.insert(
        key.clone(),
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
    );
    let w = c.path("bn-nan.safetensors");
    save(&w, t.iter().map(|(k, v)| (k.as_str(), v.clone())).collect());
    let mut args = cnn_bn.to_vec();
    let set = set_path("model.init", &w);
    args.extend(["--set", &set]);
    let out = c.train(&cfg, &args);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "bn-nan.safetensors",
            "model.init",
            &key,
            "non-finite",
            "index 1",
        ],
    );
}

#[test]
fn unexpected_extra_weight() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let w = c.path("extra.safetensors");
    let mut t = mlp_tensors((128, 784));
    t.push((
        "fc4.weight",
        Tensor::zeros((10, 10), DType::F32, &Device::Cpu).unwrap(),
    ));
    save(&w, t);
    let out = c.train(&cfg, &["--set", &set_path("model.init", &w)]);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "extra.safetensors",
            "model.init",
            "does not fit model `mlp`",
            "unexpected `fc4.weight`",
        ],
    );
}

#[test]
fn missing_weights_are_listed_together() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let w = c.path("partial.safetensors");
    let t: Vec<_> = mlp_tensors((128, 784))
        .into_iter()
        .filter(|(n, _)| *n != "fc1.bias" && *n != "fc3.weight")
        .chain([(
            "head.weight",
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        )])
        .collect();
    save(&w, t);
    let out = c.train(&cfg, &["--set", &set_path("model.init", &w)]);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "partial.safetensors",
            "model.init",
            "missing `fc1.bias` [128]",
            "missing `fc3.weight` [10, 64]",
            "unexpected `head.weight`",
        ],
    );
}

// --- batch schedule (`data.schedule`, exit 1) -------------------------------------------

#[test]
fn missing_schedule_file() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let s = c.path("no-schedule.safetensors");
    let out = c.train(&cfg, &["--set", &set_path("data.schedule", &s)]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["no-schedule.safetensors", "data.schedule"],
    );
    c.assert_no_model();
}

#[test]
fn schedule_index_out_of_range() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let s = c.path("sched.safetensors");
    write_schedule(&s, &[vec![0, 1, 2, 3, 4, 5, 6, 999_999]]);
    let out = c.train(&cfg, &["--set", &set_path("data.schedule", &s)]);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "data.schedule",
            "example index 999999",
            "batch 0",
            "source training",
        ],
    );
    c.assert_no_model();
    // A negative index is refused when the file is read.
    write_schedule(&s, &[vec![0, 1, 2, 3, 4, 5, 6, -1]]);
    let out = c.train(&cfg, &["--set", &set_path("data.schedule", &s)]);
    expect_failure(
        &out,
        RUN_FAILED,
        &["sched.safetensors", "train_batches", "negative index -1"],
    );
}

#[test]
fn schedule_shorter_than_the_run() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let s = c.path("short.safetensors");
    write_schedule(&s, &[(0..8).collect(), (8..16).collect()]);
    let out = c.train(
        &cfg,
        &[
            "--set",
            &set_path("data.schedule", &s),
            "--set",
            "train.steps=3",
        ],
    );
    expect_failure(
        &out,
        RUN_FAILED,
        &["holds 2 batches", "needs 3", "data.schedule"],
    );
    c.assert_no_model();
}

// --- counterpart buffer (`offload.*`, exit 1) -------------------------------------------

/// `ldt-s` with a small statistics pass.
const LDT_S: [&str; 4] = [
    "--set",
    "train.method=ldt-s",
    "--set",
    "stage1.stat_batches=2",
];

#[test]
fn host_budget_too_small_without_a_spill_file() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let mut args = LDT_S.to_vec();
    args.extend(["--set", "offload.host_bytes=1000"]);
    let out = c.train(&cfg, &args);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "counterpart buffer needs",
            "bytes",
            "host budget is 1000 bytes",
            "offload.host_bytes",
            "offload.path",
        ],
    );
    // The needed size is a number of bytes, stated exactly.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let needed: u64 = stderr
        .split("needs ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count after `needs`: {stderr}"));
    assert!(needed > 1000, "{stderr}");
    c.assert_no_model();
}

#[test]
fn spill_file_already_exists() {
    let c = Case::new();
    let cfg = c.bundled_config();
    let spill = c.path("counterparts.bin");
    std::fs::write(&spill, b"somebody else's data").unwrap();
    let set = set_path("offload.path", &spill);
    let mut args = LDT_S.to_vec();
    args.extend(["--set", "offload.host_bytes=1000", "--set", &set]);
    let out = c.train(&cfg, &args);
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "counterparts.bin",
            "File exists",
            "never overwritten",
            "offload.path",
        ],
    );
    assert_eq!(
        std::fs::read(&spill).unwrap(),
        b"somebody else's data",
        "the existing file was modified"
    );
    c.assert_no_model();
}

// --- partition report (`stage1.partition`, exit 1) --------------------------------------

#[test]
fn partition_report_of_another_model() {
    let c = Case::new();
    let cfg = c.bundled_config();
    // A real report, made by `ldt stats` for a small cnn.
    let stats = c.ldt(&[
        "stats",
        "run.toml",
        "--set",
        "model.arch=cnn",
        "--set",
        "model.channels=[4]",
        "--set",
        "model.fc_hidden=8",
        "--set",
        "stage1.stat_batches=2",
        "--out",
        "cnn-stats",
    ]);
    assert_eq!(
        stats.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let report = c.path("cnn-stats/partition.json");
    let out = c.train(
        &cfg,
        &[
            "--set",
            "train.method=ldt",
            "--set",
            &set_path("stage1.partition", &report),
        ],
    );
    expect_failure(
        &out,
        RUN_FAILED,
        &[
            "cnn-stats/partition.json",
            "model `mlp`",
            "conv1.weight",
            "fc1.weight",
            "ldt stats",
        ],
    );
    c.assert_no_model();
}

// --- command line (clap, exit 2) --------------------------------------------------------

#[test]
fn unknown_subcommand() {
    let c = Case::new();
    c.bundled_config();
    let out = c.ldt(&["trian", "run.toml"]);
    expect_failure(&out, USAGE, &["unrecognized subcommand", "trian", "train"]);
}

#[test]
fn missing_required_argument() {
    let c = Case::new();
    c.bundled_config();
    let out = c.ldt(&["train"]);
    expect_failure(&out, USAGE, &["required", "<CONFIG>"]);
    let out = c.ldt(&["eval", "run.toml"]);
    expect_failure(&out, USAGE, &["required", "--weights"]);
}

#[test]
fn compare_with_an_unknown_method_or_a_bad_seed() {
    let c = Case::new();
    c.bundled_config();
    let out = c.ldt(&["compare", "run.toml", "--methods", "erm,foo"]);
    expect_failure(&out, USAGE, &["--methods", "foo", "ldt-s"]);
    let out = c.ldt(&["compare", "run.toml", "--seeds", "0,x"]);
    expect_failure(&out, USAGE, &["--seeds", "'x'"]);
}
