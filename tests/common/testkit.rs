//! Small helpers for the verification tests (declared with `#[path]` from each test file
//! that needs them): temporary copies of the bundled data, writing safetensors files from
//! Rust, and floating-point distances.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The bundled RotatedMNIST-5k directory (`data/rotmnist5k`, u8 images).
pub fn bundled_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/rotmnist5k")
}

/// Copies the regular files of `src` (not recursive) into the new directory `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("mkdir {}: {e}", dst.display()));
    for e in std::fs::read_dir(src).unwrap_or_else(|e| panic!("read_dir {}: {e}", src.display())) {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of the bundled data in `<dir>/data`; returns the copied manifest's path.
pub fn copy_bundled_data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    copy_dir(&bundled_data(), &d);
    d.join("manifest.json")
}

/// Writes named tensors to a safetensors file (through candle).
pub fn save(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .collect();
    candle_core::safetensors::save(&map, path)
        .unwrap_or_else(|e| panic!("save {}: {e}", path.display()));
}

/// Reads every tensor of a safetensors file.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

/// Cuts a file down to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len).unwrap();
}

/// The spacing of f32 numbers at `x` (one unit in the last place), as f64.
pub fn ulp_f32(x: f64) -> f64 {
    let a = (x as f32).abs();
    if a == 0.0 {
        return f32::from_bits(1) as f64;
    }
    let next = f32::from_bits(a.to_bits() + 1);
    (next - a) as f64
}

/// Flattened values as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Flattened values as f32.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// `max|a - ref| / max|ref|`: the "scaled" deviation the PyTorch comparisons bound.
pub fn scaled(a: &Tensor, r: &Tensor) -> f64 {
    let (a, r) = (f64s(a), f64s(r));
    assert_eq!(a.len(), r.len());
    let diff = a
        .iter()
        .zip(&r)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / r.iter().fold(0f64, |m, y| m.max(y.abs()))
}

/// Asserts `value <= bound`, printing what and the measured value.
pub fn within(what: &str, value: f64, bound: f64) {
    eprintln!("{what:<48} {value:>10.3e}  (bound {bound:.0e})");
    assert!(value <= bound, "{what}: {value:e} > {bound:e}");
}

/// The mean L1 loss of `y` against `target` (PyTorch's `F.l1_loss`).
pub fn l1(y: &Tensor, target: &Tensor) -> Tensor {
    (y - target).unwrap().abs().unwrap().mean_all().unwrap()
}

/// The bits of an f32 tensor's values.
pub fn bits(t: &Tensor) -> Vec<u32> {
    f32s(t).iter().map(|x| x.to_bits()).collect()
}

/// An f64 CPU tensor of `shape`, uniform in `[lo, hi)` from `rng`.
pub fn uniform(rng: &mut ldt::rng::Rng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * rng.next_f64()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A super-resolution fixture of `tests/sr/` (written by the torch scripts): its tensors
/// and its `__metadata__` (the network's settings).
pub fn sr_fixture(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sr")
        .join(name);
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().expect("the fixture's settings");
    (load(&path), meta)
}
