//! Image quality of super-resolution outputs: PSNR and SSIM with the conventions of
//! BasicSR (`basicsr/metrics/psnr_ssim.py`, `calculate_psnr` / `calculate_ssim`), which
//! is how the SR literature reports them (BasicSR reproduces the MATLAB scoring of the
//! older papers, and later ones score with BasicSR or a copy of it), so that numbers from
//! `ldt` can stand beside published tables.
//!
//! What is scored is the saved 8-bit image, not the float network output: [`quantize`]
//! turns an output into the bytes BasicSR's `tensor2img` would write. Images are CHW,
//! RGB, `u8`; `border` pixels are cropped from each side (papers crop the scale factor),
//! and [`Channel`] picks the luma channel (the usual choice) or every stored channel.
//! All arithmetic after the luma conversion is `f64`. `tests/quality.rs` checks every
//! case of `tests/sr/quality.json`, computed by `scripts/make_quality_fixtures.py` with
//! numpy and OpenCV, to 1e-4 dB PSNR and 1e-5 SSIM.

use anyhow::{bail, Result};

/// The network output `x` (nominally in [0, 1]) as the 8-bit image SR papers score, value
/// by value exactly as BasicSR's `tensor2img`: clamp to [0, 1], times 255 in `f32`, round
/// half to even (numpy's `round`), then to `u8`. A NaN becomes 0 (the cast numpy does on
/// x86; BasicSR leaves it undefined).
pub fn quantize(x: &[f32]) -> Vec<u8> {
    x.iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
        .collect()
}

/// Which channels are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The luma of ITU-R BT.601 YCbCr, in [16, 235], as MATLAB's `rgb2ycbcr` and
    /// BasicSR's `to_y_channel`: from RGB in [0, 1] (`u8 / 255` in `f32`),
    /// `Y = 65.481 R + 128.553 G + 24.966 B + 16` in `f64`, divided by 255 and stored as
    /// `f32`, times 255 in `f32`: not rounded to an integer. Needs 3 channels. What SR
    /// papers report (`test_y_channel: true`).
    Y,
    /// Every stored channel as it is (RGB): the mean squared error over all of them for
    /// PSNR, the mean of the per-channel SSIMs.
    Rgb,
}

/// Peak signal-to-noise ratio of `a` against `b` in dB, as BasicSR's `calculate_psnr`:
/// `10 log10(255² / MSE)` over the channels `ch` of the images with `border` pixels cut
/// from each side; infinite when the images agree there (MSE = 0). `a` and `b` are CHW
/// `u8` images of `shape` = `[C, H, W]`.
pub fn psnr(a: &[u8], b: &[u8], shape: [usize; 3], border: usize, ch: Channel) -> Result<f64> {
    let Planes { a: pa, b: pb, .. } = planes("PSNR", a, b, shape, border, ch)?;
    let n = (pa.len() * pa[0].len()) as f64;
    let sse: f64 = pa
        .iter()
        .zip(&pb)
        .flat_map(|(x, y)| x.iter().zip(y))
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let mse = sse / n;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    })
}

/// Side of the SSIM window.
const WINDOW: usize = 11;

/// Structural similarity of `a` and `b`, as BasicSR's `calculate_ssim` (which matches
/// the MATLAB code of Wang et al. 2004): per channel, local statistics under an 11x11
/// Gaussian window of sigma 1.5 (OpenCV's `getGaussianKernel`, outer product) at every
/// position where the window lies inside the image (`filter2D(..)[5:-5, 5:-5]`), the
/// SSIM map with `C1 = (0.01·255)²` and `C2 = (0.03·255)²`, its mean; the mean over
/// channels. Same arguments as [`psnr`]; the cropped image must be at least 11x11.
pub fn ssim(a: &[u8], b: &[u8], shape: [usize; 3], border: usize, ch: Channel) -> Result<f64> {
    let Planes { a: pa, b: pb, h, w } = planes("SSIM", a, b, shape, border, ch)?;
    if h < WINDOW || w < WINDOW {
        bail!(
            "SSIM: its {WINDOW}x{WINDOW} window needs at least {WINDOW}x{WINDOW} pixels, \
             and a {}x{}x{} image less a border of {border} leaves {h}x{w}",
            shape[0],
            shape[1],
            shape[2]
        );
    }
    let k = gaussian();
    let sum: f64 = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| ssim_plane(x, y, h, w, &k))
        .sum();
    Ok(sum / pa.len() as f64)
}

/// The scored channels of two images as `f64` planes, the border cut.
struct Planes {
    /// The planes of the first image.
    a: Vec<Vec<f64>>,
    /// Those of the second.
    b: Vec<Vec<f64>>,
    /// Height of a plane.
    h: usize,
    /// Width of a plane.
    w: usize,
}

