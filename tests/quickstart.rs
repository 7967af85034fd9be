//! README's first command: the bundled quickstart run reaches a source test accuracy
//! above 0.8 (composite network of LDT-S, default steps).

mod common;

#[test]
fn quickstart_reaches_source_accuracy_above_0_8() {
    let toml = std::fs::read_to_string(common::root().join("configs/quickstart.toml")).unwrap();
    let man = format!(
        "data.manifest=\"{}\"",
        common::root()
            .join("data/rotmnist5k/manifest.json")
            .display()
    );
    let (_dir, ctx) = common::run(&toml, &[&man]);
    let r = &ctx.summary.eval["composite"];
    eprintln!("quickstart composite: {}", r.line());
    assert!(
        r.source_acc > 0.8,
        "composite source accuracy {}",
        r.source_acc
    );
}
