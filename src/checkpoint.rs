//! Checkpoints, resume and signals for cluster jobs.
//!
//! A checkpoint is `DIR/checkpoints/step-N/` with `state.safetensors` (every tensor
//! needed to continue: live weights, counterpart slots, optimizer moments, buffers) and
//! `meta.json` (step, method, model, partition, counters, optimizer step counts, config).
//! It is written into a hidden temporary directory, every file fsynced, `meta.json`
//! last, then renamed into place and the parent fsynced: a half-written checkpoint is
//! never visible under a `step-N` name, and older checkpoints are untouched until the
//! new one is complete. The data order is rebuilt from the seed and the number of
//! batches consumed, so a resumed run sees exactly the batches it would have seen.
//!
//! Integrity: `state.safetensors` records a checksum of every tensor and `meta.json` one
//! of its fields ([`crate::integrity`]). A resume checks both; a damaged newest
//! checkpoint is named in a warning and the newest intact one is used.

use crate::model::{io, NetState, Network};
use crate::optim::{LayerState, OptimSettings, Optimizer};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit code after a signal: the current step finished and a checkpoint was written;
/// requeue the job and run it again with `--resume`.
pub const EXIT_CHECKPOINTED: u8 = 3;
/// Exit code of a second signal: exited at once; the newest complete checkpoint is intact.
pub const EXIT_INTERRUPTED: i32 = 4;

/// The error a training loop returns after checkpointing on a signal.
#[derive(Debug)]
pub struct Interrupted {
    /// What the checkpoint holds.
    pub kind: Kind,
    /// Steps of that kind done.
    pub step: usize,
    /// Its directory.
    pub dir: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped by a signal after {} {}; checkpoint {} written; rerun with --resume",
            self.kind.steps_name(),
            self.step,
            self.dir.display()
        )
    }
}

/// What a checkpoint continues: training (`step-N`, N optimizer steps of training done)
/// or stage 1 (`stage1-N`, N of its steps done: warm-up steps, then statistics batches).
/// A training checkpoint supersedes every stage-1 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Training steps.
    Train,
    /// Stage 1's warm-up steps and statistics batches.
    Stage1,
}

impl Kind {
    /// The directory name prefix.
    fn prefix(self) -> &'static str {
        match self {
            Kind::Train => "step-",
            Kind::Stage1 => "stage1-",
        }
    }

    /// What its steps are called in messages.
    pub fn steps_name(self) -> &'static str {
        match self {
            Kind::Train => "step",
            Kind::Stage1 => "stage-1 step",
        }
    }
}

impl std::error::Error for Interrupted {}

/// SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's `--signal`): the first sets a flag the
/// training loop checks after every step; a second one exits at once with
/// [`EXIT_INTERRUPTED`].
#[derive(Clone)]
pub struct Signals {
    flag: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> Result<Signals> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGUSR1,
        ] {
            signal_hook::flag::register_conditional_shutdown(sig, EXIT_INTERRUPTED, flag.clone())?;
            signal_hook::flag::register(sig, flag.clone())?;
        }
        Ok(Signals { flag })
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// Tensors and fields that a method adds to a checkpoint.
#[derive(Default)]
pub struct Writer {
    tensors: Vec<(String, Tensor)>,
    meta: Map<String, Value>,
}

impl Writer {
    /// Adds a tensor.
    pub fn tensor(&mut self, name: impl Into<String>, t: &Tensor) {
        self.tensors.push((name.into(), t.clone()));
    }

    /// Adds a metadata field.
    pub fn meta(&mut self, key: &str, v: Value) {
        self.meta.insert(key.into(), v);
    }

    /// Adds a network's parameters and buffers under `prefix/`.
    pub fn net(&mut self, prefix: &str, net: &dyn Network, state: &NetState) -> Result<()> {
        for (n, t) in io::named_tensors(net, state)? {
            self.tensors.push((format!("{prefix}/{n}"), t));
        }
        Ok(())
    }

    /// Adds an optimizer's per-layer state under `prefix/`.
    pub fn optimizer(&mut self, prefix: &str, opt: &Optimizer, net: &dyn Network) -> Result<()> {
        let n = opt.layers();
        let mut steps = Vec::with_capacity(n);
        for (i, spec) in net.params().iter().enumerate().take(n) {
            match opt.snapshot(i, &spec.shape)? {
                Some(s) => {
                    steps.push(json!(s.step));
                    for (role, t) in s.tensors() {
                        self.tensors
                            .push((format!("{prefix}/{i}/{role}"), t.clone()));
                    }
                }
                None => steps.push(Value::Null),
            }
        }
        self.meta
            .insert(format!("{prefix}_steps"), Value::Array(steps));
        Ok(())
    }
}

