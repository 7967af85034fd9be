//! Turns a [`Figure`] into a [`Scene`]: the heading, the partition bar chart
//! and the grid of curve panels, with axes, ticks and legends.

use super::scene::{char_advance, text_width, Anchor, Prim, Rgb, Scene, Text};
use super::{Figure, LayerSet, Panel, PlotLayer};

/// Image width in pixels; the height follows from the content.
const WIDTH: f64 = 1600.0;
/// Outer margin.
const MARGIN: f64 = 16.0;
/// Height of the partition plot area.
const PART_H: f64 = 320.0;
/// Height of one row of panels.
const PANEL_ROW: f64 = 360.0;
/// Height of the plot area inside a panel.
const PANEL_PLOT_H: f64 = 250.0;
/// At most this many panels side by side.
const MAX_COLS: usize = 3;
/// Longest layer tick label, in pixels.
const NAME_BUDGET: f64 = 180.0;

/// Text sizes (bitmap-font scale).
const TITLE: u32 = 3;
const HEAD: u32 = 2;
const LABEL: u32 = 2;
const SMALL: u32 = 1;

const BACKGROUND: Rgb = Rgb(0xff, 0xff, 0xff);
const INK: Rgb = Rgb(0x22, 0x22, 0x22);
const MUTED: Rgb = Rgb(0x66, 0x66, 0x66);
const AXIS: Rgb = Rgb(0x55, 0x55, 0x55);
const GRID: Rgb = Rgb(0xe6, 0xe6, 0xe6);
const FRAME: Rgb = Rgb(0xaa, 0xaa, 0xaa);
const STABLE: Rgb = Rgb(0x1f, 0x77, 0xb4);
const UNSTABLE: Rgb = Rgb(0xff, 0x7f, 0x0e);
const COEF: Rgb = Rgb(0x1b, 0x7a, 0x3a);
const MARK: Rgb = Rgb(0x44, 0x44, 0x44);
/// Curve colours (the tab10 cycle).
const PALETTE: [Rgb; 10] = [
    Rgb(0x1f, 0x77, 0xb4),
    Rgb(0xff, 0x7f, 0x0e),
    Rgb(0x2c, 0xa0, 0x2c),
    Rgb(0xd6, 0x27, 0x28),
    Rgb(0x94, 0x67, 0xbd),
    Rgb(0x8c, 0x56, 0x4b),
    Rgb(0xe3, 0x77, 0xc2),
    Rgb(0x7f, 0x7f, 0x7f),
    Rgb(0xbc, 0xbd, 0x22),
    Rgb(0x17, 0xbe, 0xcf),
];

/// Builds the scene for `fig`.
pub(crate) fn build(fig: &Figure) -> Scene {
    let mut b = Builder::default();
    let mut y = MARGIN;
    let full = WIDTH - 2.0 * MARGIN;
    b.text(
        (WIDTH / 2.0, y + cap_half(TITLE) + 2.0),
        &fit(&fig.title, full, TITLE),
        TITLE,
        INK,
        Anchor::Middle,
    );
    y += line_height(TITLE) + 8.0;
    if !fig.criterion.is_empty() {
        let text = format!("criterion: {}", fig.criterion);
        b.text(
            (WIDTH / 2.0, y + cap_half(LABEL)),
            &fit(&text, full, LABEL),
            LABEL,
            MUTED,
            Anchor::Middle,
        );
        y += line_height(LABEL) + 8.0;
    }
    if !fig.layers.is_empty() {
        y = partition(&mut b, &fig.layers, y + 8.0);
    }
    if !fig.panels.is_empty() {
        y = panels(&mut b, &fig.panels, y + 8.0);
    }
    Scene {
        width: WIDTH as u32,
        height: (y + MARGIN).ceil() as u32,
        background: BACKGROUND,
        prims: b.prims,
    }
}

/// Half the capital height of text at `size`.
fn cap_half(size: u32) -> f64 {
    3.5 * f64::from(size)
}

/// Distance between lines of text at `size`.
fn line_height(size: u32) -> f64 {
    12.0 * f64::from(size)
}

/// Space taken across the reading direction by vertical text, plus a gap.
fn vertical_pitch(size: u32) -> f64 {
    8.0 * f64::from(size) + 3.0
}

/// Centre of the pixel row or column containing `v`, where a 1 px line is crisp.
fn crisp(v: f64) -> f64 {
    v.floor() + 0.5
}

