//! Launch descriptions of the EMA kernels in `kernels/ema.ptx`, independent of CUDA.
//!
//! A fold over many tensors is one launch of `ldt_ema_multi` (or `ldt_ema_mapped`): block
//! `b` folds entry `b` of a table in device memory, 32 bytes per entry with the addresses,
//! the length, the two f32 coefficients and the storage dtypes of one piece of one tensor.
//! [`pack`] cuts the tensors into pieces of at most [`CHUNK_ELEMS`] elements so a large
//! tensor is shared by many blocks and many small tensors go in the same launch. A single
//! tensor can also go to `ldt_ema` with its own grid ([`single_blocks`]).

use super::ema::coefficients;
use super::StorageDtype;

/// The PTX ISA version `kernels/ema.ptx` is written in (its `.version` line).
pub const KERNEL_PTX_ISA: (u32, u32) = (7, 0);

/// The newest PTX ISA a driver JIT-compiles, from its CUDA version as
/// `cuDriverGetVersion` reports it (`1000 * major + 10 * minor`): CUDA 11.x reads ISA 7.x,
/// 12.0-12.5 read 8.0-8.5, 12.6 reads 8.5, 12.8 and 12.9 read 8.7 and 8.8, 13.x reads 9.x.
/// `None` for drivers older than CUDA 11.0 (whose ISA is below the kernels').
pub fn driver_ptx_isa(driver_version: i32) -> Option<(u32, u32)> {
    let (major, minor) = (driver_version / 1000, (driver_version % 1000 / 10) as u32);
    match major {
        ..=10 => None,
        11 => Some((7, minor)),
        12 => Some((
            8,
            match minor {
                0..=5 => minor,
                6 => 5,
                7 | 8 => 7,
                _ => 8,
            },
        )),
        _ => Some((9, minor)),
    }
}

/// Threads per block of every EMA launch.
pub const BLOCK_THREADS: u32 = 256;

/// Most elements one table entry covers: 128 per thread of a block (32 iterations of the
/// kernel's 4-lane loop), a multiple of 256 so every piece after the first of a tensor
/// starts 512 bytes (f32: 1 KiB) past its start, as aligned as the tensor itself.
pub const CHUNK_ELEMS: usize = 1 << 15;

/// Blocks `ldt_ema` needs for `n` elements: at least 16 elements per thread, at most
/// 65535 blocks (the grid-stride loop covers the rest), at least one.
pub fn single_blocks(n: usize) -> u32 {
    let per_block = BLOCK_THREADS as usize * 16;
    n.div_ceil(per_block).clamp(1, 65_535) as u32
}

/// The code of a storage dtype in the kernels (0 = f32, 1 = bf16, 2 = f16).
pub const fn dtype_code(d: StorageDtype) -> u32 {
    match d {
        StorageDtype::F32 => 0,
        StorageDtype::BF16 => 1,
        StorageDtype::F16 => 2,
    }
}

/// The `codes` word of a launch: destination code in bits 0..8, source code in 8..16.
pub const fn codes(dst: StorageDtype, src: StorageDtype) -> u32 {
    dtype_code(dst) | dtype_code(src) << 8
}

/// One entry of the launch table, laid out exactly as the kernels read it
/// (`ld.global.nc` at offsets 0, 8, 16, 20, 24, 28 of `[%entry]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaEntry {
    /// Device address of the piece's first destination element.
    pub dst: u64,
    /// Device address of the piece's first source element.
    pub src: u64,
    /// Elements in the piece (at most [`CHUNK_ELEMS`]).
    pub len: u32,
    /// `w` rounded to f32.
    pub wf: f32,
    /// `1 - w` (in f64) rounded to f32.
    pub cf: f32,
    /// [`codes`] of the destination and source dtypes.
    pub codes: u32,
}

/// One tensor of a fold, by device address: `dst = w*dst + (1-w)*src` over `len` elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaSpan {
    /// Device address of the destination (device memory or mapped pinned host memory).
    pub dst: u64,
    /// Storage dtype of the destination.
    pub dst_dtype: StorageDtype,
    /// Device address of the source.
    pub src: u64,
    /// Storage dtype of the source.
    pub src_dtype: StorageDtype,
    /// Number of elements.
    pub len: usize,
    /// The DPU coefficient, as computed in f64.
    pub w: f64,
}

