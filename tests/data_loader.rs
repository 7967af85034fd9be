//! The data path: batch orders (a schedule file, seeded shuffles), the prefetching
//! loader, and pixel decoding (u8 files are read as `q / 255`).
//!
//! Everything is compared exactly (indices, labels, pixel bits): the expected values are
//! recomputed here from the split files, read independently of the loader.

mod common;
#[path = "common/testkit.rs"]
mod testkit;

use candle_core::{DType, Device, Tensor};
use ldt::config::Config;
use ldt::data::loader::{self, BatchOrder};
use ldt::data::{Benchmark, Loader};
use ldt::rng::Rng;
use ldt::train::RunContext;
use std::path::Path;
use testkit::*;

const IMAGE: usize = 784;

/// The source training splits of the bundled data, read here (not by the loader):
/// concatenated pixels as f32 (`q / 255`) and labels, in manifest order.
fn source_pool_by_hand(manifest: &Path) -> (Vec<f32>, Vec<i64>) {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    let dir = manifest.parent().unwrap();
    let (mut px, mut lb) = (Vec::new(), Vec::new());
    for d in m["domains"].as_array().unwrap() {
        if d["role"] != "source" {
            continue;
        }
        let t = load(&dir.join(d["splits"]["train"]["file"].as_str().unwrap()));
        let images = &t["images"];
        let pixels: Vec<f32> = match images.dtype() {
            DType::U8 => images
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
                .iter()
                .map(|&q| q as f32 / 255.0)
                .collect(),
            _ => f32s(images),
        };
        px.extend(pixels);
        lb.extend(t["labels"].to_vec1::<i64>().unwrap());
    }
    (px, lb)
}

/// A run context over the bundled data with `overrides` (its directory is a tempdir).
fn context(overrides: &[String]) -> (tempfile::TempDir, RunContext) {
    let man = format!(
        "data.manifest={:?}",
        bundled_data().join("manifest.json").display().to_string()
    );
    let mut ov = vec![man, "model.arch=\"mlp\"".to_string()];
    ov.extend_from_slice(overrides);
    let cfg = Config::from_toml("", "test", &ov).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = RunContext::open(cfg, dir.path()).unwrap();
    (dir, ctx)
}

/// Writes a schedule file with tensor `key` = `rows` (i64 [S, B]).
fn write_schedule(path: &Path, key: &str, rows: &[Vec<usize>]) {
    let b = rows[0].len();
    let flat: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
    let t = Tensor::from_vec(flat, (rows.len(), b), &Device::Cpu).unwrap();
    // A decoy under the default key: the loader must read the one it is told to.
    let mut tensors = vec![(key, t)];
    if key != "train_batches" {
        tensors.push((
            "train_batches",
            Tensor::zeros((rows.len(), b), DType::I64, &Device::Cpu).unwrap(),
        ));
    }
    save(path, tensors);
}

#[test]
fn schedule_batches_come_in_file_order() {
    let tmp = tempfile::tempdir().unwrap();
    let sched = tmp.path().join("sched.safetensors");
    let (px, lb) = source_pool_by_hand(&bundled_data().join("manifest.json"));
    let mut rng = Rng::new(8, 8);
    let rows: Vec<Vec<usize>> = (0..7)
        .map(|_| (0..5).map(|_| rng.below(lb.len())).collect())
        .collect();
    write_schedule(&sched, "my_batches", &rows);
    // Reading the file gives the rows in order.
    assert_eq!(loader::read_batches(&sched, "my_batches").unwrap(), rows);
    let s = format!("data.schedule={:?}", sched.display().to_string());
    let (_d, ctx) = context(&[s, "data.schedule_key=\"my_batches\"".into()]);
    // The run's batch order is the schedule, row by row.
    let mut order = ctx.train_order().unwrap();
    assert_eq!(order.remaining(), Some(7));
    for (k, r) in rows.iter().enumerate() {
        assert_eq!(order.next_batch().as_ref(), Some(r), "row {k}");
    }
    assert_eq!(order.next_batch(), None);
    // And the loader thread delivers those examples, in that order.
    assert_eq!(ctx.pool.len(), lb.len());
    let mut l = ctx
        .loader(ctx.train_order().unwrap(), "train", 0, 7)
        .unwrap();
    for r in &rows {
        let b = l.next_batch().unwrap();
        let want_lb: Vec<i64> = r.iter().map(|&i| lb[i]).collect();
        let want_px: Vec<u32> = r
            .iter()
            .flat_map(|&i| px[i * IMAGE..(i + 1) * IMAGE].iter().map(|v| v.to_bits()))
            .collect();
        assert_eq!(b.labels().unwrap(), &want_lb[..]);
        assert_eq!(
            b.images.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want_px
        );
    }
    assert!(
        l.next_batch().is_err(),
        "a loader gives exactly the planned batches"
    );
}

