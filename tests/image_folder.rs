//! Image folders (`data.format = "image-folder"`), built here from the bundled
//! RotatedMNIST data: PNG (grayscale, RGBA, an odd size) and JPEG (RGB) files in class
//! folders, one domain with `train`/`test` folders and others split by
//! `data.test_fraction`, plus one corrupt file.
//!
//! Compared: the PNG pixels read back against the bundled u8 pixels (bit for bit); JPEG
//! against them within 6/255 mean absolute error (lossy codec, quality 95); classes
//! against torchvision's `ImageFolder` order (sorted names); LDT-S end to end with
//! augmentation and normalization, whose exported weights load under the network's
//! names and record the classes, size and normalization; the run resumed from a
//! mid-run checkpoint equals the whole run bit for bit (augmentation draws included).

mod common;
use common::*;
use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use ldt::config::Config;
use ldt::data::Benchmark;
use std::path::{Path, PathBuf};

/// Examples taken per domain and class-agnostic split from the bundled data.
const PER_DOMAIN: usize = 60;

/// Bundled examples `0..n` of domain `d`'s `split` as (u8 28x28 pixels, label).
fn bundled(d: usize, test: bool, n: usize) -> Vec<(Vec<u8>, i64)> {
    let b = Benchmark::from_manifest(&root().join("data/rotmnist5k/manifest.json")).unwrap();
    let s = if test {
        b.domains[d].test.clone()
    } else {
        b.domains[d].train.clone()
    };
    let hb = b
        .pool(vec![s])
        .gather(&(0..n).collect::<Vec<_>>(), None)
        .unwrap();
    hb.images
        .chunks(784)
        .map(|px| px.iter().map(|&v| (v * 255.0).round() as u8).collect())
        .zip(hb.labels().unwrap().to_vec())
        .collect()
}

