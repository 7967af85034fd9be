//! LDT against the authors' arithmetic (PyTorch fixtures in ../shared/fixtures/ldt-ref):
//! statistics, partition, DPU coefficients, both branches after steps 1, 10 and 300, the
//! composite and its target accuracy.

mod common;
use common::*;

fn replay(
    arch: &str,
) -> Option<(
    tempfile::TempDir,
    ldt::train::RunContext,
    std::path::PathBuf,
)> {
    let fx = fixtures()?.join(format!("ldt-ref/{arch}-seed0"));
    let m = fixtures()?.join("rotmnist5k/manifest.json");
    let toml = std::fs::read_to_string(root().join("configs/ldt-replay.toml")).unwrap();
    let init = format!("model.init=\"{}\"", fx.join("init.safetensors").display());
    let sched = format!(
        "data.schedule=\"{}\"",
        fx.join("batches.safetensors").display()
    );
    let man = format!("data.manifest=\"{}\"", m.display());
    let a = format!("model.arch=\"{arch}\"");
    let (dir, ctx) = run(&toml, &[&init, &sched, &man, &a]);
    Some((dir, ctx, fx))
}

fn check(arch: &str, bound_1_10: f64, bound_300: f64) {
    let Some((dir, ctx, fx)) = replay(arch) else {
        return;
    };
    let d = dir.path();
    // Statistics, partition, coefficients.
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("variance.json")).unwrap()).unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("partition.json")).unwrap()).unwrap();
    let rows = want["rows"].as_array().unwrap();
    let layers = got["layers"].as_array().unwrap();
    assert_eq!(rows.len(), layers.len());
    let mut worst_stat = 0f64;
    for r in rows {
        let name = r["name"].as_str().unwrap();
        let l = layers.iter().find(|l| l["name"] == name).unwrap();
        for (ours, theirs) in [
            ("var", "var_f64"),
            ("mean", "mean_f64"),
            ("var_cross", "var_paper"),
        ] {
            let (a, b) = (
                l["stats"][ours].as_f64().unwrap(),
                r[theirs].as_f64().unwrap(),
            );
            // Statistics: relative 1e-5 (SPEC tolerance). A head bias's gradient mean is a
            // cancellation (softmax minus one-hot sums to ~0 over classes), so the mean is
            // measured relative to the gradient's scale, max(|mean|, sqrt(var)).
            let scale = if ours == "mean" {
                b.abs().max(r["var_f64"].as_f64().unwrap().sqrt())
            } else {
                b.abs()
            };
            let rel = (a - b).abs() / scale;
            worst_stat = worst_stat.max(rel);
            assert!(rel < 1e-5, "{arch} {name} {ours}: {a} vs {b} (rel {rel:e})");
        }
        assert_eq!(l["set"], r["set"], "{arch} {name} set");
        assert_eq!(
            l["index_in_set"], r["index_in_set"],
            "{arch} {name} index_in_set"
        );
        // DPU coefficients: exact (same f64 formula).
        assert_eq!(
            l["coefficient"].as_f64(),
            r["dpu_coefficient"].as_f64(),
            "{arch} {name} coefficient"
        );
    }
    assert_eq!(got["stable"], want["spe_stable"]);
    assert_eq!(got["unstable"], want["inv_unstable"]);
    eprintln!("{arch}: worst statistic relative error {worst_stat:e}");
    // Branches: model1 = AM, model2 = PM.
    for (step, bound) in [(1, bound_1_10), (10, bound_1_10)] {
        for (ours, theirs) in [("am", "model1"), ("pm", "model2")] {
            let (r, k) = worst_rel_l2(
                &d.join(format!("step{step}_{ours}.safetensors")),
                &fx.join(format!("ldt_step{step}_{theirs}.safetensors")),
            );
            eprintln!("{arch} step {step} {ours}: worst rel L2 {r:e} ({k})");
            assert!(
                r < bound,
                "{arch} step {step} {ours}: {k} rel L2 {r:e} >= {bound:e}"
            );
        }
    }
    for (ours, theirs) in [
        ("am", "ldt_model1"),
        ("pm", "ldt_model2"),
        ("composite", "composite"),
    ] {
        let (r, k) = worst_rel_l2(
            &d.join(format!("{ours}.safetensors")),
            &fx.join(format!("{theirs}.safetensors")),
        );
        eprintln!("{arch} step 300 {ours}: worst rel L2 {r:e} ({k})");
        assert!(
            r < bound_300,
            "{arch} 300 steps {ours}: {k} rel L2 {r:e} >= {bound_300:e}"
        );
    }
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("result.json")).unwrap()).unwrap();
    let want_acc = result["acc_ldt_composite"]["target_all"].as_f64().unwrap();
    let c = &ctx.summary.eval["composite"];
    // The fixture's target_all pools both target domains (equal sizes, so = the mean).
    eprintln!(
        "{arch} composite target acc {} vs fixture {want_acc}",
        c.target_acc
    );
    assert!(
        (c.target_acc - want_acc).abs() <= 0.005,
        "{arch}: composite target accuracy {} vs {want_acc}",
        c.target_acc
    );
}

#[test]
fn mlp_reproduces_the_authors_run() {
    check("mlp", 1e-6, 5e-5);
}

#[test]
fn cnn_reproduces_the_authors_run() {
    check("cnn", 1e-6, 5e-5);
}