/// One launch of an EMA kernel.
#[derive(Clone, Debug, PartialEq)]
pub enum EmaLaunch {
    /// `ldt_ema` over one tensor, [`single_blocks`] blocks.
    Single(EmaSpan),
    /// `ldt_ema_multi` (or `ldt_ema_mapped` when `mapped`, for counterparts in mapped
    /// host memory) over a table, one block per entry.
    Table {
        /// The table, from [`pack`].
        entries: Vec<EmaEntry>,
        /// Whether a side of the fold is in mapped host memory.
        mapped: bool,
    },
}

/// The launch table of `spans`: every span cut into pieces of at most `chunk` elements
/// (a positive multiple of 256), in order, empty spans left out.
///
/// # Panics
/// If `chunk` is not a positive multiple of 256 or exceeds `u32::MAX`.
pub fn pack(spans: &[EmaSpan], chunk: usize) -> Vec<EmaEntry> {
    assert!(
        chunk > 0 && chunk.is_multiple_of(256) && chunk <= u32::MAX as usize,
        "pack: chunk {chunk} must be a positive multiple of 256 that fits in u32"
    );
    let mut out = Vec::with_capacity(spans.iter().map(|s| s.len.div_ceil(chunk)).sum());
    for s in spans {
        let (wf, cf) = coefficients(s.w);
        let (dsz, ssz) = (s.dst_dtype.size_of() as u64, s.src_dtype.size_of() as u64);
        let mut start = 0;
        while start < s.len {
            let len = chunk.min(s.len - start);
            out.push(EmaEntry {
                dst: s.dst + start as u64 * dsz,
                src: s.src + start as u64 * ssz,
                len: len as u32,
                wf,
                cf,
                codes: codes(s.dst_dtype, s.src_dtype),
            });
            start += len;
        }
    }
    out
}

/// The table as the bytes to copy to the device.
pub fn as_bytes(entries: &[EmaEntry]) -> &[u8] {
    // SAFETY: `EmaEntry` is `repr(C)` with fields of 8, 8, 4, 4, 4, 4 bytes in that order:
    // no padding (size 32, checked in the tests), so every byte is initialized; u8 has
    // alignment 1 and the length is exactly `size_of_val(entries)`.
    unsafe {
        std::slice::from_raw_parts(
            entries.as_ptr().cast::<u8>(),
            std::mem::size_of_val(entries),
        )
    }
}

/// What the kernels compute, on host memory: the model the GPU code is checked against
/// on the device, and the kernel of the simulated device in the backend tests.
#[cfg(test)]
pub(crate) mod emulate {
    use super::EmaEntry;
    use crate::offload::convert::Lane;
    use half::{bf16, f16};

    /// Reads element `i` of dtype `code` at `base`, widened to f32.
    ///
    /// # Safety
    /// `base` must point at `i + 1` valid elements of that dtype.
    unsafe fn get(base: u64, code: u32, i: usize) -> f32 {
        // SAFETY: the caller guarantees element `i` exists.
        unsafe {
            match code {
                0 => *(base as *const f32).add(i),
                1 => (*(base as *const bf16).add(i)).to_f32(),
                2 => (*(base as *const f16).add(i)).to_f32(),
                _ => panic!("dtype code {code}"),
            }
        }
    }

    /// Writes `v`, narrowed to dtype `code`, as element `i` at `base`.
    ///
    /// # Safety
    /// `base` must point at `i + 1` valid, writable elements of that dtype.
    unsafe fn put(base: u64, code: u32, i: usize, v: f32) {
        // SAFETY: the caller guarantees element `i` exists and is writable.
        unsafe {
            match code {
                0 => *(base as *mut f32).add(i) = v,
                1 => *(base as *mut bf16).add(i) = <bf16 as Lane>::from_f32(v),
                2 => *(base as *mut f16).add(i) = f16::from_f32(v),
                _ => panic!("dtype code {code}"),
            }
        }
    }