/// `text` cut to at most `max_px` wide, ending in `..` when cut.
fn fit(text: &str, max_px: f64, size: u32) -> String {
    truncate(text, (max_px / char_advance(size)) as usize)
}

/// `text` cut to at most `max` (at least 3) characters, ending in `..` when cut.
fn truncate(text: &str, max: usize) -> String {
    let max = max.max(3);
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let head: String = text.chars().take(max - 2).collect();
        format!("{head}..")
    }
}

/// Width of the widest of `labels` at `size`.
fn widest<S: AsRef<str>>(labels: &[S], size: u32) -> f64 {
    labels
        .iter()
        .map(|l| text_width(l.as_ref(), size))
        .fold(0.0, f64::max)
}

/// Collects primitives in painting order.
#[derive(Default)]
struct Builder {
    prims: Vec<Prim>,
}

impl Builder {
    fn line(&mut self, a: (f64, f64), b: (f64, f64), width: f64, color: Rgb) {
        self.prims.push(Prim::Line {
            x1: a.0,
            y1: a.1,
            x2: b.0,
            y2: b.1,
            width,
            color,
        });
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: Rgb) {
        self.prims.push(Prim::Rect {
            x,
            y,
            w,
            h,
            fill,
            class: None,
            tip: None,
        });
    }

    fn circle(&mut self, c: (f64, f64), r: f64, fill: Rgb) {
        self.prims.push(Prim::Circle {
            cx: c.0,
            cy: c.1,
            r,
            fill,
        });
    }

    fn text(&mut self, at: (f64, f64), text: &str, size: u32, color: Rgb, anchor: Anchor) {
        self.push_text(at, text, size, color, anchor, false);
    }

    fn vtext(&mut self, at: (f64, f64), text: &str, size: u32, color: Rgb, anchor: Anchor) {
        self.push_text(at, text, size, color, anchor, true);
    }

    fn push_text(
        &mut self,
        at: (f64, f64),
        text: &str,
        size: u32,
        color: Rgb,
        anchor: Anchor,
        vertical: bool,
    ) {
        if text.is_empty() {
            return;
        }
        self.prims.push(Prim::Text(Text {
            x: at.0,
            y: at.1,
            text: text.to_string(),
            size,
            color,
            anchor,
            vertical,
        }));
    }

    /// A cross of half-size `h` centred on `c`.
    fn cross(&mut self, c: (f64, f64), h: f64, color: Rgb) {
        self.line((c.0 - h, c.1 - h), (c.0 + h, c.1 + h), 1.5, color);
        self.line((c.0 - h, c.1 + h), (c.0 + h, c.1 - h), 1.5, color);
    }

    /// A 1 px outline just inside the pixel rectangle `x0..x1`, `y0..y1`.
    fn outline(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, color: Rgb) {
        let (l, r, t, btm) = (x0 + 0.5, x1 - 0.5, y0 + 0.5, y1 - 0.5);
        self.line((l, t), (r, t), 1.0, color);
        self.line((l, btm), (r, btm), 1.0, color);
        self.line((l, t), (l, btm), 1.0, color);
        self.line((r, t), (r, btm), 1.0, color);
    }
}

/// A linear axis over nice round numbers.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    /// Decimal exponent of the tick step (the step is 1, 2 or 5 times 10^exp).
    exp: i32,
}

