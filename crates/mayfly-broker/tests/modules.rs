//! The broker's top-level modules form no cycle: each names (`crate::x`)
//! only modules that do not name it back, directly or through others, so
//! each can be read, and split off, after what it uses.

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

#[test]
fn the_broker_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &all {
        let module = module_of(&src, file);
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
    assert!(uses.contains_key("service") && uses["service"].contains("store"));
    for module in uses.keys() {
        let mut path = vec![module.clone()];
        let cycle = reaches(&uses, module, module, &mut BTreeSet::new(), &mut path);
        assert!(!cycle, "module cycle: {}", path.join(" -> "));
    }
}

#[test]
fn the_scan_sees_grouped_and_nested_names() {
    let names = named("use crate::{http, reaper};\nuse crate::store::redis::RedisStore;");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["http", "reaper", "store"]
    );
}
