//! The source layout keeps its promise (issue 17): modules depend one way only,
//!
//! ```text
//! config, metrics, shutdown  ←  upstream  ←  shadow  ←  data  ←  control
//! ```
//!
//! so hot code (`src/data/`, `src/shadow/`, `src/upstream/`) can be read, changed and benchmarked
//! without the cold code it must not wait on, and no two of these modules form an import cycle.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every line of `dir`'s Rust files (tests included) whose code names one of `modules` as
/// `crate::<module>`, or reaches it by `super::super::<module>`.
fn lines_naming(dir: &str, modules: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join(dir), &mut files);
    assert!(!files.is_empty(), "no Rust files under {dir}");
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let names = |m: &&str| {
                code.contains(&format!("crate::{m}"))
                    || code.contains(&format!("super::super::{m}"))
            };
            if modules.iter().any(names) {
                let shown = file.strip_prefix(root).unwrap_or(&file).display();
                found.push(format!("{shown}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

fn assert_never_names(dir: &str, modules: &[&str]) {
    let found = lines_naming(dir, modules);
    assert!(
        found.is_empty(),
        "{dir} must not depend on {modules:?}:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_data_path_never_names_the_control_path() {
    assert_never_names("src/data", &["control"]);
}

#[test]
fn shadowing_depends_only_on_upstream_config_and_metrics() {
    assert_never_names("src/shadow", &["control", "data"]);
}

#[test]
fn upstream_depends_on_neither_path() {
    assert_never_names("src/upstream", &["control", "data", "shadow"]);
}

#[test]
fn the_checker_sees_a_dependency_where_there_is_one() {
    // The control path does use the data path; a checker that found nothing there would be blind.
    assert!(!lines_naming("src/control", &["data"]).is_empty());
}

/// The modules of `src/control/` each file (outside its tests) imports, by the module it
/// belongs to: `canary/step.rs` belongs to `canary`.
fn control_imports() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/control");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut graph = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for file in files {
        let relative = file.strip_prefix(&root).unwrap();
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let module = parts[0].clone();
        if module == "mod" {
            continue;
        }
        let sibling = if parts.len() == 1 {
            "super::"
        } else {
            "super::super::"
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let imports = graph.entry(module.clone()).or_default();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("");
            for prefix in ["crate::control::", sibling] {
                for (at, _) in line.match_indices(prefix) {
                    let rest = &line[at + prefix.len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    // `super::super::x` seen through the shorter prefix is not a sibling.
                    let deeper = prefix == "super::" && rest.starts_with("super::");
                    let is_module =
                        root.join(format!("{name}.rs")).exists() || root.join(&name).is_dir();
                    if !deeper && is_module && name != module {
                        imports.insert(name);
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn the_control_modules_form_no_import_cycle() {
    let graph = control_imports();
    assert!(
        graph.contains_key("writer") && graph["writer"].contains("state"),
        "{graph:?}"
    );
    // Depth-first search from every module; a module met again on the current path is a cycle.
    fn visit(
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        module: &str,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(graph, next, path) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    for module in graph.keys() {
        if let Some(cycle) = visit(&graph, module, &mut Vec::new()) {
            panic!("import cycle in src/control: {}", cycle.join(" → "));
        }
    }
}
