//! Run outputs that are read by people and programs: `metrics.jsonl` (one typed
//! [`Record`] per line, flushed as written, read back by [`read_records`]),
//! `summary.json` ([`Summary`]), and a progress bar on terminals (plain lines otherwise).
//! The writer and every reader (plots, reports, `ldt compare`, tests) share these types.

use crate::config::Criterion;
use crate::ldt::lag::LagReport;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One line of `metrics.jsonl`, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// An optimizer step: of training (`stage` = `train`) or of a warm-up (`warmup`).
    Train(TrainRecord),
    /// A batch of the stage-1 statistics pass (no update).
    Stats {
        /// Batch, 1-based.
        step: usize,
        /// Its mean loss.
        loss: f32,
    },
    /// An evaluation of one network on every domain.
    Eval(EvalRecord),
    /// A network's mean accuracy on the source validation hold-outs (model selection).
    Val {
        /// Step of the evaluation.
        step: usize,
        /// Network name.
        model: String,
        /// Mean validation accuracy.
        val_acc: f64,
    },
    /// A search probe (`auto`): one candidate partition's score on the source
    /// validation hold-out after the run's first `stage1.probe_steps` steps with it.
    Probe {
        /// The candidate's criterion.
        criterion: Criterion,
        /// The candidate's unstable ratio.
        unstable_ratio: f64,
        /// The validation score (accuracy, or PSNR-Y in dB); null when not finite.
        score: Option<f64>,
    },
    /// The EMA half-lives of stage 2 and their warnings.
    Lag {
        /// The report.
        report: LagReport,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Its step.
        step: usize,
        /// Its directory.
        dir: String,
    },
    /// A step skipped by `train.on_nonfinite = "skip"`.
    Skip {
        /// The step.
        step: usize,
        /// The branch (`model`, `pm`, `am`, `warmup`).
        branch: String,
        /// What was not finite.
        reason: String,
    },
    /// A re-partition during training (`stage1.repartition_every`): the layers that
    /// changed set and the sets it made (`partition.json` holds the last ones).
    Repartition {
        /// The optimizer step after which it ran.
        step: usize,
        /// Layers moved from the unstable to the stable set.
        to_stable: Vec<String>,
        /// Layers moved from the stable to the unstable set.
        to_unstable: Vec<String>,
        /// The stable set now, ascending by score.
        stable: Vec<String>,
        /// The unstable set now, ascending by score.
        unstable: Vec<String>,
    },
    /// The run continued from a checkpoint.
    Resume {
        /// The checkpoint's training step (0 for a stage-1 checkpoint).
        step: usize,
        /// Stage-1 steps done, for a stage-1 checkpoint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage1: Option<usize>,
    },
}

/// An optimizer step. Only what the method has is written: `loss` for one network,
/// `loss_pm`/`loss_am` for LDT's branches (null for the branch that did not step), `acc`
/// where one network steps (erm, lp-ft, warm-ups, LDT-S), `phase` where one network is
/// live; `lr` always.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// `train` or `warmup`.
    pub stage: String,
    /// Step, 1-based within the stage.
    pub step: usize,
    /// The one network's loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f32>,
    /// The accuracy on the batch of the network that stepped (LDT-S: the live one; with
    /// `ldt_s.repeat_batch`, phase A's half-step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    /// The scheduled base learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// PM's loss (NaN, written null, when PM did not step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pm: Option<f32>,
    /// AM's loss (NaN, written null, when AM did not step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_am: Option<f32>,
    /// The live branch after the step (`P` or `A`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// An evaluation record: the means and each domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Step of the evaluation.
    pub step: usize,
    /// Network name (`model`, `composite`, `pm`, `am`).
    pub model: String,
    /// Mean accuracy over the source domains.
    #[serde(deserialize_with = "null_as_nan")]
    pub source_acc: f64,
    /// Mean accuracy over the target domains (NaN, written null, without targets).
    #[serde(deserialize_with = "null_as_nan")]
    pub target_acc: f64,
    /// Per domain.
    pub domains: BTreeMap<String, DomainRecord>,
    /// Super-resolution: the source and target means of image quality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[Option<ImageScore>; 2]>,
}

