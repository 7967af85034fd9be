//! PyTorch checkpoints (`.pth`, `.pt`, `.bin`: what `torch.save` writes, a zip of one
//! pickled object and its tensor storages), read without Python and without executing
//! anything from the file. The pickle machine here knows only the opcodes and the
//! globals a tensor `state_dict` needs — those `torch.load(weights_only=True)` allows
//! for one: `collections.OrderedDict`, the tensor and parameter rebuilders of
//! `torch._utils`, the typed storages — and refuses anything else, naming the opcode or
//! the global. Nothing in the file is ever called: a "call" of an allowed global is
//! this module building a dict, a tensor or a storage reference itself.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

/// Values by name, in the file's order.
pub type Named<T> = Vec<(String, T)>;

/// The element types of PyTorch's typed storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    Float,
    Double,
    Half,
    BFloat16,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
}

impl Storage {
    /// The storage named `torch.<name>`, if it is one.
    fn named(name: &str) -> Option<Storage> {
        Some(match name {
            "FloatStorage" => Storage::Float,
            "DoubleStorage" => Storage::Double,
            "HalfStorage" => Storage::Half,
            "BFloat16Storage" => Storage::BFloat16,
            "LongStorage" => Storage::Long,
            "IntStorage" => Storage::Int,
            "ShortStorage" => Storage::Short,
            "CharStorage" => Storage::Char,
            "ByteStorage" => Storage::Byte,
            "BoolStorage" => Storage::Bool,
            _ => return None,
        })
    }

    /// Bytes per element in the file.
    fn size(self) -> usize {
        match self {
            Storage::Double | Storage::Long => 8,
            Storage::Float | Storage::Int => 4,
            Storage::Half | Storage::BFloat16 | Storage::Short => 2,
            Storage::Char | Storage::Byte | Storage::Bool => 1,
        }
    }
}

/// The callables and classes a tensor `state_dict` refers to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(Storage),
}

