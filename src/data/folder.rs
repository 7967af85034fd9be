//! Image folders (`data.format = "image-folder"`): `root/<domain>/<class>/<image>`, or
//! `root/<domain>/{train,test}/<class>/<image>`, PNG or JPEG.
//!
//! Classes are the sorted folder names (as torchvision's `ImageFolder`) and must be the
//! same set in every domain and split. A domain without `train`/`test` folders is split
//! per class by `data.test_fraction`, seeded by `data.split_seed`. Opening reads every
//! image's header (or, with `data.on_bad_image = "skip"`, decodes every image once), so
//! an unreadable file stops the run before training, naming it; pixels are decoded
//! when a batch needs them, on the loader's threads.

use crate::config::{DataConfig, OnBadImage};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Extensions read as images (compared without case).
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// One split of a domain: image files and their labels, in class then path order.
#[derive(Clone, Debug, Default)]
pub struct FileSplit {
    /// Image files.
    pub files: Vec<PathBuf>,
    /// Label of each file.
    pub labels: Vec<i64>,
}

/// A domain's two splits.
#[derive(Clone, Debug)]
pub struct FolderDomain {
    /// The folder's name.
    pub name: String,
    /// Training split.
    pub train: FileSplit,
    /// Test split.
    pub test: FileSplit,
}

/// The scanned folder: classes, the chosen domains, and what was left out.
#[derive(Clone, Debug)]
pub struct Folder {
    /// Class names, sorted; label `k` is `classes[k]`.
    pub classes: Vec<String>,
    /// The domains named by `data.sources` and `data.targets`, in that order.
    pub domains: Vec<FolderDomain>,
    /// Lines worth telling the user (skipped images, ignored files).
    pub notes: Vec<String>,
}

/// A split's class folders, sorted, each with its image files.
type Classes = Vec<(String, Vec<PathBuf>)>;

