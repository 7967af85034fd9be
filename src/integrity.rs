//! Integrity of what a run writes: every safetensors file `ldt` writes (checkpoint state,
//! exported weights) carries an xxh3-64 checksum of each tensor (its name, dtype, shape
//! and bytes) in its header metadata, and a checkpoint's `meta.json` one of its own
//! fields. They are checked whenever a file is read back (resume, `model.init`,
//! `ldt eval`, `ldt verify-checkpoint`), so a flipped byte is an error naming the file and
//! the tensor instead of a run continuing from damaged weights.
//!
//! Files written by other tools (PyTorch's `save_file`) carry no checksums and are read
//! as they are; a file with checksums must have one for every tensor and no other.

use anyhow::{bail, Result};
use safetensors::SafeTensors;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;
use xxhash_rust::xxh3::Xxh3;

/// The metadata key holding the checksums: a JSON object `{tensor name: xxh3 hex}`, one
/// key (safetensors writes its metadata map in no fixed order; one entry keeps the
/// file's bytes a function of its tensors).
pub const TENSOR_KEY: &str = "ldt.xxh3";
/// The `meta.json` field holding the checksum of the other fields.
pub const META_KEY: &str = "checksum";

/// xxh3-64 of a tensor's name, dtype, shape and bytes, as 16 hex digits.
pub fn tensor_checksum(name: &str, dtype: &str, shape: &[usize], data: &[u8]) -> String {
    let mut h = Xxh3::new();
    h.update(format!("{name}\0{dtype}\0{shape:?}\0").as_bytes());
    h.update(data);
    format!("{:016x}", h.digest())
}

/// The header metadata recording `checksums` (`(tensor name, tensor_checksum)` each).
pub fn tensor_metadata(
    checksums: impl IntoIterator<Item = (String, String)>,
) -> HashMap<String, String> {
    let sums: std::collections::BTreeMap<String, String> = checksums.into_iter().collect();
    let json = serde_json::to_string(&sums).expect("a map of strings serializes");
    HashMap::from([(TENSOR_KEY.to_string(), json)])
}

/// What checking a file's tensors found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Every tensor matched its checksum.
    Intact(usize),
    /// The file records no checksums (written by another tool or an older `ldt`).
    Unrecorded,
}

/// Parses the safetensors file `bytes`, read from `path`, and checks every tensor against
/// the checksums in its metadata.
///
/// # Errors
/// An unreadable file; a tensor whose bytes do not match, a tensor without a checksum or
/// a checksum without its tensor: the error names the file and the tensor.
pub fn check_file<'a>(path: &Path, bytes: &'a [u8]) -> Result<(SafeTensors<'a>, Checked)> {
    let unreadable = |e: safetensors::SafeTensorError| {
        anyhow::anyhow!(
            "{} is not a readable safetensors file (truncated or corrupt?): {e}; re-export it with safetensors.torch.save_file",
            path.display()
        )
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(unreadable)?;
    let st = SafeTensors::deserialize(bytes).map_err(unreadable)?;
    let checked = check_tensors(path, &st, header.metadata().as_ref())?;
    Ok((st, checked))
}

/// Checks every tensor of `st`, read from `path`, against the checksums of `meta`.
fn check_tensors(
    path: &Path,
    st: &SafeTensors<'_>,
    meta: Option<&HashMap<String, String>>,
) -> Result<Checked> {
    let Some(json) = meta.and_then(|m| m.get(TENSOR_KEY)) else {
        return Ok(Checked::Unrecorded);
    };
    let recorded: HashMap<String, String> = serde_json::from_str(json).map_err(|e| {
        anyhow::anyhow!(
            "{}: its checksums are unreadable ({e}); the file is damaged, use an intact copy",
            path.display()
        )
    })?;
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in &tensors {
        let Some(want) = recorded.get(name.as_str()) else {
            bail!(
                "{}: tensor `{name}` has no checksum while the others do; the file was altered after it was written; use an intact copy",
                path.display()
            );
        };
        let got = tensor_checksum(
            name,
            &format!("{:?}", view.dtype()),
            view.shape(),
            view.data(),
        );
        if got != *want {
            bail!(
                "{}: tensor `{name}` does not match its checksum (xxh3 {got}, recorded {want}); the file is damaged, use an intact copy",
                path.display()
            );
        }
    }
    if let Some(missing) = recorded
        .keys()
        .find(|n| !tensors.iter().any(|(t, _)| t == *n))
    {
        bail!(
            "{}: tensor `{missing}` has a checksum but is not in the file; the file is damaged",
            path.display()
        );
    }
    Ok(Checked::Intact(tensors.len()))
}

/// xxh3-64 of a JSON object's fields other than [`META_KEY`] (serde_json writes keys
/// sorted, so the text and its checksum are a function of the values).
fn fields_checksum(map: &Map<String, Value>) -> Result<String> {
    let mut rest = map.clone();
    rest.remove(META_KEY);
    let text = serde_json::to_string(&Value::Object(rest))?;
    Ok(format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    ))
}