/// The first `n` batches of a seeded shuffle over `indices`.
fn shuffled(indices: &[usize], batch: usize, seed: u64, n: usize) -> Vec<Vec<usize>> {
    let mut o = BatchOrder::shuffle(indices.to_vec(), batch, Rng::new(seed, 2));
    (0..n).map(|_| o.next_batch().unwrap()).collect()
}

#[test]
fn shuffle_is_seeded_and_covers_every_index_once_per_epoch() {
    // Non-contiguous candidate indices; 103 is not a multiple of the batch (10), so
    // batches straddle epoch ends.
    let indices: Vec<usize> = (0..103).map(|i| 5 + 3 * i).collect();
    let (batch, epochs) = (10, 4);
    let n = (indices.len() * epochs).div_ceil(batch);
    let a = shuffled(&indices, batch, 1, n);
    // Deterministic: the same seed gives the same batches.
    assert_eq!(a, shuffled(&indices, batch, 1, n));
    // Seeds differ: different orders.
    let b = shuffled(&indices, batch, 2, n);
    assert_ne!(a, b);
    assert!(a.iter().all(|x| x.len() == batch));
    // Each epoch (consecutive runs of 103 examples across batch ends) is a permutation
    // of the candidates, and consecutive epochs are shuffled differently.
    let stream: Vec<usize> = a.concat();
    let mut sorted = indices.clone();
    sorted.sort_unstable();
    let mut prev: Option<&[usize]> = None;
    for (e, epoch) in stream.chunks(indices.len()).take(epochs).enumerate() {
        let mut s = epoch.to_vec();
        s.sort_unstable();
        assert_eq!(
            s, sorted,
            "epoch {e} is not a permutation of the candidates"
        );
        if let Some(p) = prev {
            assert_ne!(p, epoch, "epoch {e} repeats the previous order");
        }
        prev = Some(epoch);
    }
    // Not the identity order either.
    assert_ne!(&stream[..indices.len()], &indices[..]);
}

#[test]
fn run_shuffle_follows_the_config_seed() {
    let first = |seed: u64| -> Vec<Vec<usize>> {
        let (_d, ctx) = context(&[format!("seed={seed}"), "train.batch_size=16".into()]);
        let mut o = ctx.train_order().unwrap();
        let n = ctx.pool.len();
        assert!(
            o.remaining().is_none(),
            "without a schedule the order is a shuffle"
        );
        // Two epochs' worth of batches.
        (0..(2 * n).div_ceil(16))
            .map(|_| o.next_batch().unwrap())
            .collect()
    };
    let (a, b, c) = (first(3), first(3), first(4));
    assert_eq!(a, b, "same seed, same order");
    assert_ne!(a, c, "another seed, another order");
    let n = source_pool_by_hand(&bundled_data().join("manifest.json"))
        .1
        .len();
    let stream = a.concat();
    let mut e = stream[..n].to_vec();
    e.sort_unstable();
    assert_eq!(
        e,
        (0..n).collect::<Vec<_>>(),
        "the first epoch covers every source example once"
    );
}

