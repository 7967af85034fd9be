//! From stored pixels to the model's input: the region (the whole image, resize and
//! center-crop, or a random resized crop), antialiased resampling to the input size,
//! colour jitter, mirroring and per-channel normalization.
//!
//! Random choices come from a generator keyed by (seed, stage, batch, example), never
//! from shared state, so any thread may prepare any example and a resumed run draws
//! what the whole run would have drawn. Pixels that need nothing (stored at the input
//! size, no normalization, no draw) pass through with their bits.

use crate::config::{AugmentConfig, Config, Normalization};
use crate::rng::Rng;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a trained network expects of its input: recorded in `summary.json` and in the
/// metadata of every exported weights file, and read back by `ldt eval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Class names; output `k` is `classes[k]`.
    pub classes: Vec<String>,
    /// The input `[C, H, W]`.
    pub shape: [usize; 3],
    /// Per-channel mean subtracted from the [0, 1] pixels (none: not normalized).
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation the pixels were divided by.
    pub std: Option<Vec<f32>>,
}

impl InputSpec {
    /// The safetensors metadata key that holds the spec (as JSON).
    pub const KEY: &'static str = "ldt.input";

    /// The spec as safetensors metadata.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let json = serde_json::to_string(self).expect("an input spec serializes");
        BTreeMap::from([(Self::KEY.to_string(), json)])
    }

    /// The spec recorded in a weights file's metadata (`None` when it records none:
    /// another tool's file, or a checkpoint); `file` names it in errors.
    pub fn from_metadata(meta: &BTreeMap<String, String>, file: &str) -> Result<Option<Self>> {
        meta.get(Self::KEY)
            .map(|j| {
                serde_json::from_str(j)
                    .with_context(|| format!("{file}: metadata `{}` is not readable", Self::KEY))
            })
            .transpose()
    }

    /// Applies the recorded normalization to `cfg`; returns what changed, for the user.
    pub fn apply_normalization(&self, cfg: &mut Config) -> Option<String> {
        let as_f64 = |v: &Option<Vec<f32>>| {
            v.as_ref()
                .map(|v| Normalization::Values(v.iter().map(|&x| x as f64).collect()))
        };
        let (mean, std) = (as_f64(&self.mean), as_f64(&self.std));
        let channels = self.shape[0];
        let values = |n: &Option<Normalization>, key: &str, std: bool| {
            n.as_ref().and_then(|n| n.values(key, channels, std).ok())
        };
        let now = (
            values(&cfg.data.mean, "data.mean", false),
            values(&cfg.data.std, "data.std", true),
        );
        let want = (
            values(&mean, "data.mean", false),
            values(&std, "data.std", true),
        );
        if now == want {
            return None;
        }
        cfg.data.mean = mean;
        cfg.data.std = std;
        Some(match &want.0 {
            Some(m) => format!(
                "data.mean = {m:?}, data.std = {:?}",
                want.1.clone().unwrap_or_default()
            ),
            None => "no normalization".into(),
        })
    }
}

/// An example's pixels: `c` planes of `h x w`, values in [0, 1].
pub struct Image<'a> {
    /// Channels.
    pub c: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// `c * h * w` values, plane by plane.
    pub px: &'a [f32],
}

/// Which random draws a training example gets: its stage (hashed name), the batch's
/// position in that stage's order and the example's index in the source pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Draw {
    /// The stage's key ([`crate::rng::name_key`] of its name).
    pub stage: u64,
    /// The batch's position in the stage's order (counted from the stage's start).
    pub batch: u64,
    /// The example's global index.
    pub example: u64,
}

impl Draw {
    /// The generator of this example's draws.
    fn rng(&self, seed: u64) -> Rng {
        let mut k = self.stage;
        for v in [self.batch, self.example] {
            k = (k ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        }
        Rng::new(seed, k ^ AUGMENT_STREAM)
    }
}

/// Stream tag of the augmentation draws (apart from `train::run::streams`).
const AUGMENT_STREAM: u64 = 0xA5A5_0000_0000_0007;

/// A region of the source image in pixel coordinates (fractional for resize + crop).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Region {
    y: f64,
    x: f64,
    h: f64,
    w: f64,
}

/// How every example becomes the model's input.
#[derive(Clone, Debug)]
pub struct Prep {
    shape: [usize; 3],
    norm: Option<(Vec<f32>, Vec<f32>)>,
    augment: AugmentConfig,
    seed: u64,
}

