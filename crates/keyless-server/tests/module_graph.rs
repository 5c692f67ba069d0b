//! The server's modules import downward only: no module imports one that imports it back,
//! neither file by file nor between the top-level modules (the contexts `arm`, `sts`, `kv`,
//! `host`, … and the leaves they share). Read from the sources: every `crate::…`, `super::…`
//! and `self::…` path outside comments and `#[cfg(test)]` modules is an import of the deepest
//! module file it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module file under `src` by its path (`arm/mod.rs` → `["arm"]`), lib.rs excluded.
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            if p.extension().and_then(|x| x.to_str()) != Some("rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let m: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .filter(|c| c != "mod")
                .collect();
            if m == ["lib"] {
                continue;
            }
            out.insert(m, std::fs::read_to_string(&p).unwrap());
        }
    }
    out
}

/// The source without comments and without its `#[cfg(test)]` module (always last).
fn code(src: &str) -> String {
    let src = match src.find("#[cfg(test)]") {
        Some(i) => {
            let item = src[i..].trim_start_matches("#[cfg(test)]").trim_start();
            assert!(
                item.starts_with("mod ") || item.starts_with("pub(crate) mod "),
                "a #[cfg(test)] item that is not the test module: {}",
                &item[..item.len().min(60)]
            );
            &src[..i]
        }
        None => src,
    };
    let mut out = String::with_capacity(src.len());
    let (b, mut i) = (src.as_bytes(), 0);
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = src[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            i = end;
        } else if b[i] == b'"' {
            // a string literal: skipped (paths in messages are no imports)
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The module files `m` imports.
fn imports(m: &Module, src: &str, all: &BTreeMap<Module, String>) -> BTreeSet<Module> {
    let resolve = |parts: &[String]| -> Option<Module> {
        (1..=parts.len())
            .rev()
            .map(|k| parts[..k].to_vec())
            .find(|p| all.contains_key(p))
    };
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = BTreeSet::new();
    let text = code(src);
    let mut rest = text.as_str();
    while let Some(i) = ["crate::", "super::", "self::"]
        .iter()
        .filter_map(|k| rest.find(k))
        .min()
    {
        // the whole path, `a::b::{c, d::e}` groups expanded one level
        let before_ok = i == 0 || !rest[..i].ends_with(ident);
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(ident(c) || c == ':'))
            .unwrap_or(tail.len());
        let path = &tail[..end];
        rest = &tail[end..];
        if !before_ok {
            continue;
        }
        let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let mut base: Module = match segs.first() {
            Some(&"crate") => vec![],
            _ => m.clone(),
        };
        if matches!(segs.first(), Some(&"self") | Some(&"crate")) {
            segs.remove(0);
        } else {
            while segs.first() == Some(&"super") {
                segs.remove(0);
                base.pop();
            }
        }
        let prefix: Module = base
            .into_iter()
            .chain(segs.iter().map(|s| s.to_string()))
            .collect();
        // `a::{b, c::d as e, self}` imports a::b, a::c::d and a itself, not a for the braces
        let mut targets = vec![];
        match rest.strip_prefix('{') {
            Some(group) => {
                let close = group.find('}').unwrap_or(group.len());
                for item in group[..close].split(',') {
                    let item = item.split(" as ").next().unwrap_or("");
                    let item: Vec<String> = item
                        .trim()
                        .split("::")
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty() && s != "self")
                        .collect();
                    targets.push(prefix.iter().cloned().chain(item).collect());
                }
            }
            None => targets.push(prefix),
        }
        for t in targets {
            if let Some(r) = resolve(&t) {
                if &r != m {
                    out.insert(r);
                }
            }
        }
    }
    out
}

/// The cycles of `g` (strongly connected components of more than one node).
fn cycles<N: Ord + Clone>(g: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    // reachability by repeated search: the graphs are small
    let reach = |from: &N| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for d in g.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<N, BTreeSet<N>> = g.keys().map(|n| (n.clone(), reach(n))).collect();
    let mut out: Vec<Vec<N>> = vec![];
    for n in g.keys() {
        if !reaches[n].contains(n) || out.iter().any(|c| c.contains(n)) {
            continue;
        }
        out.push(
            g.keys()
                .filter(|o| reaches[n].contains(*o) && reaches[*o].contains(n))
                .cloned()
                .collect(),
        );
    }
    out
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let all = modules(&src);
    all.iter()
        .map(|(m, s)| (m.clone(), imports(m, s, &all)))
        .collect()
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    assert!(g.len() > 20, "the sources were not found: {g:?}");
    let files = cycles(&g);
    assert!(
        files.is_empty(),
        "module files in an import cycle: {files:?}"
    );
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in &g {
        let e = top.entry(m[0].clone()).or_default();
        e.extend(deps.iter().map(|d| d[0].clone()).filter(|d| d != &m[0]));
    }
    let tops = cycles(&top);
    assert!(
        tops.is_empty(),
        "top-level modules in an import cycle: {tops:?}"
    );
    // the leaves import no context
    for leaf in [
        "authz", "caches", "clock", "error", "keys", "request", "state", "tokens", "util",
    ] {
        for ctx in ["arm", "sts", "kv", "host", "graph", "ops", "cloud"] {
            assert!(
                !top.get(leaf).is_some_and(|d| d.contains(ctx)),
                "the leaf `{leaf}` imports the context `{ctx}`"
            );
        }
    }
}

#[test]
fn the_checker_sees_a_cycle() {
    let m = |s: &str| vec![s.to_string()];
    let all: BTreeMap<Module, String> = [
        (m("a"), "use crate::b::{x, y};".to_string()),
        (m("b"), "fn f() { super::a::g() } // crate::c".to_string()),
        (m("c"), "\"crate::a\"".to_string()),
    ]
    .into();
    let g: BTreeMap<Module, BTreeSet<Module>> = all
        .iter()
        .map(|(k, s)| (k.clone(), imports(k, s, &all)))
        .collect();
    assert_eq!(g[&m("a")], [m("b")].into());
    // a group names its items, not the module before the braces
    let nested: BTreeMap<Module, String> = [
        (m("p"), String::new()),
        (vec!["p".into(), "x".into()], String::new()),
        (vec!["p".into(), "y".into()], String::new()),
        (m("q"), "use crate::p::{x, y as z};".to_string()),
    ]
    .into();
    assert_eq!(
        imports(&m("q"), &nested[&m("q")], &nested),
        [
            vec!["p".to_string(), "x".to_string()],
            vec!["p".to_string(), "y".to_string()]
        ]
        .into()
    );
    // `super::` from a top-level module names the crate root: resolved like `crate::`
    assert_eq!(g[&m("b")], [m("a")].into());
    assert!(g[&m("c")].is_empty(), "comments and strings are no imports");
    assert_eq!(cycles(&g), vec![vec![m("a"), m("b")]]);
}
