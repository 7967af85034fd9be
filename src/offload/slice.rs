//! Typed views of host memory in one of the storage dtypes.

use half::{bf16, f16};

use super::{convert, StorageDtype};

/// A read-only host tensor in its storage dtype (a slot, or a host copy of live weights).
#[derive(Debug, Clone, Copy)]
pub enum HostSlice<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
}

/// A writable host tensor in its storage dtype.
#[derive(Debug)]
pub enum HostSliceMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// bf16 elements.
    BF16(&'a mut [bf16]),
    /// f16 elements.
    F16(&'a mut [f16]),
}

/// Views `s` as its raw bytes.
fn bytes_of<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: only instantiated (below) with f32, bf16 and f16: plain-old-data types without
    // padding, so every byte of the slice is initialized; u8 has alignment 1 and the length
    // in bytes is exactly `size_of_val(s)`; the borrow of `s` is carried over.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Views `s` as its raw bytes, writable.
fn bytes_of_mut<T: Copy>(s: &mut [T]) -> &mut [u8] {
    let n = std::mem::size_of_val(s);
    // SAFETY: as in `bytes_of`; in addition every bit pattern is a valid f32, bf16 or f16,
    // so any bytes written through the view leave valid elements behind. The mutable borrow
    // of `s` is moved into the result, so there is no aliasing.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), n) }
}

impl<'a> HostSlice<'a> {
    /// A view of `n` elements of `dtype` at `ptr`.
    ///
    /// # Safety
    /// Unless `n == 0`, `ptr` must point at `n` initialized elements of `dtype`, aligned
    /// for it, that nothing writes while the view lives.
    pub(crate) unsafe fn from_raw(ptr: *const u8, dtype: StorageDtype, n: usize) -> Self {
        if n == 0 {
            return match dtype {
                StorageDtype::F32 => HostSlice::F32(&[]),
                StorageDtype::BF16 => HostSlice::BF16(&[]),
                StorageDtype::F16 => HostSlice::F16(&[]),
            };
        }
        // SAFETY: forwarded from the caller; any bit pattern is a valid f32, bf16 or f16.
        unsafe {
            match dtype {
                StorageDtype::F32 => HostSlice::F32(std::slice::from_raw_parts(ptr.cast(), n)),
                StorageDtype::BF16 => {
                    HostSlice::BF16(std::slice::from_raw_parts(ptr.cast::<bf16>(), n))
                }
                StorageDtype::F16 => {
                    HostSlice::F16(std::slice::from_raw_parts(ptr.cast::<f16>(), n))
                }
            }
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostSlice::F32(s) => s.len(),
            HostSlice::BF16(s) => s.len(),
            HostSlice::F16(s) => s.len(),
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage dtype of the elements.
    pub fn dtype(&self) -> StorageDtype {
        match self {
            HostSlice::F32(_) => StorageDtype::F32,
            HostSlice::BF16(_) => StorageDtype::BF16,
            HostSlice::F16(_) => StorageDtype::F16,
        }
    }

    /// The raw bytes (native endianness), for byte-exact copies to the device or a file.
    pub fn as_bytes(&self) -> &'a [u8] {
        match *self {
            HostSlice::F32(s) => bytes_of(s),
            HostSlice::BF16(s) => bytes_of(s),
            HostSlice::F16(s) => bytes_of(s),
        }
    }

    /// Widens every element into `out` (exact: f32, bf16 and f16 all embed in f32).
    ///
    /// # Panics
    /// If `out.len() != self.len()`.
    pub fn to_f32_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len(), "to_f32_into: length mismatch");
        match self {
            HostSlice::F32(s) => out.copy_from_slice(s),
            HostSlice::BF16(s) => convert::bf16_to_f32(s, out),
            HostSlice::F16(s) => convert::f16_to_f32(s, out),
        }
    }

    /// Splits the view at element `mid`, like `slice::split_at`.
    ///
    /// # Panics
    /// If `mid > self.len()`.
    pub fn split_at(self, mid: usize) -> (HostSlice<'a>, HostSlice<'a>) {
        match self {
            HostSlice::F32(s) => {
                let (a, b) = s.split_at(mid);
                (HostSlice::F32(a), HostSlice::F32(b))
            }
            HostSlice::BF16(s) => {
                let (a, b) = s.split_at(mid);
                (HostSlice::BF16(a), HostSlice::BF16(b))
            }
            HostSlice::F16(s) => {
                let (a, b) = s.split_at(mid);
                (HostSlice::F16(a), HostSlice::F16(b))
            }
        }
    }
}

