//! The shipped configs parse, `configs/reference.toml` states exactly the defaults, and
//! paths in a config resolve against the config file (those given with `--set` against
//! the working directory), so a run's saved `config.toml` works from any directory.

mod common;
use ldt::config::Config;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn reference_config_equals_the_defaults() {
    let path = common::root().join("configs/reference.toml");
    let c = Config::load(&path, &[]).unwrap();
    // The file names the bundled data relative to itself; the default names it relative
    // to the working directory: the same file from the repository root.
    let mut d = Config::default();
    d.data.manifest = canonical(&common::root()).join(&d.data.manifest);
    assert_eq!(c.to_toml(), d.to_toml());
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

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Compares each path field of a loaded config with where it must point: written in the
/// file, against the file's directory (`..` and `.` taken off); given with `--set` (also
/// one replacing the file's value), against the working directory. Before, every path
/// stayed as written (relative, so against the working directory). Then the saved TOML,
/// loaded from another directory, gives the same config.
#[test]
fn paths_resolve_against_the_config_file_and_set_paths_against_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = canonical(tmp.path());
    std::fs::create_dir_all(t.join("conf/sub")).unwrap();
    let file = t.join("conf/sub/run.toml");
    std::fs::write(
        &file,
        "[model]\ninit = \"w/init.safetensors\"\n[data]\nmanifest = \"../../data/manifest.json\"\n\
         [stage1]\npartition = \"./p.json\"\n[offload]\npath = \"spill.bin\"\n",
    )
    .unwrap();
    let set = [
        "data.schedule=\"rel/batches.safetensors\"".to_string(),
        "offload.path=\"o/spill.bin\"".to_string(),
    ];
    let c = Config::load(&file, &set).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(
        c.model.init.as_deref(),
        Some(t.join("conf/sub/w/init.safetensors").as_path())
    );
    assert_eq!(c.data.manifest, t.join("data/manifest.json"));
    assert_eq!(
        c.stage1.partition.as_deref(),
        Some(t.join("conf/sub/p.json").as_path())
    );
    assert_eq!(
        c.data.schedule.as_deref(),
        Some(cwd.join("rel/batches.safetensors").as_path())
    );
    assert_eq!(
        c.offload.path.as_deref(),
        Some(cwd.join("o/spill.bin").as_path())
    );
    // Saved and loaded from elsewhere: the same paths.
    std::fs::create_dir_all(t.join("elsewhere")).unwrap();
    let saved = t.join("elsewhere/config.toml");
    std::fs::write(&saved, c.to_toml()).unwrap();
    assert_eq!(Config::load(&saved, &[]).unwrap().to_toml(), c.to_toml());
    // No config file: against the working directory.
    let m = Config::from_toml("[data]\nmanifest = \"x/m.json\"\n", "t", &[]).unwrap();
    assert_eq!(m.data.manifest, cwd.join("x/m.json"));
}

/// Compares loading a config whose relative path exists only from the working directory
/// (where it used to resolve, silently) with an error that names the key, the file and
/// the path to write instead. Before, the config loaded.
#[test]
fn a_path_found_only_from_the_working_directory_is_an_error_naming_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let file = canonical(tmp.path()).join("run.toml");
    // Any entry of the working directory: it exists there, not beside the config.
    let name = std::fs::read_dir(".")
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .find(|n| n != "run.toml")
        .expect("a non-empty working directory");
    let name = name.to_str().unwrap();
    std::fs::write(&file, format!("[data]\nmanifest = {name:?}\n")).unwrap();
    let e = format!("{:#}", Config::load(&file, &[]).unwrap_err());
    let fix = pathdiff(
        &std::env::current_dir().unwrap().join(name),
        file.parent().unwrap(),
    );
    for needle in [
        "`data.manifest`",
        &file.display().to_string(),
        "relative to the config file",
        &format!("`{}`", fix.display()),
    ] {
        assert!(e.contains(needle), "no `{needle}` in: {e}");
    }
    // The same path given with --set is the user's shell's: fine.
    let set = format!("data.manifest={name:?}");
    std::fs::write(&file, "").unwrap();
    Config::load(&file, &[set]).unwrap();
}

/// `target` relative to `base` (both canonical).
fn pathdiff(target: &Path, base: &Path) -> PathBuf {
    let (t, b): (Vec<_>, Vec<_>) = (target.components().collect(), base.components().collect());
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out: PathBuf = b[common..].iter().map(|_| "..").collect();
    out.extend(&t[common..]);
    out
}

/// Compares `ldt train` of the bundled quickstart config run from a directory that is
/// not the repository root, then of the run's saved `config.toml` from a third
/// directory: both succeed and the second run saves the same config, whose manifest is
/// the bundled one's absolute path. Before, the first run failed (the manifest was looked
/// up in the working directory).
#[test]
fn a_saved_config_runs_from_any_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = canonical(tmp.path());
    for d in ["a", "b"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    let train = |config: &Path, cwd: &str, out: &str, set: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_ldt"))
            .current_dir(t.join(cwd))
            .arg("train")
            .arg(config)
            .args(set.iter().flat_map(|s| ["--set", s]))
            .arg("--out")
            .arg(t.join(out))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ldt train {} from {cwd}: {}",
            config.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::read_to_string(t.join(out).join("config.toml")).unwrap()
    };
    let tiny = [
        "threads=1",
        "train.steps=2",
        "stage1.warmup_steps=0",
        "stage1.stat_batches=2",
        "ldt_s.p_steps=1",
        "ldt_s.a_steps=1",
    ];
    let quickstart = common::root().join("configs/quickstart.toml");
    let first = train(&quickstart, "a", "run1", &tiny);
    let second = train(&t.join("run1/config.toml"), "b", "run2", &[]);
    assert_eq!(first, second);
    let saved: Config = toml::from_str(&first).unwrap();
    assert_eq!(
        saved.data.manifest,
        canonical(&common::root().join("data/rotmnist5k/manifest.json"))
    );
}
