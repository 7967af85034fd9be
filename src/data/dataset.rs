//! Splits and the opened benchmark. Stored images (`f32` or `u8` scaled by 1/255) stay
//! in the mapped file (or, for a gzip IDX file, in its decompressed bytes), image-folder
//! examples stay files; either is read only into the batches that need it, through the
//! run's [`Prep`] (size, augmentation, normalization). Labels are read once.

use super::folder::{self, FileSplit};
use super::idx::{FileBytes, Idx, IMAGES_MAGIC, LABELS_MAGIC};
use super::manifest::{Manifest, Role, SplitEntry, SplitFormat};
use super::prep::{Draw, Image, InputSpec, Prep};
use crate::config::{Config, DataFormat, Task};
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
    /// What the outputs are scored against.
    pub truth: Truth,
}

/// The ground truth of a batch's examples.
#[derive(Clone, Debug, PartialEq)]
pub enum Truth {
    /// Class labels, `N`.
    Labels(Vec<i64>),
    /// Target images, `N*C*H*W` f32 in [0, 1] (super-resolution's high-resolution
    /// images), each of `shape` `[C, H, W]`.
    Images {
        /// The pixels.
        pixels: Vec<f32>,
        /// One image's `[C, H, W]`.
        shape: [usize; 3],
    },
}

impl Truth {
    /// Examples it holds.
    pub fn len(&self) -> usize {
        match self {
            Truth::Labels(l) => l.len(),
            Truth::Images { pixels, shape } => pixels.len() / shape.iter().product::<usize>(),
        }
    }

    /// Whether it holds no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole truth as a tensor on `device` (see [`Truth::rows`]).
    pub fn tensor(&self, device: &Device) -> Result<Tensor> {
        self.rows(0, self.len(), device)
    }

    /// Rows `lo..hi` as a tensor on `device`: labels i64 `[n]`, images f32 `[n, C, H, W]`.
    fn rows(&self, lo: usize, hi: usize, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Truth::Labels(l) => Tensor::from_slice(&l[lo..hi], hi - lo, device)?,
            Truth::Images { pixels, shape } => {
                let per: usize = shape.iter().product();
                let [c, h, w] = *shape;
                Tensor::from_slice(&pixels[lo * per..hi * per], (hi - lo, c, h, w), device)?
            }
        })
    }
}

impl HostBatch {
    /// The class labels (None for a batch of target images).
    pub fn labels(&self) -> Option<&[i64]> {
        match &self.truth {
            Truth::Labels(l) => Some(l),
            Truth::Images { .. } => None,
        }
    }

    /// Examples in the batch.
    pub fn len(&self) -> usize {
        self.truth.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.truth.is_empty()
    }

    /// The batch as `(images [N,C,H,W] f32, truth)` on `device` (truth: labels i64 `[N]`
    /// or target images f32 `[N,C,H,W]`).
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
        Ok((x, self.truth.rows(lo, hi, device)?))
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

/// One split: its pixels (stored or files) and checked ground truth.
pub struct Split {
    path: PathBuf,
    store: Store,
    truth: SplitTruth,
}

/// What a split's examples are scored against.
enum SplitTruth {
    /// Class labels, read once.
    Labels(Vec<i64>),
    /// Target images stored in the same file as the inputs (`Store::Stored`): `dims`
    /// values per example from `offset`.
    Images {
        offset: usize,
        pixels: Pixels,
        dims: [usize; 3],
        n: usize,
    },
}

/// Maps a split file read-only and parses its safetensors header.
fn map_split(path: &Path) -> Result<Mmap> {
    let p = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open data file {p}"))?;
    // SAFETY: the file is opened read-only and not modified while mapped.
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map data file {p}"))
}

/// Parses the safetensors header of split file `path` mapped at `mmap`.
fn parse_split<'a>(mmap: &'a Mmap, path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(mmap).map_err(|e| {
        anyhow::anyhow!(
            "data file {} is not a valid safetensors file ({e}); truncated or corrupt?",
            path.display()
        )
    })
}

