//! Super-resolution data and scoring (`task = "super-resolution"`) on the bundled
//! real-photograph benchmark `data/sr-photos`:
//! - a batch's inputs and targets are the stored `lr` / `hr` bytes (/255, exact), and a
//!   horizontal flip mirrors both or neither;
//! - bicubic upsampling's Y-channel PSNR per camera (this crate's PIL-style bicubic, the
//!   BasicSR conventions of `ldt::task::quality`) against the value the generator
//!   recorded with PIL's own `resize(BICUBIC)` and numpy, to 0.05 dB (PIL rounds its
//!   filter in fixed point; measured deviations are printed);
//! - what cannot work is refused before anything runs, naming the key: a task the data
//!   does not hold, preparations that would change the input without its target, a
//!   classifier on image targets, a manifest whose target shape is not the scale's, a
//!   split without `hr`.

mod common;

use ldt::config::{Config, Task};
use ldt::data::{Benchmark, Truth};
use ldt::task::Scoring;
use std::path::{Path, PathBuf};

fn manifest() -> PathBuf {
    common::root().join("data/sr-photos/manifest.json")
}

fn cfg(overrides: &[&str]) -> Config {
    let mut ov = vec![format!("data.manifest=\"{}\"", manifest().display())];
    ov.extend(overrides.iter().map(|s| s.to_string()));
    Config::from_toml("", "test", &ov).expect("config")
}

fn err<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// The `u8` tensor `name` of a split file, row-major.
fn stored(file: &Path, name: &str) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name).unwrap().data().to_vec()
}

#[test]
fn batches_hold_the_stored_pairs_and_flips_mirror_both() {
    let bench = Benchmark::open(&cfg(&[])).unwrap();
    assert_eq!(bench.task, Task::SuperResolution);
    assert_eq!(bench.scale, Some(2));
    assert_eq!(bench.shape(), [3, 24, 24]);
    assert_eq!(bench.target_shape(), Some([3, 48, 48]));
    let d = &bench.domains[0];
    let pool = bench.pool(vec![d.train.clone()]);
    let idx: Vec<usize> = (0..8).collect();
    let b = pool.gather(&idx, None).unwrap();
    let lr = stored(d.train.path(), "lr");
    let hr = stored(d.train.path(), "hr");
    let want_x: Vec<f32> = lr[..8 * 3 * 24 * 24]
        .iter()
        .map(|&v| v as f32 / 255.0)
        .collect();
    let want_y: Vec<f32> = hr[..8 * 3 * 48 * 48]
        .iter()
        .map(|&v| v as f32 / 255.0)
        .collect();
    assert_eq!(b.images, want_x);
    assert_eq!(
        b.truth,
        Truth::Images {
            pixels: want_y.clone(),
            shape: [3, 48, 48]
        }
    );
    // With hflip each example is mirrored in both or in neither.
    let bench = Benchmark::open(&cfg(&["augment.hflip=true"])).unwrap();
    let pool = bench.pool(vec![bench.domains[0].train.clone()]);
    let (mut flipped, mut kept) = (0, 0);
    for batch in 0..4u64 {
        let f = pool.gather(&idx, Some((7, batch))).unwrap();
        let Truth::Images { pixels, .. } = &f.truth else {
            panic!("image targets")
        };
        for i in 0..8 {
            let (x, x0) = (
                &f.images[i * 1728..(i + 1) * 1728],
                &want_x[i * 1728..(i + 1) * 1728],
            );
            let (y, y0) = (
                &pixels[i * 6912..(i + 1) * 6912],
                &want_y[i * 6912..(i + 1) * 6912],
            );
            let mirror = |v: &[f32], w: usize| -> Vec<f32> {
                v.chunks(w).flat_map(|r| r.iter().rev().copied()).collect()
            };
            if x == x0 {
                assert_eq!(y, y0, "input kept, target mirrored (example {i})");
                kept += 1;
            } else {
                assert_eq!(x, mirror(x0, 24), "input neither kept nor mirrored");
                assert_eq!(
                    y,
                    mirror(y0, 48),
                    "input mirrored, target not (example {i})"
                );
                flipped += 1;
            }
        }
    }
    assert!(flipped > 4 && kept > 4, "flipped {flipped}, kept {kept}");
}