impl<'a> HostSliceMut<'a> {
    /// A writable view of `n` elements of `dtype` at `ptr`.
    ///
    /// # Safety
    /// As [`HostSlice::from_raw`], the memory writable, and no other view of it may exist
    /// while this one lives.
    pub(crate) unsafe fn from_raw(ptr: *mut u8, dtype: StorageDtype, n: usize) -> Self {
        if n == 0 {
            return match dtype {
                StorageDtype::F32 => HostSliceMut::F32(&mut []),
                StorageDtype::BF16 => HostSliceMut::BF16(&mut []),
                StorageDtype::F16 => HostSliceMut::F16(&mut []),
            };
        }
        // SAFETY: forwarded from the caller; any bit pattern is a valid f32, bf16 or f16.
        unsafe {
            match dtype {
                StorageDtype::F32 => {
                    HostSliceMut::F32(std::slice::from_raw_parts_mut(ptr.cast(), n))
                }
                StorageDtype::BF16 => {
                    HostSliceMut::BF16(std::slice::from_raw_parts_mut(ptr.cast::<bf16>(), n))
                }
                StorageDtype::F16 => {
                    HostSliceMut::F16(std::slice::from_raw_parts_mut(ptr.cast::<f16>(), n))
                }
            }
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage dtype of the elements.
    pub fn dtype(&self) -> StorageDtype {
        self.as_slice().dtype()
    }

    /// A read-only view for the duration of the borrow.
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostSliceMut::F32(s) => HostSlice::F32(s),
            HostSliceMut::BF16(s) => HostSlice::BF16(s),
            HostSliceMut::F16(s) => HostSlice::F16(s),
        }
    }

    /// A shorter-lived writable view, so a view can be handed out and used again later.
    pub fn reborrow(&mut self) -> HostSliceMut<'_> {
        match self {
            HostSliceMut::F32(s) => HostSliceMut::F32(s),
            HostSliceMut::BF16(s) => HostSliceMut::BF16(s),
            HostSliceMut::F16(s) => HostSliceMut::F16(s),
        }
    }

    /// The raw bytes (native endianness), writable, for byte-exact copies.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostSliceMut::F32(s) => bytes_of_mut(s),
            HostSliceMut::BF16(s) => bytes_of_mut(s),
            HostSliceMut::F16(s) => bytes_of_mut(s),
        }
    }

    /// Stores `src` in the storage dtype (bf16/f16 round to nearest, ties to even).
    ///
    /// # Panics
    /// If `src.len() != self.len()`.
    pub fn copy_from_f32(&mut self, src: &[f32]) {
        assert_eq!(src.len(), self.len(), "copy_from_f32: length mismatch");
        match self {
            HostSliceMut::F32(d) => d.copy_from_slice(src),
            HostSliceMut::BF16(d) => convert::f32_to_bf16(src, d),
            HostSliceMut::F16(d) => convert::f32_to_f16(src, d),
        }
    }

    /// Splits the view at element `mid`, like `slice::split_at_mut`.
    ///
    /// # Panics
    /// If `mid > self.len()`.
    pub fn split_at_mut(self, mid: usize) -> (HostSliceMut<'a>, HostSliceMut<'a>) {
        match self {
            HostSliceMut::F32(s) => {
                let (a, b) = s.split_at_mut(mid);
                (HostSliceMut::F32(a), HostSliceMut::F32(b))
            }
            HostSliceMut::BF16(s) => {
                let (a, b) = s.split_at_mut(mid);
                (HostSliceMut::BF16(a), HostSliceMut::BF16(b))
            }
            HostSliceMut::F16(s) => {
                let (a, b) = s.split_at_mut(mid);
                (HostSliceMut::F16(a), HostSliceMut::F16(b))
            }
        }
    }
}
