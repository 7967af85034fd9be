//! Bounded, seeded mutation fuzzing of the two text parsers a user feeds directly: the
//! run configuration (`Config::from_toml`, with `--set` overrides) and the benchmark
//! manifest (`Manifest::load`), and of the readers of what a run wrote: a checkpoint
//! (`meta.json` and the safetensors header and tensors of `state.safetensors`) and a
//! weights file. It runs on stable in every `cargo test`; the coverage-guided libFuzzer
//! targets in `fuzz/` (nightly, `cargo fuzz run config|manifest|checkpoint|weights`)
//! search the same properties much longer.
//!
//! Inputs: the shipped configs and the bundled manifest, mutated by byte flips,
//! truncations, deleted / duplicated / swapped lines (key deletions and repeats),
//! value type swaps and insertions of hostile tokens. Properties, for every input:
//! - no panic (each call runs under `catch_unwind`);
//! - every error names where it comes from (the config file or the `--set` it was given;
//!   the manifest's path);
//! - a configuration that validates reloads from its own `to_toml` (what each run
//!   directory stores), and a manifest that loads keeps `Manifest::load`'s promises;
//! - a damaged checkpoint or weights file is never read as something else: it either
//!   loads with every tensor and field bit-identical to what was written (a change that
//!   alters nothing, e.g. whitespace), or fails with an error naming it.

#[path = "common/testkit.rs"]
mod testkit;

use ldt::config::Config;
use ldt::data::Manifest;
use ldt::rng::Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use testkit::*;

/// Values of every TOML / JSON type and the edges of the numeric ranges.
const TOKENS: &[&str] = &[
    "0",
    "1",
    "-1",
    "-5",
    "2",
    "0.5",
    "1.5",
    "-0.0",
    "1e999",
    "-1e999",
    "nan",
    "inf",
    "-inf",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775808",
    "true",
    "false",
    "\"\"",
    "\"x\"",
    "\"ldt-s\"",
    "\"mlp\"",
    "[]",
    "[0]",
    "[1, 2]",
    "[0.9, 1.0]",
    "[[]]",
    "{}",
    "{ a = 1 }",
    "null",
    "1979-05-27",
    "'''",
    "\"\\u0000\"",
    "\"\\uD800\"",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "=",
    ".",
    "\"",
    "#",
    "\n",
    "\n[x]\n",
    "\n[train]\n",
    "\n[[optim.groups]]\n",
];

/// Keys worth overriding (valid ones, near misses and non-sections).
const KEYS: &[&str] = &[
    "seed",
    "threads",
    "device",
    "model.arch",
    "model.hidden",
    "model.channels",
    "model.fc_hidden",
    "model.init",
    "data.manifest",
    "data.prefetch",
    "train.method",
    "train.steps",
    "train.batch_size",
    "train.log_every",
    "optim.lr",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
    "optim.momentum",
    "optim.groups",
    "stage1.stat_batches",
    "stage1.unstable_ratio",
    "stage1.split_fraction",
    "stage1.warmup_lr",
    "stage1.criterion",
    "ldt.ema_every",
    "ldt.fixed_w",
    "ldt.stable_slope",
    "ldt_s.p_steps",
    "ldt_s.a_steps",
    "ldt_s.repeat_batch",
    "offload.host_bytes",
    "offload.threads",
    "eval.batch_size",
    "snapshots.at_steps",
    "seed.x",
    "train",
    "train.",
    ".steps",
    "a..b",
    "",
    "optim.betas.0",
];

fn pick<'a>(r: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[r.below(xs.len())]
}

