//! The dependency rule of docs/ARCHITECTURE.md, checked: every module of the
//! server may import only modules of a lower layer (never one of its own
//! layer, never one above). Reads the `crate::` paths of every source file
//! under src/ (the binaries excluded) and fails naming each edge against
//! the rule, so a circle between modules cannot come back unnoticed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom to top. A module imports only from layers before its own.
const LAYERS: &[&[&str]] = &[
    &["clock", "id", "timer", "stats", "console", "ws", "http"],
    &["deadline", "admission", "config"],
    &["logging", "ingest", "store"],
    &["history", "error"],
    &["tls", "auth", "decrypt", "migrate"],
    &["revoke", "proto"],
    &["policy", "work", "route"],
    &["env"],
    &["session", "api"],
    &["conn"],
    &["shard"],
    &["accept"],
    &["server"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "bin") {
                continue; // the load generator's binary: not the server
            }
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/shard/run.rs` -> `shard`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// Code without `//` comments (doc comments mention modules freely).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module named after `crate::`, including inside `use crate::{a, b::c}`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while let Some(i) = code[at..].find("crate::") {
        let start = at + i + "crate::".len();
        at = start;
        if bytes.get(start) == Some(&b'{') {
            // A group: the first identifier of each item at depth 1.
            let mut depth = 0;
            let mut item_start = true;
            let mut j = start;
            while j < bytes.len() {
                let c = bytes[j];
                match c {
                    b'{' => {
                        depth += 1;
                        item_start = depth == 1;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => item_start = true,
                    c if item_start && depth == 1 && (c.is_ascii_alphabetic() || c == b'_') => {
                        let end = code[j..]
                            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                            .map_or(code.len(), |e| j + e);
                        found.insert(code[j..end].to_owned());
                        item_start = false;
                        j = end;
                        continue;
                    }
                    _ => {}
                }
                j += 1;
            }
        } else {
            let end = code[start..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .map_or(code.len(), |e| start + e);
            found.insert(code[start..end].to_owned());
        }
    }
    found
}

#[test]
fn modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut against = Vec::new();
    let mut unknown = BTreeSet::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "main" {
            continue; // the crate root and the CLI sit above everything
        }
        let Some(own) = layer_of(&module) else {
            unknown.insert(module);
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for imported in imports(&code(&text)) {
            if imported == module {
                continue; // inside the same module
            }
            match layer_of(&imported) {
                None => {
                    unknown.insert(imported);
                }
                Some(l) if l >= own => against.push(format!(
                    "{} ({module}, layer {own}) imports {imported} (layer {l})",
                    file.strip_prefix(&src).unwrap_or(file).display()
                )),
                Some(_) => {}
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS (add them where they belong, and to docs/ARCHITECTURE.md): {unknown:?}"
    );
    assert!(
        against.is_empty(),
        "imports against the layer rule (docs/ARCHITECTURE.md):\n{}",
        against.join("\n")
    );
}

#[test]
fn the_reader_sees_groups_and_paths() {
    let found = imports("use crate::{a::X, b, c::{d, e}};\nlet x = crate::f::g();");
    let names: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(names, ["a", "b", "c", "f"]);
}

#[test]
fn the_architecture_document_lists_every_layer() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md"))
            .expect("docs/ARCHITECTURE.md");
    for layer in LAYERS {
        for module in *layer {
            assert!(
                doc.contains(&format!("`{module}`")),
                "docs/ARCHITECTURE.md does not name module `{module}`"
            );
        }
    }
}
