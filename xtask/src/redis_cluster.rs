//! A throwaway 3-master Redis Cluster on loopback for `cargo xtask test`.
//!
//! Three `redis-server --cluster-enabled yes` processes (children of xtask)
//! on the first free ports from 7000 up (each with its bus port + 10000 free),
//! data and logs under `target/xtask/redis-cluster-<pid>/`, no persistence,
//! joined by `redis-cli --cluster create … --cluster-replicas 0`. Dropping the
//! [`Cluster`] kills the nodes and removes the directory, also when the tests
//! fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many masters the throwaway cluster has.
const MASTERS: usize = 3;
/// The first port probed.
const FIRST_PORT: u16 = 7000;
/// The last port probed.
const LAST_PORT: u16 = 7999;

/// A running throwaway cluster; dropping it stops the nodes.
pub(crate) struct Cluster {
    dir: PathBuf,
    nodes: Vec<(u16, Child)>,
}

impl Cluster {
    /// Starts the cluster under `root/target/xtask/`, or says why it cannot.
    pub(crate) fn start(root: &Path) -> Result<Self, String> {
        for tool in ["redis-server", "redis-cli"] {
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("`{tool}` is not installed or not runnable ({e})"))?;
        }
        let base = root.join("target").join("xtask");
        remove_stale_dirs(&base, "redis-cluster-");
        let dir = base.join(format!("redis-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
        };
        let mut next = FIRST_PORT;
        while cluster.nodes.len() < MASTERS {
            let port = free_port(next)?;
            next = port + 1;
            let child = cluster.spawn(port)?;
            cluster.nodes.push((port, child));
        }
        let ports: Vec<u16> = cluster.nodes.iter().map(|(port, _)| *port).collect();
        for &port in &ports {
            cluster.wait_for("a node to answer PING", |c| {
                c.check_alive()?;
                Ok(cli(port, &["PING"]).is_some_and(|out| out.trim() == "PONG"))
            })?;
        }
        let addrs: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run redis-cli --cluster create: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        cluster.wait_for("cluster_state:ok on every node", |c| {
            c.check_alive()?;
            Ok(ports.iter().all(|&port| {
                cli(port, &["CLUSTER", "INFO"]).is_some_and(|info| {
                    info.lines().any(|l| l.trim() == "cluster_state:ok")
                        && info
                            .lines()
                            .any(|l| l.trim() == format!("cluster_known_nodes:{MASTERS}"))
                })
            }))
        })?;
        Ok(cluster)
    }

    /// The node URLs, comma-separated (the value of `IDEM_REDIS_CLUSTER_URLS`).
    pub(crate) fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|(port, _)| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, port: u16) -> Result<Child, String> {
        let log = self.dir.join(format!("redis-{port}.log"));
        Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(format!("nodes-{port}.conf"))
            .arg("--dir")
            .arg(&self.dir)
            .arg("--dbfilename")
            .arg(format!("dump-{port}.rdb"))
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server on port {port}: {e}"))
    }

    /// Fails if a node exited (a port taken in the meantime, a bad option).
    fn check_alive(&mut self) -> Result<(), String> {
        for (port, child) in &mut self.nodes {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join(format!("redis-{port}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                return Err(format!(
                    "redis-server on port {port} exited ({status}):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        Ok(())
    }

    /// Polls `ready` every 50 ms for up to 30 s.
    fn wait_for(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&mut Self) -> Result<bool, String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready(self)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            // Our own children, by handle; throwaway data, so no clean shutdown.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `redis-cli -p <port> <args>`; `None` if it fails.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The first port from `from` whose cluster bus port (+10000) is free too.
fn free_port(from: u16) -> Result<u16, String> {
    let bindable = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    (from..=LAST_PORT)
        .find(|&port| bindable(port) && bindable(port + 10_000))
        .ok_or_else(|| format!("no free port pair in {from}..={LAST_PORT} (and +10000)"))
}

/// Removes the directories `<prefix><pid>` of earlier runs whose xtask
/// process is gone.
pub(crate) fn remove_stale_dirs(base: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && Path::new("/proc/self").exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
