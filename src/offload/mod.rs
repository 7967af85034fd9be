//! Host-side machinery for the counterpart weights of LDT-S.
//!
//! In the single-branch variant the off-phase branch (its trained set, its optimizer state
//! and the frozen counterpart copy) waits in host memory while the live network trains.
//! This module holds that memory and works on it, independent of any tensor library:
//!
//! - [`CounterpartBuffer`]: one 64-byte-aligned host arena up to a byte budget, with the
//!   slots that do not fit spilled to a memory-mapped file; [`SharedCounterpartBuffer`] adds
//!   per-slot locks so copy jobs on several threads can work on disjoint slots.
//! - [`fused_ema`]: the DPU fold `dst = w * dst + (1 - w) * src` over many tensors in one
//!   call, split across threads, bit-identical for any thread count.
//! - [`CopyEngine`]: ordered copy streams with fences (the host analogue of CUDA streams and
//!   events), and [`StagingArea`], a bounded byte budget that makes large swaps go in chunks.
//! - [`store`]: the counterpart store, the per-layer face of all of this that training
//!   uses (park, swap, fold into and from parked weights, park and stage optimizer state,
//!   read back to host); it picks the backend for the device.
//! - [`backend`]: the calls the store makes on the buffer; [`stream`]: their implementation for a
//!   device with queues ([`order`]: what waits for what; [`launch`]: the EMA kernels' launch
//!   tables), and `cuda` (feature `cuda`): that device on a CUDA GPU.

pub mod backend;
mod buffer;
mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
mod ema;
mod engine;
mod error;
pub mod launch;
pub mod order;
mod slice;
pub mod store;
pub mod stream;

use std::path::PathBuf;

pub use buffer::{
    remove_stale_spill, CounterpartBuffer, HostAlloc, HostMemory, SharedCounterpartBuffer,
    SlotReadGuard, SlotSpec, SlotWriteGuard,
};
pub use ema::{fused_ema, EmaTask};
pub use engine::{CopyEngine, Fence, StagingArea, StagingLease};
pub use error::OffloadError;
pub use slice::{HostSlice, HostSliceMut};

/// The driver's `(used, total)` bytes of `device`'s memory (`total - free`: every
/// allocation of this and any other process), or `None` where there is no such device
/// memory (the CPU) or the driver does not answer.
pub fn device_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(((total - free) as u64, total as u64))
        }
        _ => None,
    }
}

/// Element type a slot is stored in on the host; the counterpart may be kept in a narrower
/// type than the live weights to halve host memory and copy traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageDtype {
    /// IEEE 754 binary32.
    F32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// IEEE 754 binary16.
    F16,
}

impl StorageDtype {
    /// Bytes per element, used to size slots and to balance work by bytes.
    pub const fn size_of(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::BF16 | StorageDtype::F16 => 2,
        }
    }
}

/// Where the counterpart buffer may live and how it is worked on (the `offload.*` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffloadConfig {
    /// Most bytes the host RAM arena may take (`offload.host_bytes`); slots beyond it spill.
    pub host_budget_bytes: u64,
    /// File for the slots that do not fit in RAM (`offload.path`); `None` makes an
    /// over-budget layout an error instead.
    pub file_path: Option<PathBuf>,
    /// Bytes of staging memory a swap may hold at once (`offload.staging_bytes`).
    pub staging_bytes: u64,
    /// Host worker threads for the EMA fold (`offload.threads`).
    pub threads: usize,
}