impl Axis {
    /// An axis covering `lo..=hi` with about `target` intervals, extended to
    /// whole steps. An empty or degenerate range is widened around its value.
    fn new(lo: f64, hi: f64, target: usize) -> Self {
        let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() {
            (lo.min(hi), lo.max(hi))
        } else {
            (0.0, 1.0)
        };
        if hi - lo <= 1e-12 * lo.abs().max(hi.abs()) {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.01 };
            lo -= pad;
            hi += pad;
        }
        let raw = (hi - lo) / target.max(1) as f64;
        let mut exp = raw.log10().floor() as i32;
        // Shrunk by a hair, so that rounding (5.000000000000001) does not
        // pick the next larger step.
        let f = raw / 10f64.powi(exp) / (1.0 + 1e-9);
        let mantissa = if f <= 1.0 {
            1.0
        } else if f <= 2.0 {
            2.0
        } else if f <= 5.0 {
            5.0
        } else {
            exp += 1;
            1.0
        };
        let step = mantissa * 10f64.powi(exp);
        // The tolerance keeps a bound that is a whole step (up to rounding)
        // from adding one more.
        let first = (lo / step + 1e-9).floor() as i64;
        let last = (hi / step - 1e-9).ceil() as i64;
        let ticks: Vec<f64> = (first..=last).map(|i| i as f64 * step).collect();
        Axis {
            lo: first as f64 * step,
            hi: last as f64 * step,
            ticks,
            exp,
        }
    }

    /// Position of `v` between pixel coordinates `p0` (at `lo`) and `p1` (at `hi`).
    fn map(&self, v: f64, p0: f64, p1: f64) -> f64 {
        p0 + (v - self.lo) / (self.hi - self.lo) * (p1 - p0)
    }

    /// Tick label for `v`, with as many decimals as the step needs, or in
    /// scientific notation for very large or very small magnitudes.
    fn label(&self, v: f64) -> String {
        let magnitude = self.lo.abs().max(self.hi.abs());
        let s = if magnitude >= 1e6 || (magnitude < 1e-3 && magnitude > 0.0) {
            if v == 0.0 {
                "0".to_string()
            } else {
                // The same mantissa digits for every tick on the axis.
                let e = magnitude.log10().floor() as i32;
                let digits = (e - self.exp).max(0) as usize;
                format!("{v:.digits$e}")
            }
        } else {
            let decimals = (-self.exp).max(0) as usize;
            format!("{v:.decimals$}")
        };
        if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
            s[1..].to_string()
        } else {
            s
        }
    }
}

/// A plot area with integer pixel edges: columns `x0..x1`, rows `y0..y1`.
struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn new(x0: f64, x1: f64, y0: f64, y1: f64) -> Self {
        Frame {
            x0: x0.round(),
            x1: x1.round(),
            y0: y0.round(),
            y1: y1.round(),
        }
    }

    fn x(&self, axis: &Axis, v: f64) -> f64 {
        axis.map(v, self.x0, self.x1)
    }

    fn y(&self, axis: &Axis, v: f64) -> f64 {
        axis.map(v, self.y1, self.y0)
    }

    /// Horizontal grid lines, left axis line, ticks and labels for `axis`.
    fn left_axis(&self, b: &mut Builder, axis: &Axis) {
        for &t in &axis.ticks {
            let y = crisp(self.y(axis, t));
            b.line((self.x0, y), (self.x1, y), 1.0, GRID);
            b.line((self.x0 - 6.0, y), (self.x0, y), 1.0, AXIS);
            b.text((self.x0 - 10.0, y), &axis.label(t), LABEL, INK, Anchor::End);
        }
        b.line(
            (self.x0 - 0.5, self.y0),
            (self.x0 - 0.5, self.y1 + 1.0),
            1.0,
            AXIS,
        );
    }

    /// Right axis line, ticks and labels for `axis`, in `color`.
    fn right_axis(&self, b: &mut Builder, axis: &Axis, color: Rgb) {
        for &t in &axis.ticks {
            let y = crisp(self.y(axis, t));
            b.line((self.x1, y), (self.x1 + 6.0, y), 1.0, color);
            b.text(
                (self.x1 + 10.0, y),
                &axis.label(t),
                LABEL,
                color,
                Anchor::Start,
            );
        }
        b.line(
            (self.x1 + 0.5, self.y0),
            (self.x1 + 0.5, self.y1 + 1.0),
            1.0,
            color,
        );
    }

    /// Vertical grid lines, bottom axis line, ticks and labels for `axis`.
    fn bottom_axis(&self, b: &mut Builder, axis: &Axis) {
        for &t in &axis.ticks {
            let x = crisp(self.x(axis, t).min(self.x1 - 0.5));
            b.line((x, self.y0), (x, self.y1), 1.0, GRID);
            b.line((x, self.y1), (x, self.y1 + 6.0), 1.0, AXIS);
            let at = (x, self.y1 + 10.0 + cap_half(LABEL));
            b.text(at, &axis.label(t), LABEL, INK, Anchor::Middle);
        }
        self.baseline(b);
    }

    /// The line under the plot area.
    fn baseline(&self, b: &mut Builder) {
        b.line(
            (self.x0 - 1.0, self.y1 + 0.5),
            (self.x1, self.y1 + 0.5),
            1.0,
            AXIS,
        );
    }
}

/// A legend symbol.
enum Mark {
    Swatch(Rgb),
    Dot(Rgb),
    Cross(Rgb),
    Stroke(Rgb),
}

