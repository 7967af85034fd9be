//! The run context shared by every method: configuration, run directory, device,
//! benchmark, network, metrics log, and the common pieces (initial weights, batch
//! orders, evaluation, summary).

use crate::checkpoint::{self, Checkpoint, Interrupted, Signals, Writer};
use crate::config::{Config, OnNonFinite, Recompute, Resume};
use crate::data::dataset::Pool;
use crate::data::loader::{self, BatchOrder};
use crate::data::{Benchmark, Loader};
use crate::metrics::{
    self, Best, DataParallel, EvalRecord, EvalReport, MetricsLog, Record, Summary,
};
use crate::model::{self, io, NetState, Network, Weights};
use crate::rng::Rng;
use crate::task::{Scoring, Tally};
use crate::train::eval::evaluate;
use crate::train::step::{nonfinite, Batch, StepStats};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// Random streams of a run, so that each consumer is independent of the others.
pub mod streams {
    /// Weight initialization.
    pub const INIT: u64 = 1;
    /// Training batch order.
    pub const TRAIN: u64 = 2;
    /// Stage-1 D1/D2 split.
    pub const SPLIT: u64 = 3;
    /// Stage-1 warm-up order.
    pub const WARMUP: u64 = 4;
    /// Stage-1 statistics order.
    pub const STATS: u64 = 5;
    /// The `random` criterion.
    pub const CRITERION: u64 = 6;
    /// The statistics batches of the re-partitions ([`repartition`]).
    pub const REPARTITION: u64 = 7;
    /// Validation hold-out (plus the source domain's position).
    pub const VAL: u64 = 100;

    /// The stream of the `k`-th re-partition's statistics batches (k = 1, 2, ...):
    /// [`REPARTITION`] with `k` above the low 32 bits, apart from every other stream, so
    /// each re-partition sees fresh batches and a resumed run draws the same ones.
    pub fn repartition(k: usize) -> u64 {
        REPARTITION | (k as u64) << 32
    }
}

/// Everything a training method needs.
pub struct RunContext {
    /// Resolved configuration.
    pub cfg: Config,
    /// Where this process writes its outputs: the run directory on rank 0, a scratch
    /// directory on the other ranks of a data-parallel run.
    pub dir: PathBuf,
    /// The run directory (checkpoints are read from and written to it).
    pub run_dir: PathBuf,
    /// The scratch directory of a non-zero rank, removed when the run ends.
    _scratch: Option<tempfile::TempDir>,
    /// Compute device.
    pub device: Device,
    /// The opened benchmark.
    pub bench: Benchmark,
    /// The network.
    pub net: Box<dyn Network>,
    /// `metrics.jsonl`.
    pub metrics: MetricsLog,
    /// Concatenated source training splits.
    pub pool: Pool,
    /// Indices of `pool` used for training (all but the validation hold-out).
    pub train_indices: Vec<usize>,
    /// Per source domain, the held-out validation indices of `pool` (`data.val_fraction`).
    pub val: Vec<(String, Vec<usize>)>,
    /// Best validation result so far: (mean source validation accuracy, step, network).
    best: Option<(f64, usize, String)>,
    /// Final and intermediate results that go into `summary.json`.
    pub summary: Summary,
    /// The training checkpoint to continue from (`checkpoint.resume = "auto"`), taken by
    /// the method.
    pub resume: Option<Checkpoint>,
    /// The stage-1 checkpoint to continue stage 1 from, when no training checkpoint is
    /// intact; taken by stage 1 (its network by the method first).
    pub stage1_resume: Option<Checkpoint>,
    /// Stop requests from SIGTERM / SIGINT / SIGUSR1 (installed by the CLI).
    pub signals: Option<Signals>,
    /// Heap peaks by stage.
    pub stages: metrics::StagePeaks,
    /// Activation bytes of one training micro-batch in phases P and A
    /// ([`RunContext::plan_memory`], [`RunContext::refine_activations`]).
    activations: [u64; 2],
    /// Rows of an evaluation batch: `eval.batch_size`, or fewer where
    /// `offload.device_bytes` needs it ([`RunContext::plan_memory`]).
    eval_batch: usize,
    /// How evaluations score the outputs (the task's loss; PSNR/SSIM's border).
    scoring: Scoring,
    /// The lock on the directory this process writes ([`crate::lock`]); declared last so
    /// it is released after everything else was dropped.
    _lock: crate::lock::RunLock,
}

/// The error of a non-finite step of `branch` under `train.on_nonfinite = "stop"`.
pub fn nonfinite_stop(step: usize, branch: &str, what: &str) -> String {
    format!(
        "step {step} ({branch}): {what}; lower the learning rate, check the data, or set \
         train.on_nonfinite = \"skip\""
    )
}

