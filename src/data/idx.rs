//! IDX files (the format of MNIST and Fashion-MNIST): a big-endian header — magic
//! `0x000008DD` (two zero bytes, type `0x08` = u8, `DD` = number of dimensions), then one
//! u32 per dimension — followed by the u8 items in row-major order. Plain files are
//! memory-mapped; gzip files (recognized by the gzip magic, as Debian's
//! `dataset-fashion-mnist` ships them) are decompressed into memory once.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::io::Read;
use std::path::Path;

/// Magic of an IDX file of u8 images `[N, rows, cols]`.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an IDX file of u8 labels `[N]`.
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The bytes of a data file: memory-mapped, or held in memory (decompressed).
pub enum FileBytes {
    /// A read-only mapping of the file.
    Mapped(Mmap),
    /// The decompressed content.
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// An opened and checked IDX file of u8 items.
pub struct Idx {
    /// Dimensions from the header, e.g. `[N, 28, 28]`.
    pub dims: Vec<usize>,
    bytes: FileBytes,
    offset: usize,
}

/// What a magic number stands for, for messages.
fn describe(magic: u32) -> &'static str {
    match magic {
        IMAGES_MAGIC => "u8 images [N, rows, cols]",
        LABELS_MAGIC => "u8 labels [N]",
        _ => "unknown",
    }
}

/// Parses the header at the start of `head` (magic, then one u32 per dimension) once
/// enough bytes are there: `Ok(None)` asks for more bytes.
fn header(p: &str, head: &[u8], magic: u32) -> Result<Option<(Vec<usize>, usize)>> {
    if head.len() < 4 {
        return Ok(None);
    }
    let got = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
    if got != magic {
        let hint = match got {
            IMAGES_MAGIC | LABELS_MAGIC => format!(" (this is an IDX file of {})", describe(got)),
            _ if got >> 16 != 0 => " (not an IDX file)".to_string(),
            _ => String::new(),
        };
        bail!(
            "IDX file {p}: wrong magic number 0x{got:08x}{hint}; expected 0x{magic:08x} ({})",
            describe(magic)
        );
    }
    let rank = (magic & 0xff) as usize;
    let len = 4 + 4 * rank;
    if head.len() < len {
        return Ok(None);
    }
    let dims = head[4..len]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
        .collect();
    Ok(Some((dims, len)))
}

/// Bytes of data the header declares, or an error when that overflows.
fn body_len(p: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .with_context(|| format!("IDX file {p}: header dimensions {dims:?} are too large"))
}

impl Idx {
    /// Opens the IDX file at `path` (plain or gzip), checks that its magic is `magic`
    /// ([`IMAGES_MAGIC`] or [`LABELS_MAGIC`]) and that it holds exactly the data its
    /// header declares; every problem is an error naming the file.
    pub fn open(path: &Path, magic: u32) -> Result<Idx> {
        let p = path.display().to_string();
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open IDX file {p}"))?;
        let size = file
            .metadata()
            .with_context(|| format!("cannot read the size of IDX file {p}"))?
            .len();
        if size == 0 {
            bail!("IDX file {p} is empty");
        }
        // SAFETY: the file is opened read-only and not modified while mapped.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map IDX file {p}"))?;
        if mmap.starts_with(&[0x1f, 0x8b]) {
            return Self::gunzip(&p, &mmap, magic);
        }
        let truncated =
            || format!("IDX file {p} is truncated: {size} bytes, too short for its header");
        let (dims, offset) = header(&p, &mmap, magic)?.with_context(truncated)?;
        let body = body_len(&p, &dims)?;
        let have = mmap.len() - offset;
        if have < body {
            bail!(
                "IDX file {p} is truncated: its header declares {dims:?} = {body} bytes of data, \
                 the file holds {have}"
            );
        }
        if have > body {
            bail!(
                "IDX file {p} holds {} bytes past the {dims:?} items its header declares; corrupt?",
                have - body
            );
        }
        Ok(Idx {
            dims,
            bytes: FileBytes::Mapped(mmap),
            offset,
        })
    }

    /// Decompresses a gzip IDX file, reading no more than its header declares.
    fn gunzip(p: &str, gz: &[u8], magic: u32) -> Result<Idx> {
        let mut dec = flate2::read::MultiGzDecoder::new(gz);
        let corrupt = |e: std::io::Error| {
            anyhow::anyhow!("IDX file {p}: truncated or corrupt gzip data ({e})")
        };
        let mut buf = Vec::new();
        let (dims, offset) = loop {
            if let Some(h) = header(p, &buf, magic)? {
                break h;
            }
            let mut b = [0u8; 4];
            let n = dec.read(&mut b).map_err(corrupt)?;
            if n == 0 {
                bail!(
                    "IDX file {p} is truncated: {} bytes after decompression, too short for its header",
                    buf.len()
                );
            }
            buf.extend_from_slice(&b[..n]);
        };
        let body = body_len(p, &dims)?;
        let want = offset
            .checked_add(body)
            .with_context(|| format!("IDX file {p}: header dimensions {dims:?} are too large"))?;
        // Grows with the data actually read: a header that lies costs no memory.
        (&mut dec)
            .take((want - buf.len()) as u64)
            .read_to_end(&mut buf)
            .map_err(corrupt)?;
        if buf.len() < want {
            bail!(
                "IDX file {p} is truncated: its header declares {dims:?} = {body} bytes of data, \
                 the decompressed file holds {}",
                buf.len() - offset
            );
        }
        // Reading on to the end also checks the gzip trailer (CRC and length).
        let mut extra = [0u8; 1];
        if dec.read(&mut extra).map_err(corrupt)? > 0 {
            bail!("IDX file {p} holds data past the {dims:?} items its header declares; corrupt?");
        }
        Ok(Idx {
            dims,
            bytes: FileBytes::Owned(buf),
            offset,
        })
    }

