//! Plots of an LDT run: the stable/unstable layer partition and the training
//! curves, as SVG and PNG, with no font, plotting library or network.
//!
//! The top chart has one bar per layer in model order, its height the
//! log10 of the partition statistic, coloured by set (stable blue, unstable
//! orange), with the DPU coefficient as a dot on a secondary axis at the
//! right. Layers whose statistic is zero, negative or not finite get no bar
//! and a grey cross on the baseline. Below it, each [`Panel`] is a line chart
//! of value against step with a legend.
//!
//! Both renderers paint the same list of primitives built once from the
//! [`Figure`], so the SVG and the PNG show the same picture.

mod font;
mod layout;
mod raster;
mod scene;
mod svg;

/// Which side of the partition a layer fell on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSet {
    /// Layers trained with the stable branch (drawn blue).
    Stable,
    /// Layers trained with the unstable branch (drawn orange).
    Unstable,
}

/// One layer of the partition report.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotLayer {
    /// Parameter or module name, e.g. `model.layers.3.mlp.down_proj.weight`.
    pub name: String,
    /// The partition statistic; drawn on a log10 scale, so values that are
    /// zero, negative or not finite get a marker instead of a bar.
    pub statistic: f64,
    /// The set the layer was assigned to.
    pub set: LayerSet,
    /// The layer's DPU coefficient (right axis); a non-finite one is not drawn.
    pub coefficient: f64,
}

/// One line of a chart: `(x, value)` pairs in drawing order (x is usually the
/// step). Non-finite points break the line.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Legend text.
    pub label: String,
    /// `(x, value)` pairs.
    pub points: Vec<(f64, f64)>,
}

/// A line chart of several curves (usually against the step).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Heading above the chart, e.g. `loss`.
    pub title: String,
    /// Label of the vertical axis.
    pub y_label: String,
    /// Label of the horizontal axis, e.g. `step`.
    pub x_label: String,
    /// The curves, each with its own colour and legend entry.
    pub curves: Vec<Curve>,
}

/// Everything one report image shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Heading of the whole image.
    pub title: String,
    /// Description of the partition criterion, shown under the heading.
    pub criterion: String,
    /// Layers in model order; the partition chart is left out when empty.
    pub layers: Vec<PlotLayer>,
    /// Training-curve charts, laid out in a grid of up to three columns.
    pub panels: Vec<Panel>,
}

/// Renders `fig` as a standalone SVG document (bars carry their full layer
/// name and values as hover titles).
pub fn render_svg(fig: &Figure) -> String {
    svg::write(&layout::build(fig))
}

/// Renders `fig` as a PNG file (8-bit RGB), the same picture as
/// [`render_svg`] drawn with a built-in bitmap font.
pub fn render_png(fig: &Figure) -> Vec<u8> {
    raster::write(&layout::build(fig))
}