    /// Runs every entry of a table (`ldt_ema_multi` / `ldt_ema_mapped`) on the host.
    ///
    /// # Safety
    /// Every entry's addresses must be valid host pointers to `len` elements of its dtypes,
    /// destinations writable, and nothing else may access them meanwhile.
    pub(crate) unsafe fn run(entries: &[EmaEntry]) {
        for e in entries {
            let (dc, sc) = (e.codes & 0xFF, (e.codes >> 8) & 0xFF);
            for i in 0..e.len as usize {
                // SAFETY: forwarded from the caller.
                unsafe {
                    let d = get(e.dst, dc, i);
                    let s = get(e.src, sc, i);
                    put(e.dst, dc, i, d * e.wf + e.cf * s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{fused_ema, EmaTask, HostSlice, HostSliceMut};
    use half::{bf16, f16};
    use std::mem::{offset_of, size_of};

    const DTYPES: [StorageDtype; 3] = [StorageDtype::F32, StorageDtype::BF16, StorageDtype::F16];

    fn span(dst: u64, src: u64, len: usize, w: f64) -> EmaSpan {
        EmaSpan {
            dst,
            dst_dtype: StorageDtype::F32,
            src,
            src_dtype: StorageDtype::BF16,
            len,
            w,
        }
    }

    #[test]
    fn entry_layout_matches_the_kernels() {
        assert_eq!(size_of::<EmaEntry>(), 32);
        let ptx = include_str!("../../kernels/ema.ptx");
        for (reg, off) in [
            ("%dst", offset_of!(EmaEntry, dst)),
            ("%src", offset_of!(EmaEntry, src)),
            ("%len32", offset_of!(EmaEntry, len)),
            ("%wf", offset_of!(EmaEntry, wf)),
            ("%cf", offset_of!(EmaEntry, cf)),
            ("%codes", offset_of!(EmaEntry, codes)),
        ] {
            let at = if off == 0 {
                "[%entry]".to_string()
            } else {
                format!("[%entry+{off}]")
            };
            // Both table kernels read this field from this offset.
            let hits = ptx
                .lines()
                .filter(|l| l.contains(&format!("{reg}, {at};")))
                .count();
            assert_eq!(hits, 2, "{reg} at {at}");
        }
        assert!(ptx.contains(&format!(
            "mul.wide.u32 \t%first, %bid, {};",
            size_of::<EmaEntry>()
        )));
    }

    #[test]
    fn the_kernels_use_the_declared_isa_and_old_drivers_read_it() {
        let ptx = include_str!("../../kernels/ema.ptx");
        let (major, minor) = KERNEL_PTX_ISA;
        assert!(ptx.contains(&format!("\n.version {major}.{minor}\n")));
        assert_eq!(driver_ptx_isa(10020), None);
        assert_eq!(driver_ptx_isa(11000), Some((7, 0)));
        assert_eq!(driver_ptx_isa(11080), Some((7, 8)));
        assert_eq!(driver_ptx_isa(12040), Some((8, 4)));
        assert_eq!(driver_ptx_isa(12060), Some((8, 5)));
        assert_eq!(driver_ptx_isa(12090), Some((8, 8)));
        assert_eq!(driver_ptx_isa(13000), Some((9, 0)));
        // Every driver from CUDA 11.0 on reads the kernels.
        for v in [11000, 11040, 12000, 12060, 13000, 13040] {
            assert!(driver_ptx_isa(v).unwrap() >= KERNEL_PTX_ISA, "{v}");
        }
    }

    #[test]
    fn pack_cuts_spans_into_chunks_with_byte_offsets() {
        let spans = [
            span(0x1000, 0x9000, 600, 0.99),
            span(0x5000, 0xA000, 0, 0.5),
            span(0x7000, 0xB000, 256, 0.999),
        ];
        let t = pack(&spans, 256);
        let got: Vec<(u64, u64, u32)> = t.iter().map(|e| (e.dst, e.src, e.len)).collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x9000, 256),
                (0x1000 + 256 * 4, 0x9000 + 256 * 2, 256),
                (0x1000 + 512 * 4, 0x9000 + 512 * 2, 88),
                (0x7000, 0xB000, 256),
            ]
        );
        assert_eq!(t[0].codes, 1 << 8);
        assert_eq!((t[0].wf, t[0].cf), (0.99f32, (1.0 - 0.99f64) as f32));
        assert_eq!((t[3].wf, t[3].cf), (0.999f32, (1.0 - 0.999f64) as f32));
        assert_eq!(as_bytes(&t).len(), 4 * 32);
        assert_eq!(&as_bytes(&t)[..8], &0x1000u64.to_ne_bytes());
        assert_eq!(&as_bytes(&t)[16..20], &256u32.to_ne_bytes());
    }

    #[test]
    fn codes_put_the_destination_low() {
        assert_eq!(codes(StorageDtype::F32, StorageDtype::F32), 0);
        assert_eq!(codes(StorageDtype::BF16, StorageDtype::F16), 1 | 2 << 8);
        assert_eq!(codes(StorageDtype::F16, StorageDtype::F32), 2);
    }

    #[test]
    fn single_blocks_stays_in_range() {
        assert_eq!(single_blocks(0), 1);
        assert_eq!(single_blocks(1), 1);
        assert_eq!(single_blocks(4096), 1);
        assert_eq!(single_blocks(4097), 2);
        assert_eq!(single_blocks(usize::MAX / 2), 65_535);
    }

    #[test]
    #[should_panic(expected = "multiple of 256")]
    fn pack_refuses_unaligned_chunks() {
        pack(&[], 100);
    }

    /// Storage of one random tensor in one dtype.
    #[derive(Clone)]
    enum Buf {
        F32(Vec<f32>),
        BF16(Vec<bf16>),
        F16(Vec<f16>),
    }

    impl Buf {
        fn random(d: StorageDtype, n: usize, seed: u64) -> Buf {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut v = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            };
            match d {
                StorageDtype::F32 => Buf::F32((0..n).map(|_| v()).collect()),
                StorageDtype::BF16 => Buf::BF16((0..n).map(|_| bf16::from_f32(v())).collect()),
                StorageDtype::F16 => Buf::F16((0..n).map(|_| f16::from_f32(v())).collect()),
            }
        }
        fn addr(&mut self) -> u64 {
            match self {
                Buf::F32(v) => v.as_mut_ptr() as u64,
                Buf::BF16(v) => v.as_mut_ptr() as u64,
                Buf::F16(v) => v.as_mut_ptr() as u64,
            }
        }
        fn view(&self) -> HostSlice<'_> {
            match self {
                Buf::F32(v) => HostSlice::F32(v),
                Buf::BF16(v) => HostSlice::BF16(v),
                Buf::F16(v) => HostSlice::F16(v),
            }
        }
        fn view_mut(&mut self) -> HostSliceMut<'_> {
            match self {
                Buf::F32(v) => HostSliceMut::F32(v),
                Buf::BF16(v) => HostSliceMut::BF16(v),
                Buf::F16(v) => HostSliceMut::F16(v),
            }
        }
    }

    /// Every dtype pair, odd sizes, several tensors per table: running the packed table
    /// gives the host fold's bits (every element covered exactly once, right offsets,
    /// coefficients and codes).
    #[test]
    fn packed_table_computes_the_host_fold() {
        let sizes = [1usize, 255, 257, 1000, 70_001];
        let w = |k: usize| 0.99 + 0.001 * k as f64;
        for (p, (dd, sd)) in DTYPES
            .iter()
            .flat_map(|&d| DTYPES.iter().map(move |&s| (d, s)))
            .enumerate()
        {
            let seed = 100 * p as u64;
            let dst: Vec<Buf> = (0..sizes.len())
                .map(|k| Buf::random(dd, sizes[k], seed + k as u64))
                .collect();
            let mut src: Vec<Buf> = (0..sizes.len())
                .map(|k| Buf::random(sd, sizes[k], seed + 50 + k as u64))
                .collect();
            let mut reference = dst.clone();
            for (k, r) in reference.iter_mut().enumerate() {
                let task = EmaTask {
                    dst: r.view_mut(),
                    src: src[k].view(),
                    w: w(k),
                };
                fused_ema(&mut [task], 1);
            }
            for chunk in [256, 4096, CHUNK_ELEMS] {
                let mut out = dst.clone();
                let spans: Vec<EmaSpan> = (0..sizes.len())
                    .map(|k| EmaSpan {
                        dst: out[k].addr(),
                        dst_dtype: dd,
                        src: src[k].addr(),
                        src_dtype: sd,
                        len: sizes[k],
                        w: w(k),
                    })
                    .collect();
                let table = pack(&spans, chunk);
                // SAFETY: every address points into `out` / `src`, alive and unaliased.
                unsafe { emulate::run(&table) };
                for k in 0..sizes.len() {
                    assert_eq!(
                        out[k].view().as_bytes(),
                        reference[k].view().as_bytes(),
                        "{dd:?} <- {sd:?}, n = {}, chunk {chunk}",
                        sizes[k]
                    );
                }
            }
        }
    }
}