/// Draws `mark` in a 24x14 box whose left edge centre is `at`.
fn legend_mark(b: &mut Builder, mark: &Mark, at: (f64, f64)) {
    let (x, y) = at;
    match *mark {
        Mark::Swatch(c) => b.rect(x + 5.0, (y - 7.0).round(), 14.0, 14.0, c),
        Mark::Dot(c) => b.circle((x + 12.0, y), 4.5, c),
        Mark::Cross(c) => b.cross((x + 12.0, y), 5.0, c),
        Mark::Stroke(c) => b.line((x, y), (x + 24.0, y), 3.0, c),
    }
}

/// Width of one legend entry: mark, gap, text.
fn legend_entry_width(text: &str) -> f64 {
    24.0 + 8.0 + text_width(text, LABEL)
}

/// Log10 of a statistic, or `None` when it has no finite logarithm.
fn log_statistic(s: f64) -> Option<f64> {
    let l = s.log10();
    (s > 0.0 && l.is_finite()).then_some(l)
}

/// Smallest label interval of at least `min` that reads well (1..5, then
/// multiples of 5).
fn label_every(min: usize) -> usize {
    if min <= 5 {
        min.max(1)
    } else {
        min.div_ceil(5) * 5
    }
}

/// `2nd`, `3rd`, `10th`: the ordinal of a [`label_every`] interval.
fn ordinal(k: usize) -> String {
    match k {
        2 => "2nd".to_string(),
        3 => "3rd".to_string(),
        k => format!("{k}th"),
    }
}

/// Short tick labels for layer names.
struct Names {
    labels: Vec<String>,
    /// Dot-separated start and end shared by all names, left out of `labels`.
    prefix: String,
    suffix: String,
}

impl Names {
    /// Drops the components shared by all names at the start and end
    /// (keeping at least one); when any is then longer than `max`
    /// characters, all are abbreviated alike.
    fn new(names: &[&str], max: usize) -> Self {
        let parts: Vec<Vec<&str>> = names.iter().map(|n| n.split('.').collect()).collect();
        let shortest = parts.iter().map(Vec::len).min().unwrap_or(0);
        let (mut pre, mut suf) = (0, 0);
        if parts.len() > 1 {
            while pre + 1 < shortest && parts.iter().all(|p| p[pre] == parts[0][pre]) {
                pre += 1;
            }
            let from_end = |p: &Vec<&str>, i: usize| p[p.len() - 1 - i].to_string();
            while pre + suf + 1 < shortest
                && parts
                    .iter()
                    .all(|p| from_end(p, suf) == from_end(&parts[0], suf))
            {
                suf += 1;
            }
        }
        let kept: Vec<&[&str]> = parts.iter().map(|p| &p[pre..p.len() - suf]).collect();
        let longest = kept.iter().map(|p| p.join(".").chars().count()).max();
        let labels = if longest.unwrap_or(0) <= max {
            kept.iter().map(|p| p.join(".")).collect()
        } else {
            kept.iter().map(|p| abbreviate(p, max)).collect()
        };
        let (prefix, suffix) = match parts.first() {
            Some(first) => (first[..pre].join("."), first[first.len() - suf..].join(".")),
            None => (String::new(), String::new()),
        };
        Names {
            labels,
            prefix,
            suffix,
        }
    }
}

/// Joins `parts` with dots in at most `max` characters: every component
/// but numbers and the last is cut to its initials, each keeping the digits it
/// ends in (`self_attn` to `sa`, `layer3` to `l3`, `conv1` to `c1`: torchvision's
/// stages and convolutions stay apart), and what is still too long is cut to end
/// in `..`.
fn abbreviate(parts: &[&str], max: usize) -> String {
    let last = parts.len().saturating_sub(1);
    let short: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i == last || p.chars().all(|c| c.is_ascii_digit()) {
                p.to_string()
            } else {
                p.split('_')
                    .filter_map(|w| {
                        let first = w.chars().next()?;
                        let digits =
                            w.len() - w.trim_end_matches(|c: char| c.is_ascii_digit()).len();
                        Some(format!("{first}{}", &w[w.len() - digits..]))
                    })
                    .collect()
            }
        })
        .collect();
    truncate(&short.join("."), max)
}