/// One domain of an [`EvalRecord`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    /// Accuracy.
    #[serde(deserialize_with = "null_as_nan")]
    pub acc: f64,
    /// Mean loss.
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f64,
    /// `source` or `target`.
    pub role: String,
    /// Super-resolution: the domain's image quality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageScore>,
}

impl EvalRecord {
    /// The headline source and target means ([`EvalReport::headline`]).
    pub fn headline(&self) -> (f64, f64) {
        match &self.image {
            None => (self.source_acc, self.target_acc),
            Some([s, t]) => {
                let psnr = |x: &Option<ImageScore>| x.map_or(f64::NAN, |i| i.psnr);
                (psnr(s), psnr(t))
            }
        }
    }

    /// The record of report `r` of network `model` at `step`.
    pub fn of(step: usize, model: &str, r: &EvalReport) -> Self {
        EvalRecord {
            step,
            model: model.into(),
            source_acc: r.source_acc,
            target_acc: r.target_acc,
            image: r.image,
            domains: r
                .domains
                .iter()
                .map(|d| {
                    let rec = DomainRecord {
                        acc: d.acc,
                        loss: d.loss,
                        role: d.role.clone(),
                        image: d.image,
                    };
                    (d.name.clone(), rec)
                })
                .collect(),
        }
    }
}

/// JSON writes non-finite numbers as null; they read back as NaN.
fn null_as_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Every record of a `metrics.jsonl`, in order. A last line without its newline (the
/// run was killed while writing it) is left out; any other line that is not a record is
/// an error naming the file and line.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not a metrics record", path.display(), i + 1))
        })
        .collect()
}

/// Score of one domain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DomainScore {
    /// Domain name.
    pub name: String,
    /// `source` or `target`.
    pub role: String,
    /// Accuracy in [0, 1] (NaN, written null, for super-resolution).
    #[serde(deserialize_with = "null_as_nan")]
    pub acc: f64,
    /// Mean loss (cross-entropy; super-resolution's pixel loss).
    pub loss: f64,
    /// Examples scored.
    pub n: usize,
    /// Super-resolution: the mean image quality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageScore>,
}

impl DomainScore {
    /// The task's headline score: accuracy, or the Y-channel PSNR (dB).
    pub fn headline(&self) -> f64 {
        self.image.map_or(self.acc, |i| i.psnr)
    }
}

/// Mean image quality of super-resolved images against their targets, over a domain's
/// images: each image quantized to u8 as saved, `border` pixels cut from each side
/// (BasicSR's conventions, which super-resolution papers report).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    /// PSNR of the Y channel (BT.601), dB.
    pub psnr: f64,
    /// SSIM of the Y channel.
    pub ssim: f64,
    /// PSNR over the RGB channels, dB.
    pub psnr_rgb: f64,
}

/// Scores of one network on all domains.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// Per domain, manifest order.
    pub domains: Vec<DomainScore>,
    /// Mean accuracy over source domains.
    #[serde(deserialize_with = "null_as_nan")]
    pub source_acc: f64,
    /// Mean accuracy over target domains (NaN when there are none).
    #[serde(deserialize_with = "null_as_nan")]
    pub target_acc: f64,
    /// Super-resolution: the means of the source and of the target domains' image
    /// quality (the accuracies are then NaN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[Option<ImageScore>; 2]>,
}

impl EvalReport {
    /// The task's headline scores (higher is better), source and target mean: accuracy,
    /// or for super-resolution the Y-channel PSNR (NaN where a role has no domain).
    pub fn headline(&self) -> (f64, f64) {
        match &self.image {
            None => (self.source_acc, self.target_acc),
            Some([s, t]) => {
                let psnr = |x: &Option<ImageScore>| x.map_or(f64::NAN, |i| i.psnr);
                (psnr(s), psnr(t))
            }
        }
    }

