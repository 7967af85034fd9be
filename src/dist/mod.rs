//! Data parallelism across processes: a collective engine, the process group of this
//! run, and how a launcher (mpirun, srun, torchrun) names this process's place in it.
//!
//! Every rank runs the same loop on the same global batch order and takes its shard of
//! each batch; the gradients of the trained set are averaged across ranks before the
//! optimizer step (see [`crate::train::step::gradients`]), so every rank applies the same
//! update to the same weights. Stage-1 statistics are computed from those averaged
//! gradients, so the partition is identical everywhere; DPU folds and counterpart swaps
//! are local and deterministic, so the counterparts stay identical without traffic.
//! BatchNorm running statistics follow PyTorch DDP: rank 0's are broadcast after every
//! forward. Rank 0 alone writes metrics, checkpoints and exported networks.
//!
//! The group is process-wide (like `torch.distributed`'s default group): [`init`] sets
//! it once from the launcher's environment; without a launcher it is [`Local`] (one
//! rank, no communication, and nothing changes in the arithmetic).

#[cfg(feature = "mpi")]
mod mpi;

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A collective engine over the ranks of one run.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Elementwise sum over ranks, in place, identical on every rank.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Elementwise sum over ranks of f64 values (statistics, flags), in place.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Copies rank `root`'s `buf` to every rank.
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// The engine's name for logs and `summary.json`.
    fn name(&self) -> &'static str;
}

/// One rank, no communication.
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f64(&self, _buf: &mut [f64], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "local"
    }
}

/// This process's place as a launcher describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Rank on this node (picks `cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// The launcher, by the variables it set.
    pub launcher: &'static str,
}

/// Reads the launcher's variables from `get` (the process environment in [`init`]):
/// mpirun (`OMPI_COMM_WORLD_RANK`/`_SIZE`/`_LOCAL_RANK`), srun (`SLURM_PROCID`,
/// `SLURM_NTASKS`, `SLURM_LOCALID`; only inside a job step, `SLURM_STEP_ID`, so that a
/// batch script's own shell is not mistaken for a rank) and torchrun (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`), in that order. `None` without a launcher; an error for
/// values that are not numbers or a rank outside the world, naming the variable.
pub fn launch_from(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    let sets: [(&str, [&str; 3]); 3] = [
        (
            "mpirun",
            [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ],
        ),
        ("srun", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]),
        ("torchrun", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
    ];
    for (launcher, [r, w, l]) in sets {
        if launcher == "srun" && get("SLURM_STEP_ID").is_none() {
            continue;
        }
        let (Some(rank), Some(world)) = (get(r), get(w)) else {
            continue;
        };
        let num = |name: &str, v: &str| -> Result<usize> {
            v.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "environment variable {name}={v:?} (set by {launcher}) is not a number"
                )
            })
        };
        let (rank, world) = (num(r, &rank)?, num(w, &world)?);
        let local_rank = match get(l) {
            Some(v) => num(l, &v)?,
            None => 0,
        };
        if world == 0 || rank >= world {
            bail!(
                "{launcher} set {r}={rank} but {w}={world}: the rank must be below the world size"
            );
        }
        return Ok(Some(Launch {
            rank,
            world,
            local_rank,
            launcher,
        }));
    }
    Ok(None)
}

static GROUP: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Keeps the collective engine alive; dropping it shuts the engine down (MPI_Finalize),
/// so `main` holds it until the exit code is known.
pub struct Guard {
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi::Universe>,
}