impl Global {
    /// `module.name` if it is allowed; the error names it otherwise.
    fn resolve(module: &str, name: &str) -> Result<Global> {
        Ok(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", s) if Storage::named(s).is_some() => {
                Global::Storage(Storage::named(s).expect("checked"))
            }
            _ => bail!(
                "refers to `{module}.{name}`, which a tensor state_dict does not need (only \
                 collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter \
                 and torch.*Storage are allowed; nothing from the file is ever run). Save \
                 `model.state_dict()` alone, or export safetensors"
            ),
        })
    }
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Clone, Debug)]
struct TensorRef {
    storage: Storage,
    key: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// A value on the pickle machine's stack.
#[derive(Clone, Debug)]
enum Value {
    Mark,
    None,
    /// A bool, float or bytes object: metadata beside the tensors, never read.
    Scalar(&'static str),
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    /// A persistent id resolved: `(storage type, key, numel)`.
    Storage(Storage, String, usize),
    Tensor(TensorRef),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Mark => "a mark",
            Value::None => "None",
            Value::Scalar(kind) => kind,
            Value::Int(_) => "an int",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Storage(..) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    fn int(&self, what: &str) -> Result<i64> {
        match self {
            Value::Int(i) => Ok(*i),
            other => bail!("{what} is {}, not an int", other.kind()),
        }
    }

    fn ints(&self, what: &str) -> Result<Vec<usize>> {
        match self {
            Value::Tuple(v) => v
                .iter()
                .map(|x| usize::try_from(x.int(what)?).map_err(|_| anyhow!("{what}: negative")))
                .collect(),
            other => bail!("{what} is {}, not a tuple", other.kind()),
        }
    }
}

/// Reads the pickle `data` (protocols 2 to 5) into its value, refusing every opcode and
/// global a tensor `state_dict` does not need.
fn unpickle(data: &[u8]) -> Result<Value> {
    let mut r = Reader { data, at: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| anyhow!("stack underflow"));
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| anyhow!("no mark on the stack"))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let at = r.at;
        let op = r.byte()?;
        let fail = |e: anyhow::Error| e.context(format!("pickle opcode 0x{op:02x} at byte {at}"));
        let step = (|| -> Result<bool> {
            match op {
                0x80 => {
                    let p = r.byte()?;
                    if p < 2 {
                        bail!("pickle protocol {p}: torch.save writes 2 or later");
                    }
                }
                0x95 => {
                    r.take(8)?;
                }
                b'.' => return Ok(true),
                b'(' => stack.push(Value::Mark),
                b'}' => stack.push(Value::Dict(Rc::default())),
                b']' => stack.push(Value::List(Rc::default())),
                b')' => stack.push(Value::Tuple(Vec::new())),
                b'N' => stack.push(Value::None),
                0x88 | 0x89 => stack.push(Value::Scalar("a bool")),
                b'J' => stack.push(Value::Int(i32::from_le_bytes(r.array()?) as i64)),
                b'K' => stack.push(Value::Int(r.byte()? as i64)),
                b'M' => stack.push(Value::Int(u16::from_le_bytes(r.array()?) as i64)),
                0x8a | 0x8b => {
                    let n = match op {
                        0x8a => r.byte()? as usize,
                        _ => u32::from_le_bytes(r.array()?) as usize,
                    };
                    let b = r.take(n)?;
                    if n > 8 {
                        bail!("an integer of {n} bytes");
                    }
                    let mut v: i64 = 0;
                    for (k, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * k);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    stack.push(Value::Int(v));
                }
                b'G' => {
                    r.take(8)?;
                    stack.push(Value::Scalar("a float"));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => u32::from_le_bytes(r.array()?) as usize,
                        0x8c => r.byte()? as usize,
                        _ => u64::from_le_bytes(r.array()?) as usize,
                    };
                    let s = std::str::from_utf8(r.take(n)?).context("a string not in UTF-8")?;
                    stack.push(Value::Str(s.to_string()));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => u32::from_le_bytes(r.array()?) as usize,
                        b'C' => r.byte()? as usize,
                        _ => u64::from_le_bytes(r.array()?) as usize,
                    };
                    r.take(n)?;
                    stack.push(Value::Scalar("bytes"));
                }
                b't' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if stack.len() < n {
                        bail!("stack underflow");
                    }
                    let items = stack.split_off(stack.len() - n);
                    stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(Value::Dict(Rc::new(RefCell::new(pairs(items)?))));
                }
                b'a' => {
                    let v = pop(&mut stack)?;
                    match stack.last() {
                        Some(Value::List(l)) => l.borrow_mut().push(v),
                        _ => bail!("APPEND to something not a list"),
                    }
                }
                b'e' => {
                    let items = pop_mark(&mut stack)?;
                    match stack.last() {
                        Some(Value::List(l)) => l.borrow_mut().extend(items),
                        _ => bail!("APPENDS to something not a list"),
                    }
                }
                b's' => {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    match stack.last() {
                        Some(Value::Dict(d)) => d.borrow_mut().push((k, v)),
                        _ => bail!("SETITEM on something not a dict"),
                    }
                }
                b'u' => {
                    let items = pairs(pop_mark(&mut stack)?)?;
                    match stack.last() {
                        Some(Value::Dict(d)) => d.borrow_mut().extend(items),
                        _ => bail!("SETITEMS on something not a dict"),
                    }
                }
                b'q' | b'r' | 0x94 => {
                    let k = match op {
                        b'q' => r.byte()? as u64,
                        b'r' => u32::from_le_bytes(r.array()?) as u64,
                        _ => memo.len() as u64,
                    };
                    let v = stack.last().ok_or_else(|| anyhow!("stack underflow"))?;
                    memo.insert(k, v.clone());
                }
                b'h' | b'j' => {
                    let k = match op {
                        b'h' => r.byte()? as u64,
                        _ => u32::from_le_bytes(r.array()?) as u64,
                    };
                    let v = memo.get(&k).ok_or_else(|| anyhow!("memo {k} unset"))?;
                    stack.push(v.clone());
                }
                b'0' => {
                    pop(&mut stack)?;
                }
                b'1' => {
                    pop_mark(&mut stack)?;
                }
                b'2' => {
                    let v = stack.last().ok_or_else(|| anyhow!("stack underflow"))?;
                    stack.push(v.clone());
                }
                b'c' => {
                    let module = r.line()?;
                    let name = r.line()?;
                    stack.push(Value::Global(Global::resolve(&module, &name)?));
                }
                0x93 => {
                    let name = pop(&mut stack)?;
                    let module = pop(&mut stack)?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        bail!("STACK_GLOBAL of {} and {}", module.kind(), name.kind());
                    };
                    stack.push(Value::Global(Global::resolve(m, n)?));
                }
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    stack.push(persistent(pid)?);
                }
                b'R' => {
                    let args = pop(&mut stack)?;
                    let f = pop(&mut stack)?;
                    stack.push(call(f, args)?);
                }
                b'b' => {
                    // The state of an object: an OrderedDict's `_metadata` (versions of
                    // the modules that wrote it), or a parameter's extra attributes.
                    let _state = pop(&mut stack)?;
                    match stack.last() {
                        Some(Value::Dict(_) | Value::Tensor(_)) => {}
                        Some(other) => bail!("BUILD on {}", other.kind()),
                        None => bail!("stack underflow"),
                    }
                }
                other => bail!(
                    "pickle opcode 0x{other:02x} is not one a tensor state_dict needs; \
                     refused (nothing from the file is run)"
                ),
            }
            Ok(false)
        })();
        if step.map_err(fail)? {
            break;
        }
    }
    stack
        .pop()
        .ok_or_else(|| anyhow!("the pickle ends with an empty stack"))
}

