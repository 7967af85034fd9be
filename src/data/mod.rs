//! Data: the benchmark (a manifest of safetensors or IDX splits, or image folders), the
//! preparation of each example for the model (size, augmentation, normalization), and
//! batch loaders.

pub mod dataset;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod manifest;
pub mod prep;

pub use dataset::{Benchmark, HostBatch, Split, Truth};
pub use loader::Loader;
pub use manifest::{Manifest, Role, SplitFormat};