/// The partition chart with its legend row, from `top`; returns the y below it.
fn partition(b: &mut Builder, layers: &[PlotLayer], top: f64) -> f64 {
    let n = layers.len();
    let logs: Vec<Option<f64>> = layers.iter().map(|l| log_statistic(l.statistic)).collect();
    let (lo, hi) = logs
        .iter()
        .flatten()
        .fold((0.0f64, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let yaxis = Axis::new(lo, hi, 6);
    let coefs = layers
        .iter()
        .map(|l| l.coefficient)
        .filter(|c| c.is_finite());
    let caxis = coefs
        .clone()
        .reduce(f64::min)
        .zip(coefs.reduce(f64::max))
        .map(|(lo, hi)| Axis::new(lo, hi, 5));

    let ylabels: Vec<String> = yaxis.ticks.iter().map(|&t| yaxis.label(t)).collect();
    let title_w = vertical_pitch(LABEL);
    let x0 = MARGIN + title_w + 12.0 + widest(&ylabels, LABEL) + 10.0;
    let x1 = match &caxis {
        Some(c) => {
            let clabels: Vec<String> = c.ticks.iter().map(|&t| c.label(t)).collect();
            WIDTH - MARGIN - title_w - 12.0 - widest(&clabels, LABEL) - 10.0
        }
        None => WIDTH - MARGIN - 24.0,
    };
    let y0 = (top + line_height(LABEL) + 12.0).round();
    let f = Frame::new(x0, x1, y0, y0 + PART_H);

    // Legend row above the plot.
    let count = |set: LayerSet| layers.iter().filter(|l| l.set == set).count();
    let missing = logs.iter().filter(|l| l.is_none()).count();
    let mut entries = vec![
        (
            Mark::Swatch(STABLE),
            format!("stable ({})", count(LayerSet::Stable)),
        ),
        (
            Mark::Swatch(UNSTABLE),
            format!("unstable ({})", count(LayerSet::Unstable)),
        ),
    ];
    if caxis.is_some() {
        entries.push((Mark::Dot(COEF), "DPU coefficient (right axis)".to_string()));
    }
    if missing > 0 {
        entries.push((
            Mark::Cross(MARK),
            format!("no bar: statistic <= 0 or not finite ({missing})"),
        ));
    }
    let mut x = f.x0;
    let ly = top + cap_half(LABEL);
    for (mark, text) in &entries {
        legend_mark(b, mark, (x, ly));
        b.text((x + 32.0, ly), text, LABEL, INK, Anchor::Start);
        x += legend_entry_width(text) + 28.0;
    }

    // Axes and titles.
    f.left_axis(b, &yaxis);
    let mid = (f.y0 + f.y1) / 2.0;
    let tx = MARGIN + title_w / 2.0;
    b.vtext((tx, mid), "log10(statistic)", LABEL, INK, Anchor::Middle);
    if let Some(c) = &caxis {
        f.right_axis(b, c, COEF);
        b.vtext(
            (WIDTH - tx, mid),
            "DPU coefficient",
            LABEL,
            COEF,
            Anchor::Middle,
        );
    }

    // Bars from log10 = 0, crosses for missing bars, coefficient dots.
    let slot = (f.x1 - f.x0) / n as f64;
    // Whole pixels, so that all bars are equally wide.
    let bar_w = if slot >= 3.0 {
        (slot * 0.75).min(36.0)
    } else {
        slot
    }
    .round()
    .max(1.0);
    let base = f.y(&yaxis, 0.0);
    let centre = |i: usize| f.x0 + slot * (i as f64 + 0.5);
    for (i, (layer, log)) in layers.iter().zip(&logs).enumerate() {
        let c = centre(i);
        let Some(v) = *log else {
            b.cross((c, base), (slot * 0.35).clamp(2.5, 5.0), MARK);
            continue;
        };
        let left = (c - bar_w / 2.0).round();
        let end = f.y(&yaxis, v);
        let (mut y_top, mut y_bottom) = (end.min(base).round(), end.max(base).round());
        if y_bottom - y_top < 1.0 {
            if v >= 0.0 {
                y_top = y_bottom - 1.0;
            } else {
                y_bottom = y_top + 1.0;
            }
        }
        let (fill, class, set) = match layer.set {
            LayerSet::Stable => (STABLE, "bar-stable", "stable"),
            LayerSet::Unstable => (UNSTABLE, "bar-unstable", "unstable"),
        };
        b.prims.push(Prim::Rect {
            x: left,
            y: y_top,
            w: bar_w,
            h: y_bottom - y_top,
            fill,
            class: Some(class),
            tip: Some(format!(
                "{}\nstatistic {:.4e} (log10 {v:.3})\n{set}\nDPU coefficient {:.6}",
                layer.name, layer.statistic, layer.coefficient
            )),
        });
    }
    let zero = crisp(base);
    b.line((f.x0, zero), (f.x1, zero), 1.0, AXIS);
    f.baseline(b);
    if let Some(c) = &caxis {
        let r = (slot * 0.3).clamp(1.5, 4.0);
        for (i, layer) in layers.iter().enumerate() {
            if layer.coefficient.is_finite() {
                let at = (centre(i), f.y(c, layer.coefficient));
                b.circle(at, r + 1.0, BACKGROUND);
                b.circle(at, r, COEF);
            }
        }
    }

    // Layer names under the axis, every k-th when they do not all fit.
    let (size, k) = if slot >= vertical_pitch(LABEL) {
        (LABEL, 1)
    } else {
        let min = (vertical_pitch(SMALL) / slot).ceil() as usize;
        (SMALL, label_every(min))
    };
    let max_chars = (NAME_BUDGET / char_advance(size)) as usize;
    let all: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    let names = Names::new(&all, max_chars);
    let shown: Vec<&String> = names.labels.iter().step_by(k).collect();
    for (j, label) in shown.iter().enumerate() {
        let x = crisp(centre(j * k));
        b.line((x, f.y1 + 1.0), (x, f.y1 + 6.0), 1.0, AXIS);
        b.vtext((x, f.y1 + 10.0), label, size, INK, Anchor::End);
    }
    let mut caption = format!("layers in model order ({n})");
    if k > 1 {
        caption.push_str(&format!("; every {} name shown", ordinal(k)));
    }
    let mut affixes = Vec::new();
    if !names.prefix.is_empty() {
        affixes.push(format!("prefix '{}.'", names.prefix));
    }
    if !names.suffix.is_empty() {
        affixes.push(format!("suffix '.{}'", names.suffix));
    }
    if !affixes.is_empty() {
        caption.push_str(&format!("; names without {}", affixes.join(" and ")));
    }
    let cy = f.y1 + 10.0 + widest(&shown, size) + 12.0 + cap_half(LABEL);
    let caption = fit(&caption, WIDTH - 2.0 * MARGIN, LABEL);
    b.text(
        ((f.x0 + f.x1) / 2.0, cy),
        &caption,
        LABEL,
        INK,
        Anchor::Middle,
    );
    cy + cap_half(LABEL) + 8.0
}

/// The panels in a grid of up to [`MAX_COLS`] columns from `top`; returns
/// the y below them.
fn panels(b: &mut Builder, panels: &[Panel], top: f64) -> f64 {
    let rows = panels.len().div_ceil(MAX_COLS);
    let cols = panels.len().div_ceil(rows);
    let cell_w = (WIDTH - 2.0 * MARGIN) / cols as f64;
    for (i, p) in panels.iter().enumerate() {
        let x = MARGIN + cell_w * (i % cols) as f64;
        let y = top + PANEL_ROW * (i / cols) as f64;
        panel(b, p, (x, y), cell_w);
    }
    top + PANEL_ROW * rows as f64
}

/// One line chart in the cell of width `w` whose top left is `at`.
fn panel(b: &mut Builder, p: &Panel, at: (f64, f64), w: f64) {
    let finite: Vec<(f64, f64)> = p
        .curves
        .iter()
        .flat_map(|c| c.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let range = |sel: fn(&(f64, f64)) -> f64| {
        let lo = finite.iter().map(sel).fold(f64::INFINITY, f64::min);
        let hi = finite.iter().map(sel).fold(f64::NEG_INFINITY, f64::max);
        if finite.is_empty() {
            (0.0, 1.0)
        } else {
            (lo, hi)
        }
    };
    let (ylo, yhi) = range(|p| p.1);
    let yaxis = Axis::new(ylo, yhi, 5);
    let ylabels: Vec<String> = yaxis.ticks.iter().map(|&t| yaxis.label(t)).collect();
    let title_w = vertical_pitch(LABEL);
    let x0 = at.0 + title_w + 12.0 + widest(&ylabels, LABEL) + 10.0;
    let x1 = at.0 + w - 28.0;
    let y0 = at.1 + line_height(HEAD) + 12.0;
    let f = Frame::new(x0, x1, y0, y0 + PANEL_PLOT_H);
    let (xlo, xhi) = range(|p| p.0);
    let xaxis = Axis::new(xlo, xhi, (((f.x1 - f.x0) / 110.0) as usize).max(2));

    let title = fit(&p.title, w - 20.0, HEAD);
    let centre_x = (f.x0 + f.x1) / 2.0;
    b.text(
        (centre_x, at.1 + cap_half(HEAD) + 4.0),
        &title,
        HEAD,
        INK,
        Anchor::Middle,
    );
    f.left_axis(b, &yaxis);
    f.bottom_axis(b, &xaxis);
    let mid = (f.y0 + f.y1) / 2.0;
    let ylabel = fit(&p.y_label, f.y1 - f.y0, LABEL);
    b.vtext(
        (at.0 + title_w / 2.0, mid),
        &ylabel,
        LABEL,
        INK,
        Anchor::Middle,
    );
    let step_y = f.y1 + 10.0 + line_height(LABEL) + 12.0;
    let xlabel = fit(&p.x_label, f.x1 - f.x0, LABEL);
    b.text((centre_x, step_y), &xlabel, LABEL, INK, Anchor::Middle);
    if finite.is_empty() {
        b.text((centre_x, mid), "no data", LABEL, MUTED, Anchor::Middle);
    }

    // Curves, broken at non-finite points; a lone point is a dot.
    let to_px = |(x, y): (f64, f64)| (f.x(&xaxis, x), f.y(&yaxis, y));
    for (j, curve) in p.curves.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        for run in curve
            .points
            .split(|(x, y)| !(x.is_finite() && y.is_finite()))
            .filter(|r| !r.is_empty())
        {
            if let [single] = run {
                b.circle(to_px(*single), 3.0, color);
            } else {
                let points = decimate(&run.iter().copied().map(to_px).collect::<Vec<_>>());
                b.prims.push(Prim::Polyline {
                    points,
                    width: 2.0,
                    color,
                });
            }
        }
    }

    // Legend in the plot corner that hides the fewest points.
    if p.curves.is_empty() {
        return;
    }
    let row = line_height(LABEL) + 4.0;
    let fits = (((f.y1 - f.y0 - 24.0) / row) as usize).max(1);
    let mut entries: Vec<(Option<Rgb>, String)> = p
        .curves
        .iter()
        .enumerate()
        .map(|(j, c)| {
            (
                Some(PALETTE[j % PALETTE.len()]),
                fit(&c.label, 360.0, LABEL),
            )
        })
        .collect();
    if entries.len() > fits {
        let more = entries.len() - (fits - 1);
        entries.truncate(fits - 1);
        entries.push((None, format!("({more} more)")));
    }
    let labels: Vec<&String> = entries.iter().map(|(_, l)| l).collect();
    let lw = (10.0 + widest(&labels, LABEL) + 32.0 + 10.0).round();
    let lh = (row * labels.len() as f64 + 8.0).round();
    let px: Vec<(f64, f64)> = finite.iter().copied().map(to_px).collect();
    let corners = [
        (f.x1 - 8.0 - lw, f.y0 + 8.0),
        (f.x0 + 8.0, f.y0 + 8.0),
        (f.x1 - 8.0 - lw, f.y1 - 8.0 - lh),
        (f.x0 + 8.0, f.y1 - 8.0 - lh),
    ];
    let hidden = |&(lx, ly): &(f64, f64)| {
        px.iter()
            .filter(|(x, y)| *x >= lx && *x <= lx + lw && *y >= ly && *y <= ly + lh)
            .count()
    };
    let (lx, ly) = corners
        .iter()
        .copied()
        .min_by_key(hidden)
        .map_or(corners[0], |(x, y)| (x.round(), y.round()));
    b.rect(lx, ly, lw, lh, BACKGROUND);
    b.outline(lx, ly, lx + lw, ly + lh, FRAME);
    for (j, (color, label)) in entries.iter().enumerate() {
        let y = crisp(ly + 4.0 + row * (j as f64 + 0.5));
        if let Some(c) = color {
            legend_mark(b, &Mark::Stroke(*c), (lx + 10.0, y));
        }
        b.text((lx + 42.0, y), label, LABEL, INK, Anchor::Start);
    }
}

/// Keeps, of each stretch of consecutive points in one pixel column, the
/// first, lowest, highest and last, so that a curve of many thousand steps
/// stays small while its drawn shape stays the same.
fn decimate(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len().min(4096));
    for column in points.chunk_by(|a, b| a.0.floor() == b.0.floor()) {
        if column.len() <= 4 {
            out.extend_from_slice(column);
            continue;
        }
        let by_y = |a: &usize, b: &usize| column[*a].1.total_cmp(&column[*b].1);
        let i = (0..column.len()).min_by(by_y).unwrap_or(0);
        let j = (0..column.len()).max_by(by_y).unwrap_or(0);
        out.push(column[0]);
        out.push(column[i.min(j)]);
        out.push(column[i.max(j)]);
        out.push(column[column.len() - 1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(axis: &Axis) -> Vec<String> {
        axis.ticks.iter().map(|&t| axis.label(t)).collect()
    }

    #[test]
    fn axis_ticks_are_round_and_cover_the_data() {
        let a = Axis::new(0.0, 9950.0, 6);
        assert_eq!((a.lo, a.hi), (0.0, 10000.0));
        assert_eq!(labels(&a), ["0", "2000", "4000", "6000", "8000", "10000"]);
        let a = Axis::new(-0.97, 1.43, 6);
        assert_eq!((a.lo, a.hi), (-1.0, 1.5));
        assert_eq!(labels(&a)[..3], ["-1.0", "-0.5", "0.0"]);
        let a = Axis::new(0.9903, 0.99995, 5);
        assert_eq!(
            labels(&a),
            ["0.990", "0.992", "0.994", "0.996", "0.998", "1.000"]
        );
    }

    #[test]
    fn degenerate_and_extreme_axes() {
        let a = Axis::new(1.0, 1.0, 5);
        assert!(a.lo < 1.0 && a.hi > 1.0);
        assert_eq!(
            labels(&Axis::new(0.0, 0.0, 4)),
            ["-1.0", "-0.5", "0.0", "0.5", "1.0"]
        );
        let a = Axis::new(f64::NAN, 3.0, 5);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));
        assert_eq!(
            labels(&Axis::new(0.0, 2e-5, 4)),
            ["0", "5.0e-6", "1.0e-5", "1.5e-5", "2.0e-5"]
        );
        assert_eq!(labels(&Axis::new(1.9e6, 2.1e6, 4))[0], "1.90e6");
    }

    #[test]
    fn layer_names_lose_shared_parts_and_shorten_alike() {
        let names = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.11.post_attention_layernorm.weight",
        ];
        let short = Names::new(&names, 100);
        assert_eq!(short.prefix, "model.layers");
        assert_eq!(short.suffix, "weight");
        assert_eq!(
            short.labels,
            [
                "0.self_attn.q_proj",
                "0.mlp.down_proj",
                "11.post_attention_layernorm"
            ]
        );
        let short = Names::new(&names, 20);
        assert_eq!(
            short.labels,
            ["0.sa.q_proj", "0.m.down_proj", "11.post_attention_.."]
        );
        // torchvision's resnet: stages and convolutions keep their numbers.
        let resnet = [
            "layer1.0.conv1.weight",
            "layer2.0.conv1.weight",
            "layer2.0.conv2.weight",
            "layer3.1.bn2.weight",
            "layer4.0.downsample.0.weight",
            "conv1.weight",
        ];
        let short = Names::new(&resnet, 10);
        assert_eq!(
            short.labels,
            [
                "l1.0.conv1",
                "l2.0.conv1",
                "l2.0.conv2",
                "l3.1.bn2",
                "l4.0.d.0",
                "conv1"
            ]
        );
        let one = Names::new(&["lm_head.weight"], 30);
        assert_eq!(
            (one.labels[0].as_str(), one.prefix.as_str()),
            ("lm_head.weight", "")
        );
    }

    #[test]
    fn decimation_keeps_each_columns_extremes_in_order() {
        let points: Vec<(f64, f64)> = (0..100)
            .map(|i| (10.0 + f64::from(i) / 100.0, f64::from((i * 37) % 11)))
            .chain([(11.5, 3.0)])
            .collect();
        let kept = decimate(&points);
        assert_eq!(kept.len(), 5);
        assert_eq!(kept[0], points[0]);
        assert_eq!(kept[3], points[99]);
        assert_eq!(kept[4], (11.5, 3.0));
        let ys: Vec<f64> = kept[1..3].iter().map(|p| p.1).collect();
        assert!(ys.contains(&0.0) && ys.contains(&10.0));
    }
}
