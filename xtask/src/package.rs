//! `cargo xtask package [--verify]`: `cargo package` for every publishable
//! crate of the workspace (every `crates/*` whose manifest does not say
//! `publish = false`), together, so that they resolve each other before any
//! is on the registry. `ci` runs it without `--verify` (metadata, file
//! lists, dependency versions); `--verify` also builds each package from its
//! `.crate` archive.

use std::path::Path;

/// The publishable crates, by package name, in a stable order.
pub(crate) fn publishable(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("crates");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let manifest = entry
            .map_err(|e| format!("read {}: {e}", dir.display()))?
            .path()
            .join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        if text.lines().any(|l| l.trim() == "publish = false") {
            continue;
        }
        let name = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = "))
            .map(|v| v.trim_matches('"').to_string())
            .ok_or_else(|| format!("{}: no package name", manifest.display()))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Runs `cargo package` for every publishable crate.
pub(crate) fn run(args: &[String], root: &Path) -> Result<(), String> {
    let verify = match args {
        [] => false,
        [flag] if flag == "--verify" => true,
        _ => {
            return Err(format!(
                "package: unexpected arguments {args:?} (expected --verify)"
            ));
        }
    };
    let crates = publishable(root)?;
    // A check, not a release: a working tree with uncommitted changes is
    // packaged as it is.
    let mut cargo_args = vec!["package", "--locked", "--allow-dirty"];
    if !verify {
        cargo_args.push("--no-verify");
    }
    for name in &crates {
        cargo_args.extend(["-p", name.as_str()]);
    }
    eprintln!(
        "xtask: packaging {} crates: {}",
        crates.len(),
        crates.join(", ")
    );
    crate::cargo(&cargo_args)
}