/// Cuts `s` at a char boundary at or below `i`.
fn floor(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One random edit of `s`.
fn mutate_once(r: &mut Rng, s: &str) -> String {
    let n = s.len();
    let at = floor(s, r.below(n + 1));
    let to = floor(s, at + r.below(24));
    let to = to.max(at);
    let lines: Vec<&str> = s.lines().collect();
    match r.below(9) {
        // Truncation.
        0 => s[..at].to_string(),
        // Delete a span.
        1 => format!("{}{}", &s[..at], &s[to..]),
        // Insert a token.
        2 => format!("{}{}{}", &s[..at], pick(r, TOKENS), &s[at..]),
        // Replace a span by a token.
        3 => format!("{}{}{}", &s[..at], pick(r, TOKENS), &s[to..]),
        // Flip one byte (kept only if it stays UTF-8).
        4 => {
            let mut b = s.as_bytes().to_vec();
            if !b.is_empty() {
                let i = r.below(b.len());
                b[i] ^= 1 << r.below(8);
            }
            String::from_utf8(b).unwrap_or_else(|_| s.to_string())
        }
        // Delete a line (a key or a section header).
        5 if !lines.is_empty() => {
            let k = r.below(lines.len());
            lines
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != k)
                .map(|(_, l)| *l)
                .collect::<Vec<_>>()
                .join("\n")
        }
        // Duplicate a line (repeated keys / sections).
        6 if !lines.is_empty() => {
            let k = r.below(lines.len());
            let mut v = lines.clone();
            v.insert(r.below(lines.len() + 1), lines[k]);
            v.join("\n")
        }
        // Type swap: the value after the next `=` or `:` becomes another type's value.
        7 => match s[at..].find(['=', ':']) {
            Some(off) => {
                let v0 = at + off + 1;
                let end = s[v0..].find(['\n', ',']).map(|e| v0 + e).unwrap_or(n);
                format!("{} {}{}", &s[..v0], pick(r, TOKENS), &s[end..])
            }
            None => s.to_string(),
        },
        // Swap two lines (keys move between sections).
        _ if lines.len() >= 2 => {
            let (a, b) = (r.below(lines.len()), r.below(lines.len()));
            let mut v = lines.clone();
            v.swap(a, b);
            v.join("\n")
        }
        _ => s.to_string(),
    }
}

/// One to four stacked edits.
fn mutate(r: &mut Rng, s: &str) -> String {
    let mut t = s.to_string();
    for _ in 0..1 + r.below(4) {
        t = mutate_once(r, &t);
    }
    t
}

fn config_seeds() -> Vec<String> {
    let mut v: Vec<String> = ["reference", "quickstart", "ldt-replay"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{n}.toml")),
            )
            .unwrap()
        })
        .collect();
    v.push(String::new());
    v.push("[train]\nmethod = \"ldt-s\"\nsteps = 10\n[ldt_s]\np_steps = 5\na_steps = 5\nrepeat_batch = true\n".into());
    v
}

/// Runs one config case; returns whether it validated.
fn config_case(text: &str, overrides: &[String]) -> bool {
    let r = catch_unwind(AssertUnwindSafe(|| {
        Config::from_toml(text, "fuzz.toml", overrides)
    }));
    let r = r.unwrap_or_else(|_| {
        panic!("Config::from_toml panicked on\n---\n{text}\n--- overrides: {overrides:?}")
    });
    match r {
        Ok(cfg) => {
            let again = catch_unwind(AssertUnwindSafe(|| cfg.to_toml()))
                .unwrap_or_else(|_| panic!("to_toml panicked for\n{text}\n{overrides:?}"));
            if let Err(e) = Config::from_toml(&again, "round-trip", &[]) {
                panic!("a valid config does not reload from its TOML: {e:#}\n---\n{again}");
            }
            true
        }
        Err(e) => {
            let m = format!("{e:#}");
            assert!(
                m.contains("fuzz.toml") || m.contains("--set"),
                "an error that names neither the file nor the --set: {m}\n---\n{text}\n{overrides:?}"
            );
            false
        }
    }
}

#[test]
fn config_parser_survives_mutations() {
    let seeds = config_seeds();
    let mut r = Rng::new(20_260_701, 1);
    let (mut cases, mut valid) = (0, 0);
    for _ in 0..4000 {
        let k = r.below(seeds.len());
        let text = mutate(&mut r, &seeds[k]);
        valid += config_case(&text, &[]) as usize;
        cases += 1;
    }
    // Overrides: random keys with random values (and broken specs) over valid files.
    for _ in 0..3000 {
        let text = &seeds[r.below(seeds.len())];
        let ov: Vec<String> = (0..1 + r.below(3))
            .map(|_| match r.below(6) {
                0 => pick(&mut r, KEYS).to_string(),
                1 => format!("{}{}", pick(&mut r, KEYS), pick(&mut r, TOKENS)),
                _ => format!("{}={}", pick(&mut r, KEYS), pick(&mut r, TOKENS)),
            })
            .collect();
        valid += config_case(text, &ov) as usize;
        cases += 1;
    }
    eprintln!("config: {cases} cases, {valid} valid");
    // The mutations reach both sides of the parser.
    assert!(
        valid > 100 && valid < cases - 1000,
        "{valid} of {cases} valid"
    );
}

