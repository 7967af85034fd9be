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
//! it from the launcher's environment; without a launcher it is [`Local`] (one rank, no
//! communication, and nothing changes in the arithmetic). Two engines: MPI
//! (`--features mpi`) for CPU processes, started by [`init`]; NCCL (`--features nccl`)
//! for GPUs, which [`connect`] starts once a run has opened its GPU and knows its run
//! directory (the NCCL id travels through a file there, see [`rendezvous`]).

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use parking_lot::RwLock;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
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
    /// Elementwise sum over ranks of an f32 tensor, returned on the tensor's device. The
    /// default goes through host memory ([`Collective::all_reduce_sum_f32`]); the NCCL
    /// engine reduces GPU tensors in device memory, on the compute stream.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.all_reduce_sum_f32(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?)
    }
    /// Rank `root`'s `t` on every rank (same shape and dtype everywhere), on the tensor's
    /// device. The default goes through host memory as f64 ([`Collective::broadcast_f64`];
    /// exact for f32 and for integers below 2^53); the NCCL engine broadcasts GPU
    /// tensors in device memory.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let host = t.to_device(&Device::Cpu)?.flatten_all()?;
        let mut v = host.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        self.broadcast_f64(&mut v, root)?;
        let back = Tensor::from_vec(v, t.shape(), &Device::Cpu)?.to_dtype(t.dtype())?;
        Ok(back.to_device(t.device())?)
    }
    /// The engine's name for logs and `summary.json`.
    fn name(&self) -> &'static str;
    /// Whether this is [`Local`]: one process and no engine, so the data-parallel
    /// reductions are skipped. An engine of one rank still runs them (a test of the
    /// engine on one GPU).
    fn is_local(&self) -> bool {
        false
    }
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
    fn is_local(&self) -> bool {
        true
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

static GROUP: RwLock<Option<Arc<dyn Collective>>> = RwLock::new(None);
static LAUNCH: OnceLock<Option<Launch>> = OnceLock::new();

/// Makes `engine` the process group. [`init`] and [`connect`] call it; tests use it to
/// run the data-parallel code paths through an engine of their own.
#[doc(hidden)]
pub fn set_group(engine: Arc<dyn Collective>) {
    *GROUP.write() = Some(engine);
}

/// Keeps the collective engine alive; dropping it shuts the engine down (MPI_Finalize),
/// so `main` holds it until the exit code is known.
pub struct Guard {
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi::Universe>,
}

/// Sets the process group from the launcher's environment: one rank without a launcher;
/// with a launcher of more than one rank, the MPI engine (`--features mpi`; not under
/// torchrun when the build has NCCL), or else with `--features nccl` a group that waits
/// for [`connect`] to start NCCL. A
/// multi-rank launch in a build without an engine is an error that says how to rebuild.
pub fn init() -> Result<Guard> {
    let launch = launch_from(|k| std::env::var(k).ok())?;
    let launch = LAUNCH.get_or_init(|| launch.filter(|l| l.world > 1));
    let guard = Guard {
        #[cfg(feature = "mpi")]
        _mpi: None,
    };
    let Some(launch) = launch else {
        set_group(Arc::new(Local));
        return Ok(guard);
    };
    // torchrun starts no MPI job: its ranks wait for NCCL when the build has it.
    #[cfg(feature = "mpi")]
    if launch.launcher != "torchrun" || cfg!(not(feature = "nccl")) {
        let (universe, engine) = mpi::start(launch)?;
        set_group(Arc::new(engine));
        return Ok(Guard {
            _mpi: Some(universe),
        });
    }
    #[cfg(feature = "nccl")]
    {
        set_group(Arc::new(AwaitingGpu {
            rank: launch.rank,
            world: launch.world,
        }));
        Ok(guard)
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = guard;
        bail!(
            "{} started this process as rank {} of {}, but this ldt was built without a \
             collective engine: rebuild with `cargo build --release --features mpi` (CPU; \
             OpenMPI: apt-get install openmpi-bin libopenmpi-dev libclang-dev) or \
             `--features nccl` (GPUs), or run a single process",
            launch.launcher,
            launch.rank,
            launch.world
        )
    }
}

/// The group of a multi-rank launch without MPI (a build without it, or torchrun) before
/// [`connect`] has started NCCL: it knows its rank, and every collective is an error
/// that says why (NCCL needs the run's GPU).
#[cfg(feature = "nccl")]
struct AwaitingGpu {
    rank: usize,
    world: usize,
}

#[cfg(feature = "nccl")]
impl AwaitingGpu {
    fn refuse(&self) -> Result<()> {
        bail!(
            "rank {} of {}: this launch has only the NCCL engine, which needs `device = \"cuda:N\"`; \
             for CPU runs build with `--features mpi` and launch with mpirun or srun",
            self.rank,
            self.world
        )
    }
}

#[cfg(feature = "nccl")]
impl Collective for AwaitingGpu {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        self.refuse()
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        self.refuse()
    }
    fn broadcast_f64(&self, _buf: &mut [f64], _root: usize) -> Result<()> {
        self.refuse()
    }
    fn barrier(&self) -> Result<()> {
        self.refuse()
    }
    fn name(&self) -> &'static str {
        "awaiting-nccl"
    }
}