/// The [`Planes`] of `a` and `b`; an error naming the shapes when the lengths do not match
/// `shape`, when `ch` needs channels the images lack, or when the border leaves no pixel.
fn planes(
    what: &str,
    a: &[u8],
    b: &[u8],
    shape: [usize; 3],
    border: usize,
    ch: Channel,
) -> Result<Planes> {
    let [c, h, w] = shape;
    let len = c.checked_mul(h).and_then(|n| n.checked_mul(w));
    if len.is_none_or(|n| n == 0) {
        bail!("{what}: image shape {shape:?} (C, H, W) has no pixel");
    }
    if a.len() != b.len() || Some(a.len()) != len {
        bail!(
            "{what}: images of {} and {} values for shape {shape:?} (C, H, W), {} expected each",
            a.len(),
            b.len(),
            c * h * w
        );
    }
    if ch == Channel::Y && c != 3 {
        bail!("{what}: the Y channel needs RGB images (3 channels), shape {shape:?} has {c}");
    }
    if border.saturating_mul(2) >= h || border.saturating_mul(2) >= w {
        bail!("{what}: a border of {border} pixels leaves nothing of a {c}x{h}x{w} image");
    }
    // The bytes of plane `i` of an image, the border cut.
    let plane = |img: &[u8], i: usize| -> Vec<u8> {
        (border..h - border)
            .flat_map(|y| {
                let row = (i * h + y) * w;
                img[row + border..row + w - border].iter().copied()
            })
            .collect()
    };
    let take = |img: &[u8]| -> Vec<Vec<f64>> {
        match ch {
            Channel::Rgb => (0..c)
                .map(|i| plane(img, i).into_iter().map(f64::from).collect())
                .collect(),
            Channel::Y => {
                let (r, g, b) = (plane(img, 0), plane(img, 1), plane(img, 2));
                vec![(0..r.len()).map(|p| luma(r[p], g[p], b[p])).collect()]
            }
        }
    };
    Ok(Planes {
        a: take(a),
        b: take(b),
        h: h - 2 * border,
        w: w - 2 * border,
    })
}

/// The luma of one RGB pixel with the float types of BasicSR's `to_y_channel`: the
/// channels to `f32` in [0, 1], the weighted sum in `f64` (BGR order, as numpy's `dot`
/// over BasicSR's BGR images adds), divided by 255 and stored as `f32`, times 255 in
/// `f32`.
fn luma(r: u8, g: u8, b: u8) -> f64 {
    let unit = |v: u8| f64::from(f32::from(v) / 255.0);
    let y = unit(b) * 24.966 + unit(g) * 128.553 + unit(r) * 65.481 + 16.0;
    f64::from((y / 255.0) as f32 * 255.0)
}

/// The 1-D Gaussian of OpenCV's `getGaussianKernel(11, 1.5)`: `exp(-d² / (2·1.5²))` for
/// offsets `d` = -5..=5, normalized to sum 1. The SSIM window is its outer product.
fn gaussian() -> [f64; WINDOW] {
    let mut k = [0.0; WINDOW];
    let mid = (WINDOW / 2) as f64;
    for (i, v) in k.iter_mut().enumerate() {
        let d = i as f64 - mid;
        *v = (-d * d / (2.0 * 1.5 * 1.5)).exp();
    }
    let sum: f64 = k.iter().sum();
    k.map(|v| v / sum)
}