    /// One line: source mean, target mean (when there are target domains), each domain.
    pub fn line(&self) -> String {
        if self.image.is_some() {
            return self.image_line();
        }
        let mut s = format!("source {:.4}", self.source_acc);
        if !self.target_acc.is_nan() {
            s.push_str(&format!("  target {:.4}", self.target_acc));
        }
        s.push_str(" |");
        for d in &self.domains {
            s.push_str(&format!(" {} {:.4}", d.name, d.acc));
        }
        s
    }

    /// [`EvalReport::line`] of super-resolution: PSNR (dB) / SSIM of the Y channel.
    fn image_line(&self) -> String {
        let q = |i: &ImageScore| format!("{:.2} dB / {:.4}", i.psnr, i.ssim);
        let [src, tgt] = self.image.unwrap_or([None, None]);
        let mut s = format!("source {}", src.as_ref().map_or("-".into(), q));
        if let Some(t) = &tgt {
            s.push_str(&format!("  target {}", q(t)));
        }
        s.push_str(" |");
        for d in &self.domains {
            if let Some(i) = &d.image {
                s.push_str(&format!(" {} {}", d.name, q(i)));
            }
        }
        s
    }
}

/// Live parameter-state bytes by category (`summary.json` `memory`): computed from the
/// partition's set sizes, with the measured peak beside them.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryReport {
    /// Live weights (one or two networks).
    pub live_weights: u64,
    /// Gradients at the peak.
    pub gradients: u64,
    /// Live optimizer state at the peak.
    pub optimizer: u64,
    /// Counterpart buffer in host RAM.
    pub counterparts_ram: u64,
    /// Counterpart buffer in the file tier.
    pub counterparts_file: u64,
    /// Optimizer state of the next phase staged early (swaps of weights are in place).
    pub staging: u64,
    /// Peak of live weights + gradients + optimizer state + staging (computed).
    pub live_peak: u64,
    /// Measured peak of the same sum over the run, from the tensors actually held
    /// (weights, the gradients of the step, every live optimizer-state tensor).
    pub measured_live_peak: u64,
    /// Activations and temporaries of one micro-batch's forward and backward in the
    /// phase of the device peak (the probe of `train::memory::activations`).
    #[serde(default)]
    pub activations: u64,
    /// The planned device peak of training: the larger phase's parameter state plus its
    /// activations (compare with the measured `train` stage of `measured_memory`).
    #[serde(default)]
    pub device_peak: u64,
    /// Optimizer state and master weights kept in host memory (`offload.optimizer =
    /// "host"`).
    #[serde(default)]
    pub host_optimizer: u64,
    /// Parameter state of a P and of an A half-step (equal for one network), to add
    /// each phase's activations to; the fields above are those of the larger.
    #[serde(skip)]
    pub phases: [PhaseBytes; 2],
}

/// One phase's parameter state on the device, in bytes ([`MemoryReport::phases`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseBytes {
    /// Weights kept on the device between uses.
    pub weights: u64,
    /// Of those, the trained sets' (what stays with the frozen set streamed).
    pub trained: u64,
    /// Gradients.
    pub gradients: u64,
    /// Optimizer state.
    pub optimizer: u64,
    /// Optimizer state of the next phase, staged.
    pub staging: u64,
}

impl PhaseBytes {
    /// Everything the phase holds.
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.staging
    }
}

