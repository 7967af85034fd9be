//! `model::io::read_safetensors` (what `model.init` and `ldt eval` read) on arbitrary
//! bytes: `Ok` or `Err`, never a panic; an error names the file; a file that loads and
//! records checksums passed every one of them.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ldt-fuzz-weights-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d.join("w.safetensors")
    })
}

fuzz_target!(|data: &[u8]| {
    let p = scratch();
    std::fs::write(p, data).expect("writing the scratch file");
    if let Err(e) = ldt::model::io::read_safetensors(p, &Device::Cpu) {
        assert!(format!("{e:#}").contains("w.safetensors"), "{e:#}");
    }
});