/// Alternating keys and values as pairs.
fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("a dict with an odd number of items");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// A persistent id: torch's `('storage', <storage class>, key, location, numel)`.
fn persistent(pid: Value) -> Result<Value> {
    let Value::Tuple(t) = pid else {
        bail!("a persistent id that is {}, not a tuple", pid.kind());
    };
    match &t[..] {
        [Value::Str(tag), Value::Global(Global::Storage(s)), Value::Str(key), _, numel]
            if tag == "storage" =>
        {
            let n = usize::try_from(numel.int("a storage's size")?)?;
            Ok(Value::Storage(*s, key.clone(), n))
        }
        _ => bail!("a persistent id that is not a torch storage"),
    }
}

/// What "calling" an allowed global builds.
fn call(f: Value, args: Value) -> Result<Value> {
    let Value::Global(g) = f else {
        bail!("REDUCE of {}, not an allowed global", f.kind());
    };
    let Value::Tuple(args) = args else {
        bail!("REDUCE with {} for arguments", args.kind());
    };
    Ok(match g {
        Global::OrderedDict if args.is_empty() => Value::Dict(Rc::default()),
        Global::RebuildTensor => match &args[..] {
            [Value::Storage(s, key, numel), offset, size, stride, ..] => {
                let t = TensorRef {
                    storage: *s,
                    key: key.clone(),
                    offset: usize::try_from(offset.int("a tensor's storage offset")?)?,
                    size: size.ints("a tensor's size")?,
                    stride: stride.ints("a tensor's stride")?,
                };
                if t.size.len() != t.stride.len() {
                    bail!(
                        "a tensor of {} dims with {} strides",
                        t.size.len(),
                        t.stride.len()
                    );
                }
                let last = t.offset
                    + t.size
                        .iter()
                        .zip(&t.stride)
                        .map(|(&n, &s)| n.saturating_sub(1) * s)
                        .sum::<usize>();
                if t.size.iter().all(|&n| n > 0) && last >= *numel {
                    bail!("a tensor reaching element {last} of a storage of {numel}");
                }
                Value::Tensor(t)
            }
            _ => bail!("_rebuild_tensor_v2 with unexpected arguments"),
        },
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => t,
            _ => bail!("_rebuild_parameter without a tensor"),
        },
        other => bail!("{other:?} called with {} arguments", args.len()),
    })
}

