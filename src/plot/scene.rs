//! The drawing primitives shared by the SVG writer and the raster canvas.
//!
//! The layout turns a [`Figure`](super::Figure) into one [`Scene`]; both
//! back ends only translate primitives, so the two outputs cannot drift.

/// An opaque sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#rrggbb`, as SVG wants it.
    pub(crate) fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

/// Where a text's anchor point lies along its reading direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Anchor {
    Start,
    Middle,
    End,
}

/// A text label. The anchor point is centred across the reading direction
/// (on the middle of the capital height).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Text {
    pub x: f64,
    pub y: f64,
    pub text: String,
    /// Bitmap-font scale: one unit is a 6x9 pixel cell (5x7 glyph, descender,
    /// spacing); SVG uses a monospace font of `10 * size` px, the same advance.
    pub size: u32,
    pub color: Rgb,
    pub anchor: Anchor,
    /// Rotated 90 degrees counter-clockwise: reads bottom to top.
    pub vertical: bool,
}

/// One drawing primitive, in pixel coordinates (origin top left, y down).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prim {
    /// A straight stroke.
    Line {
        x1: f64,
        y1: f64,
        x2: f64,
        y2: f64,
        width: f64,
        color: Rgb,
    },
    /// A connected stroke through several points.
    Polyline {
        points: Vec<(f64, f64)>,
        width: f64,
        color: Rgb,
    },
    /// A filled axis-aligned rectangle; `class` and `tip` only reach the SVG
    /// (a class attribute and a hover `<title>`).
    Rect {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: Rgb,
        class: Option<&'static str>,
        tip: Option<String>,
    },
    /// A filled disc.
    Circle { cx: f64, cy: f64, r: f64, fill: Rgb },
    /// A text label.
    Text(Text),
}

/// A complete picture: size in pixels and primitives in painting order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scene {
    pub width: u32,
    pub height: u32,
    pub background: Rgb,
    pub prims: Vec<Prim>,
}

/// Advance of one character in pixels at `size`.
pub(crate) const fn char_advance(size: u32) -> f64 {
    6.0 * size as f64
}

/// Width in pixels that `text` takes at `size` (bitmap font metric, which
/// the SVG monospace font matches closely).
pub(crate) fn text_width(text: &str, size: u32) -> f64 {
    text.chars().count() as f64 * char_advance(size)
}
