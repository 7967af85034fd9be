//! Renders partition reports and training curves through the public plot API
//! and checks the SVG structure and the decoded PNG pixels.

use ldt::plot::{render_png, render_svg, Curve, Figure, LayerSet, Panel, PlotLayer};

const STABLE: [u8; 3] = [0x1f, 0x77, 0xb4];
const UNSTABLE: [u8; 3] = [0xff, 0x7f, 0x0e];

/// A deterministic pseudo-random number in [0, 1).
fn noise(i: u64) -> f64 {
    let x = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let x = (x ^ (x >> 33)).wrapping_mul(0xff51afd7ed558ccd);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Llama-like parameter names: embeddings, 33 blocks of 9 and the head (300).
fn llama_names() -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..33 {
        for leaf in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{i}.{leaf}.weight"));
        }
    }
    names.push("model.norm.weight".to_string());
    names.push("lm_head.weight".to_string());
    names
}

/// Layers with log-normal statistics split at 1.0, plus the given bad values.
fn layers(names: &[String], bad: &[(usize, f64)]) -> Vec<PlotLayer> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut statistic = 10f64.powf(2.5 * noise(i as u64) - 1.0);
            if let Some(&(_, v)) = bad.iter().find(|(j, _)| *j == i) {
                statistic = v;
            }
            PlotLayer {
                name: name.clone(),
                statistic,
                set: if statistic > 1.0 {
                    LayerSet::Unstable
                } else {
                    LayerSet::Stable
                },
                coefficient: 0.99 + 0.01 * noise(1000 + i as u64),
            }
        })
        .collect()
}

fn curve(label: &str, n: usize, f: impl Fn(f64) -> f64) -> Curve {
    Curve {
        label: label.to_string(),
        points: (0..n)
            .map(|i| {
                let step = i as f64 * 50.0;
                (step, f(step) + 0.02 * (noise(i as u64 + 77) - 0.5))
            })
            .collect(),
    }
}

fn training_panels() -> Vec<Panel> {
    vec![
        Panel {
            title: "loss".to_string(),
            y_label: "cross-entropy".to_string(),
            x_label: "step".to_string(),
            curves: vec![
                curve("train (LDT)", 200, |s| 0.4 + 2.0 * (-s / 2500.0).exp()),
                curve("val (LDT)", 200, |s| 0.5 + 2.0 * (-s / 3000.0).exp()),
                curve("train (baseline)", 200, |s| {
                    0.55 + 2.0 * (-s / 3500.0).exp()
                }),
            ],
        },
        Panel {
            title: "accuracy".to_string(),
            y_label: "top-1 accuracy".to_string(),
            x_label: "step".to_string(),
            curves: vec![
                curve("train", 200, |s| 0.9 - 0.8 * (-s / 2500.0).exp()),
                curve("val", 200, |s| 0.85 - 0.8 * (-s / 3000.0).exp()),
            ],
        },
    ]
}

fn figure(layers: Vec<PlotLayer>, panels: Vec<Panel>) -> Figure {
    Figure {
        title: "LDT partition and training".to_string(),
        criterion: "gradient noise ratio > 1.0 -> unstable".to_string(),
        layers,
        panels,
    }
}

/// Checks that tags nest and close, and that text holds no raw `<` or stray `&`.
fn assert_well_formed(svg: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| entity.starts_with(e)),
                "bare & in text: {entity:.20}"
            );
        }
        let close = rest[open..].find('>').expect("unclosed tag") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "'<' inside tag {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().expect("tag name");
            stack.push(name.to_string());
        }
        rest = &rest[close + 1..];
    }
    assert!(stack.is_empty(), "unclosed tags {stack:?}");
    assert!(rest.trim().is_empty(), "text after the root element");
}

/// Decodes a PNG into (width, height, RGB bytes).
fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    assert!(png_bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "PNG signature");
    let mut reader = png::Decoder::new(png_bytes)
        .read_info()
        .expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn count_colour(rgb: &[u8], colour: [u8; 3]) -> usize {
    rgb.chunks_exact(3).filter(|p| *p == colour).count()
}

