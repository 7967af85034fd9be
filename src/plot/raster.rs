//! A small RGB canvas that paints a [`Scene`] and encodes it as PNG.
//!
//! Rectangles and text are solid; lines and discs are anti-aliased by the
//! distance from each pixel centre to the shape.

use super::font::{self, CAP_H, CELL_W};
use super::scene::{Anchor, Prim, Rgb, Scene, Text};

/// An RGB pixel buffer, row-major, top row first.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32, background: Rgb) -> Self {
        let (width, height) = (width as usize, height as usize);
        let pixels = [background.0, background.1, background.2].repeat(width * height);
        Canvas {
            width,
            height,
            pixels,
        }
    }

    /// Mixes `color` into pixel (x, y) with opacity `alpha`; off-canvas is ignored.
    fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f64) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || alpha <= 0.0 {
            return;
        }
        let a = alpha.min(1.0);
        let i = (y as usize * self.width + x as usize) * 3;
        for (k, c) in [color.0, color.1, color.2].into_iter().enumerate() {
            let old = f64::from(self.pixels[i + k]);
            self.pixels[i + k] = (old + (f64::from(c) - old) * a).round() as u8;
        }
    }

    /// Fills the pixels whose centres lie inside the rectangle (at least one
    /// pixel wide and high when the rectangle is not empty).
    fn fill_rect(&mut self, x: f64, y: f64, w: f64, h: f64, color: Rgb) {
        if w <= 0.0
            || h <= 0.0
            || !(x.is_finite() && y.is_finite() && w.is_finite() && h.is_finite())
        {
            return;
        }
        let x0 = x.round() as i64;
        let y0 = y.round() as i64;
        let x1 = ((x + w).round() as i64).max(x0 + 1);
        let y1 = ((y + h).round() as i64).max(y0 + 1);
        for py in y0..y1 {
            for px in x0..x1 {
                self.blend(px, py, color, 1.0);
            }
        }
    }

    /// Strokes connected segments of `width` through `points` with one
    /// coverage mask, so joints are not painted twice.
    fn stroke(&mut self, points: &[(f64, f64)], width: f64, color: Rgb) {
        if points.len() < 2 || points.iter().any(|p| !(p.0.is_finite() && p.1.is_finite())) {
            return;
        }
        let half = width / 2.0;
        let pad = half + 1.0;
        let clamp_x = |v: f64| (v.floor() as i64).clamp(0, self.width as i64);
        let clamp_y = |v: f64| (v.floor() as i64).clamp(0, self.height as i64);
        let bx0 = clamp_x(points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) - pad);
        let bx1 = clamp_x(points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max) + pad + 1.0);
        let by0 = clamp_y(points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) - pad);
        let by1 = clamp_y(points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max) + pad + 1.0);
        if bx1 <= bx0 || by1 <= by0 {
            return;
        }
        let mw = (bx1 - bx0) as usize;
        let mut mask = vec![0.0f64; mw * (by1 - by0) as usize];
        for seg in points.windows(2) {
            let (a, b) = (seg[0], seg[1]);
            let sx0 = clamp_x(a.0.min(b.0) - pad).max(bx0);
            let sx1 = clamp_x(a.0.max(b.0) + pad + 1.0).min(bx1);
            let sy0 = clamp_y(a.1.min(b.1) - pad).max(by0);
            let sy1 = clamp_y(a.1.max(b.1) + pad + 1.0).min(by1);
            for py in sy0..sy1 {
                for px in sx0..sx1 {
                    let d = segment_distance((px as f64 + 0.5, py as f64 + 0.5), a, b);
                    let cov = (half + 0.5 - d).clamp(0.0, 1.0);
                    let m = &mut mask[(py - by0) as usize * mw + (px - bx0) as usize];
                    *m = m.max(cov);
                }
            }
        }
        for (i, &cov) in mask.iter().enumerate() {
            if cov > 0.0 {
                let px = bx0 + (i % mw) as i64;
                let py = by0 + (i / mw) as i64;
                self.blend(px, py, color, cov);
            }
        }
    }

    fn fill_circle(&mut self, cx: f64, cy: f64, r: f64, color: Rgb) {
        if !(cx.is_finite() && cy.is_finite() && r > 0.0) {
            return;
        }
        let x0 = (cx - r - 1.0).floor() as i64;
        let x1 = (cx + r + 1.0).ceil() as i64;
        let y0 = (cy - r - 1.0).floor() as i64;
        let y1 = (cy + r + 1.0).ceil() as i64;
        for py in y0..y1 {
            for px in x0..x1 {
                let d = (px as f64 + 0.5 - cx).hypot(py as f64 + 0.5 - cy);
                self.blend(px, py, color, (r + 0.5 - d).clamp(0.0, 1.0));
            }
        }
    }

    fn text(&mut self, t: &Text) {
        let s = i64::from(t.size.max(1));
        let n = t.text.chars().count() as i64;
        if n == 0 {
            return;
        }
        // Ink length along the reading direction (no gap after the last glyph).
        let len = n * i64::from(CELL_W) * s - s;
        let lead = match t.anchor {
            Anchor::Start => 0,
            Anchor::Middle => len / 2,
            Anchor::End => len,
        };
        // Top of the capitals, measured across the reading direction.
        let across = |v: f64| (v - f64::from(CAP_H) * s as f64 / 2.0).round() as i64;
        let (ax, ay) = (t.x.round() as i64, t.y.round() as i64);
        for (i, c) in t.text.chars().enumerate() {
            let pen = i as i64 * i64::from(CELL_W) * s - lead;
            for (gx, column) in font::glyph(c).into_iter().enumerate() {
                for gy in 0..8i64 {
                    if column & (1 << gy) == 0 {
                        continue;
                    }
                    let along = pen + gx as i64 * s;
                    let (px, py) = if t.vertical {
                        (across(t.x) + gy * s, ay - along - s)
                    } else {
                        (ax + along, across(t.y) + gy * s)
                    };
                    for dy in 0..s {
                        for dx in 0..s {
                            self.blend(px + dx, py + dy, t.color, 1.0);
                        }
                    }
                }
            }
        }
    }
}

/// Distance from `p` to the segment `a`-`b`.
fn segment_distance(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (p.0 - a.0 - t * dx).hypot(p.1 - a.1 - t * dy)
}

/// Paints `scene` and returns it as a PNG file (8-bit RGB).
pub(crate) fn write(scene: &Scene) -> Vec<u8> {
    let mut canvas = Canvas::new(scene.width, scene.height, scene.background);
    for prim in &scene.prims {
        match prim {
            Prim::Line {
                x1,
                y1,
                x2,
                y2,
                width,
                color,
            } => canvas.stroke(&[(*x1, *y1), (*x2, *y2)], *width, *color),
            Prim::Polyline {
                points,
                width,
                color,
            } => canvas.stroke(points, *width, *color),
            Prim::Rect {
                x, y, w, h, fill, ..
            } => canvas.fill_rect(*x, *y, *w, *h, *fill),
            Prim::Circle { cx, cy, r, fill } => canvas.fill_circle(*cx, *cy, *r, *fill),
            Prim::Text(t) => canvas.text(t),
        }
    }
    encode_png(&canvas)
}

fn encode_png(canvas: &Canvas) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, canvas.width as u32, canvas.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    // The buffer matches the header by construction and a Vec sink cannot
    // fail, so an error here is a bug in this module.
    let mut writer = encoder.write_header().expect("PNG header to a Vec");
    writer
        .write_image_data(&canvas.pixels)
        .expect("PNG data matching the header");
    writer.finish().expect("PNG end to a Vec");
    out
}