/// A cursor over the pickle's bytes.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| anyhow!("the pickle ends early"))?;
        let b = &self.data[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.at..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("the pickle ends early"))?;
        let s = std::str::from_utf8(&rest[..n]).context("a global's name not in UTF-8")?;
        self.at += n + 1;
        Ok(s.to_string())
    }
}

/// The keys under which a checkpoint may hold its state dict, in the order they are
/// tried: training checkpoints (`state_dict`, `model`, `model_state_dict`) and BasicSR's
/// (`params`, `params_ema`). BasicSR saves a model trained with an EMA under both; its
/// loader reads `params` unless told otherwise (`param_key_g`), and so does this one,
/// taking `params_ema` when it is alone.
const STATE_DICT_KEYS: [&str; 5] = [
    "state_dict",
    "model",
    "model_state_dict",
    "params",
    "params_ema",
];

/// The named tensors of a state dict, and a note saying which dict of the file held it
/// when it was not the top level ([`STATE_DICT_KEYS`]).
fn state_dict(top: Value) -> Result<(Named<TensorRef>, Option<String>)> {
    let tensors = |d: &Rc<RefCell<Vec<(Value, Value)>>>| -> Option<Vec<(String, TensorRef)>> {
        d.borrow()
            .iter()
            .map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
                _ => None,
            })
            .collect()
    };
    let Value::Dict(d) = &top else {
        bail!("holds {}, not a state_dict (a dict of tensors)", top.kind());
    };
    if let Some(t) = tensors(d) {
        return Ok((t, None));
    }
    let keys: Vec<String> = d
        .borrow()
        .iter()
        .map(|(k, _)| match k {
            Value::Str(s) => s.clone(),
            other => other.kind().to_string(),
        })
        .collect();
    let inner = |want: &str| {
        d.borrow().iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(inner)) if k == want => tensors(inner),
            _ => None,
        })
    };
    for want in STATE_DICT_KEYS {
        if let Some(t) = inner(want) {
            let mut note = format!("read the state_dict under `{want}`");
            if want == "params" && inner("params_ema").is_some() {
                note += " (BasicSR's default; the `params_ema` beside it was not read)";
            }
            return Ok((t, Some(note)));
        }
    }
    bail!(
        "holds a dict that is not a state_dict (a dict of tensors) and holds none under \
         {}; its keys: {}",
        STATE_DICT_KEYS.map(|k| format!("`{k}`")).join(", "),
        keys.join(", ")
    )
}

/// Whether `bytes` are a PyTorch checkpoint in either format (zip or legacy pickle).
pub fn is_torch(bytes: &[u8]) -> bool {
    is_torch_zip(bytes) || is_torch_legacy(bytes)
}

/// Whether `bytes` start like a zip archive (`torch.save` since PyTorch 1.6).
fn is_torch_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Whether `bytes` start like the legacy format of `torch.save` (before 1.6): its magic
/// number `0x1950a86a20f9469cfc6c` pickled with protocol 2. (A first byte of 0x80 alone
/// says nothing: a safetensors file starts with its header's length.)
fn is_torch_legacy(bytes: &[u8]) -> bool {
    bytes.starts_with(&[
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
    ])
}