/// The stored pixel tensor `name` of split file `path` (in `mmap`): `[n, C, H, W]` with
/// `[C, H, W]` = `shape` (the manifest's `key`), f32 (finite) or u8. Returns its offset
/// in the file and its element type.
fn stored_pixels(
    st: &SafeTensors<'_>,
    mmap: &Mmap,
    path: &Path,
    (name, key): (&str, &str),
    n: usize,
    shape: [usize; 3],
) -> Result<(usize, Pixels)> {
    let p = path.display();
    let t = st
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("data file {p} has no tensor `{name}`"))?;
    let want = [n, shape[0], shape[1], shape[2]];
    let got = t.shape();
    if got != want {
        if got.len() == 4 && got[1..] == shape[..] {
            bail!(
                "data file {p}: tensor `{name}` holds {} examples but the manifest says `n` = \
                 {n} for this split; fix `n` in the manifest",
                got[0]
            );
        }
        bail!(
            "data file {p}: tensor `{name}` has shape {got:?}, the manifest says {want:?} \
             (`n` = {n}, `{key}` = {shape:?})"
        );
    }
    let pixels = match t.dtype() {
        Dtype::F32 => Pixels::F32,
        Dtype::U8 => Pixels::U8,
        d => bail!("data file {p}: tensor `{name}` has dtype {d:?}; use f32 in [0,1] or u8"),
    };
    if pixels == Pixels::F32 {
        let image_len: usize = shape.iter().product();
        let bad = t
            .data()
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes(b.try_into().expect("4 bytes")).is_finite());
        if let Some(i) = bad {
            bail!(
                "data file {p}: tensor `{name}` holds a non-finite value (NaN or Inf) in \
                 example {}",
                i / image_len
            );
        }
    }
    Ok((t.data().as_ptr() as usize - mmap.as_ptr() as usize, pixels))
}

impl Split {
    /// Opens and checks a split file: tensors `images` [N,C,H,W] (f32 or u8) and
    /// `labels` i64 [N]; shapes as the manifest says, labels in range, pixels finite.
    pub fn open(path: &Path, expect_n: usize, shape: [usize; 3], classes: usize) -> Result<Split> {
        let p = path.display();
        let mmap = map_split(path)?;
        let st = parse_split(&mmap, path)?;
        let (offset, pixels) =
            stored_pixels(&st, &mmap, path, ("images", "image_shape"), expect_n, shape)?;
        let labels = st
            .tensor("labels")
            .map_err(|_| anyhow::anyhow!("data file {p} has no tensor `labels`"))?;
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
        Ok(Split {
            path: path.to_path_buf(),
            store: Store::Stored {
                bytes: FileBytes::Mapped(mmap),
                offset,
                pixels,
                dims: shape,
            },
            truth: SplitTruth::Labels(labels),
        })
    }

    /// Opens and checks a super-resolution split file: tensors `lr` `[N, C, H, W]` (the
    /// inputs, `shape`) and `hr` `[N, C, sH, sW]` (the targets, `target`), f32 or u8.
    pub fn open_pairs(
        path: &Path,
        expect_n: usize,
        shape: [usize; 3],
        target: [usize; 3],
    ) -> Result<Split> {
        let mmap = map_split(path)?;
        let st = parse_split(&mmap, path)?;
        let (offset, pixels) =
            stored_pixels(&st, &mmap, path, ("lr", "image_shape"), expect_n, shape)?;
        let (t_offset, t_pixels) =
            stored_pixels(&st, &mmap, path, ("hr", "target_shape"), expect_n, target)?;
        Ok(Split {
            path: path.to_path_buf(),
            store: Store::Stored {
                bytes: FileBytes::Mapped(mmap),
                offset,
                pixels,
                dims: shape,
            },
            truth: SplitTruth::Images {
                offset: t_offset,
                pixels: t_pixels,
                dims: target,
                n: expect_n,
            },
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
            truth: SplitTruth::Labels(labels),
        })
    }

