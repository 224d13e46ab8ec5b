//! The source layout keeps its promise (issue 17): the data path (`src/data/`) and shadowing
//! (`src/shadow/`) never reach into the control path (`src/control/`), so hot code can be read,
//! changed and benchmarked without the cold code it must not wait on.

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

/// Every line of `dir`'s Rust files that names the control module, tests included.
fn lines_naming_control(dir: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join(dir), &mut files);
    assert!(!files.is_empty(), "no Rust files under {dir}");
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains("crate::control") || code.contains("super::super::control") {
                let shown = file.strip_prefix(root).unwrap_or(&file).display();
                found.push(format!("{shown}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn the_data_path_and_shadowing_never_name_the_control_path() {
    let found: Vec<String> = ["src/data", "src/shadow"]
        .iter()
        .flat_map(|dir| lines_naming_control(dir))
        .collect();
    assert!(
        found.is_empty(),
        "hot code names the control path:\n{}",
        found.join("\n")
    );
}
