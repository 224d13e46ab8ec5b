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
                code.contains(&format!("crate::{m}")) || code.contains(&format!("super::super::{m}"))
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