/// The mean of the SSIM map of two `h` x `w` planes. Each local statistic is the
/// correlation with the window `k ⊗ k` at the valid positions, done as a pass along rows
/// then one along columns (the window is separable).
fn ssim_plane(x: &[f64], y: &[f64], h: usize, w: usize, k: &[f64; WINDOW]) -> f64 {
    const C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
    const C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);
    let (oh, ow) = (h - WINDOW + 1, w - WINDOW + 1);
    let filter = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
        let mut rows = vec![0.0; h * ow];
        for r in 0..h {
            for j in 0..ow {
                rows[r * ow + j] = (0..WINDOW).map(|v| k[v] * f(r * w + j + v)).sum();
            }
        }
        let mut out = vec![0.0; oh * ow];
        for i in 0..oh {
            for j in 0..ow {
                out[i * ow + j] = (0..WINDOW).map(|u| k[u] * rows[(i + u) * ow + j]).sum();
            }
        }
        out
    };
    let mu_x = filter(&|p| x[p]);
    let mu_y = filter(&|p| y[p]);
    let xx = filter(&|p| x[p] * x[p]);
    let yy = filter(&|p| y[p] * y[p]);
    let xy = filter(&|p| x[p] * y[p]);
    let mut sum = 0.0;
    for p in 0..oh * ow {
        let (mx, my) = (mu_x[p], mu_y[p]);
        let (sx, sy, sxy) = (xx[p] - mx * mx, yy[p] - my * my, xy[p] - mx * my);
        sum +=
            ((2.0 * mx * my + C1) * (2.0 * sxy + C2)) / ((mx * mx + my * my + C1) * (sx + sy + C2));
    }
    sum / (oh * ow) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic 3 x h x w image.
    fn image(h: usize, w: usize, seed: u32) -> Vec<u8> {
        (0..3 * h * w)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 24) as u8)
            .collect()
    }

    #[test]
    fn quantize_clamps_and_rounds_half_to_even() {
        let x = [
            -1.0,
            -0.0,
            0.0,
            0.5 / 255.0,
            1.5 / 255.0,
            2.5 / 255.0,
            0.5,
            1.0,
            7.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        assert_eq!(quantize(&x), [0, 0, 0, 0, 2, 2, 128, 255, 255, 255, 0, 0]);
    }

    #[test]
    fn identical_images_score_inf_and_one() {
        let a = image(16, 13, 1);
        for ch in [Channel::Y, Channel::Rgb] {
            assert_eq!(psnr(&a, &a, [3, 16, 13], 1, ch).unwrap(), f64::INFINITY);
            assert!((ssim(&a, &a, [3, 16, 13], 1, ch).unwrap() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn psnr_of_a_known_error() {
        // Every value off by 1 in every channel: MSE 1, PSNR 20 log10(255).
        let a = image(8, 9, 2).iter().map(|v| v / 2).collect::<Vec<_>>();
        let b = a.iter().map(|v| v + 1).collect::<Vec<_>>();
        let p = psnr(&a, &b, [3, 8, 9], 0, Channel::Rgb).unwrap();
        assert!((p - 20.0 * 255f64.log10()).abs() < 1e-12, "{p}");
    }

    #[test]
    fn the_border_is_not_scored() {
        let a = image(20, 20, 3);
        let mut b = a.clone();
        // Change only the outer 2 pixels of every channel.
        for c in 0..3 {
            for y in 0..20 {
                for x in 0..20 {
                    if !(2..18).contains(&y) || !(2..18).contains(&x) {
                        b[(c * 20 + y) * 20 + x] ^= 0x55;
                    }
                }
            }
        }
        let s = [3, 20, 20];
        assert!(psnr(&a, &b, s, 1, Channel::Y).unwrap().is_finite());
        assert_eq!(psnr(&a, &b, s, 2, Channel::Y).unwrap(), f64::INFINITY);
        assert_eq!(psnr(&a, &b, s, 2, Channel::Rgb).unwrap(), f64::INFINITY);
        assert!((ssim(&a, &b, s, 2, Channel::Rgb).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bad_shapes_are_errors_naming_them() {
        let a = image(12, 12, 4);
        let short = &a[..a.len() - 1];
        let e = psnr(&a, short, [3, 12, 12], 0, Channel::Y).unwrap_err();
        assert!(e.to_string().contains("[3, 12, 12]"), "{e}");
        assert!(e.to_string().contains("431"), "{e}");
        let e = ssim(&a, &a, [3, 12, 13], 0, Channel::Rgb).unwrap_err();
        assert!(e.to_string().contains("[3, 12, 13]"), "{e}");
        let e = psnr(&a, &a, [4, 12, 9], 0, Channel::Y).unwrap_err();
        assert!(e.to_string().contains("3 channels"), "{e}");
        assert!(psnr(&[], &[], [3, 0, 5], 0, Channel::Rgb).is_err());
        assert!(psnr(&a, &a, [usize::MAX, 2, 2], 0, Channel::Rgb).is_err());
        assert!(psnr(&a, &a, [3, 12, 12], usize::MAX, Channel::Rgb).is_err());
        // Any channel count is fine for Rgb.
        assert!(psnr(&a, &a, [4, 12, 9], 0, Channel::Rgb).is_ok());
    }

    #[test]
    fn a_border_too_large_is_an_error() {
        let a = image(12, 30, 5);
        let s = [3, 12, 30];
        let e = psnr(&a, &a, s, 6, Channel::Y).unwrap_err();
        assert!(e.to_string().contains("border of 6"), "{e}");
        assert!(psnr(&a, &a, s, 5, Channel::Y).is_ok());
        // SSIM needs 11x11 after the border: 12 - 2 = 10 rows is too few.
        let e = ssim(&a, &a, s, 1, Channel::Rgb).unwrap_err();
        assert!(e.to_string().contains("leaves 10x28"), "{e}");
        assert!(ssim(&a, &a, s, 0, Channel::Rgb).is_ok());
    }

    #[test]
    fn the_window_is_normalized_and_symmetric() {
        let k = gaussian();
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        for i in 0..WINDOW {
            assert_eq!(k[i], k[WINDOW - 1 - i]);
        }
        // OpenCV's getGaussianKernel(11, 1.5) centre weight.
        assert!((k[5] - 0.266011724).abs() < 1e-8, "{}", k[5]);
    }

    #[test]
    fn luma_spans_16_to_235() {
        assert!((luma(0, 0, 0) - 16.0).abs() < 1e-4);
        assert!((luma(255, 255, 255) - 235.0).abs() < 1e-4);
    }
}
