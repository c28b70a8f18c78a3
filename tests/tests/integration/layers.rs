//! The dependency rules of docs/ARCHITECTURE.md ("Layers"), checked from the sources and from
//! Cargo's own view of the dependency graph. rust-analyzer's tidy tests are the model: the rules
//! are data here, and a change that breaks one fails with the file and the module it named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// Crates that do I/O, keep time, run tasks or hold the network: none may reach `tern-proto`,
/// directly or through another crate.
const PROTO_FORBIDDEN: &[&str] = &[
    "tokio",
    "actix",
    "actix-rt",
    "actix-web",
    "quinn",
    "quinn-proto",
    "quinn-udp",
    "rustls",
    "ring",
    "rcgen",
    "socket2",
    "mio",
    "futures",
    "futures-util",
    "async-trait",
    "tracing",
    "tern",
];

fn host_triple() -> String {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    let text = String::from_utf8(out.stdout).expect("rustc prints UTF-8");
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// `tern-proto`'s normal (non-dev, non-build) dependencies, transitively, as Cargo resolves them
/// for this machine.
fn proto_dependency_closure() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host_triple()])
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id").to_string(),
                p["name"].as_str().expect("name").to_string(),
            )
        })
        .collect();
    let nodes: BTreeMap<String, Vec<String>> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| {
            let normal = n["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .expect("dep_kinds")
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().expect("pkg").to_string())
                .collect();
            (n["id"].as_str().expect("id").to_string(), normal)
        })
        .collect();
    let root = packages
        .iter()
        .find(|(_, name)| name.as_str() == "tern-proto")
        .map(|(id, _)| id.clone())
        .expect("tern-proto is a workspace member");
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for dep in nodes.get(&id).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    seen.into_iter().map(|id| packages[&id].clone()).collect()
}

#[test]
fn tern_proto_has_no_async_network_or_actor_dependency() {
    let closure = proto_dependency_closure();
    for needed in ["serde", "rmp-serde", "thiserror"] {
        assert!(
            closure.contains(needed),
            "the check reads the graph: {needed} should be there"
        );
    }
    let bad: Vec<&str> = PROTO_FORBIDDEN
        .iter()
        .copied()
        .filter(|c| closure.contains(*c))
        .collect();
    assert!(
        bad.is_empty(),
        "tern-proto must stay sans-IO, but depends on {bad:?} (all: {closure:?})"
    );
}

/// The layers of `tern` (runtime/src), lowest first; a module may name modules of its own layer
/// or below. Written in docs/ARCHITECTURE.md.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "error", "stats", "certs", "tls", "trust", "sync", "events", "books", "limits",
            "reports", "tracked", "trace",
        ],
    ),
    ("net", &["transport"]),
    (
        "node",
        &[
            "mailbox", "registry", "handle", "service", "node", "members", "migrate", "tree",
            "inbound", "placing", "senders", "names", "replicas", "store", "replies", "precopy",
        ],
    ),
    (
        "features",
        &[
            "placement",
            "admin",
            "host",
            "pairing",
            "runner",
            "metrics",
            "discovery",
            "doc_support",
        ],
    ),
    ("api", &["lib"]),
];

/// Upward references that exist today and are to be removed (docs/ARCHITECTURE.md, "Layers").
/// The test fails when a new one appears, and also when one listed here is gone, so that this
/// list and the page stay true. None is left.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// Every `crate::<module>` a file names outside its unit tests.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = BTreeSet::new();
    assert!(
        !code.contains("crate::{"),
        "name modules one by one (`crate::a::X`), not as `crate::{{a, b}}`: the check reads each"
    );
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `tern_proto::`, `my_crate::`, ...
        }
        let name: String = code[i + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn runtime_modules_depend_downwards_only() {
    let src = workspace_root().join("runtime/src");
    let mut upward = BTreeSet::new();
    let mut unplaced = Vec::new();
    for entry in std::fs::read_dir(&src).expect("runtime/src") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let module = path.file_stem().and_then(|s| s.to_str()).expect("name");
        let Some(own) = layer_of(module) else {
            unplaced.push(module.to_string());
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("readable");
        for used in crate_refs(&text) {
            match layer_of(&used) {
                Some(l) if l > own => {
                    upward.insert((module.to_string(), used));
                }
                Some(_) => {}
                // `crate::Error`-style re-exports from lib.rs name no module.
                None if used.chars().next().is_some_and(|c| c.is_lowercase()) => {
                    unplaced.push(format!("{module} names crate::{used}"));
                }
                None => {}
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "every module of runtime/src needs a layer in this test and in ARCHITECTURE.md: {unplaced:?}"
    );
    let known: BTreeSet<(String, String)> = KNOWN_UPWARD
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = upward.difference(&known).collect();
    assert!(
        new.is_empty(),
        "modules that name a module of a higher layer (docs/ARCHITECTURE.md): {new:?}"
    );
    let gone: Vec<_> = known.difference(&upward).collect();
    assert!(
        gone.is_empty(),
        "these upward references are gone: remove them from KNOWN_UPWARD and ARCHITECTURE.md: {gone:?}"
    );
}

#[test]
fn tern_proto_sources_name_no_runtime_crate() {
    let src = workspace_root().join("proto/src");
    for entry in std::fs::read_dir(&src).expect("proto/src") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        for line in text.lines() {
            let l = line.trim_start();
            if l.starts_with("//") {
                continue;
            }
            for bad in [
                "tern::",
                "tokio::",
                "actix",
                "quinn::",
                "rustls::",
                "std::time::Instant",
                "std::thread",
                "std::net::UdpSocket",
                "std::fs",
            ] {
                assert!(
                    !l.contains(bad),
                    "{}: `{bad}` in tern-proto (no I/O, no clock, no threads): {line}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn the_checker_sees_references() {
    let refs = crate_refs("use crate::node::X;\nlet a = crate::tls::f();\nuse tern_proto::wire;\n#[cfg(test)]\nmod tests { use crate::admin; }");
    assert_eq!(
        refs,
        ["node", "tls"].into_iter().map(String::from).collect()
    );
}
