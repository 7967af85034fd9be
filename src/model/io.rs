//! Weights in and out through safetensors with PyTorch names, checked against the
//! network's specs; files are written atomically (temporary file, fsync, rename) with a
//! checksum of every tensor, checked when they are read back ([`crate::integrity`]).

use super::{init_tensor, NetState, Network};
use crate::integrity::Checked;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// Reads every tensor of a safetensors file, checking the checksums it records (files
/// from other tools record none and are read as they are).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(read_checked(path, device)?.0)
}

/// [`read_safetensors`], and whether the file recorded checksums.
pub fn read_checked(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, Checked)> {
    if !path.exists() {
        bail!("weights file {} does not exist", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (st, checked) = crate::integrity::check_file(path, &bytes)?;
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

/// Loads `path` into a network state: every parameter and buffer must be present with
/// the right shape; missing, unexpected and mis-shaped keys are listed together.
/// Floating dtypes are converted to f32; values must be finite.
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
    let mut map = read_safetensors(path, device)?;
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
    for k in unexpected {
        problems.push(format!("unexpected `{k}`"));
    }
    if !problems.is_empty() {
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
    let sums = crate::integrity::tensor_metadata(sums);
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    // The writer persists a private (0600) temporary file in place of `tmp`: the file
    // gets the permissions of one created here (the umask's), as any other output.
    let perms = std::fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .with_context(|| format!("cannot create {}", tmp.display()))?
        .permissions();
    safetensors::serialize_to_file(&map, Some(sums), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, perms)
        .and_then(|_| std::fs::File::open(&tmp))
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