/// The `width="…" height="…"` of the root element.
fn svg_size(svg: &str) -> (u32, u32) {
    let attr = |name: &str| -> u32 {
        let key = format!(" {name}=\"");
        let start = svg.find(&key).expect("size attribute") + key.len();
        let len = svg[start..].find('"').expect("closing quote");
        svg[start..start + len].parse().expect("integer size")
    };
    (attr("width"), attr("height"))
}

#[test]
fn svg_has_a_bar_per_drawable_layer_and_the_legends() {
    let names = llama_names()[..40].to_vec();
    let layers = layers(&names, &[(3, 0.0), (7, f64::NAN), (9, -2.0)]);
    let stable = layers
        .iter()
        .enumerate()
        .filter(|(i, l)| l.set == LayerSet::Stable && ![3, 7, 9].contains(i))
        .count();
    let unstable = 37 - stable;
    let svg = render_svg(&figure(layers, training_panels()));
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<rect class=\"bar-stable\"").count(), stable);
    assert_eq!(
        svg.matches("<rect class=\"bar-unstable\"").count(),
        unstable
    );
    for text in [
        "stable (",
        "unstable (",
        "DPU coefficient (right axis)",
        "no bar: statistic &lt;= 0 or not finite (3)",
        "log10(statistic)",
        "criterion: gradient noise ratio &gt; 1.0 -&gt; unstable",
        "train (LDT)",
        "val (LDT)",
        "train (baseline)",
        "accuracy",
        "cross-entropy",
        "step",
    ] {
        assert!(svg.contains(text), "missing text {text}");
    }
    // Full names survive as hover titles even where tick labels are short.
    assert!(svg.contains("<title>model.layers.0.self_attn.q_proj.weight\n"));
}

#[test]
fn png_decodes_to_the_svg_size_with_both_set_colours() {
    let fig = figure(layers(&llama_names(), &[]), training_panels());
    let png_bytes = render_png(&fig);
    let (w, h, rgb) = decode(&png_bytes);
    assert_eq!((w, h), svg_size(&render_svg(&fig)));
    assert_eq!(rgb.len(), (w * h * 3) as usize);
    assert!(count_colour(&rgb, STABLE) > 100, "stable bars drawn");
    assert!(count_colour(&rgb, UNSTABLE) > 100, "unstable bars drawn");
}

#[test]
fn unusable_statistics_and_empty_inputs_do_not_panic() {
    let names = llama_names()[..5].to_vec();
    let bad = [
        (0, 0.0),
        (1, f64::NAN),
        (2, -1.0),
        (3, f64::INFINITY),
        (4, f64::NEG_INFINITY),
    ];
    let mut odd = layers(&names, &bad);
    odd[0].coefficient = f64::NAN;
    odd[1].coefficient = f64::INFINITY;
    let cases = [
        figure(odd.clone(), vec![]),
        figure(vec![], vec![]),
        figure(vec![], training_panels()),
        figure(
            odd,
            vec![
                Panel {
                    title: String::new(),
                    y_label: String::new(),
                    x_label: "step".to_string(),
                    curves: vec![],
                },
                Panel {
                    title: "all NaN <&>".to_string(),
                    y_label: "x".to_string(),
                    x_label: "step".to_string(),
                    curves: vec![Curve {
                        label: "nan".to_string(),
                        points: vec![(f64::NAN, 1.0), (1.0, f64::NAN)],
                    }],
                },
                Panel {
                    title: "one point".to_string(),
                    y_label: "y".to_string(),
                    x_label: "step".to_string(),
                    curves: vec![Curve {
                        label: "single".to_string(),
                        points: vec![(5.0, 5.0)],
                    }],
                },
            ],
        ),
    ];
    for fig in &cases {
        let svg = render_svg(fig);
        assert_well_formed(&svg);
        assert!(!svg.contains("class=\"bar-"), "no drawable bar expected");
        let (w, h, _) = decode(&render_png(fig));
        assert_eq!((w, h), svg_size(&svg));
    }
}

#[test]
fn all_equal_statistics_and_coefficients_render() {
    let names = llama_names()[..5].to_vec();
    let flat: Vec<PlotLayer> = names
        .iter()
        .map(|name| PlotLayer {
            name: name.clone(),
            statistic: 1.0,
            set: LayerSet::Stable,
            coefficient: 1.0,
        })
        .collect();
    let svg = render_svg(&figure(flat.clone(), vec![]));
    assert_well_formed(&svg);
    assert_eq!(svg.matches("class=\"bar-stable\"").count(), 5);
    let (_, _, rgb) = decode(&render_png(&figure(flat, vec![])));
    assert!(count_colour(&rgb, STABLE) > 0);
}

