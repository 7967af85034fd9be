//! The exact equivalences of SPEC.md, bit for bit (every tensor compared by its f32 bit
//! pattern): LDT-S with p_steps = a_steps = 1 and repeat_batch == the resident dual
//! branch; swap placement == resident; the file-backed counterpart tier == the in-RAM
//! buffer. 50 steps on mlp and cnn, bundled data, fixed seed.

mod common;
use common::*;

const BASE: &str = r#"
seed = 3
threads = 1
[model]
arch = "ARCH"
[train]
method = "ldt"
steps = 50
batch_size = 16
[optim]
lr = 1e-3
[stage1]
warmup_steps = 5
stat_batches = 8
stat_batch_size = 8
[ldt]
ema_every = 5
[snapshots]
at_steps = [7]
"#;

fn outputs(arch: &str, extra: &[&str]) -> tempfile::TempDir {
    let toml = BASE.replace("ARCH", arch);
    let man = bundled_manifest();
    let mut ov = vec![man.as_str()];
    ov.extend_from_slice(extra);
    run(&toml, &ov).0
}

fn same(a: &tempfile::TempDir, b: &tempfile::TempDir, what: &str) {
    for f in [
        "pm.safetensors",
        "am.safetensors",
        "composite.safetensors",
        "step7_pm.safetensors",
        "step7_am.safetensors",
    ] {
        assert!(
            identical(&a.path().join(f), &b.path().join(f)),
            "{what}: {f} differs"
        );
    }
}

fn check(arch: &str) {
    let resident = outputs(arch, &[]);
    let swap = outputs(arch, &["ldt.placement=\"swap\""]);
    same(
        &resident,
        &swap,
        &format!("{arch}: swap placement vs resident"),
    );
    let single = outputs(
        arch,
        &[
            "train.method=\"ldt-s\"",
            "ldt_s.p_steps=1",
            "ldt_s.a_steps=1",
            "ldt_s.repeat_batch=true",
        ],
    );
    same(
        &resident,
        &single,
        &format!("{arch}: ldt-s (1/1, repeat) vs resident dual"),
    );
    let dir = tempfile::tempdir().unwrap();
    let spill = format!(
        "offload.path=\"{}\"",
        dir.path().join("counterparts.bin").display()
    );
    let file = outputs(
        arch,
        &[
            "train.method=\"ldt-s\"",
            "ldt_s.p_steps=1",
            "ldt_s.a_steps=1",
            "ldt_s.repeat_batch=true",
            "offload.host_bytes=1024",
            &spill,
        ],
    );
    same(&single, &file, &format!("{arch}: file-backed tier vs RAM"));
    // The DPU warm-up computes the same in every placement.
    let warm = "ldt.dpu_warmup=\"ratio\"";
    let resident_w = outputs(arch, &[warm]);
    assert!(
        !identical(
            &resident.path().join("composite.safetensors"),
            &resident_w.path().join("composite.safetensors")
        ),
        "{arch}: the DPU warm-up changed nothing"
    );
    same(
        &resident_w,
        &outputs(arch, &[warm, "ldt.placement=\"swap\""]),
        &format!("{arch}: warm-up, swap vs resident"),
    );
    let single_w = outputs(
        arch,
        &[
            warm,
            "train.method=\"ldt-s\"",
            "ldt_s.p_steps=1",
            "ldt_s.a_steps=1",
            "ldt_s.repeat_batch=true",
        ],
    );
    same(
        &resident_w,
        &single_w,
        &format!("{arch}: warm-up, ldt-s vs resident"),
    );
    // Early staging of the next phase's optimizer state changes no number.
    let phases = [
        "train.method=\"ldt-s\"",
        "ldt_s.p_steps=3",
        "ldt_s.a_steps=4",
    ];
    let staged = outputs(arch, &phases);
    let unstaged = outputs(
        arch,
        &[phases[0], phases[1], phases[2], "offload.staging_bytes=0"],
    );
    same(
        &staged,
        &unstaged,
        &format!("{arch}: ldt-s staged vs unstaged phase change"),
    );
    let staging = |d: &tempfile::TempDir| -> u64 {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("summary.json")).unwrap())
                .unwrap();
        s["memory"]["staging"].as_u64().unwrap()
    };
    assert!(
        staging(&staged) > 0 && staging(&unstaged) == 0,
        "{arch}: staging was not exercised"
    );
}

#[test]
fn mlp_equivalences_bit_for_bit() {
    check("mlp");
}

#[test]
fn cnn_equivalences_bit_for_bit() {
    check("cnn");
}
