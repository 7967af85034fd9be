//! Weights in and out through safetensors with PyTorch names, checked against the
//! network's specs; files are written atomically (temporary file, fsync, rename) with a
//! checksum of every tensor, checked when they are read back ([`crate::integrity`]).

use super::{init_tensor, NetState, Network};
use crate::integrity::Checked;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Reads every tensor of a safetensors file, checking the checksums it records (files
/// from other tools record none and are read as they are).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(read_checked(path, device)?.0)
}

/// [`read_safetensors`], and whether the file recorded checksums.
pub fn read_checked(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, Checked)> {
    safetensors_of(path, &read_bytes(path)?, device)
}

/// The bytes of weights file `path`.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    if !path.exists() {
        bail!("weights file {} does not exist", path.display());
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Every tensor of a weights file, told apart by its first bytes: safetensors (checked
/// as [`read_safetensors`] does) or a PyTorch checkpoint (`.pth`/`.pt`/`.bin`, read by
/// [`super::pth`] without running anything from it), with notes on how it was read.
pub fn read_weights(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    let bytes = read_bytes(path)?;
    if super::pth::is_torch(&bytes) {
        let (tensors, notes) = super::pth::read(path, &bytes, device)?;
        return Ok((tensors.into_iter().collect(), notes));
    }
    Ok((safetensors_of(path, &bytes, device)?.0, Vec::new()))
}

/// The tensors of the safetensors file `path` (its bytes `bytes`).
fn safetensors_of(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<(HashMap<String, Tensor>, Checked)> {
    let (st, checked) = crate::integrity::check_file(path, bytes)?;
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = view
                .load(device)
                .with_context(|| format!("{}: tensor `{name}` cannot be read", path.display()))?;
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    Ok((tensors, checked))
}

/// Loads `path` (safetensors, or a PyTorch checkpoint: [`read_weights`]) into a network
/// state: every parameter and buffer must be present with the right shape; missing,
/// unexpected and mis-shaped keys are listed together, with what they suggest (a head
/// for another class count, another architecture's keys). A prefix that a wrapper puts
/// before every key (`module.`, `model.`, `_orig_mod.`) is stripped, and a BatchNorm
/// without `num_batches_tracked` reads it as 0, as PyTorch does; each is said. Floating
/// dtypes are converted to f32; values must be finite.
pub fn load_state(net: &dyn Network, path: &Path, device: &Device) -> Result<NetState> {
    load(net, path, device, None)
}

/// [`load_state`] for fine-tuning on another label set (`model.reset_head`): the head's
/// parameters (`Network::is_head`) are re-initialized from `rng` with their default
/// initializers, and the file's head tensors, whatever their shape, or their absence are
/// no error. Every other key must fit as in [`load_state`].
pub fn load_state_reset_head(
    net: &dyn Network,
    path: &Path,
    device: &Device,
    rng: &mut Rng,
) -> Result<NetState> {
    load(net, path, device, Some(rng))
}

fn load(
    net: &dyn Network,
    path: &Path,
    device: &Device,
    mut reset_head: Option<&mut Rng>,
) -> Result<NetState> {
    let (mut map, mut notes) = read_weights(path, device)?;
    adapt(net, &mut map, &mut notes)?;
    for n in &notes {
        eprintln!("weights file {}: {n}", path.display());
    }
    if reset_head.is_some() {
        for (i, s) in net.params().iter().enumerate() {
            if net.is_head(i) {
                map.remove(&s.name);
            }
        }
    }
    let mut problems = Vec::new();
    let mut take = |name: &str, shape: &[usize], dtype: DType| -> Option<Tensor> {
        match map.remove(name) {
            None => {
                problems.push(format!("missing `{name}` {shape:?}"));
                None
            }
            Some(t) if t.dims() != shape => {
                problems.push(format!(
                    "`{name}` has shape {:?}, the model needs {shape:?}",
                    t.dims()
                ));
                None
            }
            Some(t) => match t.to_dtype(dtype) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(format!(
                        "`{name}`: cannot convert {:?} to {dtype:?}: {e}",
                        t.dtype()
                    ));
                    None
                }
            },
        }
    };
    let params: Vec<Option<Tensor>> = net
        .params()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if reset_head.is_some() && net.is_head(i) {
                None
            } else {
                take(&s.name, &s.shape, DType::F32)
            }
        })
        .collect();
    let buffers: Vec<Option<Tensor>> = net
        .buffers()
        .iter()
        .map(|s| take(&s.name, &s.shape, s.dtype))
        .collect();
    let mut unexpected: Vec<_> = map.keys().cloned().collect();
    unexpected.sort();
    let file_keys: Vec<String> = net
        .params()
        .iter()
        .map(|s| &s.name)
        .chain(net.buffers().iter().map(|s| &s.name))
        .filter(|n| {
            !problems
                .iter()
                .any(|p| p.starts_with(&format!("missing `{n}`")))
        })
        .cloned()
        .chain(unexpected.iter().cloned())
        .collect();
    for k in unexpected {
        problems.push(format!("unexpected `{k}`"));
    }
    if !problems.is_empty() {
        let head_misfit = net.params().iter().enumerate().any(|(i, s)| {
            net.is_head(i)
                && problems
                    .iter()
                    .any(|p| p.starts_with(&format!("`{}` has shape", s.name)))
        });
        if head_misfit {
            problems.push(
                "the head's shape differs: a checkpoint for another number of classes? set \
                 model.reset_head = true to start a new head from it"
                    .to_string(),
            );
        }
        if let Some(hint) = other_architecture(net, &file_keys) {
            problems.push(hint);
        }
        bail!(
            "weights file {} does not fit model `{}`:\n  {}",
            path.display(),
            net.arch(),
            problems.join("\n  ")
        );
    }
    let buffers: Vec<Tensor> = buffers.into_iter().flatten().collect();
    for (spec, t) in net.buffers().iter().zip(&buffers) {
        if t.dtype() == DType::F32 {
            check_finite(path, "buffer", &spec.name, t)?;
        }
    }
    let mut state = NetState {
        params: Vec::new(),
        buffers,
        masters: None,
        stream: None,
    };
    for (i, (spec, t)) in net.params().iter().zip(params).enumerate() {
        let t = match (t, reset_head.as_deref_mut()) {
            (Some(t), _) => t,
            (None, Some(rng)) if net.is_head(i) => {
                init_tensor(spec.init, &spec.shape, DType::F32, rng, device)?
            }
            (None, _) => unreachable!("a missing tensor is reported above"),
        };
        check_finite(path, "tensor", &spec.name, &t)?;
        state.params.push(Var::from_tensor(&t)?);
    }
    Ok(state)
}