#[test]
fn u8_and_f32_files_give_the_same_pixels() {
    // A copy of the bundled data whose rot15 train split is stored as f32: q / 255
    // computed in f64 and rounded once to f32 (the correctly rounded value, which is also
    // what the u8 path's f32 division gives), labels unchanged.
    let tmp = tempfile::tempdir().unwrap();
    let manifest = copy_bundled_data(tmp.path());
    let f = manifest.parent().unwrap().join("rot15_train.safetensors");
    let m = load(&f);
    let q = m["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(m["images"].dtype(), DType::U8, "the bundled data is u8");
    let x: Vec<f32> = q.iter().map(|&q| (q as f64 / 255.0) as f32).collect();
    let images = Tensor::from_vec(x, m["images"].dims(), &Device::Cpu).unwrap();
    std::fs::remove_file(&f).unwrap();
    save(
        &f,
        vec![("images", images), ("labels", m["labels"].clone())],
    );

    let a = Benchmark::from_manifest(&bundled_data().join("manifest.json"))
        .unwrap()
        .source_pool();
    let b = Benchmark::from_manifest(&manifest).unwrap().source_pool();
    assert_eq!(a.len(), b.len());
    let all: Vec<usize> = (0..a.len()).collect();
    let (ha, hb) = (a.gather(&all, None).unwrap(), b.gather(&all, None).unwrap());
    assert_eq!(ha.truth, hb.truth);
    let differ = ha
        .images
        .iter()
        .zip(&hb.images)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differ, 0,
        "{differ} pixels differ between the u8 and the f32 file"
    );
    // The rot15 range really came from the f32 file, and it is not blank.
    let start = Benchmark::from_manifest(&manifest).unwrap().domains[0]
        .train
        .len();
    assert!(hb.images[start * IMAGE..(start + 1) * IMAGE]
        .iter()
        .any(|&v| v > 0.0));
}

#[test]
fn bundled_u8_data_is_the_fixture_f32_data_quantized() {
    // The fixtures hold the same benchmark as f32; the bundled copy is round(v*255) as
    // u8, so every pixel is within half a quantization step, labels equal.
    let Some(fx) = common::fixtures() else { return };
    let (pu, lu) = source_pool_by_hand(&bundled_data().join("manifest.json"));
    let (pf, lf) = source_pool_by_hand(&fx.join("rotmnist5k/manifest.json"));
    assert_eq!(lu, lf);
    let worst = pu
        .iter()
        .zip(&pf)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 0.5 / 255.0 + 1e-6,
        "worst pixel difference {worst} > half a step"
    );
}

#[test]
fn a_schedule_shorter_than_the_run_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let sched = tmp.path().join("short.safetensors");
    let rows: Vec<Vec<usize>> = (0..3)
        .map(|r| (0..4).map(|i| r * 4 + i).collect())
        .collect();
    write_schedule(&sched, "train_batches", &rows);

    // The loader refuses before producing anything.
    let pool = Benchmark::from_manifest(&bundled_data().join("manifest.json"))
        .unwrap()
        .source_pool();
    let plan = loader::Plan {
        stage: None,
        first: 0,
        count: 5,
        workers: 1,
        depth: 2,
    };
    let e = match Loader::spawn(pool, BatchOrder::fixed(rows.clone()), plan) {
        Ok(_) => panic!("a 3-batch schedule cannot feed 5 steps"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("3 batches") && e.contains("5"), "{e}");

    // A whole run: it fails, and no training step was logged or saved.
    let s = format!("data.schedule={:?}", sched.display().to_string());
    let (dir, mut ctx) = context(&[s, "train.steps=5".into()]);
    let err = ldt::train::run_method(&mut ctx).expect_err("5 steps from a 3-batch schedule");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("schedule holds 3 batches") && msg.contains("needs 5"),
        "{msg}"
    );
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap_or_default();
    assert!(
        !metrics.contains("\"train\""),
        "training started: {metrics}"
    );
    assert!(!dir.path().join("model.safetensors").exists());

    // Exactly as long as the run is fine.
    let (dir, mut ctx) = context(&[
        format!("data.schedule={:?}", sched.display().to_string()),
        "train.steps=3".into(),
    ]);
    ldt::train::run_method(&mut ctx).expect("3 steps from a 3-batch schedule");
    assert!(dir.path().join("model.safetensors").exists());
}