/// Heap peaks of a run by stage, measured by the counting allocator ([`crate::heap`]):
/// what a GPU would hold in device memory at each stage's worst moment.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MeasuredMemory {
    /// Peak heap bytes per stage: `setup` (data, model), `stage1` (warm-ups, statistics),
    /// `train` (the steps), `eval` (evaluation and selection), `checkpoint`, `export`
    /// (snapshots and final files).
    pub stages: BTreeMap<String, u64>,
    /// Peak heap bytes of the process.
    pub process_peak: u64,
    /// Peak bytes of host arenas (the counterpart buffer's RAM tier), counted apart.
    pub host_arena_peak: u64,
    /// Heap bytes held before the network's weights (the data, the configuration, the
    /// logs): host memory on a GPU. A stage's peak minus this is the device's share.
    #[serde(default)]
    pub baseline: u64,
    /// Peak of the heap and the host arenas together: the run's memory at its worst
    /// moment (on a CPU, where device and host share RAM).
    #[serde(default)]
    pub total_peak: u64,
    /// On a GPU, the driver's used device memory per stage (`total - free`), the largest
    /// of the samples taken at the stage's boundaries and after every training step:
    /// the physical figure beside the heap's (empty on a CPU).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub device_used: BTreeMap<String, u64>,
    /// The GPU's memory (0 on a CPU).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub device_total: u64,
    /// The driver's used device memory when the run started (the CUDA context, other
    /// processes): subtracted by [`MeasuredMemory::device`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub device_start: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

impl MeasuredMemory {
    /// The device memory of `stage`: on a GPU the driver's used memory above the run's
    /// start; on a CPU the heap's peak minus [`MeasuredMemory::baseline`].
    pub fn device(&self, stage: &str) -> Option<u64> {
        if let Some(used) = self.device_used.get(stage) {
            return Some(used.saturating_sub(self.device_start));
        }
        self.stages
            .get(stage)
            .map(|p| p.saturating_sub(self.baseline))
    }
}

/// Asks the driver for the device's `(used, total)` bytes (`None`: no answer).
pub type DeviceProbe = Box<dyn Fn() -> Option<(u64, u64)> + Send>;

/// The stage a run is in, for [`MeasuredMemory`]: each stage's window of the heap's
/// peak is closed when another stage is entered or left, so a stage nested in another
/// (an evaluation during training) is measured on its own and the outer stage without it.
pub struct StagePeaks {
    /// See [`MeasuredMemory::baseline`].
    pub baseline: u64,
    peaks: BTreeMap<&'static str, u64>,
    /// The device's `(used, total)` bytes, where there is a device to ask.
    device: Option<DeviceProbe>,
    device_used: BTreeMap<&'static str, u64>,
    device_total: u64,
    device_start: u64,
    current: &'static str,
    outer: Vec<&'static str>,
}

impl StagePeaks {
    /// Starts measuring in stage `setup`.
    pub fn new() -> Self {
        crate::heap::take_peak();
        crate::heap::restart_peaks();
        StagePeaks {
            baseline: 0,
            peaks: BTreeMap::new(),
            device: None,
            device_used: BTreeMap::new(),
            device_total: 0,
            device_start: 0,
            current: "setup",
            outer: Vec::new(),
        }
    }

    fn close(&mut self) {
        let p = crate::heap::take_peak();
        let e = self.peaks.entry(self.current).or_default();
        *e = (*e).max(p);
        self.sample();
    }

    /// Also samples `device` (the driver's `(used, total)` bytes) at every stage
    /// boundary and [`StagePeaks::sample`].
    pub fn with_device(&mut self, device: DeviceProbe) {
        self.device_start = device().map_or(0, |(used, _)| used);
        self.device = Some(device);
        self.sample();
    }

    /// Records the device's used memory now in the current stage (after a training
    /// step; a no-op without a device).
    pub fn sample(&mut self) {
        if let Some((used, total)) = self.device.as_ref().and_then(|d| d()) {
            let e = self.device_used.entry(self.current).or_default();
            *e = (*e).max(used);
            self.device_total = total;
        }
    }

    /// Enters `stage` (inside the current one).
    pub fn enter(&mut self, stage: &'static str) {
        self.close();
        self.outer.push(self.current);
        self.current = stage;
    }

    /// Leaves the current stage for the one it was entered from.
    pub fn exit(&mut self) {
        self.close();
        self.current = self.outer.pop().unwrap_or("setup");
    }