/// The prefixes a wrapper puts before every key: `torch.nn.DataParallel` /
/// `DistributedDataParallel` (`module.`), a Lightning-style module (`model.`),
/// `torch.compile` (`_orig_mod.`).
const WRAPPER_PREFIXES: [&str; 3] = ["module.", "model.", "_orig_mod."];

/// Adapts a file's keys to `net` where PyTorch itself would read them: strips a
/// wrapper's prefix from every key when no key fits as it is (repeatedly: `module.model.`),
/// and gives a BatchNorm whose running statistics are there but whose
/// `num_batches_tracked` is not a count of 0 (PyTorch's `_load_from_state_dict` for
/// such state dicts). Each adaptation adds a note.
fn adapt(
    net: &dyn Network,
    map: &mut HashMap<String, Tensor>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let names: std::collections::HashSet<&str> = net
        .params()
        .iter()
        .map(|s| s.name.as_str())
        .chain(net.buffers().iter().map(|s| s.name.as_str()))
        .collect();
    while !map.is_empty() && !map.keys().any(|k| names.contains(k.as_str())) {
        let Some(prefix) = WRAPPER_PREFIXES
            .iter()
            .find(|p| map.keys().all(|k| k.starts_with(*p)))
        else {
            break;
        };
        *map = std::mem::take(map)
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v))
            .collect();
        notes.push(format!("stripped the prefix `{prefix}` from every key"));
    }
    let mut zeroed = 0;
    for b in net.buffers() {
        let Some(layer) = b.name.strip_suffix("num_batches_tracked") else {
            continue;
        };
        if !map.contains_key(&b.name) && map.contains_key(&format!("{layer}running_mean")) {
            let device = map
                .values()
                .next()
                .map_or(Device::Cpu, |t| t.device().clone());
            map.insert(
                b.name.clone(),
                Tensor::zeros(b.shape.as_slice(), b.dtype, &device)?,
            );
            zeroed += 1;
        }
    }
    if zeroed > 0 {
        notes.push(format!(
            "{zeroed} BatchNorm layer(s) without `num_batches_tracked`: read as 0, as PyTorch does"
        ));
    }
    Ok(())
}

