//! Splits and the opened benchmark. Stored images (`f32` or `u8` scaled by 1/255) stay
//! in the mapped file (or, for a gzip IDX file, in its decompressed bytes), image-folder
//! examples stay files; either is read only into the batches that need it, through the
//! run's [`Prep`] (size, augmentation, normalization). Labels are read once.

use super::folder::{self, FileSplit};
use super::idx::{FileBytes, Idx, IMAGES_MAGIC, LABELS_MAGIC};
use super::manifest::{Manifest, Role, SplitEntry, SplitFormat};
use super::prep::{Draw, Image, InputSpec, Prep};
use crate::config::{Config, DataFormat};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A batch in host memory.
pub struct HostBatch {
    /// Pixels, `N*C*H*W` f32.
    pub images: Vec<f32>,
    /// Labels, `N`.
    pub labels: Vec<i64>,
}

impl HostBatch {
    /// Examples in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The batch as `(images [N,C,H,W] f32, labels [N] i64)` on `device`.
    pub fn to_tensors(&self, shape: [usize; 3], device: &Device) -> Result<(Tensor, Tensor)> {
        self.rows_to_tensors(0, self.len(), shape, device)
    }

    /// Rows `lo..hi` of the batch as tensors on `device` (only those rows are copied).
    pub fn rows_to_tensors(
        &self,
        lo: usize,
        hi: usize,
        shape: [usize; 3],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let per = shape.iter().product::<usize>();
        let n = hi - lo;
        let pixels = &self.images[lo * per..hi * per];
        let x = Tensor::from_slice(pixels, (n, shape[0], shape[1], shape[2]), device)?;
        let y = Tensor::from_slice(&self.labels[lo..hi], n, device)?;
        Ok((x, y))
    }
}

/// Pixel storage of a split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pixels {
    F32,
    U8,
}

/// Where a split's pixels are.
enum Store {
    /// In a mapped (or decompressed) file: `image_len` values per example from `offset`.
    Stored {
        bytes: FileBytes,
        offset: usize,
        pixels: Pixels,
        dims: [usize; 3],
    },
    /// One image file per example, decoded to `channels` when read.
    Files {
        files: Vec<PathBuf>,
        channels: usize,
    },
}

/// One split: its pixels (stored or files) and checked labels.
pub struct Split {
    path: PathBuf,
    store: Store,
    labels: Vec<i64>,
}

