//! The counterpart buffer: placement, round trips, the file tier, errors, shared access.
//!
//! Tolerance: none anywhere. Round trips compare bits (f32 exactly; bf16/f16 equal to
//! `half`'s rounding of the written f32), and the RAM and file tiers must hold identical
//! bytes.

use std::path::PathBuf;

use half::{bf16, f16};
use ldt::offload::{
    fused_ema, CounterpartBuffer, EmaTask, HostSlice, OffloadConfig, OffloadError,
    SharedCounterpartBuffer, SlotSpec, StorageDtype,
};

fn spec(name: &str, numel: usize, dtype: StorageDtype) -> SlotSpec {
    SlotSpec {
        name: name.to_string(),
        numel,
        dtype,
    }
}

fn cfg(budget: u64, file: Option<PathBuf>) -> OffloadConfig {
    OffloadConfig {
        host_budget_bytes: budget,
        file_path: file,
        staging_bytes: 1 << 20,
        threads: 2,
    }
}

/// Deterministic values of varied magnitude and sign.
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let k = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            let sign = if k & 1 == 0 { 1.0 } else { -1.0 };
            sign * (k % 10_007) as f32 / 977.0 * 2f32.powi((k % 13) as i32 - 6)
        })
        .collect()
}

/// One slot of every dtype plus odd sizes and an empty one.
fn mixed_specs() -> Vec<SlotSpec> {
    vec![
        spec("a.weight", 1000, StorageDtype::F32),
        spec("a.bias", 7, StorageDtype::BF16),
        spec("b.weight", 4099, StorageDtype::F16),
        spec("empty", 0, StorageDtype::F32),
        spec("c.weight", 20_000, StorageDtype::BF16),
        spec("c.bias", 33, StorageDtype::F32),
        spec("d.weight", 12_345, StorageDtype::F16),
    ]
}

/// `x` rounded to `dtype` by `half`, back in f32.
fn rounded(x: f32, dtype: StorageDtype) -> f32 {
    match dtype {
        StorageDtype::F32 => x,
        StorageDtype::BF16 => bf16::from_f32(x).to_f32(),
        StorageDtype::F16 => f16::from_f32(x).to_f32(),
    }
}

/// write_from_f32 then read_into_f32 gives back each value rounded to the slot's dtype
/// (bitwise); write_bytes then read_bytes gives back the same bytes; every slot is
/// 64-byte aligned.
#[test]
fn round_trip_every_dtype() {
    let specs = mixed_specs();
    let mut buf = CounterpartBuffer::allocate(&specs, &cfg(u64::MAX, None)).unwrap();
    assert_eq!(buf.len(), specs.len());
    assert_eq!(buf.bytes_in_file(), 0);
    for (i, s) in specs.iter().enumerate() {
        assert_eq!(buf.spec(i), s);
        let v = values(s.numel, i as u32);
        buf.write_from_f32(i, &v).unwrap();
        let mut back = vec![0f32; s.numel];
        buf.read_into_f32(i, &mut back).unwrap();
        for (k, (x, y)) in v.iter().zip(&back).enumerate() {
            assert_eq!(
                y.to_bits(),
                rounded(*x, s.dtype).to_bits(),
                "slot {i} elem {k}"
            );
        }
        let bytes: Vec<u8> = (0..s.numel * s.dtype.size_of())
            .map(|k| (k * 31 + i) as u8)
            .collect();
        buf.write_bytes(i, &bytes).unwrap();
        let mut back = vec![0u8; bytes.len()];
        buf.read_bytes(i, &mut back).unwrap();
        assert_eq!(back, bytes, "slot {i} bytes");
        let slot = buf.slot(i);
        assert_eq!((slot.len(), slot.dtype()), (s.numel, s.dtype));
        if !slot.is_empty() {
            assert_eq!(
                slot.as_bytes().as_ptr() as usize % 64,
                0,
                "slot {i} alignment"
            );
        }
    }
}

/// Fills a buffer with the same writes and the same fused EMA, returning every slot's bytes.
fn exercise(buf: &mut CounterpartBuffer) -> Vec<Vec<u8>> {
    let n = buf.len();
    for i in 0..n {
        let v = values(buf.spec(i).numel, 100 + i as u32);
        buf.write_from_f32(i, &v).unwrap();
    }
    let srcs: Vec<Vec<f32>> = (0..n)
        .map(|i| values(buf.spec(i).numel, 200 + i as u32))
        .collect();
    let idx: Vec<usize> = (0..n).collect();
    let mut tasks: Vec<EmaTask<'_>> = buf
        .slots_mut(&idx)
        .unwrap()
        .into_iter()
        .zip(&srcs)
        .enumerate()
        .map(|(i, (dst, s))| EmaTask {
            dst,
            src: HostSlice::F32(s),
            w: 0.99 + 0.001 * i as f64,
        })
        .collect();
    fused_ema(&mut tasks, 3);
    (0..n).map(|i| buf.slot(i).as_bytes().to_vec()).collect()
}

