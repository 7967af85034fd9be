//! Pictures of a run: `partition.svg` / `partition.png` with the layers' log-variance
//! bars coloured by set, the DPU coefficients, the loss / accuracy curves read back
//! from `metrics.jsonl` and, after a search of `auto` settings, its probe scores
//! (`search.json`); `curves.svg` / `.png`, the curves alone, for a run without a
//! partition. `ldt plot DIR` redraws them.

use crate::ldt::partition::{Partition, Set};
use crate::ldt::search::SearchReport;
use crate::metrics::{read_records, Record};
use crate::plot::{render_png, render_svg, Curve, Figure, LayerSet, Panel, PlotLayer};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Loss and accuracy curves from `metrics.jsonl` (training loss per stage, evaluation
/// accuracy per evaluated network). A curve is broken where records of the other phase
/// came between two of its points (LDT-S logs `loss_pm` in phase P and `loss_am` in
/// phase A: no line is drawn across the other phase). A run without the file draws
/// empty panels.
fn curves(metrics: &Path) -> Result<Vec<Panel>> {
    let records = if metrics.exists() {
        read_records(metrics)?
    } else {
        Vec::new()
    };
    let mut loss: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut acc: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    // Per loss curve, the index of the training record that gave its last point.
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    let mut k = 0;
    for r in records {
        match r {
            Record::Train(t) if t.stage == "train" => {
                let step = t.step as f64;
                k += 1;
                for (key, v) in [
                    ("loss", t.loss),
                    ("loss_pm", t.loss_pm),
                    ("loss_am", t.loss_am),
                ] {
                    if let Some(x) = v.filter(|x| x.is_finite()) {
                        let points = loss.entry(key.to_string()).or_default();
                        if last.get(key).is_some_and(|&j| j + 1 < k) {
                            points.push((step, f64::NAN));
                        }
                        points.push((step, x.into()));
                        last.insert(key, k);
                    }
                }
            }
            Record::Eval(e) => {
                let step = e.step as f64;
                let (src, tgt) = e.headline();
                for (x, tag) in [(src, "source"), (tgt, "target")] {
                    if x.is_finite() {
                        let key = format!("{} {tag}", e.model);
                        acc.entry(key).or_default().push((step, x));
                    }
                }
            }
            _ => {}
        }
    }
    let panel = |title: &str, y: &str, m: BTreeMap<String, Vec<(f64, f64)>>| Panel {
        title: title.into(),
        y_label: y.into(),
        x_label: "step".into(),
        curves: m
            .into_iter()
            .map(|(label, points)| Curve { label, points })
            .collect(),
    };
    Ok(vec![
        panel("training loss", "loss", loss),
        panel("evaluation", "accuracy", acc),
    ])
}

/// The search's probe scores from `DIR/search.json` (a run with `auto` settings): one
/// curve per criterion over the unstable ratios, the choice in the title.
fn search_panel(dir: &Path) -> Result<Option<Panel>> {
    let p = dir.join("search.json");
    if !p.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let r: SearchReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a search report", p.display()))?;
    let mut by: Vec<Curve> = Vec::new();
    for c in &r.candidates {
        let label = c.candidate.criterion.name();
        let point = (c.candidate.unstable_ratio, c.score);
        match by.iter_mut().find(|k| k.label == label) {
            Some(k) => k.points.push(point),
            None => by.push(Curve {
                label: label.into(),
                points: vec![point],
            }),
        }
    }
    let pick = r.choice();
    Ok(Some(Panel {
        title: format!(
            "search: chose {} @ {}",
            pick.candidate.criterion.name(),
            pick.candidate.unstable_ratio
        ),
        y_label: format!("validation {}", r.metric),
        x_label: "unstable ratio".into(),
        curves: by,
    }))
}

/// Draws the run in `dir`: `partition.svg` / `.png` (the partition and the curves) for
/// an LDT method, `curves.svg` / `.png` (the curves alone) for a run without a
/// partition (erm, lp-ft).
pub fn draw(dir: &Path) -> Result<()> {
    let p = dir.join("partition.json");
    let metrics = dir.join("metrics.jsonl");
    if !p.exists() {
        if !metrics.exists() {
            anyhow::bail!(
                "{} holds neither partition.json nor metrics.jsonl: not a run directory",
                dir.display()
            );
        }
        let fig = Figure {
            title: "training curves".into(),
            criterion: String::new(),
            layers: Vec::new(),
            panels: curves(&metrics)?,
        };
        std::fs::write(dir.join("curves.svg"), render_svg(&fig))?;
        std::fs::write(dir.join("curves.png"), render_png(&fig))?;
        return Ok(());
    }
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let part: Partition = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a partition report", p.display()))?;
    let fig = Figure {
        title: format!(
            "LDT partition ({} stable / {} unstable)",
            part.stable.len(),
            part.unstable.len()
        ),
        criterion: format!("{:?}", part.criterion).to_lowercase(),
        layers: part
            .layers
            .iter()
            .map(|l| PlotLayer {
                name: l.name.clone(),
                statistic: l.score,
                set: if l.set == Set::Stable {
                    LayerSet::Stable
                } else {
                    LayerSet::Unstable
                },
                coefficient: l.coefficient,
            })
            .collect(),
        panels: curves(&metrics)?
            .into_iter()
            .chain(search_panel(dir)?)
            .collect(),
    };
    std::fs::write(dir.join("partition.svg"), render_svg(&fig))?;
    std::fs::write(dir.join("partition.png"), render_png(&fig))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LDT-S logs `loss_pm` in phase P and `loss_am` in phase A: each curve is broken
    /// across the other phase (a non-finite point the renderer splits at), and a curve
    /// logged at every record is not.
    #[test]
    fn ldt_s_loss_curves_break_across_the_other_phase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = |step: usize, phase: &str| {
            let (pm, am) = match phase {
                "P" => ("2.5", "null"),
                _ => ("null", "2.25"),
            };
            format!(
                "{{\"kind\":\"train\",\"loss_am\":{am},\"loss_pm\":{pm},\"lr\":0.001,\"phase\":\"{phase}\",\"stage\":\"train\",\"step\":{step}}}\n"
            )
        };
        let text: String = [(1, "P"), (2, "P"), (3, "A"), (4, "A"), (5, "P")]
            .iter()
            .map(|&(s, p)| line(s, p))
            .collect();
        std::fs::write(&path, text).unwrap();
        let panels = curves(&path).unwrap();
        let loss = &panels[0].curves;
        let pm = &loss.iter().find(|c| c.label == "loss_pm").unwrap().points;
        let steps: Vec<String> = pm
            .iter()
            .map(|&(s, v)| match v.is_finite() {
                true => format!("{s}"),
                false => "|".into(),
            })
            .collect();
        assert_eq!(steps, ["1", "2", "|", "5"]);
        let am = &loss.iter().find(|c| c.label == "loss_am").unwrap().points;
        assert!(am.iter().all(|p| p.1.is_finite()), "{am:?}");
    }
}