    /// The peaks so far.
    pub fn report(&mut self) -> MeasuredMemory {
        self.close();
        MeasuredMemory {
            stages: self
                .peaks
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            process_peak: crate::heap::process_peak(),
            host_arena_peak: crate::heap::host_arena().1,
            baseline: self.baseline,
            total_peak: crate::heap::total_peak(),
            device_used: self
                .device_used
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            device_total: self.device_total,
            device_start: self.device_start,
        }
    }
}

impl Default for StagePeaks {
    fn default() -> Self {
        Self::new()
    }
}

/// The partition in `summary.json`: criterion and sets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartitionSummary {
    /// The criterion the layers were ranked by.
    pub criterion: Criterion,
    /// Stable layers.
    pub stable: Vec<String>,
    /// Unstable layers.
    pub unstable: Vec<String>,
}

/// The best network on the validation hold-outs so far (`best.safetensors`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Best {
    /// Step of its evaluation.
    pub step: usize,
    /// Network name.
    pub model: String,
    /// Mean validation accuracy.
    pub val_acc: f64,
}

/// The data-parallel part of a run's timing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataParallel {
    /// Collective engine (`mpi`, `nccl`, ...).
    pub engine: String,
    /// Ranks.
    pub world: usize,
    /// Seconds in collectives.
    pub collective_seconds: f64,
    /// Milliseconds in collectives per step.
    pub collective_ms_per_step: f64,
}

/// The content of `summary.json`: what a run did and scored. Optional parts are absent
/// where they do not apply (erm has no partition; a single process no data-parallel).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// The `ldt` version that wrote it.
    #[serde(default)]
    pub version: String,
    /// The run's `seed`.
    #[serde(default)]
    pub seed: u64,
    /// `train.method`.
    pub method: String,
    /// `model.arch`.
    pub arch: String,
    /// What the trained networks expect of their input (classes, size, normalization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<crate::data::prep::InputSpec>,
    /// Parameter elements.
    pub parameters: usize,
    /// Seconds since the run started.
    pub seconds: f64,
    /// Peak resident set size of the process (where the OS says).
    pub peak_rss_bytes: Option<u64>,
    /// Final evaluation per exported network (`model`, `composite`, `pm`, `am`).
    pub eval: BTreeMap<String, EvalReport>,
    /// The partition (LDT methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionSummary>,
    /// The search of `auto` stage-1 settings: every candidate's score and the choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<crate::ldt::search::SearchReport>,
    /// Seconds of the search's probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_seconds: Option<f64>,
    /// The EMA half-lives (LDT methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagReport>,
    /// Model selection's winner (with `data.val_fraction`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<Best>,
    /// Steps skipped by `train.on_nonfinite = "skip"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
    /// The training stage's memory report (computed from the tensors held: the plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    /// The heap measured by stage (the physical figures beside the plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_memory: Option<MeasuredMemory>,
    /// Seconds of the training stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
    /// Milliseconds per training step of this process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms_per_step: Option<f64>,
    /// Milliseconds per training step after this process's first. The first step
    /// touches the heap's pages for the first time and starts the threads, which a
    /// short benchmark would otherwise count; absent for a one-step run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_ms_per_step: Option<f64>,
    /// Data-parallel engine, ranks and collective time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<DataParallel>,
    /// Ranks that agreed on rank 0's partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_agreed_ranks: Option<usize>,
    /// Ranks whose final networks agreed with rank 0's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_agreed_ranks: Option<usize>,
}