/// A loaded checkpoint.
pub struct Checkpoint {
    /// Training or stage 1.
    pub kind: Kind,
    /// Steps of that kind completed.
    pub step: usize,
    /// `meta.json`.
    pub meta: Map<String, Value>,
    /// Every tensor of `state.safetensors`, in host memory.
    pub tensors: HashMap<String, Tensor>,
    /// Its directory.
    pub dir: PathBuf,
    /// The run's device: [`Checkpoint::tensor`], [`Checkpoint::net`] and
    /// [`Checkpoint::optimizer`] put what they return there.
    pub device: Device,
}

impl Checkpoint {
    /// Tensor `name` on the run's device (an error naming the checkpoint when absent).
    /// One at a time: counterpart slots pass through the device only on their way into
    /// the buffer.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("checkpoint {} lacks tensor `{name}`", self.dir.display()))?;
        Ok(t.to_device(&self.device)?)
    }

    /// Metadata field `key`.
    pub fn field(&self, key: &str) -> Result<&Value> {
        self.meta
            .get(key)
            .with_context(|| format!("checkpoint {} lacks field `{key}`", self.dir.display()))
    }

    /// A network saved with [`Writer::net`].
    pub fn net(&self, prefix: &str, net: &dyn Network) -> Result<NetState> {
        self.net_on(prefix, net, &self.device)
    }

    /// [`Checkpoint::net`] with its weights on `device` (the host, for a network whose
    /// weights stream: they go straight to its host masters).
    pub fn net_on(&self, prefix: &str, net: &dyn Network, device: &Device) -> Result<NetState> {
        let params = net
            .params()
            .iter()
            .map(|s| {
                let name = format!("{prefix}/{}", s.name);
                let t = self.tensors.get(&name).with_context(|| {
                    format!("checkpoint {} lacks tensor `{name}`", self.dir.display())
                })?;
                Ok(Var::from_tensor(&t.to_device(device)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let buffers = net
            .buffers()
            .iter()
            .map(|s| self.tensor(&format!("{prefix}/{}", s.name)))
            .collect::<Result<Vec<_>>>()?;
        Ok(NetState {
            params,
            buffers,
            masters: None,
            stream: None,
        })
    }

    /// An optimizer saved with [`Writer::optimizer`].
    pub fn optimizer(
        &self,
        prefix: &str,
        settings: OptimSettings,
        layers: usize,
    ) -> Result<Optimizer> {
        let mut opt = Optimizer::new(settings, layers);
        let steps = self
            .field(&format!("{prefix}_steps"))?
            .as_array()
            .cloned()
            .unwrap_or_default();
        if steps.len() != layers {
            bail!(
                "checkpoint {}: optimizer `{prefix}` has {} layers, the model {layers}",
                self.dir.display(),
                steps.len()
            );
        }
        for (i, s) in steps.iter().enumerate() {
            if let Some(step) = s.as_u64() {
                let get = |role: &str| {
                    let name = format!("{prefix}/{i}/{role}");
                    self.tensors
                        .contains_key(&name)
                        .then(|| self.tensor(&name))
                        .transpose()
                };
                opt.put_state(
                    i,
                    Some(LayerState {
                        step,
                        m: get("m")?,
                        v: get("v")?,
                    }),
                );
            }
        }
        Ok(opt)
    }
}

fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The directory of training checkpoint `step` of the run in `run`.
pub fn step_dir(run: &Path, step: usize) -> PathBuf {
    dir_of(run, Kind::Train, step)
}

/// The directory of checkpoint `step` of `kind` of the run in `run`.
pub fn dir_of(run: &Path, kind: Kind, step: usize) -> PathBuf {
    checkpoints_dir(run).join(format!("{}{step}", kind.prefix()))
}

fn fsync_dir(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing directory {}", p.display()))
}

/// Writes checkpoint `step` of `kind` of the run in `run` with the common fields `common`
/// and the method's `w`; keeps the newest `keep_last` of its kind. Returns its directory.
pub fn save(
    run: &Path,
    kind: Kind,
    step: usize,
    common: Map<String, Value>,
    w: Writer,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let tmp = root.join(format!(
        ".{}{step}.tmp-{}",
        kind.prefix(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let state = tmp.join("state.safetensors");
    io::save_tensors(&w.tensors, &state)
        .with_context(|| format!("writing checkpoint {}", tmp.display()))?;
    if std::env::var("LDT_FAULT_INJECT").as_deref() == Ok("checkpoint-write") {
        bail!(
            "checkpoint {}: injected write failure (LDT_FAULT_INJECT=checkpoint-write)",
            tmp.display()
        );
    }
    let mut meta = common;
    meta.extend(w.meta);
    meta.insert("step".into(), json!(step));
    if kind == Kind::Stage1 {
        meta.insert("stage".into(), json!("stage1"));
    }
    meta.insert(
        "state_bytes".into(),
        json!(std::fs::metadata(&state)?.len()),
    );
    crate::integrity::seal_fields(&mut meta)?;
    let meta_path = tmp.join("meta.json");
    std::fs::write(
        &meta_path,
        serde_json::to_string_pretty(&Value::Object(meta))?,
    )?;
    std::fs::File::open(&meta_path)?.sync_all()?;
    fsync_dir(&tmp)?;
    let dst = dir_of(run, kind, step);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    fsync_dir(&root)?;
    // Checkpoints after this one belong to a history this run replaced (it resumed from
    // an older one because they were damaged, or started over): they go, and a training
    // checkpoint supersedes stage 1's. Of this kind, the newest `keep_last` stay.
    let mut gone = Vec::new();
    for k in [Kind::Train, Kind::Stage1] {
        let mut steps = complete_steps(&root, k)?;
        steps.sort_unstable();
        let (kept, later): (Vec<usize>, Vec<usize>) = match (kind, k) {
            (Kind::Train, Kind::Stage1) => (Vec::new(), steps),
            (Kind::Stage1, Kind::Train) => (Vec::new(), steps),
            _ => steps.iter().partition(|&&s| s <= step),
        };
        let old = if k == kind {
            kept.len().saturating_sub(keep_last)
        } else {
            0
        };
        gone.extend(
            later
                .into_iter()
                .chain(kept.into_iter().take(old))
                .map(|s| dir_of(run, k, s)),
        );
    }
    for d in gone {
        std::fs::remove_dir_all(d).ok();
    }
    // Temporary directories of interrupted saves were never complete: remove them.
    for e in std::fs::read_dir(&root)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".step-") || name.starts_with(".stage1-") {
            std::fs::remove_dir_all(e.path()).ok();
        }
    }
    Ok(dst)
}

/// Steps of the complete checkpoints of `kind` under `root` (a `step-N` or `stage1-N`
/// directory with its `meta.json`; temporary directories are never complete).
fn complete_steps(root: &Path, kind: Kind) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix(kind.prefix())
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join("meta.json").exists() {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// The directories of every complete checkpoint of the run in `run`.
pub fn complete_dirs(run: &Path) -> Result<Vec<PathBuf>> {
    Ok(resume_order(run)?
        .into_iter()
        .map(|(kind, step)| dir_of(run, kind, step))
        .collect())
}

/// Every complete checkpoint of the run in `run`, the one to resume from first: training
/// checkpoints newest first, then stage 1's newest first.
fn resume_order(run: &Path) -> Result<Vec<(Kind, usize)>> {
    let root = checkpoints_dir(run);
    let mut out = Vec::new();
    for kind in [Kind::Train, Kind::Stage1] {
        let mut steps = complete_steps(&root, kind)?;
        steps.sort_unstable_by(|a, b| b.cmp(a));
        out.extend(steps.into_iter().map(|s| (kind, s)));
    }
    Ok(out)
}

/// The newest intact checkpoint of the run in `run`, if any; its tensors are read into
/// host memory and handed out on `device` (the run's, where the restored weights and
/// optimizer state meet the batches). A damaged newer checkpoint is named in a warning
/// on stderr and skipped.
///
/// # Errors
/// Checkpoints exist and none is intact: the error names each and what is wrong.
pub fn latest(run: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let mut damaged = Vec::new();
    for (kind, step) in resume_order(run)? {
        let dir = dir_of(run, kind, step);
        match load(&dir, kind, step, device) {
            Ok(ck) => {
                for (d, e) in &damaged {
                    eprintln!(
                        "warning: checkpoint {} is damaged ({e:#}); resuming from the older {} instead (the damaged one is removed when this run writes its next checkpoint)",
                        d,
                        ck.dir.display()
                    );
                }
                return Ok(Some(ck));
            }
            Err(e) => damaged.push((dir.display().to_string(), e)),
        }
    }
    if damaged.is_empty() {
        return Ok(None);
    }
    let list: Vec<String> = damaged.iter().map(|(d, e)| format!("{d}: {e:#}")).collect();
    bail!(
        "no intact checkpoint to resume from:\n  {}\nrestore one from a copy, or start over with checkpoint.resume = \"never\" (or another --out)",
        list.join("\n  ")
    )
}

/// Checkpoint `step` in `dir`, checked: `meta.json`'s checksum, the state file's size and
/// every tensor's checksum.
fn load(dir: &Path, kind: Kind, step: usize, device: &Device) -> Result<Checkpoint> {
    let meta_path = dir.join("meta.json");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(&meta_path)
            .with_context(|| format!("cannot read {}", meta_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
    let Value::Object(meta) = meta else {
        bail!("{} is not an object", meta_path.display())
    };
    if !meta.contains_key(crate::integrity::META_KEY) {
        bail!(
            "{} records no checksum: damaged, or written by an ldt from before checksums (resume it with that version, or start over)",
            meta_path.display()
        );
    }
    crate::integrity::check_fields(&meta_path, &meta)?;
    let state = dir.join("state.safetensors");
    let want = meta.get("state_bytes").and_then(Value::as_u64);
    let have = std::fs::metadata(&state).map(|m| m.len()).ok();
    if want.is_none() || want != have {
        bail!(
            "{} has {:?} bytes, meta.json says {:?}",
            state.display(),
            have,
            want
        );
    }
    let (tensors, checked) = io::read_checked(&state, &Device::Cpu)?;
    if checked == crate::integrity::Checked::Unrecorded {
        bail!(
            "{} records no checksums while its meta.json does; the file was replaced",
            state.display()
        );
    }
    Ok(Checkpoint {
        kind,
        step,
        meta,
        tensors,
        dir: dir.to_path_buf(),
        device: device.clone(),
    })
}

/// What `ldt verify-checkpoint` found for one file or checkpoint.
pub struct Verdict {
    /// The checkpoint directory or file.
    pub path: PathBuf,
    /// What was checked (`Ok`) or what is wrong.
    pub result: Result<String>,
}

/// Checks a run directory: every complete checkpoint (as a resume would) and every
/// safetensors file at its top level (exported weights, snapshots).
pub fn verify_run(run: &Path) -> Result<Vec<Verdict>> {
    if !run.is_dir() {
        bail!("{} is not a run directory", run.display());
    }
    let mut out = Vec::new();
    let mut cks = resume_order(run)?;
    cks.reverse();
    for (kind, step) in cks {
        let dir = dir_of(run, kind, step);
        let result = load(&dir, kind, step, &Device::Cpu).map(|ck| {
            let n = ck.tensors.len();
            format!("{} {step}, {n} tensors, checksums match", kind.steps_name())
        });
        out.push(Verdict { path: dir, result });
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for path in files {
        let result = std::fs::read(&path)
            .with_context(|| format!("cannot read {}", path.display()))
            .and_then(|b| crate::integrity::check_file(&path, &b).map(|(st, c)| (st.len(), c)))
            .map(|(n, c)| match c {
                crate::integrity::Checked::Intact(_) => format!("{n} tensors, checksums match"),
                crate::integrity::Checked::Unrecorded => {
                    format!("{n} tensors, no checksums recorded (written by another tool)")
                }
            });
        out.push(Verdict { path, result });
    }
    Ok(out)
}

/// Checks that a checkpoint belongs to this run's method and model, naming the mismatch.
pub fn check_compatible(ck: &Checkpoint, method: &str, net: &dyn Network) -> Result<()> {
    let d = ck.dir.display();
    let got = ck.field("method")?.as_str().unwrap_or("");
    if got != method {
        bail!("checkpoint {d} was written by method `{got}`, this run is `{method}`; use another --out or the same method");
    }
    let arch = ck.field("arch")?.as_str().unwrap_or("");
    if arch != net.arch() {
        bail!(
            "checkpoint {d} is of model `{arch}`, this run builds `{}`",
            net.arch()
        );
    }
    let names: Vec<Value> = net.params().iter().map(|s| json!(s.name)).collect();
    let shapes: Vec<Value> = net.params().iter().map(|s| json!(s.shape)).collect();
    if ck.field("params")? != &Value::Array(names) || ck.field("shapes")? != &Value::Array(shapes) {
        bail!("checkpoint {d}: its layers or shapes differ from model `{}` as configured (check `model.*`)", net.arch());
    }
    Ok(())
}

/// Common fields of every checkpoint.
pub fn common_meta(method: &str, net: &dyn Network, config_toml: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("format".into(), json!("ldt-checkpoint/v2"));
    m.insert("method".into(), json!(method));
    m.insert("arch".into(), json!(net.arch()));
    m.insert(
        "params".into(),
        json!(net
            .params()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()),
    );
    m.insert(
        "shapes".into(),
        json!(net
            .params()
            .iter()
            .map(|s| s.shape.clone())
            .collect::<Vec<_>>()),
    );
    m.insert("config".into(), json!(config_toml));
    m
}
