//! What a run of the model explores: how many engines and clients, the
//! protocol's timing, the fault budgets, and which protocol variant runs.

use std::fmt;

/// A request a client sends, over and over until it gets a final answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientSpec {
    /// The scope (tenant) the request is made in: 0 or 1.
    pub scope: u8,
    /// The request body: 0 ("A") or 1 ("B"). Same key, another body: 422.
    pub body: u8,
}

impl ClientSpec {
    /// A client of scope `scope` sending body `body` under the shared key.
    pub const fn new(scope: u8, body: u8) -> Self {
        Self { scope, body }
    }
}

/// The protocol that runs: the intended one (docs/reliability.md, "Every way
/// a request ends"), or one deliberately broken in one place, to prove that
/// the checker finds what that break does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The protocol as intended.
    Intended,
    /// A client that gives up (its request future is dropped) releases the
    /// key, even after the handler made its external call.
    ReleaseOnCancel,
    /// The finishing write (completion, failure) does not check the fencing
    /// token: a stale holder overwrites the record.
    NoFencingOnCompletion,
    /// The heartbeat stops for good at its first store error.
    HeartbeatStopsOnError,
    /// The claim counts every `Exists` answer as a lost race against
    /// `max_cas_retries`, so duplicates get `Contention` instead of a replay.
    ExistsCountsAsRace,
    /// The store decides expiry with its own server clock (ahead of the
    /// engines' by [`Config::server_clock_ahead`]) instead of the engine's `now`.
    ServerClockExpiry,
    /// The finishing write is tried once: a store error leaves the key in
    /// flight at once instead of being retried while the write can matter.
    CompletionTriedOnce,
    /// The fingerprint does not cover the body (nested-router bug): two
    /// different requests look the same.
    FingerprintIgnoresBody,
    /// The record key does not include the scope: two tenants share a record.
    KeyIgnoresScope,
    /// No ceiling on how long a heartbeat holds a key (`max_hold` unset)
    /// while a handler hangs.
    NoHoldCeiling,
}

impl Variant {
    /// Every broken variant.
    pub const BROKEN: [Variant; 9] = [
        Variant::ReleaseOnCancel,
        Variant::NoFencingOnCompletion,
        Variant::HeartbeatStopsOnError,
        Variant::ExistsCountsAsRace,
        Variant::ServerClockExpiry,
        Variant::CompletionTriedOnce,
        Variant::FingerprintIgnoresBody,
        Variant::KeyIgnoresScope,
        Variant::NoHoldCeiling,
    ];

    /// A short name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Intended => "intended",
            Variant::ReleaseOnCancel => "release-on-cancel",
            Variant::NoFencingOnCompletion => "no-fencing-on-completion",
            Variant::HeartbeatStopsOnError => "heartbeat-stops-on-error",
            Variant::ExistsCountsAsRace => "exists-counts-as-race",
            Variant::ServerClockExpiry => "server-clock-expiry",
            Variant::CompletionTriedOnce => "completion-tried-once",
            Variant::FingerprintIgnoresBody => "fingerprint-ignores-body",
            Variant::KeyIgnoresScope => "key-ignores-scope",
            Variant::NoHoldCeiling => "no-hold-ceiling",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One bounded configuration of the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// A name for reports.
    pub name: &'static str,
    /// One entry per engine: how many ticks its clock is ahead of the
    /// slowest one (0 for all: no skew).
    pub skews: Vec<u8>,
    /// The clients, all using the same idempotency key.
    pub clients: Vec<ClientSpec>,
    /// The lease, in ticks. The heartbeat beats every tick (a third of a
    /// 3-tick lease, as `Engine::keep_alive` does).
    pub lease: u8,
    /// The record TTL in ticks; `None`: longer than anything the model does.
    pub ttl: Option<u8>,
    /// `Policy::max_cas_retries`.
    pub max_cas_retries: u8,
    /// `Policy::max_hold` in ticks.
    pub max_hold: Option<u8>,
    /// How many engine crashes (process killed, memory lost) may happen.
    pub crashes: u8,
    /// How many pauses (a stalled process: a zombie when it resumes) may happen.
    pub pauses: u8,
    /// How many store outages (one engine cannot reach the store) may happen.
    pub outages: u8,
    /// How many handlers may hang (never return).
    pub hangs: u8,
    /// Whether handlers may declare that nothing happened (release, or store
    /// a retryable failure).
    pub declare_nothing: bool,
    /// At most this many requests in progress at once (bounds the model).
    pub max_tasks: u8,
    /// Whether to check the liveness properties (explores the whole graph).
    pub liveness: bool,
    /// For [`Variant::ServerClockExpiry`]: how far ahead the server clock is.
    pub server_clock_ahead: u8,
    /// The protocol that runs.
    pub variant: Variant,
}

impl Config {
    /// The same configuration running `variant`.
    #[must_use]
    pub fn with_variant(mut self, variant: Variant) -> Self {
        self.variant = variant;
        self
    }

    /// The largest clock skew between two engines, in ticks.
    pub fn max_skew(&self) -> u8 {
        self.skews.iter().copied().max().unwrap_or(0)
    }

    /// A one-line description of the bound.
    pub fn bound(&self) -> String {
        let clients: Vec<String> = self
            .clients
            .iter()
            .map(|c| format!("s{}{}", c.scope, body_name(c.body)))
            .collect();
        format!(
            "{} engines (skew {:?}), clients [{}], lease {}, ttl {}, crashes {}, pauses {}, outages {}, hangs {}{}",
            self.skews.len(),
            self.skews,
            clients.join(" "),
            self.lease,
            self.ttl.map_or_else(|| "∞".to_string(), |t| t.to_string()),
            self.crashes,
            self.pauses,
            self.outages,
            self.hangs,
            self.max_hold
                .map_or_else(String::new, |h| format!(", max_hold {h}")),
        )
    }
}

/// "A" or "B".
pub(crate) fn body_name(body: u8) -> &'static str {
    if body == 0 { "A" } else { "B" }
}
