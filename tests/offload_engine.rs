//! The copy engine (streams, fences, cross-stream order, errors) and the staging area.
//!
//! Orderings are checked on the exact sequence of recorded events; nothing here depends on
//! timing: blocked states are set up with channels and observed through `is_done`,
//! `waiting` and `in_use`, never with sleeps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use ldt::offload::{
    CopyEngine, CounterpartBuffer, OffloadConfig, OffloadError, SharedCounterpartBuffer, SlotSpec,
    StagingArea, StorageDtype,
};

/// Jobs on one stream run in submission order: the recorded sequence is exactly 0..1000
/// on each of 3 streams, while the streams run concurrently.
#[test]
fn one_stream_runs_in_order() {
    let engine = CopyEngine::new(3);
    assert_eq!(engine.streams(), 3);
    let logs: Vec<Arc<Mutex<Vec<usize>>>> = (0..3).map(|_| Arc::default()).collect();
    let mut last = Vec::new();
    for i in 0..1000 {
        for (s, log) in logs.iter().enumerate() {
            let log = log.clone();
            last.push(engine.submit(s, move || {
                log.lock().unwrap().push(i);
                Ok(())
            }));
        }
    }
    for f in &last {
        f.wait().unwrap();
    }
    for log in &logs {
        assert_eq!(*log.lock().unwrap(), (0..1000).collect::<Vec<_>>());
    }
}

/// `submit_after` orders across streams: a job on stream 1 that waits for a gated job
/// on stream 0 does not run before the gate opens, and then runs after it; meanwhile
/// stream 0's gate job is observably pending.
#[test]
fn submit_after_orders_across_streams() {
    let engine = CopyEngine::new(2);
    let (open, gate) = mpsc::channel::<()>();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let upload = engine.submit(0, move || {
        gate.recv().map_err(|e| e.to_string())?;
        l.lock().unwrap().push("upload");
        Ok(())
    });
    let l = log.clone();
    let fold = engine.submit_after(1, std::slice::from_ref(&upload), move || {
        l.lock().unwrap().push("fold");
        Ok(())
    });
    // A later job on stream 1 waits behind the dependent one.
    let l = log.clone();
    let after = engine.submit(1, move || {
        l.lock().unwrap().push("after");
        Ok(())
    });
    assert!(!upload.is_done() && !fold.is_done() && !after.is_done());
    assert!(log.lock().unwrap().is_empty());
    open.send(()).unwrap();
    after.wait().unwrap();
    assert!(upload.is_done() && fold.is_done());
    assert_eq!(*log.lock().unwrap(), vec!["upload", "fold", "after"]);
    // `record` completes after everything queued so far on its stream.
    engine.record(0).wait().unwrap();
}

/// A job's error, and a panicking job, come back through `wait` as errors (the panic
/// message included); the stream keeps working afterwards; a job that depends on a failed
/// one is not run and fails with the prerequisite's error.
#[test]
fn errors_and_panics_come_back_through_wait() {
    let engine = CopyEngine::new(2);
    let failed = engine.submit(0, || Err("disk full".to_string()));
    let err = failed.wait().unwrap_err();
    assert_eq!(err, "disk full");
    assert!(failed.is_done());

    let panicked = engine.submit(0, || panic!("slot 3 out of range"));
    let err = panicked.wait().unwrap_err();
    assert!(
        err.contains("panicked") && err.contains("slot 3 out of range"),
        "{err}"
    );
    // Waiting again, or on a clone, gives the same answer.
    assert_eq!(panicked.clone().wait().unwrap_err(), err);

    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let dependent = engine.submit_after(1, std::slice::from_ref(&failed), move || {
        r.store(true, Ordering::SeqCst);
        Ok(())
    });
    let err = dependent.wait().unwrap_err();
    assert!(
        err.contains("skipped") && err.contains("disk full"),
        "{err}"
    );
    assert!(
        !ran.load(Ordering::SeqCst),
        "a dependent of a failed job must not run"
    );

    // Stream 0 survived the panic.
    engine.submit(0, || Ok(())).wait().unwrap();
}

/// Dropping the engine runs every queued job and joins the workers.
#[test]
fn drop_finishes_queued_jobs() {
    let engine = CopyEngine::new(2);
    let (open, gate) = mpsc::channel::<()>();
    let first = engine.submit(0, move || gate.recv().map_err(|e| e.to_string()));
    let queued: Vec<_> = (0..100).map(|k| engine.submit(k % 2, || Ok(()))).collect();
    open.send(()).unwrap();
    drop(engine);
    assert!(first.is_done());
    assert!(queued.iter().all(|f| f.is_done() && f.wait().is_ok()));
}