/// Compares `mine` with rank 0's values bit for bit on every rank of a data-parallel
/// run: `Some(world)` when all agree, `None` for a single process, and otherwise an error
/// naming, through `what(index, mine, rank 0's)`, the first value where this rank
/// differs (or saying that another rank does).
fn agree_with_rank_0(
    mine: &[f64],
    what: impl Fn(usize, f64, f64) -> String,
) -> Result<Option<usize>> {
    let group = crate::dist::group();
    if group.is_local() {
        return Ok(None);
    }
    let mut root = mine.to_vec();
    crate::dist::timed(|| group.broadcast_f64(&mut root, 0))?;
    let differs = mine
        .iter()
        .zip(&root)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    let bad = crate::dist::any(differs.is_some())?;
    if let Some(i) = differs {
        bail!(
            "rank {}: {} differs from rank 0's; data-parallel ranks must stay identical",
            group.rank(),
            what(i, mine[i], root[i])
        );
    }
    if bad {
        bail!("another rank differs from rank 0 (see its error)");
    }
    Ok(Some(group.world()))
}

/// 64-bit FNV-1a hash of a tensor's values (as f64 bits: exact for f32 and bf16 values
/// and for integers below 2^53).
/// Hashes of the final networks' tensors, compared across ranks at the end of a run.
#[derive(Default)]
pub struct Fingerprints {
    hashes: Vec<f64>,
    names: Vec<String>,
}

fn fnv1a(t: &Tensor) -> Result<u64> {
    let v = t
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(h)
}