/// Adds the checksum of `map`'s other fields as [`META_KEY`].
pub fn seal_fields(map: &mut Map<String, Value>) -> Result<()> {
    let sum = fields_checksum(map)?;
    map.insert(META_KEY.into(), Value::String(sum));
    Ok(())
}

/// Checks the checksum [`seal_fields`] added to `map`, read from `path`.
///
/// # Errors
/// A missing or different checksum, naming the file.
pub fn check_fields(path: &Path, map: &Map<String, Value>) -> Result<()> {
    let Some(want) = map.get(META_KEY).and_then(Value::as_str) else {
        bail!(
            "{}: no `{META_KEY}` field; the file is damaged",
            path.display()
        );
    };
    let got = fields_checksum(map)?;
    if got != want {
        bail!(
            "{}: its fields do not match their checksum (xxh3 {got}, recorded {want}); the file is damaged",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    fn file(meta: Option<HashMap<String, String>>, a: &[u8]) -> Vec<u8> {
        let views = vec![
            (
                "a".to_string(),
                TensorView::new(Dtype::U8, vec![a.len()], a).unwrap(),
            ),
            (
                "b".to_string(),
                TensorView::new(Dtype::U8, vec![2], &[7, 9]).unwrap(),
            ),
        ];
        safetensors::serialize(views, meta).unwrap()
    }

    fn sums(a: &[u8]) -> HashMap<String, String> {
        tensor_metadata([
            ("a".to_string(), tensor_checksum("a", "U8", &[a.len()], a)),
            ("b".to_string(), tensor_checksum("b", "U8", &[2], &[7, 9])),
        ])
    }

    /// [`sums`] with the recorded map edited by `f`.
    fn edited(a: &[u8], f: impl FnOnce(&mut HashMap<String, String>)) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = serde_json::from_str(&sums(a)[TENSOR_KEY]).unwrap();
        f(&mut m);
        HashMap::from([(TENSOR_KEY.to_string(), serde_json::to_string(&m).unwrap())])
    }

    fn check(bytes: &[u8]) -> Result<Checked> {
        Ok(check_file(Path::new("f.safetensors"), bytes)?.1)
    }

    /// A file with its checksums passes; one flipped byte of a tensor is named; a file
    /// without checksums is read as it is.
    #[test]
    fn a_flipped_byte_names_the_tensor() {
        let good = file(Some(sums(&[1, 2, 3])), &[1, 2, 3]);
        assert_eq!(check(&good).unwrap(), Checked::Intact(2));
        let mut bad = good.clone();
        let at = bad.len() - 4; // a byte of `a` (b's two bytes are last)
        bad[at] ^= 0x40;
        let e = check(&bad).unwrap_err().to_string();
        assert!(
            e.contains("f.safetensors") && e.contains("tensor `a`"),
            "{e}"
        );
        assert_eq!(check(&file(None, &[1, 2, 3])).unwrap(), Checked::Unrecorded);
        // The same bytes under another shape or name are another checksum.
        assert_ne!(
            tensor_checksum("a", "U8", &[3], &[1, 2, 3]),
            tensor_checksum("a", "U8", &[1, 3], &[1, 2, 3])
        );
        assert_ne!(
            tensor_checksum("a", "U8", &[3], &[1, 2, 3]),
            tensor_checksum("b", "U8", &[3], &[1, 2, 3])
        );
    }

    /// A tensor without a checksum, or a checksum without its tensor, is damage.
    #[test]
    fn checksums_cover_every_tensor_and_only_those() {
        let m = edited(&[1], |m| {
            m.remove("b");
        });
        let e = check(&file(Some(m), &[1])).unwrap_err().to_string();
        assert!(e.contains("tensor `b` has no checksum"), "{e}");
        let m = edited(&[1], |m| {
            m.insert("c".into(), "0".into());
        });
        let e = check(&file(Some(m), &[1])).unwrap_err().to_string();
        assert!(
            e.contains("tensor `c` has a checksum but is not in the file"),
            "{e}"
        );
        let m = HashMap::from([(TENSOR_KEY.to_string(), "{\"a\":".to_string())]);
        let e = check(&file(Some(m), &[1])).unwrap_err().to_string();
        assert!(e.contains("checksums are unreadable"), "{e}");
    }

    /// A sealed object passes; a changed value or a missing seal is named.
    #[test]
    fn sealed_fields_detect_a_change() {
        let p = Path::new("meta.json");
        let mut m = Map::new();
        m.insert("step".into(), Value::from(12));
        m.insert("loss".into(), Value::from(0.1f64 + 0.2));
        seal_fields(&mut m).unwrap();
        let text = serde_json::to_string_pretty(&Value::Object(m.clone())).unwrap();
        let Value::Object(back) = serde_json::from_str(&text).unwrap() else {
            unreachable!()
        };
        check_fields(p, &back).unwrap();
        let mut changed = back.clone();
        changed.insert("step".into(), Value::from(13));
        let e = check_fields(p, &changed).unwrap_err().to_string();
        assert!(e.contains("meta.json") && e.contains("do not match"), "{e}");
        changed.remove(META_KEY);
        assert!(check_fields(p, &changed).is_err());
    }
}
