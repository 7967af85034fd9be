//! Data: the benchmark manifest, memory-mapped splits (safetensors or IDX), and batch
//! loaders.

pub mod dataset;
pub mod idx;
pub mod loader;
pub mod manifest;

pub use dataset::{Benchmark, HostBatch, Split};
pub use loader::Loader;
pub use manifest::{Manifest, Role, SplitFormat};
