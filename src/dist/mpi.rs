//! The MPI engine (`--features mpi`, the `mpi` crate over the system's MPI library, e.g.
//! OpenMPI from `openmpi-bin` / `libopenmpi-dev`).

use super::{Collective, Launch};
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use parking_lot::Mutex;

pub use mpi::environment::Universe;

/// MPI_COMM_WORLD behind a lock: MPI runs with `MPI_THREAD_SERIALIZED`, so any thread may
/// call, one at a time.
pub struct MpiEngine {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: the communicator is a handle that MPI allows any thread to use when the
// library was initialized with MPI_THREAD_SERIALIZED and calls never overlap; the mutex
// serializes every call.
unsafe impl Send for MpiEngine {}
// SAFETY: as above; shared access only reaches the communicator through the mutex.
unsafe impl Sync for MpiEngine {}

/// Initializes MPI and checks that it sees the world the launcher announced.
pub fn start(launch: &Launch) -> Result<(Universe, MpiEngine)> {
    let Some((universe, level)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
        bail!("MPI was already initialized in this process");
    };
    if level < mpi::Threading::Serialized {
        bail!("the MPI library offers only {level:?} threading; ldt needs Serialized");
    }
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if (rank, size) != (launch.rank, launch.world) {
        bail!(
            "{} announced rank {} of {}, but MPI sees rank {rank} of {size}: launch ldt with \
             mpirun or srun (MPI), not torchrun, or check that ldt and the launcher use the same MPI",
            launch.launcher,
            launch.rank,
            launch.world
        );
    }
    let engine = MpiEngine {
        world: Mutex::new(world),
        rank,
        size,
    };
    Ok((universe, engine))
}

impl Collective for MpiEngine {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let w = self.world.lock();
        let send = buf.to_vec();
        w.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let w = self.world.lock();
        let send = buf.to_vec();
        w.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        let w = self.world.lock();
        w.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.lock().barrier();
        Ok(())
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
}
