//! Errors of the offload machinery, worded so a user knows which setting to change.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why an offload operation failed; the message names the bytes involved and the
/// `offload.*` setting that fixes it.
#[derive(Debug)]
pub enum OffloadError {
    /// The slots need more than `offload.host_bytes` and no `offload.path` is set.
    HostBudget {
        /// Bytes the whole layout needs (slots plus 64-byte alignment padding).
        needed: u64,
        /// The host budget that was given.
        budget: u64,
    },
    /// The operating system refused the host arena.
    HostAlloc {
        /// Bytes that were asked for.
        bytes: u64,
    },
    /// Creating, sizing or mapping the spill file failed.
    File {
        /// The `offload.path` that was used.
        path: PathBuf,
        /// Bytes the file had to hold.
        bytes: u64,
        /// What the operating system said.
        source: io::Error,
    },
    /// A slot's size in bytes does not fit in the address space.
    SlotTooLarge {
        /// The slot's name.
        name: String,
    },
    /// A staging request larger than the whole staging area (the caller must chunk).
    StagingTooSmall {
        /// Bytes asked for in one lease.
        requested: u64,
        /// The whole staging area.
        capacity: u64,
    },
    /// A host copy got a source or destination of the wrong length.
    SizeMismatch {
        /// The slot's name.
        slot: String,
        /// Length the slot has.
        expected: usize,
        /// Length that was given.
        got: usize,
        /// What the lengths count (`"elements"` or `"bytes"`).
        unit: &'static str,
    },
    /// A slot index past the end of the buffer.
    SlotIndex {
        /// The index given.
        index: usize,
        /// Number of slots in the buffer.
        len: usize,
    },
    /// The same slot asked for twice in one mutable borrow.
    SlotRepeated {
        /// The repeated index.
        index: usize,
    },
    /// A counterpart-store operation failed in its backend (a device or fold error, a
    /// tensor that does not fit its slot, an inconsistent checkpoint).
    Store {
        /// What the store was doing, naming the layer where there is one.
        action: String,
        /// What went wrong.
        message: String,
    },
}

/// `n bytes (x.xx GiB)`, exact for scripts and readable for people.
fn human(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{bytes} bytes ({:.2} GiB)", b / GIB)
    } else if b >= MIB {
        format!("{bytes} bytes ({:.2} MiB)", b / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffloadError::HostBudget { needed, budget } => write!(
                f,
                "the counterpart buffer needs {} but the host budget is {} ({} short); \
                 raise offload.host_bytes or set offload.path to a file on a disk with \
                 that much free space",
                human(*needed),
                human(*budget),
                human(needed.saturating_sub(*budget)),
            ),
            OffloadError::HostAlloc { bytes } => write!(
                f,
                "could not allocate {} of host memory for the counterpart buffer; lower \
                 offload.host_bytes and set offload.path to spill the rest to a file",
                human(*bytes),
            ),
            OffloadError::File {
                path,
                bytes,
                source,
            } => write!(
                f,
                "could not create the {} spill file {} ({source}); set offload.path to a \
                 new file on a writable disk with enough free space (an existing file is \
                 never overwritten: remove a stale one) or raise offload.host_bytes",
                human(*bytes),
                path.display(),
            ),
            OffloadError::SlotTooLarge { name } => {
                write!(f, "slot {name:?} is too large to address on this machine")
            }
            OffloadError::StagingTooSmall {
                requested,
                capacity,
            } => write!(
                f,
                "a staging request of {} exceeds the whole staging area of {}; copy in \
                 chunks of at most the staging size or raise offload.staging_bytes",
                human(*requested),
                human(*capacity),
            ),
            OffloadError::SizeMismatch {
                slot,
                expected,
                got,
                unit,
            } => write!(
                f,
                "slot {slot:?} holds {expected} {unit} but the copy has {got} {unit}"
            ),
            OffloadError::SlotIndex { index, len } => write!(
                f,
                "slot index {index} is out of range for a buffer of {len} slots"
            ),
            OffloadError::SlotRepeated { index } => {
                write!(f, "slot {index} was asked for twice in one mutable borrow")
            }
            OffloadError::Store { action, message } => write!(f, "{action}: {message}"),
        }
    }
}

impl std::error::Error for OffloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OffloadError::File { source, .. } => Some(source),
            _ => None,
        }
    }
}
