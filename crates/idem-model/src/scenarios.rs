//! The bounds the model is checked at: `ci` (the tests, `cargo xtask test`)
//! and `deep` (`cargo xtask model --deep`), and the broken variants with the
//! property each must break.

use crate::config::{ClientSpec, Config, Variant};
use crate::model::{
    EXT_ONCE, FENCED, LIVE_ANSWER, LIVE_SETTLED, NO_FOREIGN, REPLAY_FIRST, TX_ONCE,
};

const A0: ClientSpec = ClientSpec::new(0, 0);
const B0: ClientSpec = ClientSpec::new(0, 1);
const A1: ClientSpec = ClientSpec::new(1, 0);

/// The base of every configuration: two engines whose clocks differ by a
/// tick, two clients sending the same request, a 3-tick lease, a TTL longer
/// than the run, no faults.
pub fn base() -> Config {
    Config {
        name: "base",
        skews: vec![0, 1],
        clients: vec![A0, A0],
        lease: 3,
        ttl: None,
        max_cas_retries: 1,
        max_hold: None,
        crashes: 0,
        pauses: 0,
        outages: 0,
        hangs: 0,
        declare_nothing: true,
        max_tasks: 3,
        liveness: false,
        server_clock_ahead: 0,
        variant: Variant::Intended,
    }
}

/// Three clients sending the same request and a process killed at any
/// point (before, during or after the effect, during the completion).
pub fn crash() -> Config {
    Config {
        name: "crash",
        clients: vec![A0, A0, A0],
        crashes: 1,
        ..base()
    }
}

/// Three engines (one clock a tick ahead) and a crash.
pub fn engines() -> Config {
    Config {
        name: "engines",
        skews: vec![0, 1, 0],
        crashes: 1,
        ..base()
    }
}

/// Duplicates and a stalled process (a zombie when it resumes).
pub fn zombie() -> Config {
    Config {
        name: "zombie",
        pauses: 1,
        ..base()
    }
}

/// Heartbeats and finishing writes against a store outage, no skew (so that
/// a lease spans two heartbeats that must both fail).
pub fn outage() -> Config {
    Config {
        name: "outage",
        skews: vec![0, 0],
        outages: 1,
        ..base()
    }
}

/// The same key with another body.
pub fn bodies() -> Config {
    Config {
        name: "bodies",
        skews: vec![0, 0],
        clients: vec![A0, A0, B0],
        crashes: 1,
        ..base()
    }
}

/// The same key from two scopes (tenants).
pub fn scopes() -> Config {
    Config {
        name: "scopes",
        skews: vec![0, 0],
        clients: vec![A0, A1],
        crashes: 1,
        ..base()
    }
}

/// Records that expire (TTL 4 ticks), so that claims after expiry, and the
/// clocks that decide expiry, are explored.
pub fn expiry() -> Config {
    Config {
        name: "expiry",
        ttl: Some(4),
        pauses: 1,
        declare_nothing: false,
        server_clock_ahead: 2,
        ..base()
    }
}

/// Liveness: clients retry until they get a final answer (one of them with
/// another body); a handler may hang (the hold ceiling ends its key);
/// `max_cas_retries` 0; a crash.
pub fn liveness() -> Config {
    Config {
        name: "liveness",
        clients: vec![A0, A0, B0],
        max_cas_retries: 0,
        max_hold: Some(4),
        crashes: 1,
        hangs: 1,
        liveness: true,
        ..base()
    }
}

/// The bound of the tests and `cargo xtask test`.
pub fn ci() -> Vec<Config> {
    vec![
        crash(),
        engines(),
        zombie(),
        outage(),
        bodies(),
        scopes(),
        expiry(),
        liveness(),
    ]
}

/// The larger bound of `cargo xtask model --deep`: faults combined, more
/// clients and engines.
pub fn deep() -> Vec<Config> {
    vec![
        Config {
            name: "crash+zombie",
            crashes: 1,
            pauses: 1,
            ..base()
        },
        Config {
            name: "crash+outage",
            skews: vec![0, 0],
            crashes: 1,
            outages: 1,
            ..base()
        },
        Config {
            name: "zombie+outage",
            pauses: 1,
            outages: 1,
            ..base()
        },
        Config {
            name: "zombie-3-clients",
            clients: vec![A0, A0, A0],
            pauses: 1,
            ..base()
        },
        Config {
            name: "crash-2-3-engines-3-clients",
            skews: vec![0, 1, 0],
            clients: vec![A0, A0, B0],
            crashes: 2,
            ..base()
        },
        Config {
            name: "scopes+zombie",
            clients: vec![A0, A1],
            pauses: 1,
            ..base()
        },
        Config {
            name: "expiry+crash",
            clients: vec![A0, A0, B0],
            crashes: 1,
            ..expiry()
        },
        Config {
            name: "liveness+outage",
            clients: vec![A0, A0],
            outages: 1,
            ..liveness()
        },
        Config {
            name: "liveness+zombie",
            clients: vec![A0, A0],
            pauses: 1,
            ..liveness()
        },
    ]
}

/// Where the protocol's own assumptions end: configurations outside them,
/// with the property that then fails (asserted, so that the documented
/// limit is known to be the real one).
///
/// - Clock skew of 2 ticks between engines with a 3-tick lease (skew ≥
///   lease − heartbeat interval): an engine whose clock is ahead sees a
///   live, heartbeating holder's lease lapse and takes it over.
pub fn assumptions() -> Vec<(Config, &'static str)> {
    vec![(
        Config {
            name: "skew-2-of-3",
            skews: vec![0, 2],
            ..base()
        },
        EXT_ONCE,
    )]
}

/// Each broken variant, the configuration it runs in, and the property it
/// must break (every property is broken by at least one variant).
pub fn broken() -> Vec<(Config, &'static str)> {
    use Variant::*;
    vec![
        (crash().with_variant(ReleaseOnCancel), EXT_ONCE),
        (zombie().with_variant(NoFencingOnCompletion), FENCED),
        (zombie().with_variant(NoFencingOnCompletion), TX_ONCE),
        (zombie().with_variant(NoFencingOnCompletion), REPLAY_FIRST),
        (outage().with_variant(HeartbeatStopsOnError), EXT_ONCE),
        (outage().with_variant(CompletionTriedOnce), EXT_ONCE),
        (expiry().with_variant(ServerClockExpiry), EXT_ONCE),
        (expiry().with_variant(ServerClockExpiry), TX_ONCE),
        (bodies().with_variant(FingerprintIgnoresBody), NO_FOREIGN),
        (scopes().with_variant(KeyIgnoresScope), NO_FOREIGN),
        (liveness().with_variant(ExistsCountsAsRace), LIVE_ANSWER),
        (liveness().with_variant(NoHoldCeiling), LIVE_SETTLED),
        (liveness().with_variant(NoHoldCeiling), LIVE_ANSWER),
    ]
}
