//! CPU time of this process and of local server processes (Linux `/proc`),
//! to tell where the time of an operation goes: client or server.

/// Nanoseconds of CPU time used so far by every thread of process `pid`
/// (`self`: this process).
pub(crate) fn process_ns(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        total += read_schedstat(&task.path().join("schedstat")).unwrap_or(0);
    }
    Some(total)
}

/// The first field of a `schedstat` file: time spent on the CPU, in ns.
fn read_schedstat(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The name of process `pid` (`/proc/PID/comm`), if it runs on this machine.
pub(crate) fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// A reading of the client's and the servers' CPU time.
#[derive(Clone, Debug)]
pub(crate) struct Reading {
    client: Option<u64>,
    servers: Vec<(u32, u64)>,
}

impl Reading {
    /// Reads now; `pids` are the local server processes to follow.
    pub(crate) fn now(pids: &[u32]) -> Self {
        Self {
            client: process_ns("self"),
            servers: pids
                .iter()
                .filter_map(|&p| process_ns(&p.to_string()).map(|ns| (p, ns)))
                .collect(),
        }
    }

    /// CPU µs per operation of the client and of the servers between `self`
    /// and `later`, over `ops` operations. A server process that appeared
    /// in between counts from zero.
    pub(crate) fn per_op(&self, later: &Self, ops: u64) -> (Option<f64>, Option<f64>) {
        if ops == 0 {
            return (None, None);
        }
        let client = match (self.client, later.client) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1_000.0 / ops as f64),
            _ => None,
        };
        let server = if later.servers.is_empty() {
            None
        } else {
            let used: u64 = later
                .servers
                .iter()
                .map(|(pid, ns)| {
                    let before = self
                        .servers
                        .iter()
                        .find(|(p, _)| p == pid)
                        .map_or(0, |(_, b)| *b);
                    ns.saturating_sub(before)
                })
                .sum();
            Some(used as f64 / 1_000.0 / ops as f64)
        };
        (client, server)
    }
}
