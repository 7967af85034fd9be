//! Pictures of a run: `partition.svg` / `partition.png` with the layers' log-variance
//! bars coloured by set, the DPU coefficients, and the loss / accuracy curves read back
//! from `metrics.jsonl`. `ldt plot DIR` redraws them.

use crate::ldt::partition::{Partition, Set};
use crate::metrics::{read_records, Record};
use crate::plot::{render_png, render_svg, Curve, Figure, LayerSet, Panel, PlotLayer};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Loss and accuracy curves from `metrics.jsonl` (training loss per stage, evaluation
/// accuracy per evaluated network). A run without the file draws empty panels.
fn curves(metrics: &Path) -> Result<Vec<Panel>> {
    let records = if metrics.exists() {
        read_records(metrics)?
    } else {
        Vec::new()
    };
    let mut loss: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut acc: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        match r {
            Record::Train(t) if t.stage == "train" => {
                let step = t.step as f64;
                for (k, v) in [
                    ("loss", t.loss),
                    ("loss_pm", t.loss_pm),
                    ("loss_am", t.loss_am),
                ] {
                    if let Some(x) = v.filter(|x| x.is_finite()) {
                        loss.entry(k.to_string())
                            .or_default()
                            .push((step, x.into()));
                    }
                }
            }
            Record::Eval(e) => {
                let step = e.step as f64;
                for (x, tag) in [(e.source_acc, "source"), (e.target_acc, "target")] {
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

/// Draws `DIR/partition.svg` and `DIR/partition.png` from the run's files.
pub fn draw(dir: &Path) -> Result<()> {
    let p = dir.join("partition.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "cannot read {} (is {} a run directory of an LDT method?)",
            p.display(),
            dir.display()
        )
    })?;
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
        panels: curves(&dir.join("metrics.jsonl"))?,
    };
    std::fs::write(dir.join("partition.svg"), render_svg(&fig))?;
    std::fs::write(dir.join("partition.png"), render_png(&fig))?;
    Ok(())
}