impl Prep {
    /// The preparation of `cfg` for inputs of `shape` `[C, H, W]` (`data.mean`/`std`
    /// checked against `C`, `[augment]` and `seed` as configured).
    pub fn new(cfg: &Config, shape: [usize; 3]) -> Result<Prep> {
        let norm = match (&cfg.data.mean, &cfg.data.std) {
            (Some(m), Some(s)) => {
                let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
                Some((
                    f(m.values("data.mean", shape[0], false)?),
                    f(s.values("data.std", shape[0], true)?),
                ))
            }
            _ => None,
        };
        Ok(Prep {
            shape,
            norm,
            augment: cfg.augment.clone(),
            seed: cfg.seed,
        })
    }

    /// The model's input `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Values per prepared example.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Never true: an input has at least one value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a network trained on these inputs expects, with the data's `classes`.
    pub fn spec(&self, classes: &[String]) -> InputSpec {
        InputSpec {
            classes: classes.to_vec(),
            shape: self.shape,
            mean: self.norm.as_ref().map(|n| n.0.clone()),
            std: self.norm.as_ref().map(|n| n.1.clone()),
        }
    }

    /// Whether stored pixels of `dims` `[C, H, W]` pass through unchanged (the input
    /// size, no normalization, no random draw).
    pub fn passes(&self, dims: [usize; 3], draw: Option<Draw>) -> bool {
        dims == self.shape && self.norm.is_none() && (draw.is_none() || !self.augment.any())
    }

    /// Whether `draw` mirrors the input: the draw [`Prep::apply`] makes first when the
    /// only augmentation is `hflip` (super-resolution mirrors its target with it; a
    /// super-resolution benchmark refuses the other augmentations when it opens).
    pub fn flips(&self, draw: Option<Draw>) -> bool {
        let only_flip = self.augment.random_resized_crop.is_none()
            && self.augment.color_jitter.is_none()
            && self.augment.hflip;
        match draw {
            Some(d) if only_flip => d.rng(self.seed).next_f64() < 0.5,
            _ => false,
        }
    }

    /// Appends the prepared input of `img` (channels as the input's) to `out`: with a
    /// `draw`, the configured augmentation; without one, resize and center-crop.
    pub fn apply(&self, img: &Image<'_>, draw: Option<Draw>, out: &mut Vec<f32>) {
        let [c, oh, ow] = self.shape;
        debug_assert_eq!(img.c, c, "channels are converted when decoding");
        let mut rng = draw
            .filter(|_| self.augment.any())
            .map(|d| d.rng(self.seed));
        let region = match (&mut rng, self.augment.random_resized_crop) {
            (Some(r), Some(scale)) => random_region(img.h, img.w, scale, r),
            _ => center_region(img.h, img.w, oh, ow),
        };
        let start = out.len();
        let whole = region
            == Region {
                y: 0.0,
                x: 0.0,
                h: img.h as f64,
                w: img.w as f64,
            };
        if whole && (img.h, img.w) == (oh, ow) {
            out.extend_from_slice(img.px);
        } else {
            resample(img, region, (oh, ow), Filter::Triangle, out);
        }
        let planes = &mut out[start..];
        if let Some(r) = &mut rng {
            let flip = self.augment.hflip && r.next_f64() < 0.5;
            if let Some(j) = &self.augment.color_jitter {
                let [b, ct, s] = j.strengths().map(|s| factor(r, s));
                jitter(planes, c, [b, ct, s]);
            }
            if flip {
                for row in planes.chunks_exact_mut(ow) {
                    row.reverse();
                }
            }
        }
        if let Some((m, s)) = &self.norm {
            for (k, plane) in planes.chunks_exact_mut(oh * ow).enumerate() {
                for v in plane {
                    *v = (*v - m[k]) / s[k];
                }
            }
        }
    }
}

/// A jitter factor uniform in `[max(0, 1 - s), 1 + s]` (torchvision's range).
fn factor(r: &mut Rng, s: f64) -> f32 {
    let lo = (1.0 - s).max(0.0);
    (lo + (1.0 + s - lo) * r.next_f64()) as f32
}