#[test]
fn manifest_parser_survives_mutations() {
    let seed = std::fs::read_to_string(bundled_data().join("manifest.json")).unwrap();
    // A minimal valid manifest too, so that mutations hit the checks, not only the JSON.
    let small = r#"{"format": "dg-benchmark/v1", "name": "t", "num_classes": 2,
 "image_shape": [1, 2, 2],
 "domains": [
  {"name": "a", "role": "source", "splits": {"train": {"file": "a.st", "n": 3}, "test": {"file": "at.st", "n": 1}}},
  {"name": "b", "role": "target", "splits": {"train": {"file": "b.st", "n": 3}, "test": {"file": "bt.st", "n": 1}}}
 ]}"#;
    let seeds = [seed.as_str(), small];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("manifest.json");
    let mut r = Rng::new(20_260_701, 2);
    let (mut cases, mut valid) = (0, 0);
    for _ in 0..3000 {
        let k = r.below(2);
        let text = mutate(&mut r, seeds[k]);
        std::fs::write(&p, &text).unwrap();
        let res = catch_unwind(AssertUnwindSafe(|| Manifest::load(&p)))
            .unwrap_or_else(|_| panic!("Manifest::load panicked on\n{text}"));
        cases += 1;
        match res {
            Ok(m) => {
                valid += 1;
                assert_eq!(m.format, "dg-benchmark/v1");
                assert!(m.num_classes >= 2 && !m.image_shape.contains(&0));
                assert!(m.sources().next().is_some(), "no source:\n{text}");
                assert!(m
                    .domains
                    .iter()
                    .all(|d| d.splits.train.n > 0 && d.splits.test.n > 0));
                let mut names: Vec<&str> = m.domains.iter().map(|d| d.name.as_str()).collect();
                names.sort_unstable();
                names.dedup();
                assert_eq!(names.len(), m.domains.len(), "duplicate names:\n{text}");
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(
                    msg.contains(&p.display().to_string()),
                    "an error that does not name the manifest: {msg}"
                );
            }
        }
    }
    eprintln!("manifest: {cases} cases, {valid} valid");
    assert!(
        valid > 50 && valid < cases - 500,
        "{valid} of {cases} valid"
    );
}

/// Random damage to a bit: a flipped bit, a truncation, a zeroed span or a header byte.
fn damage(r: &mut Rng, b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    let n = v.len();
    match r.below(4) {
        0 => {
            let i = r.below(n);
            v[i] ^= 1 << r.below(8);
        }
        1 => v.truncate(r.below(n)),
        2 => {
            let i = r.below(n);
            let e = (i + 1 + r.below(64)).min(n);
            v[i..e].fill(0);
        }
        // Inside the 8-byte length or the JSON header, where the shapes and offsets are.
        _ => {
            let header = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let i = r.below(header.min(n));
            v[i] = pick(r, &["0", "9", "{", "\"", ",", " ", "]"]).as_bytes()[0];
        }
    }
    v
}

