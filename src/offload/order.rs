//! Ordering of asynchronous work for a device backend, independent of CUDA: which queue
//! waits for what before it touches a counterpart slot, and how a transfer is cut into
//! pieces that fit the device staging area.
//!
//! A device backend has three queues (CUDA streams): the compute queue the network runs
//! on, and one copy queue per direction. Work on one queue completes in order, so for a
//! slot it is enough to remember its last write and, since then, the last read on each
//! queue: a reader waits for the last write, a writer for the last write and every read
//! after it. Host work (a fold on the host's threads) appears as a [`Fence`].

use super::Fence;

/// The queues of a device backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Queue {
    /// The stream the network's forward, backward and optimizer run on.
    Compute,
    /// The copy stream towards the device (host to device, and device-to-device copies
    /// into live tensors).
    H2D,
    /// The copy stream towards the host (device to host, and kernels that write host
    /// memory).
    D2H,
}

impl Queue {
    /// Every queue, in index order.
    pub const ALL: [Queue; 3] = [Queue::Compute, Queue::H2D, Queue::D2H];

    /// Position in [`Queue::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Queue::Compute => 0,
            Queue::H2D => 1,
            Queue::D2H => 2,
        }
    }
}

/// Something later work must wait for: a recorded point of a device queue, or a host job.
#[derive(Clone, Debug)]
pub enum Dep<E> {
    /// Completes when the device queue reaches the recorded point.
    Device(E),
    /// Completes when the host job finishes.
    Host(Fence),
}

/// What one slot's next accesses must wait for.
#[derive(Clone, Debug)]
struct SlotDeps<E> {
    last_write: Option<Dep<E>>,
    reads: [Option<E>; 3],
}

impl<E> Default for SlotDeps<E> {
    fn default() -> Self {
        SlotDeps {
            last_write: None,
            reads: [None, None, None],
        }
    }
}

/// The accesses in flight on every slot of one counterpart buffer.
#[derive(Clone, Debug)]
pub struct SlotOrder<E> {
    slots: Vec<SlotDeps<E>>,
}

impl<E: Clone> SlotOrder<E> {
    /// Nothing in flight on `n` slots.
    pub fn new(n: usize) -> Self {
        SlotOrder {
            slots: (0..n).map(|_| SlotDeps::default()).collect(),
        }
    }

    /// What a read of `slot` must wait for: its last write.
    ///
    /// # Panics
    /// If `slot` is out of range.
    pub fn for_read(&self, slot: usize) -> Vec<Dep<E>> {
        self.slots[slot].last_write.iter().cloned().collect()
    }

    /// What a write of `slot` must wait for: its last write and every read since.
    ///
    /// # Panics
    /// If `slot` is out of range.
    pub fn for_write(&self, slot: usize) -> Vec<Dep<E>> {
        let s = &self.slots[slot];
        s.last_write
            .iter()
            .cloned()
            .chain(s.reads.iter().flatten().cloned().map(Dep::Device))
            .collect()
    }

    /// Records a read of `slot` on queue `q`, complete at `e`. It stands for every earlier
    /// read on `q` (a queue completes in order).
    ///
    /// # Panics
    /// If `slot` is out of range.
    pub fn read(&mut self, slot: usize, q: Queue, e: E) {
        self.slots[slot].reads[q.index()] = Some(e);
    }

    /// Records a write of `slot`, complete at `dep`; the writer waited for everything
    /// [`SlotOrder::for_write`] returned, so earlier accesses need no more tracking.
    ///
    /// # Panics
    /// If `slot` is out of range.
    pub fn write(&mut self, slot: usize, dep: Dep<E>) {
        self.slots[slot] = SlotDeps {
            last_write: Some(dep),
            reads: [None, None, None],
        };
    }
}

/// One contiguous piece of a tensor that goes through a staging half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Which of the transfer's tensors.
    pub job: usize,
    /// First element of the piece in the tensor.
    pub start: usize,
    /// Elements in the piece.
    pub len: usize,
    /// Byte offset of the piece in the staging half.
    pub offset: usize,
}

/// Byte alignment of every piece inside a staging half.
pub const PIECE_ALIGN: usize = 256;

/// Elements a piece is cut at (except a tensor's last piece), so every piece of a tensor
/// starts as aligned as the tensor for the kernels.
pub const PIECE_ELEMS: usize = 256;

/// Smallest staging half [`plan_fills`] accepts: one cut of the widest dtype (f32).
pub const MIN_HALF_BYTES: usize = PIECE_ELEMS * 4;