/// The region that resizing the shorter side to the output and cropping its center
/// keeps (aspect ratio kept; the whole image when the ratios agree).
fn center_region(h: usize, w: usize, oh: usize, ow: usize) -> Region {
    let scale = (oh as f64 / h as f64).max(ow as f64 / w as f64);
    let (rh, rw) = (oh as f64 / scale, ow as f64 / scale);
    // Equal aspect ratios give the whole image exactly (no rounding residue).
    let (rh, rw) = if (rh - h as f64).abs() < 1e-9 && (rw - w as f64).abs() < 1e-9 {
        (h as f64, w as f64)
    } else {
        (rh.min(h as f64), rw.min(w as f64))
    };
    Region {
        y: (h as f64 - rh) / 2.0,
        x: (w as f64 - rw) / 2.0,
        h: rh,
        w: rw,
    }
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at an area share in
/// `scale` and an aspect ratio in [3/4, 4/3] (log-uniform), else the center crop
/// closest to that ratio range.
fn random_region(h: usize, w: usize, scale: [f64; 2], r: &mut Rng) -> Region {
    let area = (h * w) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * (scale[0] + (scale[1] - scale[0]) * r.next_f64());
        let ratio = (lo + (hi - lo) * r.next_f64()).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let y = r.below(h - ch + 1);
            let x = r.below(w - cw + 1);
            return Region {
                y: y as f64,
                x: x as f64,
                h: ch as f64,
                w: cw as f64,
            };
        }
    }
    let ratio = w as f64 / h as f64;
    let (ch, cw) = if ratio < 3.0 / 4.0 {
        (((w as f64) / (3.0 / 4.0)).round() as usize, w)
    } else if ratio > 4.0 / 3.0 {
        (h, ((h as f64) * (4.0 / 3.0)).round() as usize)
    } else {
        (h, w)
    };
    Region {
        y: ((h - ch) / 2) as f64,
        x: ((w - cw) / 2) as f64,
        h: ch as f64,
        w: cw as f64,
    }
}

/// Weights of one output position along an axis: the first input index and the
/// normalized filter weights from there.
struct Taps {
    first: usize,
    w: Vec<f32>,
}

/// A resampling filter (PIL's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    /// Triangle: PIL's `BILINEAR`.
    Triangle,
    /// Keys' cubic with `a = -0.5`: PIL's `BICUBIC`.
    Cubic,
}

impl Filter {
    /// Half-width of the kernel at scale 1.
    fn radius(self) -> f64 {
        match self {
            Filter::Triangle => 1.0,
            Filter::Cubic => 2.0,
        }
    }

    /// The kernel at `x` (scale 1).
    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Triangle => (1.0 - x).max(0.0),
            Filter::Cubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// `filter` taps mapping `[start, start + len)` of an axis of `n` inputs onto `out`
/// outputs, widened by the downscale factor so that shrinking averages (antialiased, as
/// PIL's resize).
fn taps(n: usize, start: f64, len: f64, out: usize, filter: Filter) -> Vec<Taps> {
    let scale = len / out as f64;
    let stretch = scale.max(1.0);
    let support = filter.radius() * stretch;
    (0..out)
        .map(|i| {
            let center = start + (i as f64 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0) as usize).min(n - 1);
            let hi = ((center + support).ceil() as usize).clamp(lo + 1, n);
            let mut w: Vec<f64> = (lo..hi)
                .map(|k| filter.weight((k as f64 + 0.5 - center) / stretch))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            } else {
                // A center outside every tap (only at a clamped edge): the nearest pixel.
                w.iter_mut().for_each(|v| *v = 0.0);
                let near = (center.floor().max(0.0) as usize).clamp(lo, hi - 1);
                w[near - lo] = 1.0;
            }
            Taps {
                first: lo,
                w: w.into_iter().map(|v| v as f32).collect(),
            }
        })
        .collect()
}

/// Bicubic upsampling of the planes `px` (`[C, H, W]`, values in [0, 1]) by `scale`
/// (PIL's `BICUBIC` resize): the baseline a super-resolution network is measured
/// against.
pub fn upscale_bicubic(px: &[f32], [c, h, w]: [usize; 3], scale: usize) -> Vec<f32> {
    let img = Image { c, h, w, px };
    let whole = Region {
        y: 0.0,
        x: 0.0,
        h: h as f64,
        w: w as f64,
    };
    let mut out = Vec::with_capacity(px.len() * scale * scale);
    resample(&img, whole, (h * scale, w * scale), Filter::Cubic, &mut out);
    out
}