/// Two streams copy into disjoint slots of a shared buffer concurrently; a third job,
/// ordered after both, sees both copies complete (bitwise).
#[test]
fn streams_fill_a_shared_buffer() {
    let specs: Vec<SlotSpec> = (0..8)
        .map(|i| SlotSpec {
            name: format!("layer{i}"),
            numel: 5000,
            dtype: StorageDtype::BF16,
        })
        .collect();
    let cfg = OffloadConfig {
        host_budget_bytes: u64::MAX,
        file_path: None,
        staging_bytes: 0,
        threads: 1,
    };
    let shared = SharedCounterpartBuffer::new(CounterpartBuffer::allocate(&specs, &cfg).unwrap());
    let engine = CopyEngine::new(2);
    let fences: Vec<_> = (0..2)
        .map(|s| {
            let b = shared.clone();
            engine.submit(s, move || {
                for i in (s..8).step_by(2) {
                    let v = vec![i as f32 + 0.5; 5000];
                    b.write(i).slice_mut().copy_from_f32(&v);
                }
                Ok(())
            })
        })
        .collect();
    let b = shared.clone();
    let check = engine.submit_after(0, &fences, move || {
        for i in 0..8 {
            let mut got = vec![0f32; 5000];
            b.read(i).slice().to_f32_into(&mut got);
            if got.iter().any(|x| *x != i as f32 + 0.5) {
                return Err(format!("slot {i} incomplete"));
            }
        }
        Ok(())
    });
    check.wait().unwrap();
}

/// A staging request blocks while the area is short, and proceeds once a lease is
/// dropped; the accounting follows (in_use, waiting); `try_acquire` does not jump the
/// queue; a request larger than the whole area is an error naming the setting.
#[test]
fn staging_blocks_until_released() {
    let area = StagingArea::new(100);
    assert_eq!(area.capacity(), 100);
    let first = area.acquire(80).unwrap();
    assert_eq!((first.bytes(), area.in_use()), (80, 80));

    let (tx, rx) = mpsc::channel();
    let a = area.clone();
    let waiter = std::thread::spawn(move || {
        let lease = a.acquire(50).unwrap();
        tx.send(lease.bytes()).unwrap();
        lease
    });
    // Wait (without sleeping) until the request is queued; it cannot be served: 80 + 50.
    while area.waiting() == 0 {
        std::thread::yield_now();
    }
    assert!(
        rx.try_recv().is_err(),
        "acquired although the area was full"
    );
    assert_eq!(area.in_use(), 80);
    // 10 bytes would fit, but a queued request comes first.
    assert!(area.try_acquire(10).unwrap().is_none());

    drop(first);
    assert_eq!(rx.recv().unwrap(), 50);
    let second = waiter.join().unwrap();
    assert_eq!((area.in_use(), area.waiting()), (50, 0));
    let third = area.try_acquire(50).unwrap().expect("50 of 100 are free");
    assert!(area.try_acquire(1).unwrap().is_none());
    drop((second, third));
    assert_eq!(area.in_use(), 0);

    let err = area.acquire(101).unwrap_err();
    assert!(
        matches!(
            err,
            OffloadError::StagingTooSmall {
                requested: 101,
                capacity: 100
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("offload.staging_bytes"), "{err}");
}

/// Leases moved into copy jobs bound the bytes in flight: 16 chunked jobs of 40 bytes on
/// 4 streams through a 100-byte area never hold more than 100 bytes at once.
#[test]
fn staging_bounds_bytes_in_flight() {
    let area = StagingArea::new(100);
    let engine = CopyEngine::new(4);
    let peak = Arc::new(Mutex::new(0u64));
    let fences: Vec<_> = (0..16)
        .map(|k| {
            let lease = area.acquire(40).unwrap();
            let (a, p) = (area.clone(), peak.clone());
            engine.submit(k % 4, move || {
                let mut peak = p.lock().unwrap();
                *peak = (*peak).max(a.in_use());
                drop(lease);
                Ok(())
            })
        })
        .collect();
    for f in fences {
        f.wait().unwrap();
    }
    assert!(*peak.lock().unwrap() <= 100);
    assert_eq!(area.in_use(), 0);
}
