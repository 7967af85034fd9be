//! Memory accounting: the measured live parameter-state bytes (weights + the step's
//! gradients + every live optimizer tensor, tracked after each optimizer step) equal the
//! bytes computed from the set sizes, exactly; ldt-s and the swap placement never hold
//! more than erm; the resident dual branch holds two networks.

mod common;
use common::*;

const BASE: &str = r#"
seed = 1
threads = 1
[model]
arch = "ARCH"
[train]
steps = 20
batch_size = 8
[stage1]
stat_batches = 4
[ldt_s]
p_steps = 5
a_steps = 5
"#;

fn memory(arch: &str, method: &str, extra: &[&str]) -> (u64, u64) {
    let man = format!(
        "data.manifest=\"{}\"",
        root().join("data/rotmnist5k/manifest.json").display()
    );
    let m = format!("train.method=\"{method}\"");
    let mut ov = vec![man.as_str(), m.as_str()];
    ov.extend_from_slice(extra);
    let (_d, ctx) = run(&BASE.replace("ARCH", arch), &ov);
    let mem = &ctx.summary.extra["memory"];
    (
        mem["measured_live_peak"].as_u64().unwrap(),
        mem["live_peak"].as_u64().unwrap(),
    )
}

fn check(arch: &str) {
    let (erm, erm_c) = memory(arch, "erm", &[]);
    let (s, s_c) = memory(arch, "ldt-s", &[]);
    let (sw, sw_c) = memory(arch, "ldt", &["ldt.placement=\"swap\""]);
    let (res, res_c) = memory(arch, "ldt", &[]);
    eprintln!("{arch}: erm {erm}, ldt-s {s}, ldt swap {sw}, ldt resident {res} bytes (measured)");
    for (what, measured, computed) in [
        ("erm", erm, erm_c),
        ("ldt-s", s, s_c),
        ("swap", sw, sw_c),
        ("resident", res, res_c),
    ] {
        assert_eq!(
            measured, computed,
            "{arch} {what}: measured vs computed live bytes"
        );
    }
    assert!(s <= erm, "{arch}: ldt-s live peak {s} > erm {erm}");
    assert!(sw <= erm, "{arch}: swap live peak {sw} > erm {erm}");
    assert!(
        res > erm,
        "{arch}: resident dual should hold two networks ({res} vs erm {erm})"
    );
}

#[test]
fn mlp_live_memory() {
    check("mlp");
}

#[test]
fn cnn_live_memory() {
    check("cnn");
}