/// Sets the process group from the launcher's environment: one rank without a launcher;
/// with a launcher of more than one rank, the MPI engine (`--features mpi`). A
/// multi-rank launch in a build without an engine is an error that says how to rebuild.
pub fn init() -> Result<Guard> {
    let launch = launch_from(|k| std::env::var(k).ok())?;
    let Some(launch) = launch.filter(|l| l.world > 1) else {
        GROUP.get_or_init(|| Box::new(Local));
        return Ok(Guard {
            #[cfg(feature = "mpi")]
            _mpi: None,
        });
    };
    #[cfg(feature = "mpi")]
    {
        let (universe, engine) = mpi::start(&launch)?;
        if GROUP.set(Box::new(engine)).is_err() {
            bail!("the process group was already set");
        }
        Ok(Guard {
            _mpi: Some(universe),
        })
    }
    #[cfg(not(feature = "mpi"))]
    bail!(
        "{} started this process as rank {} of {}, but this ldt was built without a collective \
         engine: rebuild with `cargo build --release --features mpi` (OpenMPI: apt-get install \
         openmpi-bin libopenmpi-dev libclang-dev), or run a single process",
        launch.launcher,
        launch.rank,
        launch.world
    )
}

/// The process group ([`Local`] unless [`init`] found a launcher).
pub fn group() -> &'static dyn Collective {
    GROUP.get_or_init(|| Box::new(Local)).as_ref()
}

/// Whether this process writes the run's outputs (rank 0).
pub fn is_main() -> bool {
    group().rank() == 0
}

/// Sends this process's standard output to /dev/null: ranks other than 0 keep their
/// warnings and errors (stderr) but not a second copy of the progress and results.
pub fn silence_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 on two valid descriptors; stdout then refers to /dev/null.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

/// Rows `[lo, hi)` of a batch of `n` that rank `rank` of `world` takes: contiguous
/// shards whose sizes differ by at most one, in rank order.
pub fn shard(n: usize, rank: usize, world: usize) -> (usize, usize) {
    (rank * n / world, (rank + 1) * n / world)
}

static COLLECTIVE_NANOS: AtomicU64 = AtomicU64::new(0);

/// Runs `f` (a collective call) and adds its wall time to [`collective_secs`].
pub fn timed<R>(f: impl FnOnce() -> R) -> R {
    let t = Instant::now();
    let r = f();
    COLLECTIVE_NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// Seconds this process has spent in gradient collectives (including waiting for the
/// slowest rank), for the step-time split in `summary.json`.
pub fn collective_secs() -> f64 {
    COLLECTIVE_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
}

/// Whether any rank passes `flag` (a stop request, say), agreed by all ranks.
pub fn any(flag: bool) -> Result<bool> {
    let g = group();
    if g.world() == 1 {
        return Ok(flag);
    }
    let mut v = [f64::from(u8::from(flag))];
    g.all_reduce_sum_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launchers_are_read_in_order() {
        assert_eq!(launch_from(env(&[])).unwrap(), None);
        let l = launch_from(env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.launcher),
            (1, 4, 1, "mpirun")
        );
        let t = launch_from(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.launcher),
            (3, 8, 3, "torchrun")
        );
    }

    #[test]
    fn a_batch_script_is_not_a_job_step() {
        let batch = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "0"),
        ];
        assert_eq!(launch_from(env(&batch)).unwrap(), None);
        let mut step = batch.to_vec();
        step.push(("SLURM_STEP_ID", "0"));
        step[0] = ("SLURM_PROCID", "5");
        step[2] = ("SLURM_LOCALID", "1");
        let s = launch_from(env(&step)).unwrap().unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.launcher),
            (5, 8, 1, "srun")
        );
    }

    #[test]
    fn bad_launcher_values_name_the_variable() {
        let e = launch_from(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK=\"x\""), "{e}");
        let e = launch_from(env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE=2"), "{e}");
    }

    #[test]
    fn shards_cover_the_batch_in_rank_order() {
        for (n, w) in [(32, 2), (30, 4), (3, 4), (1, 1)] {
            let mut next = 0;
            for r in 0..w {
                let (lo, hi) = shard(n, r, w);
                assert_eq!(lo, next);
                assert!(hi - lo <= n.div_ceil(w) && hi - lo + 1 >= n / w);
                next = hi;
            }
            assert_eq!(next, n);
        }
    }
}
