//! `Config::from_toml` on arbitrary input: the bytes up to the first NUL are the TOML
//! text, every further NUL-separated chunk is one `--set` override. Any input must give
//! `Ok` or `Err`, never a panic; a config that validates must survive its own
//! `to_toml` round trip (what every run directory stores as `config.toml`).
#![no_main]

use ldt::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = s.split('\0');
    let text = parts.next().unwrap_or("");
    let overrides: Vec<String> = parts.map(str::to_string).collect();
    if let Ok(cfg) = Config::from_toml(text, "fuzz.toml", &overrides) {
        let again = cfg.to_toml();
        if let Err(e) = Config::from_toml(&again, "round-trip", &[]) {
            panic!("a validated config does not reload from its own TOML: {e:#}\n{again}");
        }
    }
});
