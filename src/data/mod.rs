//! Data: the benchmark manifest, memory-mapped splits (safetensors or IDX), and batch
//! loaders.

pub mod dataset;
pub mod idx;
pub mod loader;
pub mod manifest;

pub use dataset::{Benchmark, Split};
pub use loader::{HostBatch, Loader};
pub use manifest::{Manifest, Role, SplitFormat};