/// Class folder names: digits spelled so that sorting is not numeric order.
const NAMES: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The class names in label order: sorted, as torchvision's `ImageFolder` sorts them.
fn sorted_names() -> Vec<String> {
    let mut v: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Writes one image in the domain's style: `png` (grayscale), `jpeg` (RGB) or
/// `rgba` (PNG with alpha). Returns its path.
fn write(dir: &Path, i: usize, px: &[u8], style: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let g = GrayImage::from_fn(28, 28, |x, y| Luma([px[(y * 28 + x) as usize]]));
    match style {
        "png" => {
            let p = dir.join(format!("{i:03}.png"));
            g.save(&p).unwrap();
            p
        }
        "rgba" => {
            let p = dir.join(format!("{i:03}.PNG"));
            RgbaImage::from_fn(28, 28, |x, y| {
                let v = g.get_pixel(x, y)[0];
                Rgba([v, v, v, 77])
            })
            .save(&p)
            .unwrap();
            p
        }
        _ => {
            let p = dir.join(format!("{i:03}.jpg"));
            let rgb = RgbImage::from_fn(28, 28, |x, y| {
                let v = g.get_pixel(x, y)[0];
                Rgb([v, v, v])
            });
            let f = std::fs::File::create(&p).unwrap();
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(f, 95);
            enc.encode_image(&rgb).unwrap();
            p
        }
    }
}

/// The folder: `rot00` (PNG, `train`/`test` folders, one RGBA file), `rot30` (JPEG,
/// class folders only), `rot60` (PNG, class folders, one 40x33 image, one corrupt
/// file, one text file that is not an image). Returns the root.
fn build(root: &Path) -> PathBuf {
    let r = root.join("images");
    for (d, name, style) in [
        (0, "rot00", "png"),
        (2, "rot30", "jpeg"),
        (4, "rot60", "png"),
    ] {
        let train = bundled(d, false, PER_DOMAIN);
        let test = bundled(d, true, PER_DOMAIN / 3);
        let class = |l: i64| NAMES[l as usize];
        if d == 0 {
            for (i, (px, l)) in train.iter().enumerate() {
                let style = if i == 3 { "rgba" } else { style };
                write(&r.join(name).join("train").join(class(*l)), i, px, style);
            }
            for (i, (px, l)) in test.iter().enumerate() {
                write(&r.join(name).join("test").join(class(*l)), i, px, style);
            }
        } else {
            for (i, (px, l)) in train.iter().chain(&test).enumerate() {
                write(&r.join(name).join(class(*l)), i, px, style);
            }
        }
        // Every class present in every domain (the first 60 examples may miss one).
        for (k, c) in NAMES.iter().enumerate() {
            let dirs: Vec<PathBuf> = match d {
                0 => vec![
                    r.join(name).join("train").join(c),
                    r.join(name).join("test").join(c),
                ],
                _ => vec![r.join(name).join(c)],
            };
            for dir in dirs {
                if !dir.exists() {
                    write(&dir, 900 + k, &train[0].0, style);
                }
            }
        }
    }
    let odd = r.join("rot60").join("three").join("odd.png");
    GrayImage::from_fn(40, 33, |x, y| Luma([((x * 7 + y * 3) % 256) as u8]))
        .save(&odd)
        .unwrap();
    std::fs::write(
        r.join("rot60").join("five").join("broken.jpg"),
        b"not a jpeg",
    )
    .unwrap();
    std::fs::write(r.join("rot60").join("five").join("notes.txt"), b"notes").unwrap();
    r
}

/// The image-folder config used below (a small CNN, 28x28 grayscale input).
fn config(root: &Path, extra: &[&str]) -> Config {
    let ov: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Config::from_toml(&config_text(root), "image-folder test", &ov).unwrap()
}

/// The text of [`config`]'s file.
fn config_text(root: &Path) -> String {
    format!(
        r#"
seed = 3
threads = 1
[model]
arch = "cnn"
[data]
format = "image-folder"
root = "{}"
sources = ["rot00", "rot30"]
image_size = [28, 28]
channels = 1
on_bad_image = "skip"
mean = [0.5]
std = [0.25]
[augment]
hflip = true
random_resized_crop = [0.6, 1.0]
color_jitter = 0.3
[train]
method = "ldt-s"
steps = 24
batch_size = 8
log_every = 1000
[stage1]
warmup_steps = 4
stat_batches = 3
stat_batch_size = 4
[ldt_s]
p_steps = 4
a_steps = 4
[ldt]
ema_every = 2
[checkpoint]
every = 6
keep_last = 10
"#,
        root.display()
    )
}

fn open_err(cfg: &Config) -> String {
    match Benchmark::open(cfg) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Layout, classes, splits and pixels as read.
#[test]
fn folders_read_as_torchvision_image_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let r = build(tmp.path());
    let cfg = config(&r, &["data.mean=[0.0]", "data.std=[1.0]"]);
    let b = Benchmark::open(&cfg).unwrap();
    let sorted = sorted_names();
    assert_eq!(b.classes, sorted, "classes in sorted order, as ImageFolder");
    let names: Vec<(&str, ldt::data::Role)> = b
        .domains
        .iter()
        .map(|d| (d.name.as_str(), d.role))
        .collect();
    use ldt::data::Role::{Source, Target};
    assert_eq!(
        names,
        [("rot00", Source), ("rot30", Source), ("rot60", Target)]
    );
    assert!(
        b.notes
            .iter()
            .any(|n| n.contains("skipped 1") && n.contains("broken.jpg")),
        "{:?}",
        b.notes
    );
    assert!(
        b.notes.iter().any(|n| n.contains("ignored 1")),
        "{:?}",
        b.notes
    );
    // rot00's own folders: the bundled train examples, PNG bits exact, labels by name.
    let rot00 = &b.domains[0];
    let want = bundled(0, false, PER_DOMAIN);
    let got = b
        .pool(vec![rot00.train.clone()])
        .gather(&(0..rot00.train.len()).collect::<Vec<_>>(), None)
        .unwrap();
    let mut matched = 0;
    for (px, l) in &want {
        let class = sorted.iter().position(|c| c == NAMES[*l as usize]).unwrap() as i64;
        let hit = got
            .images
            .chunks(784)
            .zip(got.labels().unwrap())
            .any(|(g, &gl)| {
                gl == class
                    && g.iter()
                        .zip(px)
                        .all(|(a, &b)| a.to_bits() == (b as f32 / 255.0).to_bits())
            });
        matched += hit as usize;
    }
    assert_eq!(
        matched, PER_DOMAIN,
        "every PNG (RGBA included) reads back its pixels"
    );
    // rot30 (JPEG, RGB read as luma) split by test_fraction: stratified, seeded, lossy.
    let rot30 = &b.domains[1];
    let n = rot30.train.len() + rot30.test.len();
    assert_eq!(n, PER_DOMAIN + PER_DOMAIN / 3 + missing_classes(2));
    let frac = rot30.test.len() as f64 / n as f64;
    assert!((0.1..0.35).contains(&frac), "test share {frac}");
    // Each JPEG file (RGB written, read as luma) against the pixels it was made from.
    let mut all = bundled(2, false, PER_DOMAIN);
    all.extend(bundled(2, true, PER_DOMAIN / 3));
    for (i, (px, l)) in all.iter().enumerate() {
        let f = r
            .join("rot30")
            .join(NAMES[*l as usize])
            .join(format!("{i:03}.jpg"));
        let (h, w, got) = ldt::data::folder::decode(&f, 1).unwrap();
        assert_eq!((h, w), (28, 28));
        let mae = got
            .iter()
            .zip(px)
            .map(|(&g, &b)| (g as f64 - b as f64 / 255.0).abs())
            .sum::<f64>()
            / 784.0;
        assert!(mae < 6.0 / 255.0, "{}: mean pixel error {mae}", f.display());
    }
    // The same split again, and under another training seed (split_seed fixes it).
    let again = Benchmark::open(&config(
        &r,
        &["seed=99", "data.mean=[0.0]", "data.std=[1.0]"],
    ))
    .unwrap();
    assert_eq!(again.domains[1].test.len(), rot30.test.len());
    for i in 0..rot30.test.len() {
        assert_eq!(again.domains[1].test.label(i), rot30.test.label(i));
    }
    // The odd-size image is resized and center-cropped to 28x28.
    let rot60 = &b.domains[2];
    let all60 = b
        .pool(vec![rot60.train.clone(), rot60.test.clone()])
        .gather(
            &(0..rot60.train.len() + rot60.test.len()).collect::<Vec<_>>(),
            None,
        )
        .unwrap();
    assert_eq!(all60.images.len(), all60.len() * 784);
}

/// Classes of the bundled examples missing among domain `d`'s first examples (each
/// gets one filler image in `build`).
fn missing_classes(d: usize) -> usize {
    let mut seen = [false; 10];
    for (_, l) in bundled(d, false, PER_DOMAIN) {
        seen[l as usize] = true;
    }
    seen.iter().filter(|s| !**s).count()
}

/// Bad layouts and files stop before training, naming what to fix.
#[test]
fn bad_folders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let r = build(tmp.path());
    // A corrupt image with the default `error`.
    let e = open_err(&config(&r, &["data.on_bad_image=\"error\""]));
    assert!(
        e.contains("broken.jpg") && e.contains("on_bad_image"),
        "{e}"
    );
    // A domain that is not there.
    let e = open_err(&config(&r, &["data.sources=[\"rot99\"]"]));
    assert!(
        e.contains("rot99") && e.contains("rot00, rot30, rot60"),
        "{e}"
    );
    // A class missing in one domain.
    std::fs::remove_dir_all(r.join("rot30").join("seven")).unwrap();
    let e = open_err(&config(&r, &[]));
    assert!(
        e.contains("domain `rot30`") && e.contains("missing in domain `rot30`: [seven]"),
        "{e}"
    );
    // Config errors name the key.
    let bad = |ov: &str| {
        let base = format!(
            "[data]\nformat = \"image-folder\"\nroot = \"{}\"\nsources = [\"rot00\"]\nimage_size = [28, 28]\n",
            r.display()
        );
        format!(
            "{:#}",
            Config::from_toml(&base, "t", &[ov.to_string()]).unwrap_err()
        )
    };
    assert!(bad("data.image_size=[0, 28]").contains("data.image_size"));
    assert!(bad("data.channels=2").contains("data.channels"));
    assert!(bad("data.mean=\"imagenet\"").contains("data.std"));
    assert!(bad("augment.random_resized_crop=[0.5, 0.2]").contains("augment.random_resized_crop"));
    assert!(bad("data.targets=[\"rot00\"]").contains("both name domain `rot00`"));
}

