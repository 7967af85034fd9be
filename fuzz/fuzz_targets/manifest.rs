//! `Manifest::load` on arbitrary bytes written to a file: any input must give `Ok` or
//! `Err`, never a panic; a manifest that loads keeps the promises of `load`.
#![no_main]

use ldt::data::Manifest;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ldt-fuzz-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d.join("manifest.json")
    })
}

fuzz_target!(|data: &[u8]| {
    let p = scratch();
    std::fs::write(p, data).expect("writing the scratch manifest");
    if let Ok(m) = Manifest::load(p) {
        assert_eq!(m.format, "dg-benchmark/v1");
        assert!(m.num_classes >= 2);
        assert!(!m.image_shape.contains(&0));
        assert!(m.sources().next().is_some());
        let mut names: Vec<&str> = m.domains.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), m.domains.len());
        assert!(m
            .domains
            .iter()
            .all(|d| d.splits.train.n > 0 && d.splits.test.n > 0));
    }
});