impl Summary {
    /// Writes `path` atomically, keys sorted (as every earlier `summary.json`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&serde_json::to_value(self)?)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// The keys [`MetricsLog::write`] adds to every record: `time`, the wall clock (Unix
/// seconds, to the millisecond), and `elapsed`, seconds since this process opened the
/// log (a resumed run starts again at 0 after its `resume` record). Lines written before
/// they existed read as well ([`read_records`] ignores them); they differ between runs
/// that are otherwise the same, so a comparison of runs leaves them out.
pub const STAMP_KEYS: [&str; 2] = ["time", "elapsed"];

/// Appends JSON records to `DIR/metrics.jsonl`.
pub struct MetricsLog {
    out: BufWriter<File>,
    opened: Instant,
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
            opened: Instant::now(),
        })
    }

    /// Seconds since the log was opened (the run's clock).
    pub fn elapsed(&self) -> f64 {
        self.opened.elapsed().as_secs_f64()
    }

    /// Writes one record with its [`STAMP_KEYS`] and flushes, so a killed run keeps
    /// every line it wrote. Keys are sorted (the format every earlier `metrics.jsonl`
    /// has).
    pub fn write(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_value(record)?;
        let fields = line.as_object_mut().expect("a record is a JSON object");
        let millis = |d: Duration| d.as_millis() as f64 / 1000.0;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let [time, elapsed] = STAMP_KEYS;
        fields.insert(time.into(), millis(now).into());
        fields.insert(elapsed.into(), millis(self.opened.elapsed()).into());
        serde_json::to_writer(&mut self.out, &line)?;
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
    /// A progress display for steps `done + 1 ..= total` of stage `label` (`done` > 0:
    /// a resumed stage; the bar starts there).
    pub fn new(label: &str, done: usize, total: usize, log_every: usize) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            // On stdout, where the plain lines would go and `println` writes.
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stdout())
                .with_position(done as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            // Redrawn while a step, an evaluation or a checkpoint takes long, so a
            // position whose draw was rate-limited away still shows.
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        Self::with_bar(bar, label, total, log_every)
    }

    /// [`Progress::new`] on `bar` (`None`: plain lines).
    fn with_bar(bar: Option<ProgressBar>, label: &str, total: usize, log_every: usize) -> Self {
        Progress {
            bar,
            label: label.to_string(),
            total,
            log_every,
        }
    }

    /// Reports step `step` (1-based); called after every step. The bar moves to it at
    /// once; every `log_every` steps and at the last, `msg()` (a status message, made
    /// only then) goes on the bar, or without a terminal into a plain line.
    pub fn update(&self, step: usize, msg: impl FnOnce() -> String) {
        let log = step.is_multiple_of(self.log_every) || step == self.total;
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                if log {
                    b.set_message(msg());
                }
            }
            None if log => println!("{} {step}/{} {}", self.label, self.total, msg()),
            None => {}
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    /// Stops the bar and leaves it on the terminal at the last step it reached, on a
    /// line of its own.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.abandon();
            if !b.is_hidden() {
                println!();
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(r: &Record) -> String {
        serde_json::to_string(&serde_json::to_value(r).unwrap()).unwrap()
    }

    #[test]
    fn records_keep_the_written_format_and_read_back() {
        // The exact lines the trainer has always written (keys sorted, NaN as null).
        let train = Record::Train(TrainRecord {
            stage: "train".into(),
            step: 7,
            lr: Some(0.5),
            loss_pm: Some(1.5),
            loss_am: Some(f32::NAN),
            phase: Some("P".into()),
            ..TrainRecord::default()
        });
        assert_eq!(
            line(&train),
            r#"{"kind":"train","loss_am":null,"loss_pm":1.5,"lr":0.5,"phase":"P","stage":"train","step":7}"#
        );
        let eval = Record::Eval(EvalRecord {
            step: 3,
            model: "composite".into(),
            source_acc: 0.75,
            target_acc: f64::NAN,
            domains: BTreeMap::from([(
                "a".to_string(),
                DomainRecord {
                    acc: 0.75,
                    loss: 0.25,
                    role: "source".into(),
                    image: None,
                },
            )]),
            image: None,
        });
        assert_eq!(
            line(&eval),
            r#"{"domains":{"a":{"acc":0.75,"loss":0.25,"role":"source"}},"kind":"eval","model":"composite","source_acc":0.75,"step":3,"target_acc":null}"#
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&p, false).unwrap();
        let skip = Record::Skip {
            step: 2,
            branch: "pm".into(),
            reason: "the loss is NaN".into(),
        };
        for r in [
            &train,
            &eval,
            &skip,
            &Record::Resume {
                step: 4,
                stage1: None,
            },
        ] {
            log.write(r).unwrap();
        }
        drop(log);
        // A line cut by a kill is left out.
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str(r#"{"kind":"sta"#);
        std::fs::write(&p, &text).unwrap();
        let back = read_records(&p).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back[2], skip);
        // null reads back: NaN for an accuracy, "did not step" for a branch's loss.
        let Record::Eval(e) = &back[1] else {
            panic!("{:?}", back[1])
        };
        assert!(e.target_acc.is_nan() && e.source_acc == 0.75);
        let Record::Train(t) = &back[0] else {
            panic!("{:?}", back[0])
        };
        assert_eq!((t.loss_pm, t.loss_am), (Some(1.5), None));
        // Any complete line that is not a record is an error naming file and line.
        std::fs::write(
            &p,
            format!("{}{}\n", &text[..text.len() - 12], r#"{"kind":"nope"}"#),
        )
        .unwrap();
        let err = format!("{:#}", read_records(&p).unwrap_err());
        assert!(err.contains("metrics.jsonl line 5"), "{err}");
    }

    /// Compares each line [`MetricsLog`] writes with its record: the record's keys plus
    /// `time` (the wall clock, between the clock before and after the write) and
    /// `elapsed` (from 0, never decreasing); before, a line held the record alone. A log
    /// appended (as by a resumed run) to lines of an older version, without stamps,
    /// reads back as the same records.
    #[test]
    fn every_line_is_stamped_and_unstamped_lines_still_read() {
        let now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        let records = [
            Record::Resume {
                step: 2,
                stage1: None,
            },
            Record::Train(TrainRecord {
                stage: "train".into(),
                step: 3,
                loss: Some(0.5),
                acc: Some(0.25),
                lr: Some(0.1),
                ..TrainRecord::default()
            }),
            Record::Checkpoint {
                step: 3,
                dir: "c".into(),
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let old = Record::Stats { step: 1, loss: 2.0 };
        std::fs::write(&p, format!("{}\n", line(&old))).unwrap();
        let before = now();
        let mut log = MetricsLog::create(&p, true).unwrap();
        for r in &records {
            log.write(r).unwrap();
        }
        let after = now();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], line(&old));
        let mut last = 0.0;
        for (l, r) in lines[1..].iter().zip(&records) {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            let [time, elapsed] = STAMP_KEYS.map(|k| o.remove(k).and_then(|x| x.as_f64()));
            let (time, elapsed) = (time.expect(l), elapsed.expect(l));
            assert!(
                before - 1e-3 <= time && time <= after,
                "{l}: {before}..{after}"
            );
            assert!(elapsed >= last && elapsed <= after - before + 1e-3, "{l}");
            last = elapsed;
            assert_eq!(v, serde_json::to_value(r).unwrap(), "{l}");
        }
        let back = read_records(&p).unwrap();
        assert_eq!(back[0], old);
        assert_eq!(back[1..], records);
    }

    /// Compares the bar's position after each `update` with the step reported, the
    /// status message with the last log step's (made only at those steps: 3, 6 and the
    /// last, 7), and the position after `finish` with the last step.
    #[test]
    fn the_bar_is_at_every_step_and_the_message_at_log_steps() {
        let bar = ProgressBar::hidden();
        bar.set_length(7);
        let p = Progress::with_bar(Some(bar.clone()), "erm", 7, 3);
        let mut made = Vec::new();
        for step in 1..=7 {
            p.update(step, || {
                made.push(step);
                format!("m{step}")
            });
            assert_eq!(bar.position(), step as u64);
            let want = match step {
                1..=2 => "",
                3..=5 => "m3",
                6 => "m6",
                _ => "m7",
            };
            assert_eq!(bar.message(), want, "step {step}");
        }
        assert_eq!(made, [3, 6, 7]);
        p.finish();
        assert!(bar.is_finished());
        assert_eq!(bar.position(), 7);
    }
}
