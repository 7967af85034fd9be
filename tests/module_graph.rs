//! The shape of `src/`: dependencies between the top-level modules point one way (no
//! import cycle of any length), so do those between the files of each module directory
//! (`model/conv.rs` and `model/layers.rs`, `offload/backend.rs` and `offload/cuda.rs`
//! once imported each other), and `ldt/` — the pure LDT arithmetic: statistics,
//! partition, DPU, lag, composite — imports neither the training loops (`train`) nor
//! the counterpart machinery (`offload`). Read from the source text: every `crate::X`
//! (or `super::X`) path outside comments, including the members of `use crate::{X, Y::z}`
//! groups; a name that a directory's `mod.rs` re-exports counts as its file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The source text without `//` comments (doc links are not dependencies).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal (e.g. a URL) is rare in src/; the rest of
            // such a line is dropped too, which can only hide an edge, never invent one.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module names that `text` refers to through `crate::`.
fn crate_refs(text: &str) -> BTreeSet<String> {
    path_refs(text, "crate::")
}

/// The first segment of every path in `text` that starts with `prefix` (which ends in
/// `::`), the members of `prefix{a, b::c}` groups included.
fn path_refs(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c, d::{e, f}}`: the first identifier of each top-level item.
            let (mut depth, mut start) = (0usize, 0usize);
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..k].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..k].trim()));
                        start = k + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `module -> modules it imports` over the top-level modules of `src/` (`lib.rs` and
/// `main.rs`, the crate root and the CLI, are not modules).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let refs = crate_refs(&code(&std::fs::read_to_string(&f).unwrap()));
        let e = g.entry(module.clone()).or_default();
        e.extend(refs.into_iter().filter(|r| *r != module));
    }
    // Items of the crate root (`crate::device`, `crate::init_threads`) are not modules.
    let modules: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    g
}

/// One cycle of `g` as `a -> b -> ... -> a`, if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // 0 = unseen, 1 = on the stack, 2 = done.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        mark: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        mark.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            match mark.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == d).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(d.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(d, g, mark, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        mark.insert(n.to_string(), 2);
        None
    }
    let mut mark = BTreeMap::new();
    for n in g.keys() {
        if mark.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut mark, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let g = graph();
    assert!(g.len() >= 10, "read only {} modules of src/", g.len());
    if let Some(c) = find_cycle(&g) {
        panic!("import cycle between top-level modules: {}", c.join(" -> "));
    }
}

/// Per directory module of `src/`: `file -> sibling files it imports`, through
/// `super::file`, `crate::dir::file`, or a name the directory's `mod.rs` re-exports from
/// that file (`pub use file::{a, b}`).
fn file_graphs() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let dir = e.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().to_string();
        let siblings: BTreeSet<String> = files.iter().map(|f| stem(f)).collect();
        // Item -> file, from `pub use file::...;` in mod.rs.
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        if let Ok(m) = std::fs::read_to_string(dir.join("mod.rs")) {
            for stmt in code(&m).split(';') {
                let Some(u) = stmt.trim().strip_prefix("pub use ") else {
                    continue;
                };
                let Some((file, items)) = u.split_once("::") else {
                    continue;
                };
                let items = items.trim_start_matches('{').trim_end_matches('}');
                for item in items.split(',') {
                    let item = item.trim();
                    if !item.is_empty() {
                        owner.insert(item.to_string(), file.trim().to_string());
                    }
                }
            }
        }
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in &files {
            let me = stem(f);
            if me == "mod" {
                continue;
            }
            let text = code(&std::fs::read_to_string(f).unwrap());
            let mut refs = path_refs(&text, "super::");
            refs.extend(path_refs(&text, &format!("crate::{name}::")));
            let deps = g.entry(me.clone()).or_default();
            for r in refs {
                let target = owner.get(&r).cloned().unwrap_or(r);
                if target != me && target != "mod" && siblings.contains(&target) {
                    deps.insert(target);
                }
            }
        }
        out.insert(name, g);
    }
    out
}

#[test]
fn files_of_each_module_have_no_import_cycle() {
    let graphs = file_graphs();
    assert!(graphs["offload"].len() >= 8, "read {:?}", graphs["offload"]);
    for (dir, g) in &graphs {
        if let Some(c) = find_cycle(g) {
            panic!("import cycle inside src/{dir}/: {}", c.join(" -> "));
        }
    }
}

#[test]
fn ldt_is_pure() {
    let g = graph();
    let deps = &g["ldt"];
    for banned in ["train", "offload", "checkpoint", "dist", "metrics"] {
        assert!(
            !deps.contains(banned),
            "src/ldt imports `{banned}` ({deps:?}); it holds the pure LDT arithmetic, the loops and buffers use it"
        );
    }
}

#[test]
fn the_reader_sees_groups_and_cycles() {
    // The checks above can fail: a cycle and a grouped import are found.
    let refs = crate_refs(&code(
        "use crate::{a::b, c, d::{e, f}};\n// crate::g\nlet x = crate::h::i();",
    ));
    assert_eq!(
        path_refs("use super::{x, y::z};", "super::"),
        ["x", "y"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        refs,
        ["a", "c", "d", "h"].iter().map(|s| s.to_string()).collect()
    );
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
}