    /// Opens the split a manifest entry names (paths relative to the manifest's `dir`),
    /// as the manifest's task stores it.
    pub fn open_entry(e: &SplitEntry, m: &Manifest) -> Result<Split> {
        let (dir, shape) = (&m.dir, m.image_shape);
        match (m.task, e.format, &e.labels, m.target_shape) {
            (Task::SuperResolution, SplitFormat::Safetensors, _, Some(target)) => {
                Split::open_pairs(&dir.join(&e.file), e.n, shape, target)
            }
            (Task::SuperResolution, ..) => bail!(
                "split file {}: a super-resolution split is a safetensors file with tensors \
                 `lr` and `hr` (format `idx` holds labels, not target images)",
                e.file
            ),
            (_, SplitFormat::Idx, Some(l), _) => {
                Split::open_idx(&dir.join(&e.file), &dir.join(l), e.n, shape, m.num_classes)
            }
            (_, SplitFormat::Idx, None, _) => {
                bail!("split file {}: format `idx` needs a `labels` file", e.file)
            }
            (_, SplitFormat::Safetensors, ..) => {
                Split::open(&dir.join(&e.file), e.n, shape, m.num_classes)
            }
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        match &self.truth {
            SplitTruth::Labels(l) => l.len(),
            SplitTruth::Images { n, .. } => *n,
        }
    }

    /// Whether the split is empty (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Label of example `i` (None for a split of target images).
    pub fn label(&self, i: usize) -> Option<i64> {
        match &self.truth {
            SplitTruth::Labels(l) => Some(l[i]),
            SplitTruth::Images { .. } => None,
        }
    }

    /// Appends the target image of example `i` (f32 in [0, 1]) to `out`, mirrored with
    /// `flip` (the input's horizontal flip); nothing for a split of labels.
    fn push_target(&self, i: usize, flip: bool, out: &mut Vec<f32>) {
        let (
            SplitTruth::Images {
                offset,
                pixels,
                dims,
                ..
            },
            Store::Stored { bytes, .. },
        ) = (&self.truth, &self.store)
        else {
            return;
        };
        let start = out.len();
        push_stored(&bytes[*offset..], *pixels, dims.iter().product(), i, out);
        if flip {
            for row in out[start..].chunks_exact_mut(dims[2]) {
                row.reverse();
            }
        }
    }

    /// A split of image files (`root` names it in messages), decoded to `channels`.
    pub fn of_files(root: &Path, split: FileSplit, channels: usize) -> Split {
        Split {
            path: root.to_path_buf(),
            store: Store::Files {
                files: split.files,
                channels,
            },
            truth: SplitTruth::Labels(split.labels),
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

/// Checks that `cfg` asks for the `task` the data (`origin`) is for, and, for
/// super-resolution, no preparation that would change the input without its target
/// (resizing, normalization, crops, color jitter; a horizontal flip mirrors both).
fn check_task(cfg: &Config, task: Task, origin: &str) -> Result<()> {
    if let Some(t) = cfg.task.filter(|&t| t != task) {
        bail!(
            "config key `task` is \"{}\" but {origin} holds {} data; set task = \"{}\" \
             (or leave it unset: the data decides)",
            t.name(),
            task.name(),
            task.name()
        );
    }
    if task != Task::SuperResolution {
        return Ok(());
    }
    let (d, a) = (&cfg.data, &cfg.augment);
    let refused = [
        ("data.image_size", d.image_size.is_some()),
        ("data.mean", d.mean.is_some()),
        ("data.std", d.std.is_some()),
        (
            "augment.random_resized_crop",
            a.random_resized_crop.is_some(),
        ),
        ("augment.color_jitter", a.color_jitter.is_some()),
    ];
    if let Some((key, _)) = refused.iter().find(|(_, set)| *set) {
        bail!(
            "config key `{key}`: super-resolution ({origin}) trains on stored low/high-resolution \
             pairs as they are (the network normalizes its own input); remove `{key}` \
             (`augment.hflip` mirrors input and target together)"
        );
    }
    Ok(())
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
    /// What the data is for (the manifest's `task`; image folders hold classes).
    pub task: Task,
    /// Super-resolution: the upscaling factor from input to target.
    pub scale: Option<usize>,
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
                let s = Split::open_entry(e, &manifest)
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
        check_task(cfg, manifest.task, &format!("manifest {mp}"))?;
        Ok(Benchmark {
            origin: manifest.path.clone(),
            classes,
            domains,
            prep: Arc::new(Prep::new(cfg, shape).with_context(|| format!("manifest {mp}"))?),
            notes: Vec::new(),
            workers: cfg.data.loader_threads(),
            task: manifest.task,
            scale: manifest.scale,
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
        check_task(
            cfg,
            Task::Classification,
            &format!("image folder {}", root.display()),
        )?;
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
            task: Task::Classification,
            scale: None,
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

    /// Settles what `cfg` leaves to the data: the task and, for super-resolution, the
    /// network's upscaling factor (`model.scale`; one set to another scale than the
    /// data's is an error naming it).
    pub fn settle(&self, cfg: &mut Config) -> Result<()> {
        cfg.task = Some(self.task);
        match (self.scale, cfg.model.scale) {
            (Some(s), Some(m)) if s != m => bail!(
                "config key `model.scale` is {m} but {} holds x{s} pairs; set model.scale = \
                 {s} (or leave it unset: the data decides)",
                self.origin.display()
            ),
            (Some(s), None) => cfg.model.scale = Some(s),
            _ => {}
        }
        Ok(())
    }

    /// The target images' `[C, H, W]` of super-resolution data (None: class labels).
    pub fn target_shape(&self) -> Option<[usize; 3]> {
        let [c, h, w] = self.shape();
        self.scale.map(|s| [c, h * s, w * s])
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
        let mut targets = Vec::new();
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
            let split = &self.splits[k];
            split.push_example(local, &self.prep, draw, &mut images)?;
            match split.label(local) {
                Some(l) => labels.push(l),
                None => split.push_target(local, self.prep.flips(draw), &mut targets),
            }
        }
        let truth = match self.target_shape() {
            Some(shape) => Truth::Images {
                pixels: targets,
                shape,
            },
            None => Truth::Labels(labels),
        };
        Ok(HostBatch { images, truth })
    }

    /// The target images' `[C, H, W]` of a super-resolution pool (None: labels).
    pub fn target_shape(&self) -> Option<[usize; 3]> {
        self.splits.first().and_then(|s| match &s.truth {
            SplitTruth::Images { dims, .. } => Some(*dims),
            SplitTruth::Labels(_) => None,
        })
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
        assert_eq!((s.len(), s.label(0), s.label(2)), (3, Some(2), Some(1)));
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
