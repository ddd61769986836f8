//! The module map stays acyclic: dependencies between the crate's top-level modules point one
//! way (STYLE.md, principle 11). Read from the sources: every `crate::<module>` a module names
//! outside its tests is an edge. A submodule that names nothing of the crate itself (a leaf,
//! such as `config::parse`) is a node of its own: depending on it can never close a cycle.
//! The crate's doc comment must also name every top-level module (the map is kept true).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `config/parse.rs` -> `config::parse`; `config/mod.rs` -> `config`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The code outside test modules (`#[cfg(test)]`, `#[cfg(all(test, ...))]`: they sit at the
/// end of each file here).
fn production_code(text: &str) -> &str {
    let end = ["#[cfg(test)]", "#[cfg(all(test"]
        .iter()
        .filter_map(|marker| text.find(marker))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

/// Every `crate::a::b...` path in the code, as its segments (`crate::{a, b::c}` is two).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let segments = |path: &str| -> Vec<String> {
        path.split("::")
            .map(|segment| {
                segment
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|segment| !segment.is_empty())
            .collect()
    };
    let mut paths = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let group = group.split('}').next().unwrap_or("");
                paths.extend(group.split(',').map(segments));
            }
            None => paths.push(segments(rest)),
        }
    }
    paths.retain(|path| !path.is_empty());
    paths
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let code: BTreeMap<String, String> = files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            (module_of(&src, file), production_code(&text).to_owned())
        })
        .collect();
    let leaves: BTreeSet<&String> = code
        .iter()
        .filter(|(module, text)| module.contains("::") && crate_paths(text).is_empty())
        .map(|(module, _)| module)
        .collect();
    // The node a module belongs to: its top-level module, or itself if it is a leaf.
    let node = |module: &str| -> String {
        if leaves.iter().any(|leaf| leaf.as_str() == module) {
            module.to_owned()
        } else {
            module.split("::").next().unwrap().to_owned()
        }
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &code {
        if module == "main" || module == "lib" {
            continue;
        }
        let from = node(module);
        for path in crate_paths(text) {
            // The longest prefix of the path that is a module (`config::parse::duration`).
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|candidate| code.contains_key(candidate))
                .unwrap_or_else(|| path[0].clone());
            let to = node(&target);
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        edges: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let here = path.last().unwrap().clone();
        for next in edges.get(&here).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(edges, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    walk(edges, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_cycle_between_top_level_modules() {
    let edges = graph();
    assert!(edges.len() > 10, "the graph was read: {edges:?}");
    let cycles: Vec<String> = edges
        .keys()
        .filter_map(|module| cycle_from(&edges, module))
        .map(|cycle| cycle.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_finder_sees_a_cycle_when_there_is_one() {
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    assert_eq!(cycle_from(&edges, "a"), None);
    edges.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycle_from(&edges, "a").map(|c| c.join(" -> ")),
        Some("a -> b -> c -> a".to_owned())
    );
}

#[test]
fn the_crate_doc_maps_every_top_level_module() {
    let lib = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|line| line.strip_prefix("pub mod "))
        .map(|rest| rest.trim_end_matches(';'))
        .collect();
    assert!(declared.len() > 10, "{declared:?}");
    for module in declared {
        assert!(
            lib.contains(&format!("[`{module}`]")),
            "src/lib.rs's layout section does not name `{module}`"
        );
    }
}