/// RAM-only and spilled layouts of the same slots hold identical bytes after identical
/// work; with a small budget the spilled slots are in the file (bytes_in_file > 0, the
/// file has exactly that size and contains the slot's bytes) and the file is removed on
/// drop. A later slot that still fits goes to RAM even after an earlier one spilled.
#[test]
fn ram_and_file_tiers_hold_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counterparts.bin");
    let specs = mixed_specs();

    let mut ram = CounterpartBuffer::allocate(&specs, &cfg(u64::MAX, None)).unwrap();
    assert_eq!(ram.bytes_in_file(), 0);
    assert!(ram.bytes_in_ram() > 0);
    let want = exercise(&mut ram);

    // 4288 bytes of RAM: slots 0 (4000 bytes at 0) and 1 (14 at 4032) fit, 2 and 4 spill,
    // 5 (132 at 4096) still fits after them, 6 spills.
    let budget = 4288;
    let mut split = CounterpartBuffer::allocate(&specs, &cfg(budget, Some(path.clone()))).unwrap();
    assert_eq!(split.bytes_in_ram(), 4228);
    assert!(split.bytes_in_file() > 0);
    assert_eq!(
        split.total_bytes(),
        split.bytes_in_ram() + split.bytes_in_file()
    );
    let in_file: Vec<bool> = (0..specs.len()).map(|i| split.is_in_file(i)).collect();
    assert_eq!(
        in_file,
        vec![false, false, true, false, true, false, true],
        "placement"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        split.bytes_in_file(),
        "the file is sized exactly"
    );
    let got = exercise(&mut split);
    assert_eq!(got, want, "RAM-only and spilled layouts differ");

    // The spilled slot's bytes are really in the file (a shared mapping of it).
    let file = std::fs::read(&path).unwrap();
    let slot4 = split.slot(4).as_bytes();
    assert!(
        file.chunks(64)
            .enumerate()
            .any(|(k, _)| file[k * 64..].starts_with(slot4)),
        "slot 4 not found in the file"
    );
    drop(split);
    assert!(!path.exists(), "the spill file must be removed on drop");
}

/// Without a file path, a budget too small is an error naming the bytes needed, the
/// budget and both settings to change.
#[test]
fn budget_too_small_without_path_is_an_actionable_error() {
    let specs = vec![
        spec("big", 1 << 20, StorageDtype::F32),
        spec("small", 3, StorageDtype::BF16),
    ];
    let err = CounterpartBuffer::allocate(&specs, &cfg(1 << 20, None)).unwrap_err();
    // 4 MiB for "big", then 6 bytes at the next 64-byte boundary.
    let needed = (4u64 << 20) + 6;
    match &err {
        OffloadError::HostBudget { needed: n, budget } => {
            assert_eq!((*n, *budget), (needed, 1 << 20));
        }
        other => panic!("wrong error {other:?}"),
    }
    let text = err.to_string();
    for part in [
        needed.to_string().as_str(),
        "1048576",
        "offload.host_bytes",
        "offload.path",
    ] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
}

/// A host allocation the system refuses is an error, not an abort.
#[test]
fn impossible_allocation_is_an_error() {
    // 2^62 bytes: a valid layout, but beyond any address space.
    let specs = vec![spec("huge", 1 << 60, StorageDtype::F32)];
    let err = CounterpartBuffer::allocate(&specs, &cfg(u64::MAX, None)).unwrap_err();
    assert!(
        matches!(err, OffloadError::HostAlloc { .. }),
        "wrong error {err:?}"
    );
    assert!(err.to_string().contains("offload.host_bytes"));
    let specs = vec![spec("overflow", usize::MAX / 2, StorageDtype::F32)];
    let err = CounterpartBuffer::allocate(&specs, &cfg(u64::MAX, None)).unwrap_err();
    assert!(
        matches!(err, OffloadError::SlotTooLarge { .. }),
        "wrong error {err:?}"
    );
}

