//! `ldt bench --step`, the ldt half of `scripts/torch-compare.py`: one row per backbone
//! and method with a positive ms/step of the steps after the first, the network's parameter count, and for the LDT
//! methods the stable set it found (what the PyTorch side needs to repeat the step),
//! written to `OUT/steps.json`.

mod common;

#[test]
fn step_rows_say_what_the_comparison_needs() {
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ldt"))
        .args([
            "bench",
            "--step",
            "--archs",
            "mlp,cnn_bn",
            "--methods",
            "erm,ldt-s",
        ])
        .args(["--batch", "8", "--steps", "8", "--threads", "1", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("steps.json")).unwrap())
            .unwrap();
    let rows = rows.as_array().unwrap();
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["arch"].as_str().unwrap(), r["method"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("mlp", "erm"),
            ("mlp", "ldt-s"),
            ("cnn_bn", "erm"),
            ("cnn_bn", "ldt-s")
        ]
    );
    // mlp 784-128-64-10 and cnn_bn [16, 32] / 64 / 10, as the PyTorch models count them.
    // cnn_bn: cnn's 105,866 without the convolution biases (16 + 32), with BatchNorm's
    // weights and biases (2 x (16 + 32)).
    let cnn_bn = 105_866 - (16 + 32) + 2 * (16 + 32);
    let params = [109_386, 109_386, cnn_bn, cnn_bn];
    for (r, &p) in rows.iter().zip(&params) {
        assert!(r["ms_per_step"].as_f64().unwrap() > 0.0, "{r}");
        // The row times the steps after the first (the first touches the heap's pages):
        // summary.json's warm figure, over 7 of the 8 steps, inside the training time.
        let run = format!(
            "{}-{}-f32-t1",
            r["arch"].as_str().unwrap(),
            r["method"].as_str().unwrap()
        );
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join(run).join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(r["ms_per_step"], summary["warm_ms_per_step"], "{r}");
        let warm_ms = 7.0 * summary["warm_ms_per_step"].as_f64().unwrap();
        let train_ms = 1e3 * summary["train_seconds"].as_f64().unwrap();
        assert!(
            warm_ms <= train_ms,
            "{warm_ms} ms of warm steps, {train_ms} ms in all"
        );
        assert_eq!(r["params"].as_u64().unwrap(), p as u64, "{r}");
        let stable = r["stable"].as_array().unwrap();
        match r["method"].as_str().unwrap() {
            "erm" => assert!(stable.is_empty(), "{r}"),
            _ => assert!(!stable.is_empty(), "{r}"),
        }
        assert_eq!(r["phase_steps"], 2);
    }
    let e = std::process::Command::new(env!("CARGO_BIN_EXE_ldt"))
        .args(["bench", "--step", "--archs", "cnn", "--methods", "sgd"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("--methods"), "{err}");
}
