//! The top-level modules of the broker, mayfly-core and mayfly-policy form
//! no cycle: each names (`crate::x`) only modules that do not name it
//! back, directly or through others, so each can be read, and split off,
//! after what it uses.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level module a source file belongs to (`service/tasks.rs` →
/// `service`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Every top-level module `text` names as `crate::x` or in `crate::{x, …}`.
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let heads: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group
                .split('}')
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .collect(),
            None => vec![rest],
        };
        for head in heads {
            let name: String = head
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.insert(name);
            }
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first module cycle among the top-level modules of the crate whose
/// sources are in `src`, as a path, if there is one; and how many modules
/// name others.
fn cycle(src: &Path) -> (Option<String>, BTreeMap<String, BTreeSet<String>>) {
    let mut all = Vec::new();
    files(src, &mut all);
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &all {
        let module = module_of(src, file);
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let names = named(&text);
        let entry = uses.entry(module.clone()).or_default();
        entry.extend(names.into_iter().filter(|n| *n != module));
    }
    // Depth-first search for a path from a module back to itself.
    fn reaches(
        uses: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> bool {
        for next in uses.get(from).into_iter().flatten() {
            if next == to {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if reaches(uses, next, to, seen, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    for module in uses.keys() {
        let mut path = vec![module.clone()];
        if reaches(&uses, module, module, &mut BTreeSet::new(), &mut path) {
            return (Some(path.join(" -> ")), uses);
        }
    }
    (None, uses)
}

/// The sources of crate `name` of this workspace.
fn sources(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn the_broker_modules_form_no_cycle() {
    let (found, uses) = cycle(&sources("mayfly-broker"));
    assert!(uses.contains_key("service") && uses["service"].contains("store"));
    assert_eq!(found, None, "module cycle in mayfly-broker");
}

#[test]
fn the_core_and_policy_modules_form_no_cycle() {
    for name in ["mayfly-core", "mayfly-policy"] {
        let (found, uses) = cycle(&sources(name));
        assert!(!uses.is_empty(), "{name}: no module names another");
        assert_eq!(found, None, "module cycle in {name}");
    }
}

#[test]
fn a_cycle_is_found() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.rs"), "use crate::b::X;").unwrap();
    std::fs::write(dir.path().join("b.rs"), "use crate::c::Y;").unwrap();
    std::fs::write(dir.path().join("c.rs"), "use crate::a::Z;").unwrap();
    assert_eq!(cycle(dir.path()).0.as_deref(), Some("a -> b -> c -> a"));
}

#[test]
fn the_scan_sees_grouped_and_nested_names() {
    let names = named("use crate::{http, reaper};\nuse crate::store::redis::RedisStore;");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["http", "reaper", "store"]
    );
}
