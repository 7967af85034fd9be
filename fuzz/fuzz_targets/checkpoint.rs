//! `checkpoint::latest` on a checkpoint made of arbitrary bytes: the input up to the
//! first NUL is `meta.json`, the rest `state.safetensors`. Any input must give `Ok` or
//! `Err`, never a panic; an error names the checkpoint. (Inputs that pass carry valid
//! checksums: the seeds are real checkpoints, see `fuzz/README.md`.)
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ldt-fuzz-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(d.join("checkpoints/step-1")).expect("scratch directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let run = scratch();
    let ck = run.join("checkpoints/step-1");
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    std::fs::write(ck.join("meta.json"), &data[..cut]).expect("writing meta.json");
    std::fs::write(ck.join("state.safetensors"), data.get(cut + 1..).unwrap_or(&[]))
        .expect("writing state.safetensors");
    if let Err(e) = ldt::checkpoint::latest(run, &Device::Cpu) {
        assert!(format!("{e:#}").contains("step-1"), "{e:#}");
    }
});
