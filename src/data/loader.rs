//! Batch order (seeded shuffles or a fixed schedule) and prefetch threads that gather
//! (decode, augment) the next batches while the current step computes.

use super::dataset::{HostBatch, Pool};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use crossbeam::channel::{bounded, Receiver};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// Where the next batch's indices come from.
#[derive(Clone)]
pub enum BatchOrder {
    /// Seeded epoch-wise shuffles of `indices`; batches run across epoch ends.
    Shuffle {
        /// Candidate global indices.
        indices: Vec<usize>,
        /// Examples per batch.
        batch: usize,
        /// Generator of the permutations.
        rng: Rng,
        /// Current permutation of `indices` positions.
        perm: Vec<usize>,
        /// Next position in `perm`.
        pos: usize,
    },
    /// A fixed list of batches, used in order.
    Fixed(std::collections::VecDeque<Vec<usize>>),
}

impl BatchOrder {
    /// Seeded shuffling over `indices`.
    pub fn shuffle(indices: Vec<usize>, batch: usize, rng: Rng) -> Self {
        BatchOrder::Shuffle {
            indices,
            batch,
            rng,
            perm: Vec::new(),
            pos: 0,
        }
    }

    /// A fixed schedule.
    pub fn fixed(batches: Vec<Vec<usize>>) -> Self {
        BatchOrder::Fixed(batches.into())
    }

    /// Batches a fixed schedule still holds (`None` for shuffles: unlimited).
    pub fn remaining(&self) -> Option<usize> {
        match self {
            BatchOrder::Fixed(b) => Some(b.len()),
            BatchOrder::Shuffle { .. } => None,
        }
    }

    /// Advances past `n` batches without gathering them (resume).
    pub fn skip(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            if self.next_batch().is_none() {
                bail!("the batch order ends before the resumed step {n}");
            }
        }
        Ok(())
    }

    /// Indices of the next batch.
    pub fn next_batch(&mut self) -> Option<Vec<usize>> {
        match self {
            BatchOrder::Fixed(b) => b.pop_front(),
            BatchOrder::Shuffle {
                indices,
                batch,
                rng,
                perm,
                pos,
            } => {
                if indices.is_empty() {
                    return None;
                }
                let mut out = Vec::with_capacity(*batch);
                while out.len() < *batch {
                    if *pos >= perm.len() {
                        *perm = rng.permutation(indices.len());
                        *pos = 0;
                    }
                    out.push(indices[perm[*pos]]);
                    *pos += 1;
                }
                Some(out)
            }
        }
    }
}

/// What a loader gathers: which stage's batches (its augmentation draws), from which
/// batch position, how many, on how many threads, how far ahead.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The stage's name (`train`, `warmup`, `stats`, ...): keys its augmentation.
    /// `None` gathers evaluation batches (no augmentation).
    pub stage: Option<String>,
    /// Position of the first batch in the stage's order (the batches skipped on resume).
    pub first: usize,
    /// Batches to produce.
    pub count: usize,
    /// Gathering threads; batch `k` is gathered by thread `k % workers`.
    pub workers: usize,
    /// Batches each thread prepares ahead of the consumer.
    pub depth: usize,
}

/// Produces a plan's batches on background threads, in order, ahead of the consumer.
pub struct Loader {
    rx: Vec<Receiver<Result<HostBatch>>>,
    next: usize,
    left: usize,
}

