//! Writes a [`Scene`] as a standalone SVG document.

use std::fmt::Write;

use super::scene::{Anchor, Prim, Scene, Text};

/// Font stack whose advance is close to 0.6 em, like the bitmap font cell.
const FONT: &str = "DejaVu Sans Mono, Menlo, Consolas, monospace";

/// Escapes the XML special characters (attributes use double quotes).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            // Control characters other than tab/newline are not allowed in XML.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// Formats a coordinate compactly (at most two decimals).
fn num(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn text(out: &mut String, t: &Text) {
    let anchor = match t.anchor {
        Anchor::Start => "start",
        Anchor::Middle => "middle",
        Anchor::End => "end",
    };
    let (x, y) = (num(t.x), num(t.y));
    let rotate = if t.vertical {
        format!(" transform=\"rotate(-90 {x} {y})\"")
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "<text x=\"{x}\" y=\"{y}\" dy=\"0.35em\" font-size=\"{}\" fill=\"{}\" text-anchor=\"{anchor}\"{rotate}>{}</text>",
        10 * t.size,
        t.color.hex(),
        escape(&t.text)
    );
}

/// Renders `scene` as SVG text.
pub(crate) fn write(scene: &Scene) -> String {
    let (w, h) = (scene.width, scene.height);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"{FONT}\">"
    );
    let _ = writeln!(
        out,
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"{}\"/>",
        scene.background.hex()
    );
    for prim in &scene.prims {
        match prim {
            Prim::Line {
                x1,
                y1,
                x2,
                y2,
                width,
                color,
            } => {
                let _ = writeln!(
                    out,
                    "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"{}\"/>",
                    num(*x1),
                    num(*y1),
                    num(*x2),
                    num(*y2),
                    color.hex(),
                    num(*width)
                );
            }
            Prim::Polyline {
                points,
                width,
                color,
            } => {
                let pts: Vec<String> = points
                    .iter()
                    .map(|(x, y)| format!("{},{}", num(*x), num(*y)))
                    .collect();
                let _ = writeln!(
                    out,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{}\" stroke-linejoin=\"round\" stroke-linecap=\"round\"/>",
                    pts.join(" "),
                    color.hex(),
                    num(*width)
                );
            }
            Prim::Rect {
                x,
                y,
                w,
                h,
                fill,
                class,
                tip,
            } => {
                let class = class.map(|c| format!(" class=\"{c}\"")).unwrap_or_default();
                let head = format!(
                    "<rect{class} x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\" shape-rendering=\"crispEdges\"",
                    num(*x),
                    num(*y),
                    num(w.max(0.0)),
                    num(h.max(0.0)),
                    fill.hex()
                );
                match tip {
                    Some(tip) => {
                        let _ = writeln!(out, "{head}><title>{}</title></rect>", escape(tip));
                    }
                    None => {
                        let _ = writeln!(out, "{head}/>");
                    }
                }
            }
            Prim::Circle { cx, cy, r, fill } => {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{}\"/>",
                    num(*cx),
                    num(*cy),
                    num(*r),
                    fill.hex()
                );
            }
            Prim::Text(t) => text(&mut out, t),
        }
    }
    out.push_str("</svg>\n");
    out
}
