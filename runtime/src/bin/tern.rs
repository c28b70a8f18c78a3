//! The `tern` command line.
//!
//! ```text
//! tern ca init [--dir DIR]          create a cluster CA (ca.pem, ca.key) in DIR (default ./certs)
//! tern ca issue NAME [--dir DIR]    issue a node certificate (NAME.pem, NAME.key) from the CA in DIR
//! ```
//!
//! Keys are written readable by their owner only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tern::certs::{ClusterCa, NodeIdentity};

const USAGE: &str = "usage:
  tern ca init [--dir DIR]         create a cluster CA (ca.pem, ca.key) in DIR (default ./certs)
  tern ca issue NAME [--dir DIR]   issue a certificate for node NAME from the CA in DIR";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Splits `--dir DIR` out of `args`.
fn take_dir(args: &mut Vec<String>) -> Result<PathBuf> {
    match args.iter().position(|a| a == "--dir") {
        Some(i) => {
            if i + 1 >= args.len() {
                bail!("--dir needs a folder\n{USAGE}");
            }
            let dir = args.remove(i + 1);
            args.remove(i);
            Ok(PathBuf::from(dir))
        }
        None => Ok(PathBuf::from("certs")),
    }
}

fn run(mut args: Vec<String>) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") || args.is_empty() {
        println!("{USAGE}");
        return Ok(());
    }
    let dir = take_dir(&mut args)?;
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["ca", "init"] => {
            if dir.join("ca.key").exists() {
                bail!(
                    "{} already holds a CA key; remove it first or pick another --dir",
                    dir.display()
                );
            }
            let ca = ClusterCa::new()?;
            ca.write(&dir)?;
            println!(
                "cluster CA written to {} (ca.pem, ca.key owner-only)",
                dir.display()
            );
            Ok(())
        }
        ["ca", "issue", name] => {
            let ca = ClusterCa::load(&dir).with_context(|| {
                format!(
                    "no CA in {} (run `tern ca init --dir {}` first)",
                    dir.display(),
                    dir.display()
                )
            })?;
            let id = ca.issue(name)?;
            id.write(&dir)?;
            let (cert, key, _) = NodeIdentity::paths(&dir, name);
            println!(
                "certificate for node {name}: {} and {} (owner-only)",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        _ => bail!("unknown command {:?}\n{USAGE}", words.join(" ")),
    }
}