    /// The items after the header.
    pub fn data(&self) -> &[u8] {
        &self.bytes[self.offset..]
    }

    /// The file's bytes and the offset of the items in them.
    pub fn into_parts(self) -> (FileBytes, usize) {
        (self.bytes, self.offset)
    }
}

/// The bytes of an IDX file: `magic`, one big-endian u32 per entry of `dims`, then
/// `items` as given (nothing is checked, so tests can also build corrupt files).
pub fn encode(magic: u32, dims: &[u32], items: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend_from_slice(items);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn err(path: &Path, magic: u32) -> String {
        let e = format!("{:#}", Idx::open(path, magic).err().expect("an error"));
        assert!(
            e.contains(&path.display().to_string()),
            "names the file: {e}"
        );
        e
    }

    #[test]
    fn reads_plain_and_gzip() {
        let d = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8 * 7).collect();
        let raw = encode(IMAGES_MAGIC, &[2, 3, 4], &pixels);
        for (name, bytes) in [("a.idx", raw.clone()), ("a.idx.gz", gzip(&raw))] {
            let f = Idx::open(&write(d.path(), name, &bytes), IMAGES_MAGIC).unwrap();
            assert_eq!(f.dims, [2, 3, 4], "{name}");
            assert_eq!(f.data(), pixels, "{name}");
        }
        let labels = encode(LABELS_MAGIC, &[3], &[9, 0, 4]);
        let f = Idx::open(&write(d.path(), "l.gz", &gzip(&labels)), LABELS_MAGIC).unwrap();
        assert_eq!(
            (f.dims.clone(), f.data().to_vec()),
            (vec![3], vec![9, 0, 4])
        );
    }

    #[test]
    fn wrong_magic_names_what_the_file_is() {
        let d = tempfile::tempdir().unwrap();
        let labels = write(d.path(), "l", &encode(LABELS_MAGIC, &[2], &[1, 2]));
        let e = err(&labels, IMAGES_MAGIC);
        assert!(
            e.contains("0x00000801") && e.contains("labels") && e.contains("0x00000803"),
            "{e}"
        );
        let text = write(d.path(), "t", b"hello, world");
        assert!(err(&text, LABELS_MAGIC).contains("not an IDX file"));
        let floats = write(d.path(), "f", &encode(0x0000_0d01, &[1], &[0; 4]));
        assert!(err(&floats, LABELS_MAGIC).contains("0x00000d01"));
        let gz = write(d.path(), "g.gz", &gzip(&encode(LABELS_MAGIC, &[1], &[0])));
        assert!(err(&gz, IMAGES_MAGIC).contains("wrong magic"));
    }

    #[test]
    fn truncated_and_oversized_files_fail() {
        let d = tempfile::tempdir().unwrap();
        let raw = encode(IMAGES_MAGIC, &[2, 2, 2], &[1; 8]);
        for cut in [0, 3, 10, 15, 16, 23] {
            let p = write(d.path(), "cut", &raw[..cut]);
            let e = err(&p, IMAGES_MAGIC);
            assert!(
                e.contains("truncated") || e.contains("empty"),
                "cut {cut}: {e}"
            );
            let g = write(d.path(), "cut.gz", &gzip(&raw[..cut]));
            let e = err(&g, IMAGES_MAGIC);
            assert!(e.contains("truncated"), "gzip cut {cut}: {e}");
        }
        let mut long = raw.clone();
        long.push(0);
        assert!(err(&write(d.path(), "long", &long), IMAGES_MAGIC).contains("past"));
        assert!(err(&write(d.path(), "long.gz", &gzip(&long)), IMAGES_MAGIC).contains("past"));
        // A header that claims far more than the file holds allocates nothing for it.
        let liar = encode(IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX], &[0; 8]);
        let e = err(&write(d.path(), "liar", &liar), IMAGES_MAGIC);
        assert!(e.contains("too large"), "{e}");
        let liar = encode(IMAGES_MAGIC, &[1 << 30, 28, 28], &[0; 8]);
        let e = err(&write(d.path(), "liar.gz", &gzip(&liar)), IMAGES_MAGIC);
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn corrupt_gzip_fails() {
        let d = tempfile::tempdir().unwrap();
        let gz = gzip(&encode(IMAGES_MAGIC, &[4, 8, 8], &[3; 256]));
        // A cut stream, and a flipped byte of the CRC trailer.
        let e = err(
            &write(d.path(), "cut.gz", &gz[..gz.len() - 6]),
            IMAGES_MAGIC,
        );
        assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 6] ^= 0xff;
        let e = err(&write(d.path(), "crc.gz", &bad), IMAGES_MAGIC);
        assert!(e.contains("corrupt gzip"), "{e}");
        let e = err(&d.path().join("missing.gz"), IMAGES_MAGIC);
        assert!(e.contains("cannot open"), "{e}");
    }
}