/// LDT-S end to end on image folders with augmentation; the outputs record the input;
/// resumed from step 12 it ends in the same bytes; `ldt eval` reads the recorded input.
#[test]
fn ldt_s_trains_on_image_folders_and_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let r = build(tmp.path());
    let whole = tempfile::tempdir().unwrap();
    let mut ctx = ldt::train::RunContext::open(config(&r, &[]), whole.path()).unwrap();
    ldt::train::run_method(&mut ctx).unwrap();
    // The exported composite: the network's names, and the input it expects.
    let composite = whole.path().join("composite.safetensors");
    let net = ldt::model::build(&ctx.cfg.model, [1, 28, 28], 10).unwrap();
    let state = ldt::model::io::load_state(net.as_ref(), &composite, &candle_core::Device::Cpu);
    assert!(state.is_ok(), "{:#}", state.err().unwrap());
    let meta = ldt::model::io::file_metadata(&composite).unwrap();
    let spec = ldt::data::prep::InputSpec::from_metadata(&meta, "composite")
        .unwrap()
        .expect("recorded");
    let sorted = sorted_names();
    assert_eq!(spec.classes, sorted);
    assert_eq!(spec.shape, [1, 28, 28]);
    assert_eq!((spec.mean, spec.std), (Some(vec![0.5]), Some(vec![0.25])));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["input"]["classes"][0], "eight");
    assert_eq!(summary["input"]["std"][0], 0.25);
    // Resumed from the step-12 checkpoint: augmentation draws replayed, same bytes.
    let resumed = only_checkpoint(whole.path(), 12);
    let mut ctx =
        ldt::train::RunContext::open(config(&r, &["checkpoint.resume=\"auto\""]), resumed.path())
            .unwrap();
    ldt::train::run_method(&mut ctx).unwrap();
    for f in ["pm.safetensors", "am.safetensors", "composite.safetensors"] {
        assert!(
            identical(&whole.path().join(f), &resumed.path().join(f)),
            "{f} differs after resuming at step 12"
        );
    }
    // Without augmentation the run differs (the draws are used).
    let plain = tempfile::tempdir().unwrap();
    let mut ctx = ldt::train::RunContext::open(
        config(
            &r,
            &[
                "augment.hflip=false",
                "augment.color_jitter=0.0",
                "augment.random_resized_crop=[1.0, 1.0]",
            ],
        ),
        plain.path(),
    )
    .unwrap();
    ldt::train::run_method(&mut ctx).unwrap();
    assert!(!identical(
        &composite,
        &plain.path().join("composite.safetensors")
    ));
    // `ldt eval` with a config that says nothing of the input: the recorded one is used.
    let cfg_path = tmp.path().join("eval.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[model]\narch = \"cnn\"\n[data]\nformat = \"image-folder\"\nroot = \"{}\"\nsources = [\"rot00\"]\nimage_size = [32, 32]\nchannels = 1\non_bad_image = \"skip\"\n",
            r.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ldt"))
        .arg("eval")
        .arg(&cfg_path)
        .arg("--weights")
        .arg(&composite)
        .arg("--json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("data.image_size = [28, 28]") && err.contains("data.mean = [0.5]"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["source_acc"].as_f64().unwrap() > 0.0, "{report}");
}

/// `data.sources` / `data.targets` choose the roles of a manifest's domains too
/// (leave-one-domain-out without a new manifest); the others are not opened.
#[test]
fn config_roles_override_the_manifest() {
    let mut cfg = Config::default();
    cfg.data.manifest = root().join("data/rotmnist5k/manifest.json");
    cfg.data.sources = vec!["rot60".into(), "rot00".into()];
    cfg.data.targets = vec!["rot15".into()];
    let b = Benchmark::open(&cfg).unwrap();
    use ldt::data::Role::{Source, Target};
    let roles: Vec<(&str, ldt::data::Role)> = b
        .domains
        .iter()
        .map(|d| (d.name.as_str(), d.role))
        .collect();
    assert_eq!(
        roles,
        [("rot00", Source), ("rot15", Target), ("rot60", Source)]
    );
    assert_eq!(b.source_pool().len(), 668 + 667);
    cfg.data.targets.clear();
    let b = Benchmark::open(&cfg).unwrap();
    assert_eq!(b.domains.len(), 6, "every other domain is a target");
    cfg.data.sources = vec!["rot90".into()];
    let e = format!("{:#}", Benchmark::open(&cfg).err().unwrap());
    assert!(
        e.contains("data.sources") && e.contains("no domain `rot90`"),
        "{e}"
    );
}

/// The binary killed (SIGKILL) in the middle of an augmented LDT-S run on image
/// folders, then `--resume`d: its exports equal the uninterrupted run's bit for bit.
#[test]
fn augmented_runs_resume_bit_exactly_after_a_kill() {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let r = build(tmp.path());
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, config_text(&r)).unwrap();
    let sets = ["train.steps=160", "checkpoint.every=5"];
    let spawn = |out: &Path, resume: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ldt"));
        c.arg("train").arg(&cfg).arg("--out").arg(out);
        for s in sets {
            c.arg("--set").arg(s);
        }
        if resume {
            c.arg("--resume");
        }
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let whole = tmp.path().join("whole");
    assert!(spawn(&whole, false).wait().unwrap().success());
    let cut = tmp.path().join("cut");
    let mut child = spawn(&cut, false);
    let t = std::time::Instant::now();
    while last_step(&cut) < 40 && child.try_wait().unwrap().is_none() {
        assert!(t.elapsed().as_secs() < 120, "the run did not reach step 40");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = last_step(&cut);
    assert!(killed_at < 160, "the run ended before the kill");
    assert!(spawn(&cut, true).wait().unwrap().success());
    for f in ["pm.safetensors", "am.safetensors", "composite.safetensors"] {
        assert!(
            identical(&whole.join(f), &cut.join(f)),
            "{f} differs after a kill at step {killed_at} and --resume"
        );
    }
    eprintln!("image folders: killed at step {killed_at}, resumed, identical");
}