#[test]
fn bicubic_upsampling_scores_as_the_generator_measured() {
    let c = cfg(&[]);
    let bench = Benchmark::open(&c).unwrap();
    let scoring = Scoring::of(&c, bench.task, bench.scale);
    assert_eq!(scoring.border, 2, "the border defaults to the scale");
    let r = ldt::train::eval::bicubic(&bench, (64, &scoring), &candle_core::Device::Cpu).unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest()).unwrap()).unwrap();
    let mut worst: f64 = 0.0;
    for d in &r.domains {
        let entry = m["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == d.name.as_str())
            .unwrap();
        let want = entry["splits"]["test"]["bicubic_psnr_y"].as_f64().unwrap();
        let got = d.image.unwrap().psnr;
        println!(
            "{}: bicubic PSNR-Y {got:.4} dB, generator {want:.4} dB",
            d.name
        );
        worst = worst.max((got - want).abs());
        let i = d.image.unwrap();
        assert!(i.ssim > 0.5 && i.ssim < 1.0 && i.psnr_rgb > 20.0, "{i:?}");
    }
    println!("largest deviation {worst:.4} dB (bound 0.05)");
    assert!(worst < 0.05, "largest deviation {worst} dB");
    assert!(r.source_acc.is_nan() && r.image.is_some());
}

#[test]
fn what_cannot_work_is_refused_naming_the_key() {
    let e = err(Benchmark::open(&cfg(&["task=\"classification\""])));
    assert!(
        e.contains("`task`") && e.contains("super-resolution"),
        "{e}"
    );
    for (set, key) in [
        ("data.image_size=[12, 12]", "data.image_size"),
        ("data.mean=\"imagenet\"", "data.mean"),
        (
            "augment.random_resized_crop=[0.5, 1.0]",
            "augment.random_resized_crop",
        ),
        ("augment.color_jitter=0.2", "augment.color_jitter"),
    ] {
        let over = [set];
        let over: Vec<&str> = if key == "data.mean" {
            vec![set, "data.std=\"imagenet\""]
        } else {
            over.to_vec()
        };
        let e = err(Benchmark::open(&cfg(&over)));
        assert!(
            e.contains(key) && e.contains("super-resolution"),
            "{set}: {e}"
        );
    }
    // A classifier cannot score image targets.
    let dir = tempfile::tempdir().unwrap();
    let e = err(ldt::train::RunContext::open(
        cfg(&["model.arch=\"cnn\""]),
        dir.path(),
    ));
    assert!(e.contains("model.arch") && e.contains("edsr"), "{e}");
    // Classification data refuses a super-resolution task.
    let ov = vec![
        common::bundled_manifest(),
        "task=\"super-resolution\"".into(),
    ];
    let c = Config::from_toml("", "test", &ov).unwrap();
    let e = err(Benchmark::open(&c));
    assert!(e.contains("`task`") && e.contains("classification"), "{e}");
}

#[test]
fn a_broken_super_resolution_manifest_is_named() {
    let src = manifest();
    let text = std::fs::read_to_string(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(src.parent().unwrap()).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let m = dir.path().join("manifest.json");
    let open = |json: &str| {
        std::fs::write(&m, json).unwrap();
        let ov = vec![format!("data.manifest=\"{}\"", m.display())];
        Benchmark::open(&Config::from_toml("", "test", &ov).unwrap())
    };
    let e = err(open(&text.replacen(
        "\"target_shape\": [3,48,48]",
        "\"target_shape\": [3,40,40]",
        1,
    )));
    assert!(
        e.contains("target_shape") && e.contains("[3, 48, 48]"),
        "{e}"
    );
    let e = err(open(&text.replacen("\"scale\": 2", "\"scale\": 1", 1)));
    assert!(e.contains("`scale`"), "{e}");
    // A split file with the inputs only.
    let lr = stored(&dir.path().join("cam_b_test.safetensors"), "lr");
    let t = candle_core::Tensor::from_vec(lr, (48, 3, 24, 24), &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("lr".to_string(), t)]),
        dir.path().join("cam_b_test.safetensors"),
    )
    .unwrap();
    let e = err(open(&text));
    assert!(
        e.contains("cam_b_test.safetensors") && e.contains("`hr`"),
        "{e}"
    );
}

