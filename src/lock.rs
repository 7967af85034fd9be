//! One run per directory: a run holds an exclusive `flock` on `DIR/.ldt.lock` from before
//! it writes anything until it exits, so a second run into the same directory (a requeued
//! batch job whose previous instance is still shutting down, a typo in `--out`) stops at
//! once instead of interleaving `metrics.jsonl` and overwriting checkpoints. The kernel
//! drops the lock when the process ends in any way, SIGKILL included; the file stays and
//! names the last holder (host, PID, start time), which is what a refused run prints.
//!
//! `flock` is honoured on local file systems and on NFSv4 and Lustre as mounted by most
//! clusters (`-o flock`); where a shared file system ignores it, two runs on different
//! hosts are not kept apart (README, "Run directories").

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The name of the lock file in a run directory.
pub const LOCK_FILE: &str = ".ldt.lock";

/// An exclusive lock on a run directory, released when dropped (or the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Locks `dir` (which must exist) for this process.
    ///
    /// # Errors
    /// Another process holds it: the error names the holder and the fix.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create the lock file {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
            let mut holder = String::new();
            file.read_to_string(&mut holder).ok();
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                h => h.to_string(),
            };
            bail!(
                "the run directory {} is in use by {holder} (lock {}); wait for that run to end, or choose another --out",
                dir.display(),
                path.display()
            );
        }
        let who = format!(
            "pid {} on host {}, started {}",
            std::process::id(),
            hostname(),
            utc(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()))
        );
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(format!("{who}\n").as_bytes()))
            .and_then(|_| file.sync_all())
            .with_context(|| format!("cannot write the lock file {}", path.display()))?;
        Ok(RunLock { _file: file })
    }
}

/// This machine's host name (`?` when the system gives none).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match ok {
        true => String::from_utf8_lossy(&buf[..end]).into_owned(),
        false => "?".into(),
    }
}

/// Unix time `secs` as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to the civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second lock on a held directory is refused naming the holder; once the first
    /// is dropped the directory can be locked again.
    #[test]
    fn a_held_directory_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        let pid = format!("pid {} on host", std::process::id());
        assert!(e.contains("is in use by") && e.contains(&pid), "{e}");
        assert!(e.contains("choose another --out"), "{e}");
        drop(first);
        let _again = RunLock::acquire(dir.path()).unwrap();
        let holder = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert!(holder.starts_with(&pid), "{holder}");
    }

    /// Known instants (Python's `datetime.fromtimestamp(s, timezone.utc)`), a leap day
    /// and the last second of a century's year included.
    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_592_024), "2026-12-06 21:20:24 UTC");
        assert_eq!(utc(4_107_542_399), "2100-02-28 23:59:59 UTC");
    }
}
