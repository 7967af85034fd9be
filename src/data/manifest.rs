//! The `dg-benchmark/v1` manifest: domains with a role (source/target) and train/test
//! splits stored as safetensors files next to it, or as IDX files (`"format": "idx"`,
//! MNIST's format, e.g. the Fashion-MNIST files of Debian's `dataset-fashion-mnist`).

use crate::config::Task;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Whether a domain is seen in training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Training domain.
    Source,
    /// Held-out domain (only evaluated).
    Target,
}

/// How a split is stored (`format` of a split entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitFormat {
    /// One safetensors file with `images` and `labels` (the default).
    #[default]
    Safetensors,
    /// Two IDX files, plain or gzip: `file` holds the u8 images, `labels` the u8 labels.
    Idx,
}

/// One split file of a domain.
#[derive(Clone, Debug, Deserialize)]
pub struct SplitEntry {
    /// File name relative to the manifest (an absolute path is used as it is).
    pub file: String,
    /// Number of examples.
    pub n: usize,
    /// `safetensors` (default) or `idx`.
    #[serde(default)]
    pub format: SplitFormat,
    /// `idx` only: the labels file, relative to the manifest like `file`.
    #[serde(default)]
    pub labels: Option<String>,
}

/// Train and test splits.
#[derive(Clone, Debug, Deserialize)]
pub struct Splits {
    /// Training split.
    pub train: SplitEntry,
    /// Test split.
    pub test: SplitEntry,
}

/// One domain.
#[derive(Clone, Debug, Deserialize)]
pub struct DomainEntry {
    /// Unique name, e.g. `rot30`.
    pub name: String,
    /// Source or target.
    pub role: Role,
    /// Its splits.
    pub splits: Splits,
}

fn classification() -> Task {
    Task::Classification
}

/// A parsed and checked manifest.
#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    /// Must be `dg-benchmark/v1`.
    pub format: String,
    /// Benchmark name.
    pub name: String,
    /// What the benchmark is for; absent = classification.
    #[serde(default = "classification")]
    pub task: Task,
    /// Classes; labels lie in `0..num_classes` (0 for super-resolution).
    pub num_classes: usize,
    /// Optional class names (`num_classes` of them), recorded with the trained weights.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// `[C, H, W]` of the inputs (super-resolution: the low-resolution images).
    pub image_shape: [usize; 3],
    /// Super-resolution: the upscaling factor between `image_shape` and `target_shape`.
    #[serde(default)]
    pub scale: Option<usize>,
    /// Super-resolution: `[C, H, W]` of the high-resolution targets.
    #[serde(default)]
    pub target_shape: Option<[usize; 3]>,
    /// Domains in order (the source train splits concatenate in this order).
    pub domains: Vec<DomainEntry>,
    /// Directory of the manifest (files are relative to it).
    #[serde(skip)]
    pub dir: PathBuf,
    /// Path of the manifest file (for messages).
    #[serde(skip)]
    pub path: PathBuf,
}

impl Manifest {
    /// Reads and checks a manifest: format, at least one source, unique names,
    /// non-empty splits, positive classes and image shape.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read manifest {} (set `data.manifest`)",
                path.display()
            )
        })?;
        let mut m: Manifest = serde_json::from_str(&text).with_context(|| {
            format!(
                "manifest {} is not a valid dg-benchmark/v1 JSON",
                path.display()
            )
        })?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        m.path = path.to_path_buf();
        let p = path.display();
        if m.format != "dg-benchmark/v1" {
            bail!(
                "manifest {p}: field `format` is `{}`, expected `dg-benchmark/v1`",
                m.format
            );
        }
        match m.task {
            Task::Classification if m.num_classes < 2 => {
                bail!("manifest {p}: field `num_classes` must be at least 2")
            }
            Task::Classification => {}
            Task::SuperResolution => m.check_super_resolution()?,
        }
        if let Some(c) = &m.classes {
            if c.len() != m.num_classes {
                bail!(
                    "manifest {p}: field `classes` names {} classes but `num_classes` is {}",
                    c.len(),
                    m.num_classes
                );
            }
        }
        if m.image_shape.contains(&0) {
            bail!(
                "manifest {p}: field `image_shape` {:?} has a zero dimension",
                m.image_shape
            );
        }
        let elements = m
            .image_shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&e| e.checked_mul(4).is_some());
        if elements.is_none() {
            bail!(
                "manifest {p}: field `image_shape` {:?} is too large to address",
                m.image_shape
            );
        }
        let mut seen = HashSet::new();
        for d in &m.domains {
            if !seen.insert(d.name.as_str()) {
                bail!(
                    "manifest {p}: domain name `{}` appears twice; names must be unique",
                    d.name
                );
            }
            for (s, e) in [("train", &d.splits.train), ("test", &d.splits.test)] {
                if e.n == 0 {
                    bail!(
                        "manifest {p}: domain `{}` has an empty {s} split (n = 0)",
                        d.name
                    );
                }
                match (e.format, &e.labels) {
                    (SplitFormat::Idx, None) => bail!(
                        "manifest {p}: domain `{}`, {s} split: format `idx` needs `labels` \
                         (the IDX labels file next to the images file `file`)",
                        d.name
                    ),
                    (SplitFormat::Safetensors, Some(_)) => bail!(
                        "manifest {p}: domain `{}`, {s} split: `labels` is only for format \
                         `idx` (a safetensors split holds its labels); add \"format\": \"idx\" \
                         or remove `labels`",
                        d.name
                    ),
                    _ => {}
                }
            }
        }
        if !m.domains.iter().any(|d| d.role == Role::Source) {
            bail!("manifest {p}: no domain has role `source`; training needs at least one");
        }
        Ok(m)
    }

    /// The fields of a super-resolution manifest: a scale of 2 to 8 and a target shape of
    /// the input's channels and `scale` times its sides.
    fn check_super_resolution(&self) -> Result<()> {
        let p = self.path.display();
        let Some(scale) = self.scale.filter(|s| (2..=8).contains(s)) else {
            bail!(
                "manifest {p}: a super-resolution manifest needs `scale` (2, 3 or 4; at most \
                 8), found {:?}",
                self.scale
            );
        };
        let [c, h, w] = self.image_shape;
        let want = [c, h * scale, w * scale];
        if self.target_shape != Some(want) {
            bail!(
                "manifest {p}: `target_shape` is {:?}; with `image_shape` {:?} and `scale` \
                 {scale} it must be {want:?}",
                self.target_shape,
                self.image_shape
            );
        }
        Ok(())
    }

    /// Source domains in manifest order.
    pub fn sources(&self) -> impl Iterator<Item = &DomainEntry> {
        self.domains.iter().filter(|d| d.role == Role::Source)
    }
}
