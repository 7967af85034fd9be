//! Run outputs that are read by people and programs: `metrics.jsonl` (one JSON object
//! per line, flushed as written), a progress bar on terminals (plain lines otherwise).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;

/// Appends JSON records to `DIR/metrics.jsonl`.
pub struct MetricsLog {
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Creates `path`, truncating it, or appending to it when `append` (a resumed run).
    pub fn create(path: &Path, append: bool) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(MetricsLog {
            out: BufWriter::new(f),
        })
    }

    /// Writes one record and flushes, so a killed run keeps every line it wrote.
    pub fn write(&mut self, record: Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, &record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// Progress of a stage: a bar with loss, accuracy and throughput on a terminal, a plain
/// line every `log_every` steps otherwise (batch logs stay readable).
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: usize,
    log_every: usize,
}

impl Progress {
    /// A progress display for `total` steps of stage `label`.
    pub fn new(label: &str, total: usize, log_every: usize) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b
        });
        Progress {
            bar,
            label: label.to_string(),
            total,
            log_every,
        }
    }

    /// Reports step `step` (1-based) with a status message.
    pub fn update(&self, step: usize, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg.to_string());
            }
            None => {
                if step.is_multiple_of(self.log_every) || step == self.total {
                    println!("{} {step}/{} {msg}", self.label, self.total);
                }
            }
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` from `/proc/self/status`;
/// `None` where that file does not exist).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