/// A hint when `keys` fit another architecture much better than `net`'s: the one whose
/// parameter and buffer names hold at least 90% of them, where `net`'s hold less.
fn other_architecture(net: &dyn Network, keys: &[String]) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    let share = |n: &dyn Network| {
        let names: std::collections::HashSet<&str> = n
            .params()
            .iter()
            .map(|s| s.name.as_str())
            .chain(n.buffers().iter().map(|s| s.name.as_str()))
            .collect();
        keys.iter().filter(|k| names.contains(k.as_str())).count() as f64 / keys.len() as f64
    };
    let own = share(net);
    let [c, h, w] = net.input_shape();
    let best = crate::config::ARCHS
        .iter()
        .filter(|&&a| a != net.arch())
        .filter_map(|&a| {
            // An edsr is probed at 4x: its names hold those of 2x and 3x.
            let cfg = crate::config::ModelConfig {
                arch: a.to_string(),
                scale: Some(4),
                ..Default::default()
            };
            let other = super::build(&cfg, [c, h, w], 10).ok()?;
            Some((a, share(other.as_ref())))
        })
        .max_by(|x, y| x.1.total_cmp(&y.1))?;
    (best.1 >= 0.9 && best.1 > own).then(|| {
        format!(
            "the keys look like a `{}` ({:.0}% of them are its names, {:.0}% this model's): \
             model.arch = \"{}\"?",
            best.0,
            100.0 * best.1,
            100.0 * own,
            best.0
        )
    })
}

/// An error naming the file, the tensor and the index of its first NaN or Inf.
fn check_finite(path: &Path, kind: &str, name: &str, t: &Tensor) -> Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|v| !v.is_finite()) {
        bail!(
            "weights file {}: {kind} `{name}` holds a non-finite value at flat index {i}",
            path.display()
        );
    }
    Ok(())
}

/// Named tensors of a network state (its f32 weights, then buffers), PyTorch names;
/// master weights are read as host tensors (nothing goes to the device).
pub fn named_tensors(net: &dyn Network, state: &NetState) -> Result<Vec<(String, Tensor)>> {
    Ok(named(net, &state.weight_refs().all()?, &state.buffers))
}

/// Parameters then buffers of `net`, each with its name, for saving (the tensors are
/// shared, not copied).
pub fn named(net: &dyn Network, params: &[Tensor], buffers: &[Tensor]) -> Vec<(String, Tensor)> {
    let names = net.params().iter().map(|s| s.name.clone());
    let buffer_names = net.buffers().iter().map(|s| s.name.clone());
    names
        .zip(params.iter().cloned())
        .chain(buffer_names.zip(buffers.iter().cloned()))
        .collect()
}

/// Writes a network state to `path` atomically.
pub fn save_state(net: &dyn Network, state: &NetState, path: &Path) -> Result<()> {
    save_tensors(&named_tensors(net, state)?, path)
}

/// Writes named tensors to `path` atomically: a temporary file in the same directory,
/// fsync, then rename, so a reader never sees a half-written file. The header metadata
/// records each tensor's checksum.
pub fn save_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    save_tensors_with(tensors, BTreeMap::new(), path)
}