impl Loader {
    /// Starts the gathering threads. A fixed order with fewer than `count` batches is an
    /// error here, before any training.
    pub fn spawn(pool: Pool, order: BatchOrder, plan: Plan) -> Result<Loader> {
        let count = plan.count;
        if let Some(r) = order.remaining() {
            if r < count {
                bail!("the batch schedule holds {r} batches but the run needs {count}; lower the step count or use a longer schedule (`data.schedule`)");
            }
        }
        if let BatchOrder::Shuffle { indices, batch, .. } = &order {
            if count > 0 && indices.is_empty() {
                bail!("no source training examples to draw batches from; check the source domains (`data.sources` or the manifest's roles) and `stage1.split_fraction`");
            }
            // Larger batches would repeat examples within a batch (and a huge value
            // would exhaust memory in the loader thread instead of failing here).
            if *batch > indices.len() {
                bail!(
                    "a batch of {batch} examples is larger than the {} examples it is drawn from; \
                     lower `train.batch_size` (or `stage1.stat_batch_size` for the stage-1 \
                     statistics, drawn from the `1 - stage1.split_fraction` share)",
                    indices.len()
                );
            }
        }
        if let BatchOrder::Fixed(batches) = &order {
            // Checked here, before training, rather than in the loader thread mid-run.
            for (b, ix) in batches.iter().take(count).enumerate() {
                if let Some(&g) = ix.iter().find(|&&g| g >= pool.len()) {
                    bail!(
                        "the batch schedule (`data.schedule`) holds example index {g} in batch {b}, \
                         but the source training splits hold {} examples (indices 0..{}); \
                         the schedule was made for other data",
                        pool.len(),
                        pool.len()
                    );
                }
                if ix.is_empty() {
                    bail!("the batch schedule (`data.schedule`) holds an empty batch {b}");
                }
            }
        }
        let workers = plan.workers.clamp(1, count.max(1));
        let stage = plan.stage.as_deref().map(crate::rng::name_key);
        let mut rx = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, r) = bounded(plan.depth.max(1));
            rx.push(r);
            // Every thread replays the (cheap) order and gathers its own share.
            let (mut order, pool) = (order.clone(), pool.clone());
            let first = plan.first;
            std::thread::Builder::new()
                .name(format!("ldt-loader-{w}"))
                .spawn(move || {
                    for k in 0..count {
                        let ix = order.next_batch();
                        if k % workers != w {
                            continue;
                        }
                        let b = match ix {
                            Some(ix) => pool.gather(&ix, stage.map(|s| (s, (first + k) as u64))),
                            None => Err(anyhow::anyhow!("the batch order ran out of examples")),
                        };
                        if tx.send(b).is_err() {
                            return;
                        }
                    }
                })
                .context("cannot start a loader thread")?;
        }
        Ok(Loader {
            rx,
            next: 0,
            left: count,
        })
    }

    /// The next batch (blocks only if the loader is behind).
    pub fn next_batch(&mut self) -> Result<HostBatch> {
        if self.left == 0 {
            bail!("loader: all planned batches were consumed");
        }
        self.left -= 1;
        let k = self.next;
        self.next += 1;
        self.rx[k % self.rx.len()]
            .recv()
            .context("a loader thread stopped")?
    }
}

/// Reads an i64 tensor of a schedule file and checks its rank.
fn read_i64(
    st: &SafeTensors<'_>,
    path: &Path,
    key: &str,
    rank: usize,
) -> Result<(Vec<usize>, Vec<i64>)> {
    let t = st.tensor(key).map_err(|_| {
        anyhow::anyhow!(
            "schedule file {} has no tensor `{key}` (set `data.schedule_key`)",
            path.display()
        )
    })?;
    if t.dtype() != Dtype::I64 || t.shape().len() != rank {
        bail!(
            "schedule file {}: tensor `{key}` is {:?} {:?}; expected i64 of rank {rank}",
            path.display(),
            t.dtype(),
            t.shape()
        );
    }
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    Ok((t.shape().to_vec(), v))
}

fn to_index(path: &Path, key: &str, v: i64) -> Result<usize> {
    if v < 0 {
        bail!(
            "schedule file {}: tensor `{key}` holds a negative index {v}",
            path.display()
        );
    }
    Ok(v as usize)
}

fn open_schedule(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open schedule file {} (`data.schedule`)",
            path.display()
        )
    })?;
    // SAFETY: read-only mapping of a file nobody modifies during the run.
    unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))
}

fn parse<'a>(path: &Path, m: &'a memmap2::Mmap) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(m).map_err(|e| {
        anyhow::anyhow!(
            "schedule file {} is not a valid safetensors file ({e})",
            path.display()
        )
    })
}

/// Batches `[S, B]` from tensor `key` of a schedule file.
pub fn read_batches(path: &Path, key: &str) -> Result<Vec<Vec<usize>>> {
    let m = open_schedule(path)?;
    let st = parse(path, &m)?;
    let (shape, v) = read_i64(&st, path, key, 2)?;
    v.chunks(shape[1].max(1))
        .map(|row| row.iter().map(|&x| to_index(path, key, x)).collect())
        .collect()
}

/// Ragged batches: a flat index tensor cut into consecutive batches of the given sizes
/// (the fixtures' `var_indices` / `var_batch_sizes`).
pub fn read_ragged(path: &Path, indices_key: &str, sizes_key: &str) -> Result<Vec<Vec<usize>>> {
    let m = open_schedule(path)?;
    let st = parse(path, &m)?;
    let (_, idx) = read_i64(&st, path, indices_key, 1)?;
    let (_, sizes) = read_i64(&st, path, sizes_key, 1)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for &s in &sizes {
        let s = to_index(path, sizes_key, s)?;
        if pos + s > idx.len() {
            bail!(
                "schedule file {}: `{sizes_key}` sums past the length of `{indices_key}`",
                path.display()
            );
        }
        out.push(
            idx[pos..pos + s]
                .iter()
                .map(|&x| to_index(path, indices_key, x))
                .collect::<Result<_>>()?,
        );
        pos += s;
    }
    Ok(out)
}

/// Whether a schedule file has a tensor named `key`.
pub fn schedule_has(path: &Path, key: &str) -> Result<bool> {
    let m = open_schedule(path)?;
    let st = parse(path, &m)?;
    Ok(st.names().contains(&key))
}
