//! IDX data (MNIST's format) end to end through the real `ldt` binary, on tiny files the
//! test writes (gzip and plain): training reads them, `ldt compare` reports by step and
//! against erm, and bad files or manifest entries fail with a message naming the file and
//! the problem (exit 1) instead of a panic. One test reads the Fashion-MNIST files of
//! Debian's `dataset-fashion-mnist` through the shipped manifest; it says SKIPPED when the
//! package is not installed (the others never need it).

use ldt::data::idx::{encode, IMAGES_MAGIC, LABELS_MAGIC};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes `n` images of `side x side` (class `i % 2`: a bright left or right half, plus
/// noise) and their labels as `<stem>-images` / `<stem>-labels`, gzip when `gz`.
fn write_split(dir: &Path, stem: &str, n: u32, side: u32, gz: bool) -> (String, String) {
    let (mut px, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = (i % 2) as u8;
        for r in 0..side {
            for c in 0..side {
                let bright = (c < side / 2) == (class == 0);
                let noise = ((i * 31 + r * 7 + c * 13) % 50) as u8;
                px.push(if bright { 180 + noise } else { noise });
            }
        }
        labels.push(class);
    }
    let ext = if gz { ".gz" } else { "" };
    let files = [
        (
            format!("{stem}-images{ext}"),
            encode(IMAGES_MAGIC, &[n, side, side], &px),
        ),
        (
            format!("{stem}-labels{ext}"),
            encode(LABELS_MAGIC, &[n], &labels),
        ),
    ];
    for (name, bytes) in &files {
        let b = if gz { gzip(bytes) } else { bytes.clone() };
        std::fs::write(dir.join(name), b).unwrap();
    }
    (files[0].0.clone(), files[1].0.clone())
}

/// A manifest entry of an IDX split.
fn entry(files: &(String, String), n: u32) -> String {
    format!(
        r#"{{"format": "idx", "file": "{}", "labels": "{}", "n": {n}}}"#,
        files.0, files.1
    )
}

/// Generated `side x side` data in `dir`: source `a` (gzip, 40 train / 10 test) and
/// target `b` (plain, 20 / 10), with its manifest; returns the manifest's path.
fn write_data(dir: &Path, side: u32) -> PathBuf {
    let split = |stem: &str, n: u32, gz: bool| write_split(dir, stem, n, side, gz);
    let (at, ae) = (split("a-train", 40, true), split("a-test", 10, true));
    let (bt, be) = (split("b-train", 20, false), split("b-test", 10, false));
    let m = format!(
        r#"{{"format": "dg-benchmark/v1", "name": "idx-test", "num_classes": 2,
 "image_shape": [1, {side}, {side}],
 "domains": [
  {{"name": "a", "role": "source", "splits": {{"train": {}, "test": {}}}}},
  {{"name": "b", "role": "target", "splits": {{"train": {}, "test": {}}}}}
 ]}}"#,
        entry(&at, 40),
        entry(&ae, 10),
        entry(&bt, 20),
        entry(&be, 10)
    );
    let p = dir.join("manifest.json");
    std::fs::write(&p, m).unwrap();
    p
}

/// A config for the generated data: a small mlp, a few steps, one thread.
fn write_config(dir: &Path, manifest: &Path) -> PathBuf {
    let p = dir.join("run.toml");
    let text = format!(
        "seed = 0\nthreads = 1\n\n[model]\narch = \"mlp\"\nhidden = [16]\n\n[data]\n\
         manifest = {:?}\n\n[train]\nmethod = \"erm\"\nsteps = 4\nbatch_size = 8\n\
         lp_steps = 2\n\n[optim]\nlr = 1e-2\n\n[stage1]\nstat_batches = 4\n\n[eval]\nevery = 2\n",
        manifest.display().to_string()
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn ldt(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldt"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running the ldt binary")
}

/// Asserts success and returns stdout.
fn ok(out: &Output) -> String {
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "stdout:\n{o}\nstderr:\n{e}");
    o.into_owned()
}

