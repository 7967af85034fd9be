//! `train.method = "deft"` trains the dual branch with the backbone as the stable set and
//! the head as the unstable set, whatever `stage1.criterion` says (before, a plain
//! `ldt train` with `deft` silently ranked by gradient variance, i.e. ran `ldt`).

mod common;
use common::*;

#[test]
fn deft_partitions_backbone_and_head() {
    let toml = r#"
seed = 1
threads = 1
[model]
arch = "cnn"
[train]
method = "deft"
steps = 2
batch_size = 8
[stage1]
criterion = "var"
stat_batches = 2
"#;
    let (dir, ctx) = run(toml, &[&bundled_manifest()]);
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("partition.json")).unwrap())
            .unwrap();
    let names = |k: &str| -> Vec<String> {
        p[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let net = ctx.net.as_ref();
    let head: Vec<String> = (0..net.params().len())
        .filter(|&i| net.is_head(i))
        .map(|i| net.params()[i].name.clone())
        .collect();
    assert!(!head.is_empty());
    assert_eq!(names("unstable"), head, "deft's unstable set is the head");
    assert_eq!(
        names("stable").len() + head.len(),
        net.params().len(),
        "every other layer is stable"
    );
    assert_eq!(p["criterion"], "names");
}
