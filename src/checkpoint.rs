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
    /// Step of the checkpoint.
    pub step: usize,
    /// Its directory.
    pub dir: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped by a signal after step {}; checkpoint {} written; rerun with --resume",
            self.step,
            self.dir.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// SIGTERM / SIGUSR1 (SLURM's `--signal`): the first sets a flag the training loop
/// checks after every step; a second one exits at once with [`EXIT_INTERRUPTED`].
#[derive(Clone)]
pub struct Signals {
    flag: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> Result<Signals> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
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
    /// Training steps completed.
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

/// The directory of checkpoint `step` of the run in `run`.
pub fn step_dir(run: &Path, step: usize) -> PathBuf {
    checkpoints_dir(run).join(format!("step-{step}"))
}

fn fsync_dir(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing directory {}", p.display()))
}

/// Writes checkpoint `step` of the run in `run` with the common fields `common` and the
/// method's `w`; keeps the newest `keep_last`. Returns its directory.
pub fn save(
    run: &Path,
    step: usize,
    common: Map<String, Value>,
    w: Writer,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let tmp = root.join(format!(".step-{step}.tmp-{}", std::process::id()));
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
    meta.insert(
        "state_bytes".into(),
        json!(std::fs::metadata(&state)?.len()),
    );
    let meta_path = tmp.join("meta.json");
    std::fs::write(
        &meta_path,
        serde_json::to_string_pretty(&Value::Object(meta))?,
    )?;
    std::fs::File::open(&meta_path)?.sync_all()?;
    fsync_dir(&tmp)?;
    let dst = step_dir(run, step);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    fsync_dir(&root)?;
    let mut complete = complete_steps(&root)?;
    complete.sort_unstable();
    for s in complete.iter().rev().skip(keep_last) {
        std::fs::remove_dir_all(root.join(format!("step-{s}"))).ok();
    }
    // Temporary directories of interrupted saves were never complete: remove them.
    for e in std::fs::read_dir(&root)?.flatten() {
        if e.file_name().to_string_lossy().starts_with(".step-") {
            std::fs::remove_dir_all(e.path()).ok();
        }
    }
    Ok(dst)
}

/// Steps of the complete checkpoints under `root` (a `step-N` directory with its
/// `meta.json`; temporary directories are never complete).
fn complete_steps(root: &Path) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join("meta.json").exists() {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// The newest complete checkpoint of the run in `run`, if any; its tensors are read into
/// host memory and handed out on `device` (the run's, where the restored weights and
/// optimizer state meet the batches).
pub fn latest(run: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let root = checkpoints_dir(run);
    let Some(step) = complete_steps(&root)?.into_iter().max() else {
        return Ok(None);
    };
    let dir = step_dir(run, step);
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)
        .with_context(|| format!("checkpoint {}: meta.json is not valid JSON", dir.display()))?;
    let Value::Object(meta) = meta else {
        bail!("checkpoint {}: meta.json is not an object", dir.display())
    };
    let state = dir.join("state.safetensors");
    let want = meta.get("state_bytes").and_then(Value::as_u64);
    let have = std::fs::metadata(&state).map(|m| m.len()).ok();
    if want.is_none() || want != have {
        bail!(
            "checkpoint {}: state.safetensors has {:?} bytes, meta.json says {:?}; the checkpoint is damaged (remove that directory to resume from the previous one)",
            dir.display(),
            have,
            want
        );
    }
    let tensors = io::read_safetensors(&state, &Device::Cpu)?;
    Ok(Some(Checkpoint {
        step,
        meta,
        tensors,
        dir,
        device: device.clone(),
    }))
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
    m.insert("format".into(), json!("ldt-checkpoint/v1"));
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