/// Resamples `region` of every plane of `img` to `oh x ow` with `filter` (rows, then
/// columns) and appends the planes to `out`.
fn resample(
    img: &Image<'_>,
    region: Region,
    (oh, ow): (usize, usize),
    filter: Filter,
    out: &mut Vec<f32>,
) {
    let rows = taps(img.h, region.y, region.h, oh, filter);
    let cols = taps(img.w, region.x, region.w, ow, filter);
    let (r0, r1) = rows.iter().fold((img.h, 0), |(a, b), t| {
        (a.min(t.first), b.max(t.first + t.w.len()))
    });
    let mut across = vec![0f32; (r1 - r0) * ow];
    for plane in img.px.chunks_exact(img.h * img.w) {
        for (y, row) in (r0..r1).zip(across.chunks_exact_mut(ow)) {
            let src = &plane[y * img.w..(y + 1) * img.w];
            for (o, t) in row.iter_mut().zip(&cols) {
                *o = t.w.iter().zip(&src[t.first..]).map(|(w, v)| w * v).sum();
            }
        }
        for t in &rows {
            let base = out.len();
            out.resize(base + ow, 0.0);
            for (k, w) in t.w.iter().enumerate() {
                let src = &across[(t.first + k - r0) * ow..(t.first + k - r0 + 1) * ow];
                for (o, v) in out[base..].iter_mut().zip(src) {
                    *o += w * v;
                }
            }
        }
    }
}

/// Luma of RGB (ITU-R 601-2, torchvision's `rgb_to_grayscale`) or the one channel.
fn gray(planes: &[f32], c: usize, i: usize, n: usize) -> f32 {
    match c {
        3 => 0.299 * planes[i] + 0.587 * planes[n + i] + 0.114 * planes[2 * n + i],
        _ => planes[i],
    }
}