impl Split {
    /// Opens and checks a split file: tensors `images` [N,C,H,W] (f32 or u8) and
    /// `labels` i64 [N]; shapes as the manifest says, labels in range, pixels finite.
    pub fn open(path: &Path, expect_n: usize, shape: [usize; 3], classes: usize) -> Result<Split> {
        let p = path.display();
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open data file {p}"))?;
        // SAFETY: the file is opened read-only and not modified while mapped.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map data file {p}"))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| {
            anyhow::anyhow!(
                "data file {p} is not a valid safetensors file ({e}); truncated or corrupt?"
            )
        })?;
        let images = st
            .tensor("images")
            .map_err(|_| anyhow::anyhow!("data file {p} has no tensor `images`"))?;
        let labels = st
            .tensor("labels")
            .map_err(|_| anyhow::anyhow!("data file {p} has no tensor `labels`"))?;
        let want = [expect_n, shape[0], shape[1], shape[2]];
        let got = images.shape();
        if got != want {
            if got.len() == 4 && got[1..] == shape[..] {
                bail!(
                    "data file {p}: tensor `images` holds {} examples but the manifest says \
                     `n` = {expect_n} for this split; fix `n` in the manifest",
                    got[0]
                );
            }
            bail!(
                "data file {p}: tensor `images` has shape {got:?}, the manifest says {want:?} \
                 (`n` = {expect_n}, `image_shape` = {shape:?})"
            );
        }
        let pixels = match images.dtype() {
            Dtype::F32 => Pixels::F32,
            Dtype::U8 => Pixels::U8,
            d => bail!("data file {p}: tensor `images` has dtype {d:?}; use f32 in [0,1] or u8"),
        };
        if labels.dtype() != Dtype::I64 || labels.shape() != [expect_n] {
            bail!(
                "data file {p}: tensor `labels` is {:?} {:?}; expected i64 [{expect_n}]",
                labels.dtype(),
                labels.shape()
            );
        }
        let labels: Vec<i64> = labels
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l < 0 || l as usize >= classes)
        {
            bail!("data file {p}: label {l} at index {i} is outside 0..{classes} (manifest `num_classes`)");
        }
        let offset = images.data().as_ptr() as usize - mmap.as_ptr() as usize;
        let image_len: usize = shape.iter().product();
        if pixels == Pixels::F32 {
            let bad = images
                .data()
                .chunks_exact(4)
                .position(|b| !f32::from_le_bytes(b.try_into().expect("4 bytes")).is_finite());
            if let Some(i) = bad {
                bail!(
                    "data file {p}: tensor `images` holds a non-finite value (NaN or Inf) in example {}",
                    i / image_len
                );
            }
        }
        Ok(Split {
            path: path.to_path_buf(),
            store: Store::Stored {
                bytes: FileBytes::Mapped(mmap),
                offset,
                pixels,
                dims: shape,
            },
            labels,
        })
    }

    /// Opens and checks a split stored as two IDX files (plain or gzip): `images`
    /// (magic 0x00000803, u8 `[N, rows, cols]`) and `labels` (0x00000801, u8 `[N]`); both
    /// hold the same N, which is the manifest's `n`, the images are `[1, rows, cols]` =
    /// the manifest's `image_shape`, labels in range.
    pub fn open_idx(
        images: &Path,
        labels: &Path,
        expect_n: usize,
        shape: [usize; 3],
        classes: usize,
    ) -> Result<Split> {
        let (pi, pl) = (images.display(), labels.display());
        let im = Idx::open(images, IMAGES_MAGIC)?;
        let lb = Idx::open(labels, LABELS_MAGIC)?;
        let (n, ln) = (im.dims[0], lb.dims[0]);
        if n != ln {
            bail!(
                "IDX files {pi} ({n} images) and {pl} ({ln} labels) do not hold the same number \
                 of examples"
            );
        }
        if n != expect_n {
            bail!(
                "IDX file {pi} holds {n} examples but the manifest says `n` = {expect_n} for \
                 this split; fix `n` in the manifest"
            );
        }
        let got = [1, im.dims[1], im.dims[2]];
        if got != shape {
            bail!(
                "IDX file {pi} holds {}x{} single-channel images ({got:?}); the manifest's \
                 `image_shape` is {shape:?}",
                im.dims[1],
                im.dims[2]
            );
        }
        let labels: Vec<i64> = lb.data().iter().map(|&l| l as i64).collect();
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            bail!("IDX file {pl}: label {l} at index {i} is outside 0..{classes} (manifest `num_classes`)");
        }
        let (bytes, offset) = im.into_parts();
        Ok(Split {
            path: images.to_path_buf(),
            store: Store::Stored {
                bytes,
                offset,
                pixels: Pixels::U8,
                dims: got,
            },
            labels,
        })
    }

    /// Opens the split a manifest entry names (paths relative to the manifest's `dir`).
    pub fn open_entry(
        e: &SplitEntry,
        dir: &Path,
        shape: [usize; 3],
        classes: usize,
    ) -> Result<Split> {
        match (e.format, &e.labels) {
            (SplitFormat::Idx, Some(l)) => {
                Split::open_idx(&dir.join(&e.file), &dir.join(l), e.n, shape, classes)
            }
            (SplitFormat::Idx, None) => {
                bail!("split file {}: format `idx` needs a `labels` file", e.file)
            }
            (SplitFormat::Safetensors, _) => Split::open(&dir.join(&e.file), e.n, shape, classes),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split is empty (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Label of example `i`.
    pub fn label(&self, i: usize) -> i64 {
        self.labels[i]
    }

    /// A split of image files (`root` names it in messages), decoded to `channels`.
    pub fn of_files(root: &Path, split: FileSplit, channels: usize) -> Split {
        Split {
            path: root.to_path_buf(),
            store: Store::Files {
                files: split.files,
                channels,
            },
            labels: split.labels,
        }
    }

    /// Appends example `i` prepared by `prep` (with `draw`'s augmentation, if any) to
    /// `out`; an image file that cannot be decoded is an error naming it.
    pub fn push_example(
        &self,
        i: usize,
        prep: &Prep,
        draw: Option<Draw>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        match &self.store {
            Store::Stored {
                bytes,
                offset,
                pixels,
                dims,
            } => {
                let stored = |out: &mut Vec<f32>| {
                    push_stored(&bytes[*offset..], *pixels, dims.iter().product(), i, out)
                };
                if prep.passes(*dims, draw) {
                    stored(out);
                } else {
                    let mut px = Vec::with_capacity(dims.iter().product());
                    stored(&mut px);
                    let [c, h, w] = *dims;
                    prep.apply(&Image { c, h, w, px: &px }, draw, out);
                }
            }
            Store::Files { files, channels } => {
                let (h, w, px) = folder::decode(&files[i], *channels)?;
                prep.apply(
                    &Image {
                        c: *channels,
                        h,
                        w,
                        px: &px,
                    },
                    draw,
                    out,
                );
            }
        }
        Ok(())
    }
}

/// Appends example `i` of stored pixels `bytes` (`image_len` values per example, from
/// the first) to `out` as f32 (`u8` scaled by 1/255).
fn push_stored(bytes: &[u8], pixels: Pixels, image_len: usize, i: usize, out: &mut Vec<f32>) {
    match pixels {
        Pixels::F32 => {
            let a = i * image_len * 4;
            out.extend(
                bytes[a..a + image_len * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            );
        }
        Pixels::U8 => {
            let a = i * image_len;
            out.extend(bytes[a..a + image_len].iter().map(|&b| b as f32 / 255.0));
        }
    }
}

/// A domain with its opened splits.
pub struct Domain {
    /// Name from the manifest.
    pub name: String,
    /// Source or target.
    pub role: Role,
    /// Training split.
    pub train: Arc<Split>,
    /// Test split.
    pub test: Arc<Split>,
}

/// The whole benchmark, opened: domains with their roles, the classes, the model's
/// input shape and how examples are prepared for it.
pub struct Benchmark {
    /// The manifest or image folder it came from (for messages).
    pub origin: PathBuf,
    /// Class names (`"0"`, `"1"`, ... when the manifest names none).
    pub classes: Vec<String>,
    /// Domains: the manifest's order, or `data.sources` then the targets.
    pub domains: Vec<Domain>,
    /// Size, augmentation and normalization of the model's input.
    pub prep: Arc<Prep>,
    /// Lines worth telling the user (skipped images, ignored files).
    pub notes: Vec<String>,
    /// Threads that gather batches (`data.workers`, resolved).
    pub workers: usize,
}

impl Benchmark {
    /// Opens the data `cfg.data` names: a manifest's splits or an image folder, with
    /// the roles `data.sources` / `data.targets` give (the manifest's otherwise).
    pub fn open(cfg: &Config) -> Result<Benchmark> {
        match cfg.data.format {
            DataFormat::Manifest => Self::open_manifest(cfg),
            DataFormat::ImageFolder => Self::open_folder(cfg),
        }
    }

    /// The manifest at `path` as it stands: its roles, stored size, no normalization.
    pub fn from_manifest(path: &Path) -> Result<Benchmark> {
        let mut cfg = Config::default();
        cfg.data.manifest = path.to_path_buf();
        Self::open(&cfg)
    }

    /// The data of `cfg` opened for a network that records its input (`spec`, read from
    /// weights file `file`): the recorded normalization and size replace the config's,
    /// each change returned as a line for the user; the channels and the classes must
    /// be the recorded ones.
    pub fn open_as_recorded(
        cfg: &Config,
        spec: &InputSpec,
        file: &str,
    ) -> Result<(Benchmark, Vec<String>)> {
        let mut cfg = cfg.clone();
        let mut changes: Vec<String> = spec.apply_normalization(&mut cfg).into_iter().collect();
        let mut bench = Self::open(&cfg)?;
        let [channels, rows, cols] = spec.shape;
        if bench.shape()[0] != channels {
            bail!(
                "{file} was trained on {channels}-channel inputs but the data gives {}; set \
                 data.channels = {channels}",
                bench.shape()[0]
            );
        }
        if bench.shape() != spec.shape {
            cfg.data.image_size = Some([rows, cols]);
            changes.push(format!("data.image_size = [{rows}, {cols}]"));
            bench = Self::open(&cfg)?;
        }
        if spec.classes != bench.classes {
            bail!(
                "{file} was trained on the classes [{}] but the data has [{}]; evaluate it on \
                 data with the same classes in the same order",
                spec.classes.join(", "),
                bench.classes.join(", ")
            );
        }
        Ok((bench, changes))
    }

    /// The role of domain `name`: as `data.sources`/`data.targets` say (None = not
    /// used), else the manifest's `role`.
    fn role(cfg: &Config, name: &str, manifest: Role) -> Option<Role> {
        let d = &cfg.data;
        if d.sources.is_empty() {
            return Some(manifest);
        }
        if d.sources.iter().any(|s| s == name) {
            Some(Role::Source)
        } else if d.targets.is_empty() || d.targets.iter().any(|t| t == name) {
            Some(Role::Target)
        } else {
            None
        }
    }

    fn open_manifest(cfg: &Config) -> Result<Benchmark> {
        let manifest = Manifest::load(&cfg.data.manifest)?;
        let mp = manifest.path.display();
        for d in cfg.data.sources.iter().chain(&cfg.data.targets) {
            if !manifest.domains.iter().any(|m| &m.name == d) {
                let names: Vec<&str> = manifest.domains.iter().map(|m| m.name.as_str()).collect();
                bail!(
                    "config key `data.{}`: manifest {mp} has no domain `{d}` (its domains: {})",
                    if cfg.data.sources.contains(d) {
                        "sources"
                    } else {
                        "targets"
                    },
                    names.join(", ")
                );
            }
        }
        let mut domains = Vec::new();
        for d in &manifest.domains {
            let Some(role) = Self::role(cfg, &d.name, d.role) else {
                continue;
            };
            let open = |e: &SplitEntry| -> Result<Arc<Split>> {
                let s =
                    Split::open_entry(e, &manifest.dir, manifest.image_shape, manifest.num_classes)
                        .with_context(|| format!("domain `{}` of manifest {mp}", d.name))?;
                Ok(Arc::new(s))
            };
            domains.push(Domain {
                name: d.name.clone(),
                role,
                train: open(&d.splits.train)?,
                test: open(&d.splits.test)?,
            });
        }
        let stored = manifest.image_shape;
        let shape = match cfg.data.image_size {
            Some([h, w]) => [stored[0], h, w],
            None => stored,
        };
        let classes = match &manifest.classes {
            Some(c) => c.clone(),
            None => (0..manifest.num_classes).map(|k| k.to_string()).collect(),
        };
        Ok(Benchmark {
            origin: manifest.path.clone(),
            classes,
            domains,
            prep: Arc::new(Prep::new(cfg, shape).with_context(|| format!("manifest {mp}"))?),
            notes: Vec::new(),
            workers: cfg.data.loader_threads(),
        })
    }

    fn open_folder(cfg: &Config) -> Result<Benchmark> {
        let f = folder::scan(&cfg.data)?;
        let root = cfg.data.root.clone().unwrap_or_default();
        let channels = cfg.data.channels;
        let [h, w] = cfg
            .data
            .image_size
            .context("config key `data.image_size` is not set")?;
        let sources = cfg.data.sources.len();
        let domains = f
            .domains
            .into_iter()
            .enumerate()
            .map(|(k, d)| {
                let dir = root.join(&d.name);
                Domain {
                    name: d.name,
                    role: if k < sources {
                        Role::Source
                    } else {
                        Role::Target
                    },
                    train: Arc::new(Split::of_files(&dir, d.train, channels)),
                    test: Arc::new(Split::of_files(&dir, d.test, channels)),
                }
            })
            .collect();
        Ok(Benchmark {
            origin: root,
            classes: f.classes,
            domains,
            prep: Arc::new(Prep::new(cfg, [channels, h, w])?),
            notes: f.notes,
            workers: cfg.data.loader_threads(),
        })
    }

    /// The model's input `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        self.prep.shape()
    }

    /// What a network trained on this data expects of its input.
    pub fn input_spec(&self) -> super::prep::InputSpec {
        self.prep.spec(&self.classes)
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// A pool over `splits`, prepared as this benchmark's inputs.
    pub fn pool(&self, splits: Vec<Arc<Split>>) -> Pool {
        Pool::new(splits, self.prep.clone())
    }

    /// The concatenated source training splits, in domain order.
    pub fn source_pool(&self) -> Pool {
        self.pool(
            self.domains
                .iter()
                .filter(|d| d.role == Role::Source)
                .map(|d| d.train.clone())
                .collect(),
        )
    }
}

/// Several splits indexed as one (global index = position in the concatenation),
/// prepared by one [`Prep`].
#[derive(Clone)]
pub struct Pool {
    splits: Vec<Arc<Split>>,
    starts: Vec<usize>,
    len: usize,
    prep: Arc<Prep>,
}

impl Pool {
    /// Concatenates `splits` in order.
    pub fn new(splits: Vec<Arc<Split>>, prep: Arc<Prep>) -> Pool {
        let mut starts = Vec::with_capacity(splits.len());
        let mut len = 0;
        for s in &splits {
            starts.push(len);
            len += s.len();
        }
        Pool {
            splits,
            starts,
            len,
            prep,
        }
    }

    /// Total examples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the pool has no examples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The model's input `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        self.prep.shape()
    }

    /// The examples at `indices` as a host batch; `augment` = `(stage key, batch
    /// position)` draws the training augmentation, `None` prepares them for evaluation.
    pub fn gather(&self, indices: &[usize], augment: Option<(u64, u64)>) -> Result<HostBatch> {
        let mut images = Vec::with_capacity(indices.len() * self.prep.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &g in indices {
            if g >= self.len {
                bail!(
                    "example index {g} is outside the {} source training examples",
                    self.len
                );
            }
            let k = self.starts.partition_point(|&s| s <= g) - 1;
            let local = g - self.starts[k];
            let draw = augment.map(|(stage, batch)| Draw {
                stage,
                batch,
                example: g as u64,
            });
            self.splits[k].push_example(local, &self.prep, draw, &mut images)?;
            labels.push(self.splits[k].label(local));
        }
        Ok(HostBatch { images, labels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::encode;

    /// Writes `n` images of `rows x cols` (pixel = example index) and the labels `labels`
    /// as plain IDX files in `dir`.
    fn write_pair(dir: &Path, n: u32, rows: u32, cols: u32, labels: &[u8]) -> (PathBuf, PathBuf) {
        let px: Vec<u8> = (0..n)
            .flat_map(|i| std::iter::repeat_n(i as u8, (rows * cols) as usize))
            .collect();
        let (im, lb) = (dir.join("images"), dir.join("labels"));
        std::fs::write(&im, encode(IMAGES_MAGIC, &[n, rows, cols], &px)).unwrap();
        let lc = labels.len() as u32;
        std::fs::write(&lb, encode(LABELS_MAGIC, &[lc], labels)).unwrap();
        (im, lb)
    }

    fn err(r: Result<Split>) -> String {
        format!("{:#}", r.err().expect("an error"))
    }

    #[test]
    fn idx_split_reads_pixels_and_labels() {
        let d = tempfile::tempdir().unwrap();
        let (im, lb) = write_pair(d.path(), 3, 2, 2, &[2, 0, 1]);
        let s = Split::open_idx(&im, &lb, 3, [1, 2, 2], 3).unwrap();
        assert_eq!((s.len(), s.label(0), s.label(2)), (3, 2, 1));
        let mut px = Vec::new();
        let prep = Prep::new(&Config::default(), [1, 2, 2]).unwrap();
        s.push_example(2, &prep, None, &mut px).unwrap();
        assert_eq!(px, vec![2.0 / 255.0; 4]);
    }

    #[test]
    fn idx_split_checks_counts_shape_and_labels() {
        let d = tempfile::tempdir().unwrap();
        let (im, lb) = write_pair(d.path(), 3, 2, 2, &[2, 0]);
        let e = err(Split::open_idx(&im, &lb, 3, [1, 2, 2], 3));
        assert!(
            e.contains("3 images") && e.contains("2 labels") && e.contains("same number"),
            "{e}"
        );
        let (im, lb) = write_pair(d.path(), 3, 2, 2, &[2, 0, 1]);
        let e = err(Split::open_idx(&im, &lb, 4, [1, 2, 2], 3));
        assert!(
            e.contains("holds 3 examples") && e.contains("`n` = 4"),
            "{e}"
        );
        let e = err(Split::open_idx(&im, &lb, 3, [1, 28, 28], 3));
        assert!(e.contains("2x2") && e.contains("image_shape"), "{e}");
        let e = err(Split::open_idx(&im, &lb, 3, [3, 2, 2], 3));
        assert!(e.contains("single-channel"), "{e}");
        let e = err(Split::open_idx(&im, &lb, 3, [1, 2, 2], 2));
        assert!(
            e.contains("label 2 at index 0") && e.contains(&lb.display().to_string()),
            "{e}"
        );
        // Images and labels swapped.
        let e = err(Split::open_idx(&lb, &im, 3, [1, 2, 2], 3));
        assert!(
            e.contains("wrong magic") && e.contains(&lb.display().to_string()),
            "{e}"
        );
    }
}
