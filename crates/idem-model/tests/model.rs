//! The model check at the CI bound: every property holds for the intended
//! protocol, every reachability check is reached, and every deliberately
//! broken variant yields a counterexample (printed as a step-by-step trace).
//! `cargo xtask model --deep` runs larger bounds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use idem_model::check::Verdict;
use idem_model::model::{
    EXT_ONCE, FENCED, LIVE_ANSWER, LIVE_SETTLED, NO_FOREIGN, REPLAY_FIRST, TX_ONCE,
};
use idem_model::{Config, Variant, check, scenarios};

fn holds(config: Config) {
    let report = check(&config, None);
    println!("{}", report.render());
    let bad: Vec<_> = report
        .results
        .iter()
        .filter(|r| !matches!(r.verdict, Verdict::Holds))
        .map(|r| r.name)
        .collect();
    assert!(
        bad.is_empty(),
        "{}: {bad:?} do not hold:\n{}",
        config.name,
        report.render()
    );
}

/// One test per scenario: every property holds for the intended protocol.
macro_rules! intended {
    ($($test:ident: $scenario:ident),* $(,)?) => {$(
        #[test]
        fn $test() {
            holds(scenarios::$scenario());
        }
    )*};
}

intended! {
    intended_crash: crash,
    intended_engines: engines,
    intended_zombie: zombie,
    intended_outage: outage,
    intended_bodies: bodies,
    intended_scopes: scopes,
    intended_expiry: expiry,
    intended_liveness: liveness,
}

/// Checks `property` in `config`, which must fail: prints the
/// counterexample's trace, or fails the test.
fn fails(config: &Config, property: &'static str, what: &str) {
    match check(config, Some(property)).verdict(property) {
        Some(Verdict::Fails(trace)) => {
            println!(
                "{what} in {}: counterexample to \"{property}\":\n{trace}",
                config.name
            );
        }
        other => panic!(
            "{what} in {}: no counterexample to \"{property}\" ({other:?})",
            config.name
        ),
    }
}

fn caught(variant: Variant) {
    let cases: Vec<_> = scenarios::broken()
        .into_iter()
        .filter(|(c, _)| c.variant == variant)
        .collect();
    assert!(!cases.is_empty(), "{variant} has no broken case");
    for (config, property) in cases {
        fails(&config, property, &variant.to_string());
    }
}

/// One test per deliberately broken variant: the checker finds a
/// counterexample.
macro_rules! broken {
    ($($test:ident: $variant:ident),* $(,)?) => {$(
        #[test]
        fn $test() {
            caught(Variant::$variant);
        }
    )*};
}

broken! {
    broken_release_on_cancel: ReleaseOnCancel,
    broken_no_fencing_on_completion: NoFencingOnCompletion,
    broken_heartbeat_stops_on_error: HeartbeatStopsOnError,
    broken_exists_counts_as_race: ExistsCountsAsRace,
    broken_server_clock_expiry: ServerClockExpiry,
    broken_completion_tried_once: CompletionTriedOnce,
    broken_fingerprint_ignores_body: FingerprintIgnoresBody,
    broken_key_ignores_scope: KeyIgnoresScope,
    broken_no_hold_ceiling: NoHoldCeiling,
}

#[test]
fn outside_the_assumptions_the_checker_fails() {
    for (config, property) in scenarios::assumptions() {
        fails(&config, property, "outside the assumptions");
    }
}

#[test]
fn every_property_and_variant_is_covered() {
    let broken: BTreeSet<&str> = scenarios::broken().iter().map(|(_, p)| *p).collect();
    for p in [
        TX_ONCE,
        EXT_ONCE,
        REPLAY_FIRST,
        NO_FOREIGN,
        FENCED,
        LIVE_ANSWER,
        LIVE_SETTLED,
    ] {
        assert!(broken.contains(p), "no broken variant breaks \"{p}\"");
    }
    let variants: BTreeSet<&str> = scenarios::broken()
        .iter()
        .map(|(c, _)| c.variant.name())
        .collect();
    for v in Variant::BROKEN {
        assert!(variants.contains(v.name()), "{v} is never checked");
    }
}