impl RunContext {
    /// Creates the run directory, writes the resolved config, opens data and model. On
    /// ranks other than 0 of a data-parallel run, outputs go to a private scratch
    /// directory that is removed at the end (rank 0 alone writes the run directory);
    /// every rank resumes from the run directory's checkpoints.
    pub fn open(mut cfg: Config, dir: &Path) -> Result<RunContext> {
        // The heap's `setup` window: data and model.
        let mut stages = crate::metrics::StagePeaks::new();
        // Configs built in code (compare, tests, library users) get the same checks as
        // files, and absolute paths (the saved `config.toml` works from any directory).
        cfg.validate()?;
        cfg.absolute_paths()?;
        let run_dir = dir;
        let scratch = if crate::dist::is_main() {
            None
        } else {
            Some(
                tempfile::Builder::new()
                    .prefix(&format!("ldt-rank{}-", crate::dist::group().rank()))
                    .tempdir()
                    .context("creating the scratch directory of a non-zero rank (set TMPDIR)")?,
            )
        };
        let dir = scratch.as_ref().map_or(run_dir, |t| t.path());
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the run directory {} (choose another with --out)",
                dir.display()
            )
        })?;
        // Before anything is written: one run per directory.
        let lock = crate::lock::RunLock::acquire(dir)?;
        let probe = dir.join(".ldt-write-test");
        std::fs::write(&probe, b"ok").with_context(|| {
            format!(
                "the run directory {} is not writable (choose another with --out)",
                dir.display()
            )
        })?;
        std::fs::remove_file(&probe).ok();
        let device = crate::device(&cfg)?;
        if crate::offload::device_memory(&device).is_some() {
            let d = device.clone();
            stages.with_device(Box::new(move || crate::offload::device_memory(&d)));
        }
        crate::dist::connect(&device, run_dir)?;
        let bench = Benchmark::open(&cfg)?;
        if crate::dist::is_main() {
            for n in &bench.notes {
                println!("{n}");
            }
        }
        // The data decides what is unset about the task; the saved config says it.
        bench.settle(&mut cfg)?;
        let net = model::build(&cfg.model, bench.shape(), bench.num_classes())?;
        check_output(net.as_ref(), &bench, &cfg)?;
        let resume = match cfg.checkpoint.resume {
            Resume::Auto => checkpoint::latest(run_dir, &device)?,
            Resume::Never => None,
        };
        if resume.is_none() && crate::dist::is_main() {
            if cfg.checkpoint.resume == Resume::Auto {
                println!(
                    "nothing to resume in {} (no complete checkpoint): starting a new run",
                    run_dir.display()
                );
            }
            make_room(run_dir, &cfg)?;
        }
        std::fs::write(dir.join("config.toml"), cfg.to_toml())?;
        let mut metrics = MetricsLog::create(&dir.join("metrics.jsonl"), resume.is_some())?;
        if let Some(ck) = &resume {
            let what = ck.kind.steps_name();
            println!("resuming from {} ({what} {})", ck.dir.display(), ck.step);
            metrics.write(&match ck.kind {
                checkpoint::Kind::Train => Record::Resume {
                    step: ck.step,
                    stage1: None,
                },
                checkpoint::Kind::Stage1 => Record::Resume {
                    step: 0,
                    stage1: Some(ck.step),
                },
            })?;
        }
        let (resume, stage1_resume) = match resume {
            Some(ck) if ck.kind == checkpoint::Kind::Stage1 => (None, Some(ck)),
            r => (r, None),
        };
        let pool = bench.source_pool();
        let (train_indices, val) = hold_out(&bench, &cfg);
        let eval_batch = cfg.eval.batch_size;
        let scoring = Scoring::of(&cfg, bench.task, bench.scale);
        let input = bench.input_spec();
        Ok(RunContext {
            train_indices,
            val,
            best: None,
            resume,
            stage1_resume,
            signals: None,
            cfg,
            dir: dir.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            _scratch: scratch,
            _lock: lock,
            device,
            bench,
            net,
            metrics,
            pool,
            summary: Summary {
                input: Some(input),
                ..Summary::default()
            },
            stages,
            activations: [0; 2],
            eval_batch,
            scoring,
        })
    }

    /// Whether evaluation points select a model (`eval.val_fraction` holds data out).
    pub fn selecting(&self) -> bool {
        !self.val.is_empty()
    }

    /// The mean over the source domains' validation hold-outs of the task's headline
    /// score (accuracy; Y-channel PSNR for super-resolution), None without hold-outs.
    pub fn validate(&self, params: &Weights<'_>, buffers: &[Tensor]) -> Result<Option<f64>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let shape = self.net.input_shape();
        let mut domains = Vec::new();
        for (_, idx) in &self.val {
            let mut tally = Tally::default();
            for chunk in idx.chunks(self.eval_batch) {
                let (x, y) = self
                    .pool
                    .gather(chunk, None)?
                    .to_tensors(shape, &self.device)?;
                let mut b = buffers.to_vec();
                let out =
                    params.forward(self.net.as_ref(), &mut b, &x, crate::model::Mode::Eval)?;
                tally.add(&self.scoring, &out, &y)?;
            }
            domains.push(tally.score(&self.scoring, "validation", "source"));
        }
        Ok(Some(crate::task::report(domains).headline().0))
    }

    /// Model selection at an evaluation point, for one candidate network: scores it on
    /// the validation hold-outs (never on a target domain) and writes
    /// `DIR/best.safetensors` when it beats the best so far (ties keep the earlier; the
    /// driver offers the headline network first).
    pub fn consider(
        &mut self,
        step: usize,
        name: &str,
        params: &Weights<'_>,
        buffers: &[Tensor],
    ) -> Result<()> {
        let Some(acc) = self.validate(params, buffers)? else {
            return Ok(());
        };
        self.metrics.write(&Record::Val {
            step,
            model: name.to_string(),
            val_acc: acc,
        })?;
        if self.best.as_ref().is_none_or(|b| acc > b.0) {
            let named = io::named(self.net.as_ref(), &params.all()?, buffers);
            self.export(&named, "best.safetensors")?;
            self.best = Some((acc, step, name.to_string()));
            self.summary.best = Some(Best {
                step,
                model: name.to_string(),
                val_acc: acc,
            });
        }
        Ok(())
    }

    /// Checks that every rank of a data-parallel run holds rank 0's partition: sets,
    /// scores and DPU coefficients, bit for bit (the statistics come from gradients that
    /// were averaged across ranks, so anything else is a bug or a non-deterministic
    /// library). Records the number of agreeing ranks in `summary.json`.
    pub fn agree_partition(&mut self, partition: &crate::ldt::partition::Partition) -> Result<()> {
        let mine: Vec<f64> = partition
            .layers
            .iter()
            .flat_map(|l| {
                let stable = f64::from(u8::from(l.set == crate::ldt::partition::Set::Stable));
                [stable, l.score, l.coefficient]
            })
            .collect();
        let what = |i: usize, mine: f64, root: f64| {
            let l = &partition.layers[i / 3];
            let field = ["set", "score", "DPU coefficient"][i % 3];
            format!(
                "the partition at layer `{}` ({field} {mine} vs {root})",
                l.name
            )
        };
        if let Some(world) = agree_with_rank_0(&mine, what)? {
            self.summary.partition_agreed_ranks = Some(world);
        }
        Ok(())
    }

    /// The fingerprint of final network `name` for [`RunContext::agree_replicas`]: a
    /// 64-bit FNV-1a hash of each weight and buffer, added to `into` (nothing in a
    /// single-process run, where nothing is read: host masters are not copied for it).
    pub fn fingerprint(
        &self,
        name: &str,
        params: &Weights<'_>,
        buffers: &[Tensor],
        into: &mut Fingerprints,
    ) -> Result<()> {
        if crate::dist::group().is_local() {
            return Ok(());
        }
        for (k, t) in params.all()?.iter().chain(buffers).enumerate() {
            let h = fnv1a(t)?;
            into.hashes
                .extend([(h >> 32) as f64, (h & 0xffff_ffff) as f64]);
            into.names.push(format!("{name} tensor {k} {:?}", t.dims()));
        }
        Ok(())
    }

    /// Checks, at the end of a data-parallel run, that every rank holds rank 0's final
    /// networks bit for bit (their [`RunContext::fingerprint`]s): averaged gradients,
    /// broadcast BatchNorm statistics and deterministic folds keep the replicas
    /// identical, so a difference is a bug, found here rather than in a later resume.
    /// Records the number of agreeing ranks in `summary.json` (`replicas_agreed_ranks`).
    pub fn agree_replicas(&mut self, f: &Fingerprints) -> Result<()> {
        if crate::dist::group().is_local() {
            return Ok(());
        }
        let what = |i: usize, _: f64, _: f64| format!("the final network ({})", f.names[i / 2]);
        if let Some(world) = agree_with_rank_0(&f.hashes, what)? {
            self.summary.replicas_agreed_ranks = Some(world);
        }
        Ok(())
    }

    /// Prints and records the lag report of stage 2 (`summary.json` `lag`, a `lag`
    /// record in metrics.jsonl) with its warnings.
    pub fn report_lag(
        &mut self,
        partition: &crate::ldt::partition::Partition,
        single_phases: Option<(usize, usize)>,
    ) -> Result<()> {
        let report = crate::ldt::lag::report(&self.cfg, partition, single_phases);
        for l in &report.sets {
            println!(
                "EMA half-life of the {} set ({} layers): {:.0}..{:.0} steps of {} planned",
                l.set.name(),
                l.layers,
                l.min_half_life,
                l.max_half_life,
                l.planned_steps
            );
        }
        for w in &report.warnings {
            eprintln!("{w}");
        }
        self.metrics.write(&Record::Lag {
            report: report.clone(),
        })?;
        self.summary.lag = Some(report);
        Ok(())
    }

    /// Writes an exported network `DIR/file` (atomically), with the input it expects
    /// (classes, size, normalization) in the file's metadata.
    pub fn export(&self, named: &[(String, Tensor)], file: &str) -> Result<()> {
        let meta = self.bench.input_spec().metadata();
        io::save_tensors_with(named, meta, &self.dir.join(file))
    }

    /// Elements of one input image.
    pub fn image_len(&self) -> usize {
        self.net.input_shape().iter().product()
    }

    /// The network stage 1 starts from or continues: that of the stage-1 checkpoint
    /// `resume`, else [`RunContext::initial_state`].
    pub fn start_state(&self, resume: Option<&Checkpoint>) -> Result<NetState> {
        match resume {
            Some(ck) => self.restore_net(ck, "start"),
            None => self.initial_state(),
        }
    }

    /// Starting weights: `model.init` if set (its head re-initialized, seeded, with
    /// `model.reset_head`), else seeded PyTorch-style init; in the run's working layout
    /// ([`RunContext::working`]).
    pub fn initial_state(&self) -> Result<NetState> {
        let state = match &self.cfg.model.init {
            Some(p) if self.cfg.model.reset_head => io::load_state_reset_head(
                self.net.as_ref(),
                p,
                &self.load_device(),
                &mut Rng::new(self.cfg.seed, streams::INIT),
            )
            .context("config key `model.init`"),
            Some(p) => io::load_state(self.net.as_ref(), p, &self.load_device())
                .context("config key `model.init`"),
            None if self.cfg.streamed() => NetState::init_streamed(
                self.net.as_ref(),
                &mut Rng::new(self.cfg.seed, streams::INIT),
                &self.device,
                self.working_dtype(),
            ),
            None => NetState::init(
                self.net.as_ref(),
                &mut Rng::new(self.cfg.seed, streams::INIT),
                &self.device,
            ),
        }?;
        self.working(state)
    }

    /// `state` in the layout this run trains: with streamed weights
    /// ([`crate::config::Config::streamed`]) or bf16 working weights
    /// ([`crate::config::Config::host_masters`]) its f32 weights move to host masters.
    pub fn working(&self, state: NetState) -> Result<NetState> {
        if self.cfg.streamed() {
            state.streamed(self.working_dtype(), &self.device)
        } else if self.cfg.host_masters() {
            state.with_host_masters()
        } else {
            Ok(state)
        }
    }

    /// Where weights read from a file go first: the run's device, or the host when they
    /// stream (they become host masters; the device never holds them all).
    fn load_device(&self) -> Device {
        match self.cfg.streamed() {
            true => Device::Cpu,
            false => self.device.clone(),
        }
    }

    /// Network `prefix` of checkpoint `ck` in the run's working layout.
    pub fn restore_net(&self, ck: &Checkpoint, prefix: &str) -> Result<NetState> {
        self.working(ck.net_on(prefix, self.net.as_ref(), &self.load_device())?)
    }

    /// The dtype of the working copies (`train.precision`).
    fn working_dtype(&self) -> candle_core::DType {
        match self.cfg.train.precision {
            crate::config::Precision::Bf16 => candle_core::DType::BF16,
            crate::config::Precision::F32 => candle_core::DType::F32,
        }
    }

    /// Batch order of the training stage: the schedule (`data.schedule`) or seeded
    /// shuffles of all source training examples.
    pub fn train_order(&self) -> Result<BatchOrder> {
        match &self.cfg.data.schedule {
            Some(p) => Ok(BatchOrder::fixed(loader::read_batches(
                p,
                &self.cfg.data.schedule_key,
            )?)),
            None => Ok(BatchOrder::shuffle(
                self.train_indices.clone(),
                self.cfg.train.batch_size,
                Rng::new(self.cfg.seed, streams::TRAIN),
            )),
        }
    }

    /// The training loader resumed after `done` batches of the training order, for the
    /// remaining `count` (the order is replayed from the seed, nothing is gathered).
    pub fn train_loader(&self, done: usize, count: usize) -> Result<Loader> {
        self.loader(self.train_order()?, "train", done, count)
    }

    /// Whether a checkpoint is due after `step`: every `checkpoint.every` steps, at the
    /// last step (when checkpointing), or when a signal asked to stop.
    /// A stop request on any rank stops every rank at the same step.
    pub fn checkpoint_due(&self, step: usize) -> Result<bool> {
        let every = self.cfg.checkpoint.every;
        let stop = crate::dist::any(self.stop_requested())?;
        Ok(stop || (every > 0 && (step.is_multiple_of(every) || step == self.cfg.train.steps)))
    }

    fn stop_requested(&self) -> bool {
        self.signals.as_ref().is_some_and(Signals::requested)
    }

    /// Whether a stage-1 checkpoint is due after its step `k` (warm-up steps, then
    /// statistics batches, counted together): every `checkpoint.every` of them, or when
    /// a signal asked to stop.
    pub fn stage1_checkpoint_due(&self, k: usize) -> Result<bool> {
        let every = self.cfg.checkpoint.every;
        let stop = crate::dist::any(self.stop_requested())?;
        Ok(stop || (every > 0 && k.is_multiple_of(every)))
    }

    /// Writes training checkpoint `step` with the method's tensors; after a signal,
    /// returns the [`Interrupted`] error that ends the run with the requeue exit code.
    pub fn checkpoint(&mut self, step: usize, mut w: Writer) -> Result<()> {
        // A resumed run reports the search that chose its partition.
        if let Some(s) = &self.summary.search {
            w.meta("search", serde_json::to_value(s)?);
            w.meta(
                "search_seconds",
                serde_json::json!(self.summary.search_seconds),
            );
        }
        self.save_checkpoint(checkpoint::Kind::Train, step, w)
    }

    /// [`RunContext::checkpoint`] of stage 1, after `k` of its steps.
    pub fn checkpoint_stage1(&mut self, k: usize, w: Writer) -> Result<()> {
        self.save_checkpoint(checkpoint::Kind::Stage1, k, w)
    }

    fn save_checkpoint(&mut self, kind: checkpoint::Kind, step: usize, w: Writer) -> Result<()> {
        let common = checkpoint::common_meta(
            self.cfg.train.method.name(),
            self.net.as_ref(),
            &self.cfg.to_toml(),
        );
        // Rank 0 writes; the others wait for it, so that no rank exits (and makes the
        // launcher stop the job) while the checkpoint is being written.
        let group = crate::dist::group();
        let dir = if group.rank() == 0 {
            checkpoint::save(
                &self.run_dir,
                kind,
                step,
                common,
                w,
                self.cfg.checkpoint.keep_last,
            )?
        } else {
            checkpoint::dir_of(&self.run_dir, kind, step)
        };
        group.barrier()?;
        self.metrics.write(&Record::Checkpoint {
            step,
            dir: dir.display().to_string(),
        })?;
        if crate::dist::any(self.stop_requested())? {
            return Err(Interrupted { kind, step, dir }.into());
        }
        Ok(())
    }

    /// The non-finite guard after a forward/backward of `branch` at `step`: `Ok(true)` to
    /// apply the update; `Ok(false)` to skip it (`train.on_nonfinite = "skip"`, counted
    /// and logged); an error naming the step, layer and value (`"stop"`). With
    /// `train.clip_grad_norm` set, finite gradients are clipped here.
    pub fn guard(
        &mut self,
        step: usize,
        branch: &str,
        stats: &StepStats,
        grads: &mut [Option<crate::optim::Grad>],
    ) -> Result<bool> {
        let Some(what) = nonfinite(stats, grads, self.net.params())? else {
            if self.cfg.train.clip_grad_norm > 0.0 {
                crate::train::step::clip_grad_norm(grads, self.cfg.train.clip_grad_norm)?;
            }
            return Ok(true);
        };
        match self.cfg.train.on_nonfinite {
            OnNonFinite::Stop => bail!(nonfinite_stop(step, branch, &what)),
            OnNonFinite::Skip => {
                *self.summary.skipped_steps.get_or_insert(0) += 1;
                self.metrics.write(&Record::Skip {
                    step,
                    branch: branch.to_string(),
                    reason: what.clone(),
                })?;
                eprintln!("warning: skipped step {step} ({branch}): {what}");
                Ok(false)
            }
        }
    }

    /// The resume checkpoint after checking that it belongs to this method and model.
    pub fn take_resume(&mut self) -> Result<Option<Checkpoint>> {
        if let Some(ck) = &self.stage1_resume {
            checkpoint::check_compatible(ck, self.cfg.train.method.name(), self.net.as_ref())?;
        }
        match self.resume.take() {
            Some(ck) => {
                checkpoint::check_compatible(&ck, self.cfg.train.method.name(), self.net.as_ref())?;
                Ok(Some(ck))
            }
            None => Ok(None),
        }
    }

    /// A prefetching loader of stage `stage`'s batches in `order`: `count` of them
    /// after the first `done` (skipped, not gathered), augmented as `[augment]` says
    /// with draws keyed by the stage and the batch's position.
    pub fn loader(
        &self,
        mut order: BatchOrder,
        stage: &str,
        done: usize,
        count: usize,
    ) -> Result<Loader> {
        order.skip(done)?;
        let plan = crate::data::loader::Plan {
            stage: Some(stage.to_string()),
            first: done,
            count,
            workers: self.cfg.data.loader_threads(),
            depth: self.cfg.data.prefetch,
        };
        Loader::spawn(self.pool.clone(), order, plan)
    }

    /// This process's rows of a training batch on the run's device: the whole batch, or
    /// in a data-parallel run this rank's shard, cut before the upload.
    pub fn batch(&self, b: &crate::data::HostBatch) -> Result<Batch> {
        let group = crate::dist::group();
        let n = b.len();
        let (lo, hi) = if group.is_local() {
            (0, n)
        } else {
            crate::dist::shard(n, group.rank(), group.world())
        };
        let (x, y) = b.rows_to_tensors(lo, hi, self.net.input_shape(), &self.device)?;
        Ok(Batch { x, y, total: n })
    }

    /// Evaluates parameters and buffers on every domain.
    pub fn evaluate(&self, params: &Weights<'_>, buffers: &[Tensor]) -> Result<EvalReport> {
        evaluate(
            self.net.as_ref(),
            params,
            buffers,
            &self.bench,
            (self.eval_batch, &self.scoring),
            &self.device,
        )
    }

    /// Whether the task has an accuracy (classification; super-resolution has none).
    pub fn classifies(&self) -> bool {
        self.scoring.loss.is_classification()
    }

    /// The scores of bicubic upsampling on the super-resolution data (the baseline).
    pub fn bicubic(&self) -> Result<EvalReport> {
        crate::train::eval::bicubic(&self.bench, (self.eval_batch, &self.scoring), &self.device)
    }

    /// Logs an evaluation record (`kind: eval`) for network `name` at `step`.
    pub fn log_eval(&mut self, step: usize, name: &str, r: &EvalReport) -> Result<()> {
        self.metrics
            .write(&Record::Eval(EvalRecord::of(step, name, r)))
    }

    /// Plans the run's device memory from the starting weights `state`, before stage 1:
    /// measures the activations of one training micro-batch (a probe on the heap, see
    /// [`crate::train::memory::activations`]) and, with `offload.device_bytes`, refuses a
    /// plan that does not fit, naming the largest consumers and what shrinks them.
    pub fn plan_memory(&mut self, state: &NetState) -> Result<()> {
        // Everything on the heap now but the starting weights is host memory on a GPU.
        let weights = crate::train::memory::weight_bytes(state);
        self.stages.baseline = crate::heap::live().saturating_sub(weights);
        let rows = self.micro_batch_rows();
        let all = self.probe_activations(state, &vec![true; state.len()])?;
        self.activations = [all; 2];
        let cfg = &self.cfg;
        let budget = cfg.offload.device_bytes;
        if budget > 0 {
            let numel = self.net.numel() as u64;
            let p = crate::train::memory::before_stage1(cfg, numel, self.activations[0]);
            if p.device_peak > budget {
                bail!("{}", crate::train::memory::over_budget(&p, budget, rows));
            }
            self.plan_evaluation(state, p.live_peak - p.gradients)?;
        }
        Ok(())
    }

    /// With `offload.device_bytes`, evaluates in batches whose plan fits it: the
    /// parameter state kept through evaluation (`kept` bytes) plus one evaluation
    /// forward of `eval.batch_size` rows, or of the largest batch that fits, said when
    /// lowered. An example's logits depend on its batch only in their last bits (the
    /// matrix kernels block by batch size): accuracies are the same but for exact ties,
    /// losses agree to f32 rounding.
    fn plan_evaluation(&mut self, state: &NetState, kept: u64) -> Result<()> {
        let budget = self.cfg.offload.device_bytes;
        let wanted = self.cfg.eval.batch_size;
        let weights = state.weight_refs();
        let fit = crate::train::memory::eval_batch(
            self.net.as_ref(),
            (&weights, &state.buffers),
            (kept, budget),
            wanted,
            &self.scoring,
            &self.device,
        )
        .context("measuring the activations of an evaluation batch")?;
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        match fit {
            Some((rows, _)) if rows == wanted => {}
            Some((rows, bytes)) => {
                println!(
                    "memory: evaluation in batches of {rows} (eval.batch_size = {wanted} does not \
                     fit offload.device_bytes = {:.1} MiB; {rows} plans {:.1} MiB)",
                    mib(budget),
                    mib(kept + bytes)
                );
                self.eval_batch = rows;
            }
            None => bail!(
                "offload.device_bytes = {:.1} MiB: evaluation does not fit even one example \
                 beside the {:.1} MiB kept through it; raise offload.device_bytes",
                mib(budget),
                mib(kept)
            ),
        }
        Ok(())
    }

    /// Decides the `auto` memory settings (`train.recompute`, `offload.params`) before
    /// any network is made in the run's layout: the first of keeping every activation
    /// with resident weights, block-wise recompute, block-wise recompute with streamed
    /// weights (each costs more time than the one before) that the configuration allows
    /// and whose plan fits `offload.device_bytes` (the last allowed when none fits: the
    /// budget check then names the consumers). Prints the choice and the planned peaks
    /// behind it. The plans are probed on a seeded network of the run's architecture.
    pub fn decide_memory(&mut self) -> Result<()> {
        use crate::config::ParamsPlacement as P;
        let (r, p) = (self.cfg.train.recompute, self.cfg.offload.params);
        if r != Recompute::Auto && p != P::Auto {
            return Ok(());
        }
        let options: Vec<(Recompute, P)> = [
            (Recompute::None, P::Resident),
            (Recompute::Blocks, P::Resident),
            (Recompute::Blocks, P::Stream),
        ]
        .into_iter()
        .filter(|&(rr, pp)| (r == Recompute::Auto || r == rr) && (p == P::Auto || p == pp))
        .collect();
        let (budget, numel) = (self.cfg.offload.device_bytes, self.net.numel() as u64);
        let wb = if self.cfg.host_masters() { 2 } else { 4 };
        // Resident weights alone over the budget: only streaming can fit, and the probe's
        // network is made in host memory.
        let below_weights = budget > 0 && budget < wb * numel;
        let options: Vec<(Recompute, P)> = match below_weights {
            true if options.iter().any(|o| o.1 == P::Stream) => {
                options.into_iter().filter(|o| o.1 == P::Stream).collect()
            }
            _ => options,
        };
        let mut rng = Rng::new(self.cfg.seed, streams::INIT);
        let mut state = match options[0].1 {
            P::Stream => NetState::init_streamed(
                self.net.as_ref(),
                &mut rng,
                &self.device,
                self.working_dtype(),
            )?,
            _ => NetState::init(self.net.as_ref(), &mut rng, &self.device)?,
        };
        if self.cfg.host_masters() {
            state = state.with_host_masters()?;
        }
        let all = vec![true; state.len()];
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let name = |rr: Recompute, pp: P| format!("{rr:?}+{pp:?}").to_lowercase();
        let (mut tried, mut chosen) = (Vec::new(), *options.last().expect("one option"));
        for &(rr, pp) in &options {
            self.cfg.train.recompute = rr;
            self.cfg.offload.params = pp;
            if pp == P::Stream && state.stream.is_none() {
                // Streamed, the probe holds the fetched blocks too (the last option).
                state = self.working(state)?;
            }
            // Each option differs from the one before in what a step holds: probe each.
            let acts = self.probe_activations(&state, &all)?;
            let peak = crate::train::memory::before_stage1(&self.cfg, numel, acts).device_peak;
            tried.push(format!("{} plans {:.1} MiB", name(rr, pp), mib(peak)));
            if budget == 0 || peak <= budget {
                chosen = (rr, pp);
                break;
            }
        }
        (self.cfg.train.recompute, self.cfg.offload.params) = chosen;
        let budget = match budget {
            0 => "no offload.device_bytes budget".to_string(),
            b => format!("offload.device_bytes = {:.1} MiB", mib(b)),
        };
        eprintln!(
            "memory: train.recompute = \"{}\", offload.params = \"{}\" ({budget}; {})",
            format!("{:?}", chosen.0).to_lowercase(),
            format!("{:?}", chosen.1).to_lowercase(),
            tried.join(", ")
        );
        Ok(())
    }

    /// Plans the activations again once the partition is known: those of phase P and
    /// of phase A (which train `masks[0]` and `masks[1]`), for the training report.
    pub fn refine_activations(&mut self, state: &NetState, masks: &[Vec<bool>; 2]) -> Result<()> {
        self.activations = [
            self.probe_activations(state, &masks[0])?,
            self.probe_activations(state, &masks[1])?,
        ];
        Ok(())
    }

    /// The activations of one training micro-batch training the layers of `mask`.
    fn probe_activations(&self, state: &NetState, mask: &[bool]) -> Result<u64> {
        let rows = self.micro_batch_rows();
        let plan = crate::train::step::GradPlan::of(&self.cfg);
        crate::train::memory::activations(self.net.as_ref(), state, mask, plan, rows, &self.device)
            .context("measuring the activations of a training step")
    }

    /// Examples of one micro-batch on this rank.
    fn micro_batch_rows(&self) -> usize {
        let world = crate::dist::group().world();
        self.cfg
            .train
            .batch_size
            .div_ceil(world)
            .div_ceil(self.cfg.train.accumulate.max(1))
            .max(1)
    }

    /// Records the training stage's memory report, seconds and ms per step (over the
    /// `steps_run` steps this process ran; `warm_secs`: the seconds after the first of
    /// them, when there were more) in `summary.json`.
    pub fn record_training(
        &mut self,
        mem: &metrics::MemoryReport,
        secs: f64,
        warm_secs: Option<f64>,
        steps_run: usize,
    ) {
        let per_step = |s: f64| 1e3 * s / steps_run.max(1) as f64;
        let x = &mut self.summary;
        let mem = crate::train::memory::as_configured(*mem, &self.cfg);
        x.memory = Some(crate::train::memory::with_activations(
            mem,
            self.activations,
        ));
        x.train_seconds = Some(secs);
        x.ms_per_step = Some(per_step(secs));
        x.warm_ms_per_step = match (warm_secs, steps_run) {
            (Some(s), 2..) => Some(1e3 * s / (steps_run - 1) as f64),
            _ => None,
        };
        let group = crate::dist::group();
        if !group.is_local() {
            let c = crate::dist::collective_secs();
            x.data_parallel = Some(DataParallel {
                engine: group.name().to_string(),
                world: group.world(),
                collective_seconds: c,
                collective_ms_per_step: per_step(c),
            });
        }
    }

    /// Seconds since the run started.
    pub fn elapsed(&self) -> f64 {
        self.metrics.elapsed()
    }

    /// Writes `summary.json`.
    pub fn write_summary(&mut self) -> Result<()> {
        self.summary.version = env!("CARGO_PKG_VERSION").to_string();
        self.summary.seed = self.cfg.seed;
        self.summary.method = self.cfg.train.method.name().to_string();
        self.summary.arch = self.net.arch().to_string();
        self.summary.parameters = self.net.numel();
        self.summary.seconds = self.elapsed();
        self.summary.peak_rss_bytes = crate::metrics::peak_rss_bytes();
        self.summary.measured_memory = Some(self.stages.report());
        self.summary.write(&self.dir.join("summary.json"))
    }
}

