//! A program's `--json` prints one JSON object on stdout and nothing else; its logs go to
//! stderr. (The `tern` command line's `--json` is checked the same way in `runtime/tests/cli.rs`.)

use std::process::Command;

use serde_json::Value;

/// Every JSON value on `stdout`, and whether anything but whitespace is left after them.
fn values(stdout: &[u8]) -> (Vec<Value>, bool) {
    let mut it = serde_json::Deserializer::from_slice(stdout).into_iter::<Value>();
    let mut out = Vec::new();
    for v in it.by_ref() {
        match v {
            Ok(v) => out.push(v),
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

#[test]
fn tern_chaos_json_prints_one_object_on_stdout_and_its_logs_on_stderr() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-chaos"))
        .args(["--nodes", "2", "--migrations", "3", "--seed", "1", "--json"])
        // Logs at info: a node says it listens, a connection comes up.
        .env("RUST_LOG", "info")
        .output()
        .expect("tern-chaos runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (vals, rest) = values(&out.stdout);
    assert!(
        vals.len() == 1 && !rest,
        "stdout is not one JSON value: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report = &vals[0];
    assert!(report.is_object(), "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert!(
        stderr.contains("node listening"),
        "the logs went to stderr: {stderr}"
    );

    // A usage error says so on stderr and prints nothing on stdout.
    let bad = Command::new(env!("CARGO_BIN_EXE_tern-chaos"))
        .args(["--json", "--frobnicate"])
        .output()
        .expect("tern-chaos runs");
    assert!(!bad.status.success());
    assert!(
        bad.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown argument"));
}
