//! Shares a small secret (NCCL's unique id) from rank 0 with the other ranks through a
//! file in the run directory. Every rank of a multi-node run must see the run directory
//! on a shared file system anyway (they resume from its checkpoints), so this needs no
//! port, no store and no MPI.
//!
//! The file's name carries a token of the launch (the Slurm job and step, torchrun's run
//! id, OpenMPI's job), so a file left by an earlier launch into the same directory is
//! never read; rank 0 writes it atomically (temporary file, then rename) and removes it
//! once every rank has joined.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// First line of a rendezvous file; a file without it is not ours.
const MAGIC: &str = "ldt-rendezvous 1";

/// A token naming this launch, the same on every rank of it: `slurm-<job>.<step>` (srun),
/// `torchrun-<run id>` (torchrun's `TORCHELASTIC_RUN_ID`), `ompi-<job>` (mpirun's
/// `OMPI_MCA_ess_base_jobid`, or PMIx's namespace) or `master-<addr>-<port>`
/// (`MASTER_ADDR`/`MASTER_PORT`), else `default`. Only `[A-Za-z0-9._-]` are kept, so the
/// token is a safe file-name part.
pub fn launch_token(get: impl Fn(&str) -> Option<String>) -> String {
    let token = if let (Some(job), Some(step)) = (get("SLURM_JOB_ID"), get("SLURM_STEP_ID")) {
        format!("slurm-{job}.{step}")
    } else if let Some(id) = get("TORCHELASTIC_RUN_ID") {
        format!("torchrun-{id}")
    } else if let Some(job) = get("OMPI_MCA_ess_base_jobid").or_else(|| get("PMIX_NAMESPACE")) {
        format!("ompi-{job}")
    } else if let (Some(addr), Some(port)) = (get("MASTER_ADDR"), get("MASTER_PORT")) {
        format!("master-{addr}-{port}")
    } else {
        "default".to_string()
    };
    token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect()
}

/// The rendezvous file of one launch in one run directory.
pub struct Rendezvous {
    path: PathBuf,
    world: usize,
}

impl Rendezvous {
    /// The rendezvous of a launch of `world` ranks named `token`, in `dir`.
    pub fn new(dir: &Path, token: &str, world: usize) -> Rendezvous {
        Rendezvous {
            path: dir.join(format!(".ldt-rendezvous-{token}")),
            world,
        }
    }

    /// The file's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rank 0: writes `secret` (with the world size) so that it appears whole or not at all.
    pub fn publish(&self, secret: &[u8]) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the run directory {}", dir.display()))?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let body = format!("{MAGIC}\nworld {}\n{hex}\n", self.world);
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .with_context(|| {
                format!(
                    "writing {} (the run directory must be writable by rank 0)",
                    self.path.display()
                )
            })
    }

    /// The other ranks: waits for rank 0's file and reads the secret. An error names the
    /// file when it does not appear within `timeout` (is the run directory shared by all
    /// nodes?), is not a rendezvous file, or was written for another world size.
    pub fn wait(&self, timeout: Duration) -> Result<Vec<u8>> {
        let start = Instant::now();
        let body = loop {
            match std::fs::read_to_string(&self.path) {
                Ok(b) => break b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", self.path.display()))
                }
            }
            if start.elapsed() >= timeout {
                bail!(
                    "rank 0 did not publish {} within {:.0} s: every rank must see the same run \
                     directory (a shared file system across nodes), and rank 0 must have started",
                    self.path.display(),
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut lines = body.lines();
        let (magic, world, hex) = (lines.next(), lines.next(), lines.next().unwrap_or(""));
        if magic != Some(MAGIC) || hex.len() % 2 != 0 {
            bail!(
                "{} is not an ldt rendezvous file: remove it and launch again",
                self.path.display()
            );
        }
        if world != Some(format!("world {}", self.world).as_str()) {
            bail!(
                "{} was written for {} but this launch has {} ranks: remove it and launch again",
                self.path.display(),
                world.unwrap_or("?"),
                self.world
            );
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .with_context(|| format!("{}: the secret is not hexadecimal", self.path.display()))
    }

    /// Rank 0, once every rank has joined: removes the file.
    pub fn withdraw(&self) {
        std::fs::remove_file(&self.path).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::tests::env;

    #[test]
    fn tokens_name_the_launch() {
        let t = launch_token(env(&[("SLURM_JOB_ID", "812"), ("SLURM_STEP_ID", "0")]));
        assert_eq!(t, "slurm-812.0");
        let t = launch_token(env(&[
            ("TORCHELASTIC_RUN_ID", "a/b c"),
            ("MASTER_PORT", "1"),
        ]));
        assert_eq!(t, "torchrun-abc");
        let t = launch_token(env(&[("PMIX_NAMESPACE", "prterun-x-1@1")]));
        assert_eq!(t, "ompi-prterun-x-11");
        assert_eq!(launch_token(env(&[])), "default");
    }

    #[test]
    fn the_secret_travels_between_threads() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let secret: Vec<u8> = (0..128).map(|i| (i * 37 % 256) as u8).collect();
        let reader = {
            let run = run.clone();
            std::thread::spawn(move || {
                Rendezvous::new(&run, "t", 3)
                    .wait(Duration::from_secs(20))
                    .unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(120));
        let r0 = Rendezvous::new(&run, "t", 3);
        r0.publish(&secret).unwrap();
        assert_eq!(reader.join().unwrap(), secret);
        // A later launch (another token) never reads this one's file.
        let other = Rendezvous::new(&run, "u", 3).wait(Duration::from_millis(100));
        let e = other.unwrap_err().to_string();
        assert!(
            e.contains(".ldt-rendezvous-u") && e.contains("shared"),
            "{e}"
        );
        r0.withdraw();
        assert!(!r0.path().exists());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        Rendezvous::new(dir.path(), "t", 4)
            .publish(&[1, 2])
            .unwrap();
        let e = Rendezvous::new(dir.path(), "t", 2)
            .wait(Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("world 4") && e.contains("2 ranks"), "{e}");
        std::fs::write(dir.path().join(".ldt-rendezvous-t"), "hello\n").unwrap();
        let e = Rendezvous::new(dir.path(), "t", 4)
            .wait(Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an ldt rendezvous file"), "{e}");
    }
}