/// The outputs an earlier run left in `dir` (exports, metrics, summary, partition
/// report, checkpoints; not the spill marker, through which the counterpart store
/// reclaims a killed run's file), or none when it holds no run's: a directory
/// counts as a run's once it holds an export, a summary, a partition, a metrics record
/// or a complete checkpoint (a run that stopped at its configuration left only its
/// `config.toml`, which a new run replaces).
fn earlier_outputs(dir: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    let mut counts = false;
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let is = match name.as_str() {
            "summary.json" | "partition.json" => true,
            "metrics.jsonl" => std::fs::metadata(&p).is_ok_and(|m| m.len() > 0),
            "checkpoints" => !checkpoint::complete_dirs(dir)?.is_empty(),
            n => n.ends_with(".safetensors"),
        };
        let belongs = is
            || matches!(
                name.as_str(),
                "config.toml"
                    | "metrics.jsonl"
                    | "partition.svg"
                    | "partition.png"
                    | "curves.svg"
                    | "curves.png"
                    | "checkpoints"
            );
        counts |= is;
        if belongs {
            found.push(p);
        }
    }
    found.sort();
    Ok(if counts { found } else { Vec::new() })
}

/// Before a new run writes into `dir`: refuses when it holds another run's outputs
/// ([`earlier_outputs`]) unless `checkpoint.overwrite`, which removes them (but a file
/// the configuration reads, such as `model.init`), saying what went. With `--resume`
/// and nothing to resume they are this run's, left before its first checkpoint (a
/// requeued job killed early): they are removed the same way and the run starts over.
fn make_room(dir: &Path, cfg: &Config) -> Result<()> {
    let earlier = earlier_outputs(dir)?;
    if earlier.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = earlier
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    let resumed = cfg.checkpoint.resume == crate::config::Resume::Auto;
    if !cfg.checkpoint.overwrite && !resumed {
        bail!(
            "the run directory {} holds another run's outputs ({}): pass --resume to continue \
             it, --overwrite (checkpoint.overwrite = true) to replace it, or choose another --out",
            dir.display(),
            names.join(", ")
        );
    }
    let inputs: Vec<PathBuf> = [cfg.model.init.as_ref(), cfg.data.schedule.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let mut removed = Vec::new();
    for (p, name) in earlier.iter().zip(names) {
        if p.canonicalize().is_ok_and(|c| inputs.contains(&c)) {
            continue;
        }
        let gone = match p.is_dir() {
            true => std::fs::remove_dir_all(p),
            false => std::fs::remove_file(p),
        };
        gone.with_context(|| format!("--overwrite: cannot remove {}", p.display()))?;
        removed.push(name);
    }
    let why = match cfg.checkpoint.overwrite {
        true => "--overwrite",
        false => "--resume without a checkpoint",
    };
    eprintln!(
        "{why}: removed the earlier run's outputs from {}: {}",
        dir.display(),
        removed.join(", ")
    );
    Ok(())
}

/// Splits each source domain's train examples (global pool indices) into training and
/// Checks that `net` outputs what `bench`'s task scores: class logits of the data's
/// classes, or images of the data's target shape.
fn check_output(net: &dyn Network, bench: &Benchmark, cfg: &Config) -> Result<()> {
    let out = net.output_shape();
    match bench.target_shape() {
        Some(t) if out != t => bail!(
            "config key `model.arch`: `{}` outputs {out:?} per example but the \
             super-resolution data ({}) has targets {t:?}: use an upscaling network \
             (`edsr`, `swinir`) with the data's scale",
            cfg.model.arch,
            bench.origin.display()
        ),
        None if out.len() != 1 => bail!(
            "config key `model.arch`: `{}` outputs images {out:?}, not class logits; \
             classification data ({}) needs a classifier",
            cfg.model.arch,
            bench.origin.display()
        ),
        _ => Ok(()),
    }
}

/// validation by a seeded permutation per domain: the first `floor(n * val_fraction)`
/// of the permutation are held out. Target domains are never touched.
fn hold_out(bench: &Benchmark, cfg: &Config) -> (Vec<usize>, Vec<(String, Vec<usize>)>) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (k, d) in bench
        .domains
        .iter()
        .filter(|d| d.role == crate::data::Role::Source)
        .enumerate()
    {
        let n = d.train.len();
        let perm = Rng::new(cfg.seed, streams::VAL + k as u64).permutation(n);
        let nv = (n as f64 * cfg.data.val_fraction).floor() as usize;
        let mut v: Vec<usize> = perm[..nv].iter().map(|&i| start + i).collect();
        let mut t: Vec<usize> = perm[nv..].iter().map(|&i| start + i).collect();
        v.sort_unstable();
        t.sort_unstable();
        train.extend(t);
        if nv > 0 {
            val.push((d.name.clone(), v));
        }
        start += n;
    }
    (train, val)
}