/// Asserts exit `code`, an `error:` line naming each of `needles`, and no panic.
fn fails(out: &Output, code: i32, needles: &[&str]) {
    let e = String::from_utf8_lossy(&out.stderr);
    eprintln!("exit {:?}: {e}", out.status.code());
    assert!(!e.contains("panicked"), "panic:\n{e}");
    assert_eq!(out.status.code(), Some(code), "{e}");
    assert!(e.contains("error:"), "{e}");
    for n in needles {
        assert!(e.contains(n), "stderr does not name `{n}`:\n{e}");
    }
}

#[test]
fn trains_on_generated_idx_files() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), &write_data(d.path(), 8));
    ok(&ldt(d.path(), &["train", "run.toml", "--out", "out"]));
    assert!(d.path().join("out/model.safetensors").exists());
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("out/summary.json")).unwrap())
            .unwrap();
    let doms = s["eval"]["model"]["domains"].as_array().unwrap();
    // The source is scored on its test split, the target on all its examples.
    let n: Vec<(String, u64)> = doms
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(n, [("a".to_string(), 10), ("b".to_string(), 30)]);
    // The classes are separable by brightness: a few steps learn them.
    let acc = s["eval"]["model"]["source_acc"].as_f64().unwrap();
    assert!(acc > 0.5, "source accuracy {acc}");
    assert!(cfg.exists());
}

#[test]
fn compare_reports_steps_paired_differences_and_branches() {
    let d = tempfile::tempdir().unwrap();
    write_config(d.path(), &write_data(d.path(), 8));
    let args = [
        "compare",
        "run.toml",
        "--methods",
        "erm,ldt+ratio",
        "--seeds",
        "0,1",
        "--at",
        "2,4",
        "--out",
        "cmp",
    ];
    let o = ok(&ldt(d.path(), &args));
    for needle in [
        "| ldt+ratio |",
        "target @2",
        "Δ erm @4",
        "composite − best branch",
        "unstable half-life",
    ] {
        assert!(o.contains(needle), "no `{needle}` in\n{o}");
    }
    assert!(d.path().join("cmp/ldt+ratio-s1/config.toml").exists());
    let cfg = std::fs::read_to_string(d.path().join("cmp/ldt+ratio-s1/config.toml")).unwrap();
    assert!(cfg.contains("dpu_warmup = \"ratio\""), "{cfg}");
    let raw = std::fs::read_to_string(d.path().join("cmp/compare_runs.csv")).unwrap();
    assert!(raw.contains("ldt+ratio,1,4,am,"), "{raw}");
    assert!(raw.contains("erm,0,2,model,"), "{raw}");
    assert!(
        raw.starts_with("method,seed,step,network,source_acc_pct,target_acc_pct\n"),
        "{raw}"
    );
    let row = raw.lines().nth(1).unwrap();
    let pct: f64 = row.split(',').nth(5).unwrap().parse().unwrap();
    assert!(
        (1.0..=100.0).contains(&pct),
        "percent, not a fraction: {row}"
    );
    let csv = std::fs::read_to_string(d.path().join("cmp/compare.csv")).unwrap();
    assert!(
        csv.starts_with("method,source_acc_pct_mean,source_acc_pct_std,"),
        "{csv}"
    );
    // Steps that are not evaluated and unknown variants are usage errors (exit 2).
    let out = ldt(d.path(), &["compare", "run.toml", "--at", "3"]);
    fails(&out, 2, &["--at 3", "eval.every"]);
    let out = ldt(d.path(), &["compare", "run.toml", "--methods", "erm+ratio"]);
    fails(&out, 2, &["erm+ratio", "no DPU"]);
    let out = ldt(d.path(), &["compare", "run.toml", "--methods", "ldt+fast"]);
    fails(&out, 2, &["ldt+fast", "+timm"]);
}

