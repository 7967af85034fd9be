//! The shipped configs parse, and `configs/reference.toml` states exactly the defaults.

mod common;
use ldt::config::Config;

#[test]
fn reference_config_equals_the_defaults() {
    let path = common::root().join("configs/reference.toml");
    let c = Config::load(&path, &[]).unwrap();
    assert_eq!(c.to_toml(), Config::default().to_toml());
}

#[test]
fn every_shipped_config_parses() {
    for e in std::fs::read_dir(common::root().join("configs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            Config::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        }
    }
}