/// An existing file at the path is never overwritten: the error names the path and the
/// setting, and the file is left as it was.
#[test]
fn existing_spill_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken.bin");
    std::fs::write(&path, b"keep me").unwrap();
    let specs = vec![spec("x", 100, StorageDtype::F32)];
    let err = CounterpartBuffer::allocate(&specs, &cfg(0, Some(path.clone()))).unwrap_err();
    assert!(matches!(err, OffloadError::File { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("taken.bin") && text.contains("offload.path"),
        "{text}"
    );
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

/// Wrong lengths, bad indices and repeated indices are errors, not panics.
#[test]
fn misuse_is_reported() {
    let specs = mixed_specs();
    let mut buf = CounterpartBuffer::allocate(&specs, &cfg(u64::MAX, None)).unwrap();
    let e = buf.write_from_f32(0, &[0.0; 3]).unwrap_err();
    assert!(matches!(
        e,
        OffloadError::SizeMismatch {
            expected: 1000,
            got: 3,
            ..
        }
    ));
    assert!(e.to_string().contains("a.weight"));
    let e = buf.read_bytes(1, &mut [0u8; 7]).unwrap_err();
    assert!(matches!(
        e,
        OffloadError::SizeMismatch {
            expected: 14,
            got: 7,
            ..
        }
    ));
    let e = buf.write_bytes(99, &[]).unwrap_err();
    assert!(matches!(e, OffloadError::SlotIndex { index: 99, len: 7 }));
    let e = buf.slots_mut(&[0, 2, 0]).unwrap_err();
    assert!(matches!(e, OffloadError::SlotRepeated { index: 0 }));
    let e = buf.slots_mut(&[1, 7]).unwrap_err();
    assert!(matches!(e, OffloadError::SlotIndex { index: 7, .. }));
    let views = buf.slots_mut(&[6, 0, 3]).unwrap();
    let lens: Vec<usize> = views.iter().map(|v| v.len()).collect();
    assert_eq!(lens, vec![12_345, 1000, 0], "views come in the order asked");
}

/// A zero budget with a file puts every non-empty slot in the file and allocates no RAM.
#[test]
fn everything_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.bin");
    let specs = mixed_specs();
    let mut buf = CounterpartBuffer::allocate(&specs, &cfg(0, Some(path))).unwrap();
    assert_eq!(buf.bytes_in_ram(), 0);
    assert_eq!(buf.host_arena().1, 0);
    for i in 0..buf.len() {
        assert_eq!(buf.is_in_file(i), buf.spec(i).numel > 0, "slot {i}");
    }
    let mut ram = CounterpartBuffer::allocate(&specs, &cfg(u64::MAX, None)).unwrap();
    assert_eq!(buf.bytes_in_file(), ram.bytes_in_ram());
    assert_eq!(exercise(&mut buf), exercise(&mut ram));
}

/// Shared access: 4 threads each write their own slots through write guards while
/// others read finished slots; at the end every slot holds exactly what its writer wrote
/// (bitwise), and the buffer comes back out of the Arc.
#[test]
fn shared_buffer_concurrent_disjoint_writes() {
    let n_slots = 16;
    let specs: Vec<SlotSpec> = (0..n_slots)
        .map(|i| spec(&format!("s{i}"), 10_000 + i, StorageDtype::F32))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let buf =
        CounterpartBuffer::allocate(&specs, &cfg(100_000, Some(dir.path().join("s.bin")))).unwrap();
    assert!(buf.bytes_in_file() > 0, "some slots must be in the file");
    let shared = SharedCounterpartBuffer::new(buf);
    assert_eq!(shared.len(), n_slots);
    std::thread::scope(|s| {
        for t in 0..4 {
            let shared = shared.clone();
            s.spawn(move || {
                for round in 0..20 {
                    for i in (t..n_slots).step_by(4) {
                        let v = values(shared.spec(i).numel, (i * 1000 + round) as u32);
                        shared.write(i).slice_mut().copy_from_f32(&v);
                    }
                    // Read a slot another thread writes: it must be one whole write.
                    let other = (t + 1) % 4;
                    let g = shared.read(other);
                    let mut got = vec![0f32; g.slice().len()];
                    g.slice().to_f32_into(&mut got);
                    let whole = got.iter().all(|x| *x == 0.0)
                        || (0..20).any(|r| got == values(got.len(), (other * 1000 + r) as u32));
                    assert!(whole, "torn read of slot {other}");
                }
            });
        }
    });
    let guards = shared.write_many(&[5, 1, 9]).unwrap();
    assert_eq!(guards[0].slice().len(), 10_005);
    assert_eq!(guards[1].slice().len(), 10_001);
    drop(guards);
    assert!(matches!(
        shared.write_many(&[2, 2]),
        Err(OffloadError::SlotRepeated { index: 2 })
    ));
    let buf = shared.try_unwrap().unwrap();
    for i in 0..n_slots {
        let mut got = vec![0f32; buf.spec(i).numel];
        buf.read_into_f32(i, &mut got).unwrap();
        assert_eq!(got, values(got.len(), (i * 1000 + 19) as u32), "slot {i}");
    }
}