/// A tiny EDSR on the bundled cameras: stage 1 from scratch, DPU every 3 steps,
/// checkpoints every 6 steps, evaluation every 6.
const TINY: &str = r#"
seed = 1
threads = 1
[model]
arch = "edsr"
num_feat = 4
num_block = 1
[augment]
hflip = true
[train]
steps = 12
batch_size = 8
log_every = 1000
[optim]
lr = 1e-3
[stage1]
warmup_steps = 3
warmup_layers = "all"
stat_batches = 3
[ldt]
ema_every = 3
[ldt_s]
p_steps = 3
a_steps = 3
[eval]
every = 6
batch_size = 64
[checkpoint]
every = 6
"#;

/// Every method trains on image targets: the summary holds PSNR/SSIM per camera for each
/// exported network and bicubic upsampling's beside them, the train records carry a
/// finite pixel loss and no accuracy, and the saved config names the task and scale the
/// data decided.
#[test]
fn every_method_trains_and_scores_super_resolution() {
    let data = format!("data.manifest=\"{}\"", manifest().display());
    for method in ["erm", "lp-ft", "deft", "ldt", "ldt-s"] {
        let set = format!("train.method=\"{method}\"");
        let (dir, ctx) = common::run(TINY, &[&data, &set, "train.lp_steps=4"]);
        let exported = ldt::train::compare::exported(ldt::config::Method::parse(method).unwrap());
        let r = &ctx.summary.eval[exported];
        let b = &ctx.summary.eval["bicubic"];
        assert_eq!(r.domains.len(), 5, "{method}");
        for (d, base) in r.domains.iter().zip(&b.domains) {
            let (i, j) = (d.image.unwrap(), base.image.unwrap());
            assert!(
                i.psnr.is_finite() && i.ssim > 0.0 && d.acc.is_nan(),
                "{method} {d:?}"
            );
            assert!(j.psnr > 25.0, "bicubic {base:?}");
        }
        let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let train: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["kind"] == "train")
            .collect();
        assert!(!train.is_empty());
        for v in &train {
            assert!(v.get("acc").is_none(), "{method}: {v}");
        }
        let saved = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
        assert!(
            saved.contains("task = \"super-resolution\"") && saved.contains("scale = 2"),
            "{method}: {saved}"
        );
    }
}

/// LDT-S on image targets resumes bit for bit: the run resumed from its step-6
/// checkpoint exports the composite of the whole run; and block-wise recompute
/// computes the same steps (the same composite bits).
#[test]
fn ldt_s_resumes_and_recomputes_to_the_same_bits() {
    let data = format!("data.manifest=\"{}\"", manifest().display());
    let ov = [data.as_str(), "train.method=\"ldt-s\""];
    let (whole, _) = common::run(TINY, &ov);
    let fresh = common::only_checkpoint(whole.path(), 6);
    let cfg = Config::from_toml(
        TINY,
        "test",
        &[
            data.clone(),
            "train.method=\"ldt-s\"".into(),
            "checkpoint.resume=\"auto\"".into(),
        ],
    )
    .unwrap();
    let mut ctx = ldt::train::RunContext::open(cfg, fresh.path()).unwrap();
    ldt::train::run_method(&mut ctx).unwrap();
    let name = "composite.safetensors";
    assert!(
        common::identical(&whole.path().join(name), &fresh.path().join(name)),
        "resumed composite differs"
    );
    let (blocks, _) = common::run(TINY, &[ov[0], ov[1], "train.recompute=\"blocks\""]);
    assert!(
        common::identical(&whole.path().join(name), &blocks.path().join(name)),
        "block-wise recompute changed the composite"
    );
}