/// Brightness, contrast and saturation by `f` (torchvision's blends, each clamped to
/// [0, 1]; saturation only for 3 channels).
fn jitter(planes: &mut [f32], c: usize, f: [f32; 3]) {
    let n = planes.len() / c;
    let blend = |v: f32, other: f32, k: f32| (k * v + (1.0 - k) * other).clamp(0.0, 1.0);
    for v in planes.iter_mut() {
        *v = blend(*v, 0.0, f[0]);
    }
    let mean = (0..n).map(|i| gray(planes, c, i, n) as f64).sum::<f64>() / n as f64;
    for v in planes.iter_mut() {
        *v = blend(*v, mean as f32, f[1]);
    }
    if c == 3 {
        for i in 0..n {
            let g = gray(planes, c, i, n);
            for k in 0..3 {
                planes[k * n + i] = blend(planes[k * n + i], g, f[2]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Jitter, Normalization};

    fn prep(shape: [usize; 3], edit: impl FnOnce(&mut Config)) -> Prep {
        let mut cfg = Config::default();
        edit(&mut cfg);
        Prep::new(&cfg, shape).unwrap()
    }

    /// Resampling against an f64 recomputation of the same triangle filter written
    /// pixel by pixel (2-D weights, no separation), to 1e-6.
    #[test]
    fn resample_matches_a_direct_2d_filter() {
        let (h, w) = (7, 10);
        let px: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 23) as f32 / 23.0).collect();
        let img = Image {
            c: 1,
            h,
            w,
            px: &px,
        };
        for (region, oh, ow) in [
            (center_region(h, w, 4, 4), 4, 4),
            (center_region(h, w, 14, 20), 14, 20),
            (
                Region {
                    y: 1.0,
                    x: 2.0,
                    h: 5.0,
                    w: 6.0,
                },
                3,
                9,
            ),
        ] {
            let mut got = Vec::new();
            resample(&img, region, (oh, ow), Filter::Triangle, &mut got);
            let axis = |n: usize, start: f64, len: f64, out: usize, i: usize| -> Vec<f64> {
                let s = len / out as f64;
                let sup = s.max(1.0);
                let c = start + (i as f64 + 0.5) * s;
                let v: Vec<f64> = (0..n)
                    .map(|k| (1.0 - ((k as f64 + 0.5 - c) / sup).abs()).max(0.0))
                    .collect();
                let sum: f64 = v.iter().sum();
                v.into_iter().map(|x| x / sum).collect()
            };
            for y in 0..oh {
                for x in 0..ow {
                    let (wy, wx) = (
                        axis(h, region.y, region.h, oh, y),
                        axis(w, region.x, region.w, ow, x),
                    );
                    let want: f64 = (0..h)
                        .flat_map(|i| (0..w).map(move |j| (i, j)))
                        .map(|(i, j)| wy[i] * wx[j] * px[i * w + j] as f64)
                        .sum();
                    let g = got[y * ow + x] as f64;
                    assert!(
                        (g - want).abs() < 1e-6,
                        "{region:?} ({y},{x}): {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn center_region_keeps_the_aspect_ratio() {
        // 100x200 to 50x50: shorter side 100 -> 50, center 100 columns of the 200.
        let r = center_region(100, 200, 50, 50);
        assert_eq!((r.y, r.x, r.h, r.w), (0.0, 50.0, 100.0, 100.0));
        let r = center_region(28, 28, 32, 32);
        assert_eq!((r.y, r.x, r.h, r.w), (0.0, 0.0, 28.0, 28.0));
    }

    /// Stored pixels at the input size without normalization or draws pass with their
    /// bits; a draw repeats exactly for the same key and differs for another example.
    #[test]
    fn identity_passes_and_draws_repeat() {
        let px: Vec<f32> = (0..3 * 8 * 8).map(|i| (i % 17) as f32 / 17.0).collect();
        let img = Image {
            c: 3,
            h: 8,
            w: 8,
            px: &px,
        };
        let p = prep([3, 8, 8], |_| {});
        assert!(p.passes([3, 8, 8], None));
        let mut out = Vec::new();
        p.apply(&img, None, &mut out);
        assert_eq!(out, px);
        let p = prep([3, 6, 6], |c| {
            c.augment.hflip = true;
            c.augment.random_resized_crop = Some([0.3, 1.0]);
            c.augment.color_jitter = Some(Jitter::All(0.4));
            c.data.mean = Some(Normalization::Preset("imagenet".into()));
            c.data.std = Some(Normalization::Preset("imagenet".into()));
        });
        let d = |example| Draw {
            stage: crate::rng::name_key("train"),
            batch: 3,
            example,
        };
        let run = |draw| {
            let mut o = Vec::new();
            p.apply(&img, Some(draw), &mut o);
            o
        };
        assert_eq!(run(d(5)), run(d(5)));
        assert_ne!(run(d(5)), run(d(6)));
        assert_eq!(run(d(5)).len(), 3 * 36);
    }

    /// A mirrored draw is the plain one reversed row by row: the flip draws come from
    /// the same generator, so among examples both outcomes occur.
    #[test]
    fn hflip_mirrors_rows() {
        let px: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        let img = Image {
            c: 1,
            h: 4,
            w: 4,
            px: &px,
        };
        let p = prep([1, 4, 4], |c| c.augment.hflip = true);
        let mirrored: Vec<f32> = px.chunks(4).flat_map(|r| r.iter().rev().copied()).collect();
        let mut seen = [false; 2];
        for e in 0..32 {
            let mut o = Vec::new();
            p.apply(
                &img,
                Some(Draw {
                    stage: 1,
                    batch: 0,
                    example: e,
                }),
                &mut o,
            );
            if o == px {
                seen[0] = true;
            } else {
                assert_eq!(o, mirrored);
                seen[1] = true;
            }
        }
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn normalization_is_per_channel() {
        let px = vec![0.5f32; 2 * 2 * 2];
        let img = Image {
            c: 2,
            h: 2,
            w: 2,
            px: &px,
        };
        let p = prep([2, 2, 2], |c| {
            c.data.mean = Some(Normalization::Values(vec![0.25, 0.5]));
            c.data.std = Some(Normalization::Values(vec![0.5, 2.0]));
        });
        let mut o = Vec::new();
        p.apply(&img, None, &mut o);
        assert_eq!(o, vec![0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
    }

    /// Random regions lie inside the image, their area share within the range (up to
    /// rounding) whenever a try succeeds.
    #[test]
    fn random_regions_stay_inside() {
        let mut r = Rng::new(1, 2);
        for _ in 0..500 {
            let g = random_region(30, 50, [0.2, 0.9], &mut r);
            assert!(g.y >= 0.0 && g.x >= 0.0 && g.y + g.h <= 30.0 && g.x + g.w <= 50.0);
            assert!(g.h >= 1.0 && g.w >= 1.0);
        }
    }
}