/// Reads the tensors of the PyTorch checkpoint `path` (its bytes `bytes`) onto
/// `device`, with a note when its state_dict sat inside a larger dict. Integer
/// tensors become i64, bool ones u8; floating tensors keep their dtype.
pub fn read(path: &Path, bytes: &[u8], device: &Device) -> Result<(Named<Tensor>, Vec<String>)> {
    let name = path.display();
    if !is_torch_zip(bytes) {
        if is_torch_legacy(bytes) {
            bail!(
                "weights file {name}: a PyTorch file in the legacy format (torch.save before \
                 1.6, or _use_new_zipfile_serialization=False), which is not read; load it in \
                 PyTorch and save it again with torch.save, or export safetensors"
            );
        }
        bail!("weights file {name}: neither safetensors nor a PyTorch (zip) checkpoint");
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .with_context(|| format!("weights file {name}: not a readable zip archive"))?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.to_string()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("weights file {name}: unreadable names in the archive"))?;
    if names.iter().any(|n| n.ends_with("constants.pkl")) {
        bail!(
            "weights file {name}: a TorchScript archive (torch.jit.save), not a state_dict; \
             save `model.state_dict()` with torch.save"
        );
    }
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| anyhow!("weights file {name}: a zip archive without data.pkl"))?
        .clone();
    let prefix = pkl
        .strip_suffix("data.pkl")
        .expect("found by it")
        .to_string();
    let mut entry = |n: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(n)
            .with_context(|| format!("weights file {name}: no `{n}` in the archive"))?;
        let mut v = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut v)
            .with_context(|| format!("weights file {name}: cannot read `{n}`"))?;
        Ok(v)
    };
    let big_endian = match entry(&format!("{prefix}byteorder")) {
        Ok(b) => b.trim_ascii() == b"big",
        Err(_) => false,
    };
    let top = unpickle(&entry(&pkl)?).with_context(|| format!("weights file {name}"))?;
    let (refs, inside) = state_dict(top).with_context(|| format!("weights file {name}"))?;
    let notes: Vec<String> = inside.into_iter().collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (key, t) in refs {
        if !storages.contains_key(&t.key) {
            let data = entry(&format!("{prefix}data/{}", t.key))?;
            storages.insert(t.key.clone(), data);
        }
        let data = &storages[&t.key];
        let tensor = materialize(&t, data, big_endian, device)
            .with_context(|| format!("weights file {name}: tensor `{key}`"))?;
        out.push((key, tensor));
    }
    Ok((out, notes))
}

/// The tensor `t` describes, gathered from its storage's bytes `data` in row-major
/// order.
fn materialize(t: &TensorRef, data: &[u8], big_endian: bool, device: &Device) -> Result<Tensor> {
    let size = t.storage.size();
    let count: usize = t.size.iter().product();
    let mut bytes = Vec::with_capacity(count * size);
    let mut index = vec![0usize; t.size.len()];
    for _ in 0..count {
        let at = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        let b = data
            .get(at * size..(at + 1) * size)
            .ok_or_else(|| anyhow!("element {at} lies past its storage's {} bytes", data.len()))?;
        match big_endian {
            true => bytes.extend(b.iter().rev()),
            false => bytes.extend_from_slice(b),
        }
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    let shape = t.size.as_slice();
    let widen = |v: Vec<i64>| Tensor::from_vec(v, shape, device);
    Ok(match t.storage {
        Storage::Float => Tensor::from_raw_buffer(&bytes, DType::F32, shape, device)?,
        Storage::Double => Tensor::from_raw_buffer(&bytes, DType::F64, shape, device)?,
        Storage::Half => Tensor::from_raw_buffer(&bytes, DType::F16, shape, device)?,
        Storage::BFloat16 => Tensor::from_raw_buffer(&bytes, DType::BF16, shape, device)?,
        Storage::Long => Tensor::from_raw_buffer(&bytes, DType::I64, shape, device)?,
        Storage::Int => widen(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64)
                .collect(),
        )?,
        Storage::Short => widen(
            bytes
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes(c.try_into().expect("2")) as i64)
                .collect(),
        )?,
        Storage::Char => widen(bytes.iter().map(|&b| b as i8 as i64).collect())?,
        Storage::Byte | Storage::Bool => Tensor::from_raw_buffer(&bytes, DType::U8, shape, device)?,
    })
}
