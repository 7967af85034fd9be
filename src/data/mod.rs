//! Data: the benchmark manifest, memory-mapped splits, and batch loaders.

pub mod dataset;
pub mod loader;
pub mod manifest;

pub use dataset::{Benchmark, Split};
pub use loader::{HostBatch, Loader};
pub use manifest::{Manifest, Role};