#[test]
fn three_hundred_layers_render_with_names_thinned() {
    let names = llama_names();
    assert_eq!(names.len(), 300);
    let fig = figure(
        layers(&names, &[(10, 0.0), (150, f64::NAN)]),
        training_panels(),
    );
    let svg = render_svg(&fig);
    assert_well_formed(&svg);
    let bars = svg.matches("<rect class=\"bar-").count();
    assert_eq!(bars, 298);
    assert!(svg.contains("layers in model order (300); every"));
    assert!(svg.contains("names without suffix '.weight'"));
    let (_, _, rgb) = decode(&render_png(&fig));
    assert!(count_colour(&rgb, STABLE) > 100);
    assert!(count_colour(&rgb, UNSTABLE) > 100);
}

#[test]
fn many_panels_wrap_into_rows() {
    let panels: Vec<Panel> = (0..5)
        .map(|i| Panel {
            title: format!("metric {i}"),
            y_label: "value".to_string(),
            x_label: "step".to_string(),
            curves: vec![curve("run", 50, move |s| s * f64::from(i))],
        })
        .collect();
    let one_row = render_svg(&figure(vec![], panels[..3].to_vec()));
    let two_rows = render_svg(&figure(vec![], panels));
    assert!(svg_size(&two_rows).1 > svg_size(&one_row).1);
}

#[test]
fn long_curves_are_thinned_and_crowded_legends_cut() {
    let long = curve("every step", 100_000, |s| (s / 1e5).sin());
    let many: Vec<Curve> = (0..20)
        .map(|i| curve(&format!("run {i}"), 20, move |s| s + f64::from(i)))
        .collect();
    let fig = figure(
        vec![],
        vec![
            Panel {
                title: "long".to_string(),
                y_label: "value".to_string(),
                x_label: "step".to_string(),
                curves: vec![long],
            },
            Panel {
                title: "many".to_string(),
                y_label: "value".to_string(),
                x_label: "step".to_string(),
                curves: many,
            },
        ],
    );
    let svg = render_svg(&fig);
    assert_well_formed(&svg);
    let polyline = svg
        .lines()
        .find(|l| l.starts_with("<polyline"))
        .expect("a polyline");
    assert!(
        polyline.matches(',').count() < 4 * 1600,
        "thinned to the pixel columns"
    );
    assert!(svg.contains("run 0") && svg.contains(" more)"));
    assert!(!svg.contains(">run 19<"), "the overflow is summarised");
    decode(&render_png(&fig));
}

/// Writes the 300-layer example next to the other temporary files, for a
/// person to look at.
#[test]
fn example_files_are_written() {
    let fig = figure(
        layers(&llama_names(), &[(10, 0.0), (150, f64::NAN)]),
        training_panels(),
    );
    let dir = std::env::temp_dir();
    std::fs::write(dir.join("plot_example.png"), render_png(&fig)).expect("write PNG");
    std::fs::write(dir.join("plot_example.svg"), render_svg(&fig)).expect("write SVG");
}

/// A run without a partition (erm) draws its curves (`curves.svg` / `.png`) at its end,
/// and `ldt plot` redraws them; a directory that is no run is an error naming it.
#[test]
fn an_erm_run_draws_its_curves() {
    #[path = "common/mod.rs"]
    mod common;
    let toml = r#"
seed = 1
threads = 1
[model]
arch = "mlp"
[train]
method = "erm"
steps = 4
batch_size = 8
log_every = 1
"#;
    let (dir, _) = common::run(toml, &[&common::bundled_manifest()]);
    let svg = std::fs::read_to_string(dir.path().join("curves.svg")).expect("curves.svg");
    assert_well_formed(&svg);
    assert!(svg.contains("training loss"), "the loss panel");
    std::fs::remove_file(dir.path().join("curves.png")).unwrap();
    ldt::train::report::draw(dir.path()).unwrap();
    assert!(dir.path().join("curves.png").exists(), "redrawn");
    let none = tempfile::tempdir().unwrap();
    let e = ldt::train::report::draw(none.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a run directory"), "{e}");
}