#[test]
fn bad_idx_files_fail_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let manifest = write_data(d.path(), 8);
    write_config(d.path(), &manifest);
    let train = |d: &Path| ldt(d, &["train", "run.toml", "--out", "out"]);
    // A truncated (gzip) images file.
    let f = d.path().join("a-train-images.gz");
    let good = std::fs::read(&f).unwrap();
    std::fs::write(&f, &good[..good.len() / 2]).unwrap();
    fails(
        &train(d.path()),
        1,
        &["a-train-images.gz", "truncated", "domain `a`"],
    );
    std::fs::write(&f, &good).unwrap();
    // Labels of another split: 10 labels for 20 images.
    std::fs::copy(
        d.path().join("b-test-labels"),
        d.path().join("b-train-labels"),
    )
    .unwrap();
    fails(
        &train(d.path()),
        1,
        &["b-train-images", "b-train-labels", "same number"],
    );
    // Images and labels files swapped in the manifest.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let swapped = text.replacen(
        r#""file": "a-test-images.gz", "labels": "a-test-labels.gz""#,
        r#""file": "a-test-labels.gz", "labels": "a-test-images.gz""#,
        1,
    );
    assert_ne!(swapped, text);
    std::fs::write(&manifest, swapped).unwrap();
    fails(
        &train(d.path()),
        1,
        &["a-test-labels.gz", "wrong magic", "0x00000803"],
    );
    // An IDX split without its labels file.
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(r#", "labels": "a-test-images.gz""#, ""),
    )
    .unwrap();
    fails(&train(d.path()), 1, &["manifest.json", "`labels`", "idx"]);
    assert!(!d.path().join("out/model.safetensors").exists());
}

#[test]
fn fashion_mnist_package_reads_through_the_shipped_manifest() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").exists() {
        eprintln!(
            "SKIPPED: {} is absent (apt-get install dataset-fashion-mnist)",
            dir.display()
        );
        return;
    }
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist/manifest.json");
    let b = ldt::data::Benchmark::from_manifest(&m).unwrap();
    let d = &b.domains[0];
    assert_eq!((d.train.len(), d.test.len()), (60_000, 10_000));
    for (split, per_class) in [(&d.train, 6000), (&d.test, 1000)] {
        let mut counts = [0usize; 10];
        for i in 0..split.len() {
            counts[split.label(i).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [per_class; 10], "{}", split.path().display());
    }
    // The first training image (an ankle boot, label 9) has ink and blank borders.
    assert_eq!(d.train.label(0), Some(9));
    let px = b
        .pool(vec![d.train.clone()])
        .gather(&[0], None)
        .unwrap()
        .images;
    assert_eq!(px.len(), 784);
    assert!(px.iter().any(|&v| v > 0.5) && px[0] == 0.0);
}

/// The config pair of the pretrained-backbone benchmark, briefly: `fmnist-pretrain.toml`
/// (on generated 28x28 IDX data with 2 classes instead of the package, so it runs
/// everywhere) writes the weights that `fmnist-transfer.toml` loads with a new 10-class head.
#[test]
fn benchmark_config_pair_runs_briefly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = tempfile::tempdir().unwrap();
    let manifest = write_data(d.path(), 28).display().to_string();
    let pre = d.path().join("pre").display().to_string();
    let cfg = |name: &str| root.join("configs").join(name).display().to_string();
    let quick = [
        "--set",
        "threads=1",
        "--set",
        "train.steps=3",
        "--set",
        "eval.every=0",
    ];
    let data = format!("data.manifest={manifest:?}");
    let pretrain = cfg("fmnist-pretrain.toml");
    let mut args = vec!["train", &pretrain, "--set", &data, "--out", &pre];
    args.extend(quick);
    ok(&ldt(root, &args));
    let init = format!("model.init={:?}", format!("{pre}/model.safetensors"));
    let out = d.path().join("transfer").display().to_string();
    let transfer = cfg("fmnist-transfer.toml");
    let mut args = vec!["train", &transfer, "--set", &init, "--out", &out];
    args.extend(quick);
    let o = ok(&ldt(root, &args));
    assert!(o.contains("rot75"), "{o}");
}