/// Rewrites the `__metadata__` object of the safetensors file `path` with its keys in
/// sorted order, in place (the same length): safetensors writes it from a `HashMap`,
/// whose order changes from one map to the next, and the same tensors and metadata must
/// give the same file bytes.
fn sort_metadata(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header)?;
    let Some(span) = metadata_span(&header) else {
        return Ok(());
    };
    let meta: BTreeMap<String, String> = serde_json::from_slice(&header[span.clone()])?;
    let sorted = serde_json::to_vec(&meta)?;
    anyhow::ensure!(
        sorted.len() == span.len(),
        "the header's metadata changed length when sorted"
    );
    header[span].copy_from_slice(&sorted);
    f.seek(SeekFrom::Start(8))?;
    f.write_all(&header)?;
    Ok(())
}

/// The bytes of the `__metadata__` object's value in a safetensors header (JSON
/// strings and their escapes skipped while the braces are matched).
fn metadata_span(header: &[u8]) -> Option<std::ops::Range<usize>> {
    const KEY: &[u8] = b"\"__metadata__\":";
    let start = header.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in header[start..].iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(start..start + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The metadata of the safetensors file `path` (empty when it has none; PyTorch
/// checkpoints have none).
pub fn file_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open weights file {}", path.display()))?;
    // SAFETY: read-only mapping; only the header is parsed.
    let bytes = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    if super::pth::is_torch(&bytes) {
        return Ok(BTreeMap::new());
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes[..]).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({e}); truncated or corrupt?",
            path.display()
        )
    })?;
    Ok(meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// [`save_tensors`] with `extra` metadata beside the checksums (e.g. the input spec of
/// an exported network).
pub fn save_tensors_with(
    tensors: &[(String, Tensor)],
    extra: BTreeMap<String, String>,
    path: &Path,
) -> Result<()> {
    use safetensors::View;
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    // One tensor's bytes at a time: the checksums cost no second copy of the file.
    let sums = map.iter().map(|(name, t)| {
        let dtype = format!("{:?}", View::dtype(t));
        let sum = crate::integrity::tensor_checksum(name, &dtype, t.dims(), &View::data(t));
        (name.clone(), sum)
    });
    let mut sums = crate::integrity::tensor_metadata(sums);
    sums.extend(extra);
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    // The writer persists a private (0600) temporary file in place of `tmp`: the file
    // gets the permissions of one created here (the umask's), as any other output.
    let perms = std::fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .with_context(|| format!("cannot create {}", tmp.display()))?
        .permissions();
    safetensors::serialize_to_file(&map, Some(sums), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    sort_metadata(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, perms)
        .and_then(|_| std::fs::File::open(&tmp))
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tensors and metadata write the same bytes every time (safetensors alone
    /// orders a two-key metadata map at random), braces and quotes inside the values
    /// included, and the file reads back with its metadata and checksums.
    #[test]
    fn the_same_tensors_write_the_same_bytes() {
        let d = tempfile::tempdir().unwrap();
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap();
        let tensors = vec![("w".to_string(), t.clone()), ("b".to_string(), t)];
        let extra = BTreeMap::from([
            ("ldt.input".to_string(), r#"{"a":"}{\"x"}"#.to_string()),
            ("z".to_string(), "1".to_string()),
        ]);
        let mut first: Option<Vec<u8>> = None;
        for k in 0..16 {
            let p = d.path().join(format!("{k}.safetensors"));
            save_tensors_with(&tensors, extra.clone(), &p).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            match &first {
                None => first = Some(bytes),
                Some(f) => assert!(f == &bytes, "write {k} differs"),
            }
            let meta = file_metadata(&p).unwrap();
            assert_eq!(meta["ldt.input"], extra["ldt.input"]);
            crate::integrity::check_file(&p, &std::fs::read(&p).unwrap()).unwrap();
        }
    }
}
