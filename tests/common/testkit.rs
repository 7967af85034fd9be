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
