//! Golden outputs: a refactor of the training core must not change one bit of what a run
//! writes. For every method (erm, lp-ft, deft, ldt resident, ldt swap, ldt-s, ldt-s
//! repeat-batch) on `cnn_bn` — stage 1, 20 steps, evaluation every 5 steps with the
//! branches, selection on a validation hold-out (`best.safetensors`), snapshots at step
//! 10, checkpoints every 6 steps — and for the same run resumed from its step-12
//! checkpoint, the SHA-256 of every exported `.safetensors` file's tensors (name, dtype,
//! shape and bytes of each, in name order; the header's free-form metadata, such as the
//! integrity checksums, is not results) and of `partition.json` is compared with
//! `tests/golden/cnn_bn.sha256`, recorded before the redesign of the core (re-recorded
//! over tensor contents on the commit whose file hashes still matched).
//! `LDT_BLESS=1` rewrites that file (only for a change that is meant to change results;
//! say why in the commit).
//!
//! The bits are those of the CPU they were recorded on: machines whose f32 kernels round
//! differently (another vector width in the matrix products) train to other bits. The
//! file's first line holds an arithmetic fingerprint — SHA-256 of candle's own matrix
//! products, reductions and elementwise functions on seeded inputs, no ldt code — and on
//! a machine with another fingerprint the test says SKIPPED (record the hashes there
//! with `LDT_BLESS=1` on a commit before the change to check).

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

const BASE: &str = r#"
seed = 3
threads = 1
[model]
arch = "cnn_bn"
[train]
steps = 20
batch_size = 16
log_every = 1000
[optim]
lr = 1e-3
[stage1]
warmup_steps = 4
warmup_layers = "all"
stat_batches = 4
[ldt]
ema_every = 3
[ldt_s]
p_steps = 4
a_steps = 4
[eval]
every = 5
batch_size = 512
branches = true
[snapshots]
at_steps = [10]
[checkpoint]
every = 6
keep_last = 5
"#;

/// Method name in the golden file and its overrides.
const METHODS: [(&str, &[&str]); 7] = [
    ("erm", &["train.method=\"erm\""]),
    ("lp-ft", &["train.method=\"lp-ft\"", "train.lp_steps=6"]),
    ("deft", &["train.method=\"deft\""]),
    ("ldt-resident", &["train.method=\"ldt\""]),
    (
        "ldt-swap",
        &["train.method=\"ldt\"", "ldt.placement=\"swap\""],
    ),
    ("ldt-s", &["train.method=\"ldt-s\""]),
    (
        "ldt-s-repeat",
        &["train.method=\"ldt-s\"", "ldt_s.repeat_batch=true"],
    ),
];

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's bytes; for a `.safetensors` file, of its tensors (name, dtype,
/// shape, bytes, in name order), whatever its header's metadata holds.
fn sha256(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    if p.extension().is_some_and(|e| e == "safetensors") {
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = Sha256::new();
        for (name, t) in tensors {
            h.update(format!("{name} {:?} {:?}\n", t.dtype(), t.shape()));
            h.update(t.data());
        }
        return hex(&h.finalize());
    }
    hex(&Sha256::digest(&bytes))
}

/// `file -> sha256` of a run directory's exported tensors and partition.
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".safetensors") || name == "partition.json" {
            out.insert(name, sha256(&p));
        }
    }
    out
}

fn run_in(dir: &Path, overrides: &[String]) {
    let cfg = ldt::config::Config::from_toml(BASE, "golden", overrides).expect("config");
    let mut ctx = ldt::train::RunContext::open(cfg, dir).expect("open run");
    ldt::train::run_method(&mut ctx).expect("run");
}

/// SHA-256 (hex, 16 digits) of candle CPU arithmetic that training relies on: matrix
/// products of the shapes of a dense layer and of an im2col convolution, products whose
/// inner length runs to thousands (weight gradients: gemm sums those in blocks whose
/// length depends on the CPU's caches and on the vector width of the kernel it picks at
/// run time), a long sum, and exp / ln / sqrt, on seeded inputs. Without the long
/// products, an AVX-512 gemm on one machine and an AVX2 gemm on another gave the same
/// fingerprint and different golden bits.
fn arithmetic_fingerprint() -> String {
    use candle_core::{Device, Tensor, D};
    let mut r = ldt::rng::Rng::new(11, 0);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (r.next_f64() * 2.0 - 1.0) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let dense = t(&[16, 784]).matmul(&t(&[784, 128])).unwrap();
    let conv = t(&[32, 27]).matmul(&t(&[27, 2048])).unwrap();
    // The golden runs' weight gradients: fc1 (16 rows), conv2 and conv1 (16 images).
    let fc_grad = t(&[64, 16]).matmul(&t(&[16, 1568])).unwrap();
    let conv2_grad = t(&[32, 3136]).matmul(&t(&[3136, 144])).unwrap();
    let conv1_grad = t(&[16, 12544]).matmul(&t(&[12544, 9])).unwrap();
    let fc = t(&[16, 1568]).matmul(&t(&[1568, 64])).unwrap();
    let x = t(&[8, 4096]);
    let parts = [
        dense,
        conv,
        fc_grad,
        conv2_grad,
        conv1_grad,
        fc,
        x.sum_keepdim(D::Minus1).unwrap(),
        x.exp().unwrap(),
        x.abs().unwrap().affine(1.0, 1e-3).unwrap().log().unwrap(),
        x.abs().unwrap().sqrt().unwrap(),
    ];
    let mut h = Sha256::new();
    for p in parts {
        for v in p.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            h.update(v.to_bits().to_le_bytes());
        }
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every line `run file sha256` of all methods, whole and resumed.
fn table() -> String {
    let mut lines = Vec::new();
    for (name, sets) in METHODS {
        let mut ov: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        ov.push(bundled_manifest());
        ov.push("data.val_fraction=0.1".into());
        let whole = tempfile::tempdir().unwrap();
        run_in(whole.path(), &ov);
        for (f, h) in hashes(whole.path()) {
            lines.push(format!("{name} {f} {h}"));
        }
        // Resume from step 12: a fresh directory holding only that checkpoint.
        let resumed = only_checkpoint(whole.path(), 12);
        ov.push("checkpoint.resume=\"auto\"".into());
        run_in(resumed.path(), &ov);
        for (f, h) in hashes(resumed.path()) {
            lines.push(format!("{name}+resume {f} {h}"));
        }
    }
    lines.join("\n") + "\n"
}

#[test]
fn every_method_writes_the_golden_bits() {
    let path = root().join("tests/golden/cnn_bn.sha256");
    let head = format!("# arithmetic {}\n", arithmetic_fingerprint());
    if std::env::var_os("LDT_BLESS").is_some() {
        std::fs::write(&path, head + &table()).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (LDT_BLESS=1 writes it)", path.display()));
    let Some(want) = text.strip_prefix(head.as_str()) else {
        eprintln!(
            "SKIPPED: {} was recorded on a CPU with other f32 arithmetic ({}; here {}); \
             record it here with LDT_BLESS=1 on a commit before the change to check",
            path.display(),
            text.lines().next().unwrap_or(""),
            head.trim_end()
        );
        return;
    };
    let got = table();
    let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
    let differ: Vec<String> = w
        .iter()
        .filter(|l| !g.contains(l))
        .map(|l| format!("want {l}"))
        .chain(
            g.iter()
                .filter(|l| !w.contains(l))
                .map(|l| format!(" got {l}")),
        )
        .collect();
    assert!(
        differ.is_empty(),
        "{} golden lines differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
}