/// The collective engines of this build (for `ldt info`): `local` always, `mpi` and
/// `nccl` with their features.
pub fn engines() -> Vec<&'static str> {
    let mut e = vec!["local"];
    if cfg!(feature = "mpi") {
        e.push("mpi");
    }
    if cfg!(feature = "nccl") {
        e.push("nccl");
    }
    e
}

/// This process's launch when it is one of several ranks (`None` for a single process).
pub fn launch() -> Option<&'static Launch> {
    LAUNCH.get().and_then(Option::as_ref)
}

/// Starts the GPU engine for a run on `device`: with `--features nccl`, a multi-rank
/// launch and a CUDA device, the NCCL communicator replaces the group (once per
/// process; later runs of `ldt compare` reuse it), its id shared through a file in
/// `run_dir`. Otherwise nothing changes: CPU runs keep MPI, and a GPU run in a build
/// without NCCL reduces its gradients through MPI in host memory.
pub fn connect(device: &Device, run_dir: &Path) -> Result<()> {
    let Some(launch) = launch() else {
        return Ok(());
    };
    if !device.is_cuda() || group().name() == "nccl" {
        return Ok(());
    }
    #[cfg(feature = "nccl")]
    return start_nccl(device, launch, run_dir);
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (launch, run_dir);
        Ok(())
    }
}

/// Starts NCCL for `launch` on `device` and makes it the process group. [`connect`]
/// calls it for multi-rank launches; given a one-rank `launch` it makes the same calls
/// on one GPU, which is how `scripts/gpu-check.sh` tests the engine on a lent machine.
#[cfg(feature = "nccl")]
pub fn start_nccl(device: &Device, launch: &Launch, run_dir: &Path) -> Result<()> {
    let engine = nccl::connect(device, launch, run_dir)?;
    set_group(Arc::new(engine));
    Ok(())
}

/// The process group ([`Local`] unless [`init`] found a launcher).
pub fn group() -> Arc<dyn Collective> {
    if let Some(g) = GROUP.read().as_ref() {
        return g.clone();
    }
    GROUP.write().get_or_insert_with(|| Arc::new(Local)).clone()
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

/// The GPU ordinal for `device = "cuda:n"` on a machine where `visible` GPUs are
/// visible: `n` for a single process; for a rank of a launch, `n + LOCAL_RANK` (one GPU
/// per rank on each node, torchrun's convention), or `n` when the launcher left each rank
/// one visible GPU (`srun --gpus-per-task=1`, a per-rank `CUDA_VISIBLE_DEVICES`).
pub fn local_gpu(launch: Option<&Launch>, n: usize, visible: usize) -> Result<usize> {
    let Some(l) = launch else {
        return Ok(n);
    };
    if n + l.local_rank < visible {
        Ok(n + l.local_rank)
    } else if visible == 1 && n == 0 {
        Ok(0)
    } else {
        bail!(
            "config key `device` = `cuda:{n}`: rank {} is local rank {} on its node, so it takes \
             GPU {n} + {}, but {visible} GPU(s) are visible; start at most {} rank(s) per node, \
             or give each rank its own GPU (srun --gpus-per-task=1)",
            l.rank,
            l.local_rank,
            l.local_rank,
            visible.saturating_sub(n)
        )
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
    if g.is_local() {
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

    /// A launcher environment made of `pairs` (shared with the rendezvous tests).
    pub(crate) fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
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
    fn each_rank_takes_its_local_gpu() {
        let l = |local_rank| Launch {
            rank: 4 + local_rank,
            world: 8,
            local_rank,
            launcher: "srun",
        };
        assert_eq!(local_gpu(None, 2, 4).unwrap(), 2);
        assert_eq!(local_gpu(Some(&l(3)), 0, 4).unwrap(), 3);
        assert_eq!(local_gpu(Some(&l(1)), 1, 4).unwrap(), 2);
        // srun --gpus-per-task=1: every rank sees only its own GPU, as cuda:0.
        assert_eq!(local_gpu(Some(&l(3)), 0, 1).unwrap(), 0);
        let e = local_gpu(Some(&l(3)), 0, 2).unwrap_err().to_string();
        assert!(e.contains("local rank 3") && e.contains("2 GPU(s)"), "{e}");
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