/// Sorted names of the visible subdirectories of `dir`.
fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?
    {
        let e = e.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.path().is_dir() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Image files under `dir` (recursively, sorted by path) and the count of other files.
fn images_under(dir: &Path) -> Result<(Vec<PathBuf>, usize)> {
    let (mut files, mut other) = (Vec::new(), 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in
            std::fs::read_dir(&d).with_context(|| format!("cannot read folder {}", d.display()))?
        {
            let p = e
                .with_context(|| format!("cannot read folder {}", d.display()))?
                .path();
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .is_some_and(|x| EXTENSIONS.contains(&x.to_string_lossy().to_lowercase().as_str()))
            {
                files.push(p);
            } else {
                other += 1;
            }
        }
    }
    files.sort();
    Ok((files, other))
}

/// The class folders of `dir` with their images (each class needs at least one).
fn classes_of(dir: &Path, other: &mut usize) -> Result<Classes> {
    let names = subdirs(dir)?;
    if names.is_empty() {
        bail!(
            "image folder {} holds no class folders; expected {}/<class>/<image>.png|jpg",
            dir.display(),
            dir.display()
        );
    }
    names
        .into_iter()
        .map(|c| {
            let (files, o) = images_under(&dir.join(&c))?;
            *other += o;
            if files.is_empty() {
                bail!(
                    "class folder {} holds no .png, .jpg or .jpeg image",
                    dir.join(&c).display()
                );
            }
            Ok((c, files))
        })
        .collect()
}

/// Names of `names` that `of` lacks, for messages.
fn missing(names: &[String], of: &[String]) -> Vec<String> {
    names.iter().filter(|n| !of.contains(n)).cloned().collect()
}

/// Reads the folder layout under `cfg.root` for the domains `cfg.sources` and
/// `cfg.targets` (every other domain when `targets` is empty), checks the classes,
/// splits the domains without `train`/`test` folders and checks every image.
pub fn scan(cfg: &DataConfig) -> Result<Folder> {
    let root = cfg
        .root
        .as_deref()
        .context("config key `data.root` is not set")?;
    let all =
        subdirs(root).with_context(|| format!("image folder `data.root` = {}", root.display()))?;
    for d in cfg.sources.iter().chain(&cfg.targets) {
        if !all.contains(d) {
            bail!(
                "config key `data.{}`: domain `{d}` is not a folder of {} (domains there: {})",
                if cfg.sources.contains(d) {
                    "sources"
                } else {
                    "targets"
                },
                root.display(),
                all.join(", ")
            );
        }
    }
    let targets: Vec<String> = match cfg.targets.is_empty() {
        true => all
            .iter()
            .filter(|d| !cfg.sources.contains(d))
            .cloned()
            .collect(),
        false => cfg.targets.clone(),
    };
    let mut other = 0;
    let mut classes: Option<(String, Vec<String>)> = None;
    let mut domains = Vec::new();
    for name in cfg.sources.iter().chain(&targets) {
        let dir = root.join(name);
        let sub = subdirs(&dir)?;
        let parts: Vec<(&str, Classes)> = if sub.iter().any(|s| s == "train" || s == "test") {
            if sub != ["test", "train"] {
                bail!(
                    "domain folder {} mixes split folders and others ({}); use either \
                         <domain>/train/<class> and <domain>/test/<class>, or <domain>/<class>",
                    dir.display(),
                    sub.join(", ")
                );
            }
            vec![
                ("train", classes_of(&dir.join("train"), &mut other)?),
                ("test", classes_of(&dir.join("test"), &mut other)?),
            ]
        } else {
            vec![("", classes_of(&dir, &mut other)?)]
        };
        for (part, found) in &parts {
            let names: Vec<String> = found.iter().map(|(c, _)| c.clone()).collect();
            let place = match part.is_empty() {
                true => format!("domain `{name}`"),
                false => format!("domain `{name}` ({part})"),
            };
            match &classes {
                None => classes = Some((place, names)),
                Some((first, want)) if *want != names => bail!(
                    "image folder {}: {place} has classes [{}] but {first} has [{}] (missing \
                     in {place}: [{}]; not in {first}: [{}]); every domain needs the same \
                     class folders",
                    root.display(),
                    names.join(", "),
                    want.join(", "),
                    missing(want, &names).join(", "),
                    missing(&names, want).join(", "),
                ),
                Some(_) => {}
            }
        }
        let label = |found: Classes| -> FileSplit {
            let mut s = FileSplit::default();
            for (k, (_, files)) in found.into_iter().enumerate() {
                s.labels.extend(std::iter::repeat_n(k as i64, files.len()));
                s.files.extend(files);
            }
            s
        };
        let (train, test) = match parts.len() {
            2 => {
                let mut it = parts.into_iter().map(|(_, f)| label(f));
                (it.next().expect("train"), it.next().expect("test"))
            }
            _ => {
                let found = parts.into_iter().next().expect("one part").1;
                split(name, found, cfg.test_fraction, cfg.split_seed)
            }
        };
        domains.push(FolderDomain {
            name: name.clone(),
            train,
            test,
        });
    }
    let classes = classes.map(|(_, c)| c).unwrap_or_default();
    let mut notes = Vec::new();
    if other > 0 {
        notes.push(format!(
            "image folder {}: ignored {other} files that are not .png, .jpg or .jpeg",
            root.display()
        ));
    }
    check_images(&mut domains, cfg.on_bad_image, cfg.channels, &mut notes)?;
    for d in &domains {
        if d.train.files.is_empty() || d.test.files.is_empty() {
            bail!(
                "domain `{}` of {} has an empty {} split (after skipping bad images); it \
                 needs images in both",
                d.name,
                root.display(),
                if d.train.files.is_empty() {
                    "train"
                } else {
                    "test"
                }
            );
        }
    }
    Ok(Folder {
        classes,
        domains,
        notes,
    })
}

/// Splits a domain's classes into train and test: per class, a seeded permutation
/// (keyed by the domain and class) puts `round(n * fraction)` images (at least one and
/// at most `n - 1` when `n >= 2`) in the test split.
fn split(domain: &str, found: Classes, fraction: f64, seed: u64) -> (FileSplit, FileSplit) {
    let (mut train, mut test) = (FileSplit::default(), FileSplit::default());
    for (k, (class, files)) in found.into_iter().enumerate() {
        let n = files.len();
        let key = crate::rng::name_key(&format!("{domain}/{class}"));
        let perm = Rng::new(seed, key).permutation(n);
        let n_test = match n {
            0 | 1 => 0,
            _ => ((n as f64 * fraction).round() as usize).clamp(1, n - 1),
        };
        let mut is_test = vec![false; n];
        for &i in &perm[..n_test] {
            is_test[i] = true;
        }
        for (f, t) in files.into_iter().zip(is_test) {
            let s = if t { &mut test } else { &mut train };
            s.files.push(f);
            s.labels.push(k as i64);
        }
    }
    (train, test)
}

/// Checks every image: its header (`error`), or a full decode that leaves the bad ones
/// out (`skip`), counted in `notes` with the first few named.
fn check_images(
    domains: &mut [FolderDomain],
    on_bad: OnBadImage,
    channels: usize,
    notes: &mut Vec<String>,
) -> Result<()> {
    let mut bad: Vec<(PathBuf, String)> = Vec::new();
    for d in domains.iter_mut() {
        for s in [&mut d.train, &mut d.test] {
            let verdicts: Vec<Option<String>> = s
                .files
                .par_iter()
                .map(|f| {
                    let r = match on_bad {
                        OnBadImage::Error => header(f).map(|_| ()),
                        OnBadImage::Skip => decode(f, channels).map(|_| ()),
                    };
                    r.err().map(|e| format!("{e:#}"))
                })
                .collect();
            if on_bad == OnBadImage::Error {
                if let Some(e) = verdicts.into_iter().flatten().next() {
                    bail!("{e}; fix or remove it, or set data.on_bad_image = \"skip\"");
                }
                continue;
            }
            let keep: Vec<bool> = verdicts.iter().map(Option::is_none).collect();
            for (f, v) in s.files.iter().zip(verdicts) {
                if let Some(e) = v {
                    bad.push((f.clone(), e));
                }
            }
            let mut k = keep.iter();
            s.files.retain(|_| *k.next().expect("one verdict per file"));
            let mut k = keep.iter();
            s.labels
                .retain(|_| *k.next().expect("one verdict per file"));
        }
    }
    if !bad.is_empty() {
        let shown: Vec<String> = bad.iter().take(3).map(|(_, e)| e.clone()).collect();
        notes.push(format!(
            "skipped {} unreadable image(s) (data.on_bad_image = \"skip\"): {}{}",
            bad.len(),
            shown.join("; "),
            if bad.len() > 3 { "; ..." } else { "" }
        ));
    }
    Ok(())
}

/// The format and size an image file's header declares.
fn header(path: &Path) -> Result<(u32, u32)> {
    image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(anyhow::Error::from)
        .and_then(|r| r.into_dimensions().map_err(anyhow::Error::from))
        .with_context(|| format!("image {} cannot be read", path.display()))
}

/// Decodes an image to `channels` planes of [0, 1] values (`u8 / 255`): 3 = RGB
/// (grayscale replicated, alpha dropped, 16-bit scaled to 8), 1 = luma by PIL's
/// `convert("L")` integer formula. Returns `(height, width, planes)`.
pub fn decode(path: &Path, channels: usize) -> Result<(usize, usize, Vec<f32>)> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(anyhow::Error::from)
        .and_then(|r| r.decode().map_err(anyhow::Error::from))
        .with_context(|| format!("image {} cannot be decoded", path.display()))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let n = h * w;
    let mut out = vec![0f32; channels * n];
    for (i, p) in rgb.pixels().enumerate() {
        let [r, g, b] = p.0;
        if channels == 1 {
            let l = (r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16;
            out[i] = l as f32 / 255.0;
        } else {
            out[i] = r as f32 / 255.0;
            out[n + i] = g as f32 / 255.0;
            out[2 * n + i] = b as f32 / 255.0;
        }
    }
    Ok((h, w, out))
}