/// Cuts tensors of `(elements, bytes per element)` into pieces and groups them into
/// *fills* of one staging half of `half` bytes each: a fill is copied in, folded by one
/// launch and copied out before its half is used again. Pieces start at
/// [`PIECE_ALIGN`]-aligned offsets, and a tensor is cut at multiples of [`PIECE_ELEMS`]
/// elements; tensors are visited in order and empty ones are left out.
///
/// # Panics
/// If `half < MIN_HALF_BYTES` or an element size is not 1, 2 or 4.
pub fn plan_fills(tensors: &[(usize, usize)], half: usize) -> Vec<Vec<Piece>> {
    assert!(
        half >= MIN_HALF_BYTES,
        "plan_fills: a staging half of {half} bytes is below {MIN_HALF_BYTES}"
    );
    let mut fills: Vec<Vec<Piece>> = Vec::new();
    let mut fill: Vec<Piece> = Vec::new();
    let mut used = 0usize;
    for (job, &(n, esize)) in tensors.iter().enumerate() {
        assert!(
            matches!(esize, 1 | 2 | 4),
            "plan_fills: element size {esize}"
        );
        let mut start = 0;
        while start < n {
            let offset = used.next_multiple_of(PIECE_ALIGN);
            let room = half.saturating_sub(offset) / esize;
            let left = n - start;
            let len = if left <= room {
                left
            } else {
                room / PIECE_ELEMS * PIECE_ELEMS
            };
            if len == 0 {
                fills.push(std::mem::take(&mut fill));
                used = 0;
                continue;
            }
            fill.push(Piece {
                job,
                start,
                len,
                offset,
            });
            used = offset + len * esize;
            start += len;
        }
    }
    if !fill.is_empty() {
        fills.push(fill);
    }
    fills
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_wait_for_the_last_write_only() {
        let mut o: SlotOrder<u32> = SlotOrder::new(2);
        assert!(o.for_read(0).is_empty());
        assert!(o.for_write(0).is_empty());
        o.write(0, Dep::Device(1));
        o.read(0, Queue::H2D, 2);
        o.read(0, Queue::H2D, 3);
        o.read(0, Queue::Compute, 4);
        let ids = |d: Vec<Dep<u32>>| -> Vec<u32> {
            d.into_iter()
                .map(|x| match x {
                    Dep::Device(e) => e,
                    Dep::Host(_) => 0,
                })
                .collect()
        };
        assert_eq!(ids(o.for_read(0)), vec![1]);
        // The last read per queue stands for the earlier ones on that queue.
        assert_eq!(ids(o.for_write(0)), vec![1, 4, 3]);
        // A write replaces everything before it.
        o.write(0, Dep::Device(5));
        assert_eq!(ids(o.for_write(0)), vec![5]);
        assert!(o.for_read(1).is_empty());
    }

    #[test]
    fn host_writes_are_waited_for() {
        let mut o: SlotOrder<u32> = SlotOrder::new(1);
        let engine = crate::offload::CopyEngine::new(1);
        let f = engine.submit(0, || Ok(()));
        o.write(0, Dep::Host(f));
        assert!(matches!(o.for_read(0)[..], [Dep::Host(_)]));
        o.read(0, Queue::D2H, 9);
        assert_eq!(o.for_write(0).len(), 2);
    }

    /// Every element of every tensor lands in exactly one piece, pieces fit their half
    /// without overlapping, and offsets and cuts are aligned.
    #[test]
    fn fills_cover_every_element_once() {
        let tensors = [(1, 4), (300, 4), (0, 2), (1000, 2), (77, 4), (5000, 4)];
        for half in [1024, 1100, 2048, 4096, 1 << 20] {
            let fills = plan_fills(&tensors, half);
            let mut next = vec![0usize; tensors.len()];
            for fill in &fills {
                assert!(!fill.is_empty());
                let mut end = 0;
                for p in fill {
                    let esize = tensors[p.job].1;
                    assert_eq!(p.start, next[p.job], "pieces in order, no gap");
                    assert!(p.len > 0);
                    assert_eq!(p.offset % PIECE_ALIGN, 0);
                    assert!(p.offset >= end, "no overlap");
                    end = p.offset + p.len * esize;
                    assert!(end <= half, "fits the half");
                    if p.start + p.len < tensors[p.job].0 {
                        assert_eq!(p.len % PIECE_ELEMS, 0, "cut at a multiple");
                    }
                    next[p.job] += p.len;
                }
            }
            for (k, t) in tensors.iter().enumerate() {
                assert_eq!(next[k], t.0, "tensor {k} covered with half {half}");
            }
        }
        // Small tensors share a fill.
        assert_eq!(plan_fills(&[(10, 4), (10, 4), (10, 2)], 1 << 20).len(), 1);
        assert!(plan_fills(&[], 1024).is_empty());
    }

    #[test]
    #[should_panic(expected = "below")]
    fn a_half_smaller_than_one_cut_is_refused() {
        plan_fills(&[(1, 4)], 512);
    }
}