/// Checkpoints and weights files with random damage: the readers never panic, never
/// return values other than those written, and name the file or checkpoint they refuse.
#[test]
fn damaged_checkpoints_and_weights_are_never_trusted() {
    use candle_core::{DType, Device, Tensor};
    use ldt::checkpoint::{self, Writer};
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let mut w = Writer::default();
    let a = Tensor::arange(0f32, 24.0, &Device::Cpu)
        .unwrap()
        .reshape((4, 6))
        .unwrap();
    let b = (Tensor::arange(0f32, 5.0, &Device::Cpu).unwrap() * 0.1)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let c = Tensor::new(&[7i64, -3], &Device::Cpu).unwrap();
    w.tensor("live/a", &a);
    w.tensor("opt/0/m", &b);
    w.tensor("counters", &c);
    w.meta("batches", serde_json::json!(96));
    w.meta("lr", serde_json::json!(0.1 + 0.2));
    let mut common = serde_json::Map::new();
    common.insert("method".into(), serde_json::json!("ldt-s"));
    let ck_dir = checkpoint::save(run, checkpoint::Kind::Train, 5, common, w, 2).unwrap();
    let (state_path, meta_path) = (ck_dir.join("state.safetensors"), ck_dir.join("meta.json"));
    let (state, meta) = (
        std::fs::read(&state_path).unwrap(),
        std::fs::read_to_string(&meta_path).unwrap(),
    );
    let good = checkpoint::latest(run, &Device::Cpu).unwrap().unwrap();
    let bits = |t: &Tensor| -> Vec<u8> {
        let v = t
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    };
    let same = |ck: &checkpoint::Checkpoint| {
        ck.meta == good.meta
            && ck.tensors.len() == good.tensors.len()
            && good.tensors.iter().all(|(k, t)| {
                ck.tensors.get(k).is_some_and(|u| {
                    u.dtype() == t.dtype() && u.dims() == t.dims() && bits(u) == bits(t)
                })
            })
    };
    let mut r = Rng::new(20_261_206, 3);
    let (mut cases, mut refused) = (0, 0);
    for _ in 0..1500 {
        let on_state = r.below(2) == 0;
        let (s, m) = match on_state {
            true => (damage(&mut r, &state), meta.clone()),
            false => (state.clone(), mutate(&mut r, &meta)),
        };
        std::fs::write(&state_path, &s).unwrap();
        std::fs::write(&meta_path, &m).unwrap();
        let res = catch_unwind(AssertUnwindSafe(|| checkpoint::latest(run, &Device::Cpu)))
            .unwrap_or_else(|_| panic!("checkpoint::latest panicked (state damaged: {on_state})"));
        cases += 1;
        match res {
            Ok(Some(ck)) => assert!(
                same(&ck),
                "a damaged checkpoint was read as other values (state damaged: {on_state}):\n{m}"
            ),
            Ok(None) => panic!("the checkpoint vanished"),
            Err(e) => {
                refused += 1;
                let msg = format!("{e:#}");
                assert!(
                    msg.contains("step-5"),
                    "an error that does not name the checkpoint: {msg}"
                );
            }
        }
    }
    eprintln!("checkpoint: {cases} damaged copies, {refused} refused, the rest read identical");
    assert!(refused > cases * 3 / 4, "{refused} of {cases} refused");

    // A weights file, as `model.init` and `ldt eval` read it.
    let wpath = run.join("w.safetensors");
    ldt::model::io::save_tensors(&[("x".into(), a.clone()), ("y".into(), b.clone())], &wpath)
        .unwrap();
    let wbytes = std::fs::read(&wpath).unwrap();
    let (mut refused, mut cases) = (0, 0);
    for _ in 0..1500 {
        std::fs::write(&wpath, damage(&mut r, &wbytes)).unwrap();
        let res = catch_unwind(AssertUnwindSafe(|| {
            ldt::model::io::read_safetensors(&wpath, &Device::Cpu)
        }))
        .unwrap_or_else(|_| panic!("read_safetensors panicked"));
        cases += 1;
        match res {
            Ok(map) => assert!(
                map.len() == 2 && bits(&map["x"]) == bits(&a) && bits(&map["y"]) == bits(&b),
                "a damaged weights file was read as other values"
            ),
            Err(e) => {
                refused += 1;
                let msg = format!("{e:#}");
                assert!(
                    msg.contains("w.safetensors"),
                    "an error that does not name the file: {msg}"
                );
            }
        }
    }
    eprintln!("weights: {cases} damaged copies, {refused} refused, the rest read identical");
    assert!(refused > cases * 3 / 4, "{refused} of {cases} refused");
}

/// Inputs the fuzzers found or that sit on an edge, kept as fixed cases.
#[test]
fn parser_edge_cases() {
    // A huge image shape whose element count overflows.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("manifest.json");
    let big = r#"{"format": "dg-benchmark/v1", "name": "t", "num_classes": 2,
 "image_shape": [4294967296, 4294967296, 2],
 "domains": [{"name": "a", "role": "source", "splits": {"train": {"file": "a", "n": 1}, "test": {"file": "b", "n": 1}}}]}"#;
    std::fs::write(&p, big).unwrap();
    let e = format!("{:#}", Manifest::load(&p).unwrap_err());
    assert!(e.contains("image_shape") && e.contains("too large"), "{e}");
    // Overrides that break the merged table name the --set, not a line of merged text.
    let e = format!(
        "{:#}",
        Config::from_toml(
            "",
            "fuzz.toml",
            &["train.steps=2".into(), "train.steps=-1".into()]
        )
        .unwrap_err()
    );
    assert!(
        e.contains("--set `train.steps=-1`") && !e.contains("line"),
        "{e}"
    );
    for spec in ["=1", "a..b=1", ".=1", "train.=1", "train"] {
        let e = Config::from_toml("", "fuzz.toml", &[spec.into()]).unwrap_err();
        assert!(format!("{e:#}").contains("--set"), "{spec}: {e:#}");
    }
}