/// The memory settings keep the bits on image targets too: LDT-S with the optimizer on
/// the host, with streamed weights (block-wise recompute), and dual-branch swap placement
/// each export the plain run's composite bit for bit; bf16 runs and scores.
#[test]
fn memory_settings_keep_the_bits() {
    let data = format!("data.manifest=\"{}\"", manifest().display());
    let base = [data.as_str(), "train.method=\"ldt-s\""];
    let (plain, _) = common::run(TINY, &base);
    let name = "composite.safetensors";
    for extra in [
        vec!["offload.optimizer=\"host\""],
        vec![
            "offload.optimizer=\"host\"",
            "offload.params=\"stream\"",
            "train.recompute=\"blocks\"",
        ],
    ] {
        let mut ov = base.to_vec();
        ov.extend(&extra);
        let (d, _) = common::run(TINY, &ov);
        assert!(
            common::identical(&plain.path().join(name), &d.path().join(name)),
            "{extra:?} changed the composite"
        );
    }
    let ldt = [data.as_str(), "train.method=\"ldt\""];
    let (resident, _) = common::run(TINY, &ldt);
    let (swap, _) = common::run(TINY, &[ldt[0], ldt[1], "ldt.placement=\"swap\""]);
    assert!(common::identical(
        &resident.path().join(name),
        &swap.path().join(name)
    ));
    let (_, ctx) = common::run(TINY, &[base[0], base[1], "train.precision=\"bf16\""]);
    let i = ctx.summary.eval["composite"].image.unwrap()[0].unwrap();
    assert!(i.psnr.is_finite() && i.psnr > 10.0, "{i:?}");
}

/// `ldt compare` on image targets: the tables are in dB (PSNR-Y) with an SSIM table,
/// the paired difference to erm in dB, the CSV columns named `_psnr_db`.
#[test]
fn compare_reports_psnr_and_ssim() {
    let cfg = cfg(&[]);
    let mut base = Config::from_toml(TINY, "test", &[]).unwrap();
    base.data = cfg.data.clone();
    let variants: Vec<_> = ["erm", "ldt-s"]
        .iter()
        .map(|v| ldt::train::compare::Variant::parse(v).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let md = ldt::train::compare::compare(&base, &variants, &[0, 1], &[], dir.path()).unwrap();
    println!("{md}");
    assert!(
        md.contains("Y-channel PSNR in dB") && md.contains("Y-channel SSIM"),
        "{md}"
    );
    assert!(md.contains("Δ erm") && md.contains("in dB"), "{md}");
    let csv = std::fs::read_to_string(dir.path().join("compare.csv")).unwrap();
    assert!(csv.starts_with("method,source_psnr_db_mean"), "{csv}");
    let runs = std::fs::read_to_string(dir.path().join("compare_runs.csv")).unwrap();
    assert!(runs.starts_with("method,seed,step,network,source_psnr_db,target_psnr_db\n"));
}

/// The search of `auto` settings on image targets scores its probes by the Y-channel
/// PSNR (dB) of the source validation hold-out: every score is a finite PSNR, the
/// choice is the highest, and the run then trains with it (its partition's ratio).
#[test]
fn the_search_scores_probes_by_psnr() {
    let data = format!("data.manifest=\"{}\"", manifest().display());
    let (dir, ctx) = common::run(
        TINY,
        &[
            &data,
            "train.method=\"ldt-s\"",
            "data.val_fraction=0.1",
            "stage1.unstable_ratio=\"auto\"",
            "stage1.search_ratios=[0.25, 0.5]",
            "stage1.probe_steps=6",
        ],
    );
    let r = ctx.summary.search.as_ref().expect("a search report");
    assert_eq!(r.metric, "psnr_y_db");
    assert_eq!(r.candidates.len(), 2);
    for c in &r.candidates {
        assert!(c.score > 10.0 && c.score < 60.0, "{c:?}");
    }
    let best = r
        .candidates
        .iter()
        .map(|c| c.score)
        .fold(f64::MIN, f64::max);
    assert_eq!(r.choice().score, best);
    let part: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("partition.json")).unwrap())
            .unwrap();
    assert_eq!(part["unstable_ratio"], r.choice().candidate.unstable_ratio);
}
