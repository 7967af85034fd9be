//! The task a run trains for: the loss over the network's outputs, and how an
//! evaluation scores them (accuracy for classification; PSNR and SSIM for
//! super-resolution, by the conventions the super-resolution literature reports).

pub mod quality;

use crate::config::{Config, SrLoss, Task};
use crate::metrics::{DomainScore, EvalReport, ImageScore};
use crate::model::layers;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// The training loss of a run, over f32 outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// Mean cross-entropy of logits `[N, K]` against i64 labels `[N]`.
    CrossEntropy,
    /// Mean absolute error of images against target images (BasicSR's `L1Loss`).
    L1,
    /// Mean `sqrt(d^2 + eps)` of the pixel differences `d` (BasicSR's `CharbonnierLoss`).
    Charbonnier {
        /// Added under the root.
        eps: f64,
    },
}

impl Loss {
    /// The loss `cfg` trains with (its `task`, resolved: unset means classification).
    pub fn of(cfg: &Config) -> Loss {
        Self::for_task(cfg, cfg.task.unwrap_or(Task::Classification))
    }

    /// The loss of `task` with `cfg`'s settings (`sr.loss`).
    pub fn for_task(cfg: &Config, task: Task) -> Loss {
        match (task, cfg.sr.loss) {
            (Task::Classification, _) => Loss::CrossEntropy,
            (Task::SuperResolution, SrLoss::L1) => Loss::L1,
            (Task::SuperResolution, SrLoss::Charbonnier) => Loss::Charbonnier {
                eps: cfg.sr.charbonnier_eps,
            },
        }
    }

    /// The mean loss of `out` against the truth `y` (labels, or target images of `out`'s
    /// shape), tracked where `out` is.
    pub fn mean(&self, out: &Tensor, y: &Tensor) -> Result<Tensor> {
        match self {
            Loss::CrossEntropy => layers::cross_entropy(out, y),
            Loss::L1 | Loss::Charbonnier { .. } => Ok(self.pixel(out, y)?.mean_all()?),
        }
    }

    /// Each example's loss, f64 `[N]`, untracked (an evaluation's loss).
    pub fn per_example(&self, out: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
        let out = out.detach();
        let per = match self {
            Loss::CrossEntropy => {
                let lsm = layers::log_softmax(&out)?;
                lsm.gather(&y.unsqueeze(1)?, 1)?
                    .to_dtype(DType::F64)?
                    .squeeze(1)?
                    .neg()?
            }
            Loss::L1 | Loss::Charbonnier { .. } => self
                .pixel(&out, y)?
                .to_dtype(DType::F64)?
                .flatten_from(1)?
                .mean(D::Minus1)?,
        };
        Ok(per.to_vec1::<f64>()?)
    }

    /// The pixel losses of images `out` against `y` (same shape), elementwise. The L1
    /// gradient is PyTorch's `sign(out - y)` (0 where they are equal): `|d|` is written
    /// as `d * sign(d)` with the sign untracked.
    fn pixel(&self, out: &Tensor, y: &Tensor) -> Result<Tensor> {
        if out.dims() != y.dims() {
            bail!(
                "the network's output {:?} and the target images {:?} differ in shape; the \
                 network must upscale its input by the data's scale",
                out.dims(),
                y.dims()
            );
        }
        let d = out.sub(&y.to_dtype(out.dtype())?)?;
        Ok(match self {
            Loss::L1 => d.mul(&d.detach().sign()?)?,
            Loss::Charbonnier { eps } => d.sqr()?.affine(1.0, *eps)?.sqrt()?,
            Loss::CrossEntropy => unreachable!("cross-entropy has no pixel loss"),
        })
    }

    /// Whether the loss scores class labels (an accuracy exists).
    pub fn is_classification(&self) -> bool {
        matches!(self, Loss::CrossEntropy)
    }
}

/// How an evaluation scores a network's outputs: its loss and, for images, the border
/// cut from each side before PSNR and SSIM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scoring {
    /// The loss reported beside the scores.
    pub loss: Loss,
    /// Pixels cut from each side of an image before PSNR and SSIM.
    pub border: usize,
}

impl Scoring {
    /// The scoring of `cfg` on data for `task` of upscaling factor `scale` (`sr.border`,
    /// unset = the scale).
    pub fn of(cfg: &Config, task: Task, scale: Option<usize>) -> Scoring {
        Scoring {
            loss: Loss::for_task(cfg, task),
            border: cfg.sr.border.or(scale).unwrap_or(0),
        }
    }
}

/// What an evaluation adds up over one domain's examples.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    n: usize,
    correct: usize,
    loss: f64,
    /// Sums of the per-image Y PSNR, Y SSIM and RGB PSNR.
    image: [f64; 3],
}

impl Tally {
    /// Adds the scores of outputs `out` against the truth `y` of one batch.
    pub fn add(&mut self, s: &Scoring, out: &Tensor, y: &Tensor) -> Result<()> {
        let out = out.detach().to_dtype(DType::F32)?;
        self.loss += s.loss.per_example(&out, y)?.iter().sum::<f64>();
        let n = y.dim(0)?;
        self.n += n;
        if s.loss.is_classification() {
            let pred = out.argmax(D::Minus1)?.to_dtype(DType::I64)?;
            let hits = pred.eq(y)?.to_dtype(DType::F32)?.sum_all()?;
            self.correct += hits.to_scalar::<f32>()? as usize;
            return Ok(());
        }
        let (_, c, h, w) = out.dims4()?;
        let (a, b) = (
            out.flatten_all()?.to_vec1::<f32>()?,
            y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        );
        let per = c * h * w;
        for i in 0..n {
            let sr = quality::quantize(&a[i * per..(i + 1) * per]);
            let hr = quality::quantize(&b[i * per..(i + 1) * per]);
            let shape = [c, h, w];
            self.image[0] += quality::psnr(&sr, &hr, shape, s.border, quality::Channel::Y)?;
            self.image[1] += quality::ssim(&sr, &hr, shape, s.border, quality::Channel::Y)?;
            self.image[2] += quality::psnr(&sr, &hr, shape, s.border, quality::Channel::Rgb)?;
        }
        Ok(())
    }

    /// The domain's score: the means over its examples.
    pub fn score(&self, s: &Scoring, name: &str, role: &str) -> DomainScore {
        let n = self.n as f64;
        let classify = s.loss.is_classification();
        DomainScore {
            name: name.into(),
            role: role.into(),
            acc: if classify {
                self.correct as f64 / n
            } else {
                f64::NAN
            },
            loss: self.loss / n,
            n: self.n,
            image: (!classify).then(|| ImageScore {
                psnr: self.image[0] / n,
                ssim: self.image[1] / n,
                psnr_rgb: self.image[2] / n,
            }),
        }
    }
}

/// The report of `domains`: the source and target means of accuracy, or of image quality
/// (means over the role's domains; NaN / None for a role without domains).
pub fn report(domains: Vec<DomainScore>) -> EvalReport {
    let of_role = |role: &'static str| domains.iter().filter(move |d| d.role == role);
    let mean = |v: Vec<f64>| match v.len() {
        0 => f64::NAN,
        k => v.iter().sum::<f64>() / k as f64,
    };
    let acc = |role: &'static str| mean(of_role(role).map(|d| d.acc).collect());
    let images = domains.iter().any(|d| d.image.is_some()).then(|| {
        ["source", "target"].map(|role| {
            let v: Vec<ImageScore> = of_role(role).filter_map(|d| d.image).collect();
            (!v.is_empty()).then(|| ImageScore {
                psnr: mean(v.iter().map(|i| i.psnr).collect()),
                ssim: mean(v.iter().map(|i| i.ssim).collect()),
                psnr_rgb: mean(v.iter().map(|i| i.psnr_rgb).collect()),
            })
        })
    });
    EvalReport {
        source_acc: acc("source"),
        target_acc: acc("target"),
        image: images,
        domains,
    }
}
