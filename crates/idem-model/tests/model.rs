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

#[test]
fn intended_crash() {
    holds(scenarios::crash());
}

#[test]
fn intended_engines() {
    holds(scenarios::engines());
}

#[test]
fn intended_zombie() {
    holds(scenarios::zombie());
}

#[test]
fn intended_outage() {
    holds(scenarios::outage());
}

#[test]
fn intended_bodies() {
    holds(scenarios::bodies());
}

#[test]
fn intended_scopes() {
    holds(scenarios::scopes());
}

#[test]
fn intended_expiry() {
    holds(scenarios::expiry());
}

#[test]
fn intended_liveness() {
    holds(scenarios::liveness());
}

fn caught(variant: Variant) {
    let cases: Vec<_> = scenarios::broken()
        .into_iter()
        .filter(|(c, _)| c.variant == variant)
        .collect();
    assert!(!cases.is_empty(), "{variant} has no broken case");
    for (config, property) in cases {
        let report = check(&config, Some(property));
        match report.verdict(property) {
            Some(Verdict::Fails(trace)) => {
                println!(
                    "{variant} in {}: counterexample to \"{property}\":\n{trace}",
                    config.name
                );
            }
            other => panic!(
                "{variant} in {}: no counterexample to \"{property}\" ({other:?})",
                config.name
            ),
        }
    }
}

#[test]
fn broken_release_on_cancel() {
    caught(Variant::ReleaseOnCancel);
}

#[test]
fn broken_no_fencing_on_completion() {
    caught(Variant::NoFencingOnCompletion);
}

#[test]
fn broken_heartbeat_stops_on_error() {
    caught(Variant::HeartbeatStopsOnError);
}

#[test]
fn broken_exists_counts_as_race() {
    caught(Variant::ExistsCountsAsRace);
}

#[test]
fn broken_server_clock_expiry() {
    caught(Variant::ServerClockExpiry);
}

#[test]
fn broken_completion_tried_once() {
    caught(Variant::CompletionTriedOnce);
}

#[test]
fn broken_fingerprint_ignores_body() {
    caught(Variant::FingerprintIgnoresBody);
}

#[test]
fn broken_key_ignores_scope() {
    caught(Variant::KeyIgnoresScope);
}

#[test]
fn broken_no_hold_ceiling() {
    caught(Variant::NoHoldCeiling);
}

#[test]
fn outside_the_assumptions_the_checker_fails() {
    for (config, property) in scenarios::assumptions() {
        let report = check(&config, Some(property));
        match report.verdict(property) {
            Some(Verdict::Fails(trace)) => {
                println!("{}: \"{property}\" fails:\n{trace}", config.name)
            }
            other => panic!(
                "{}: \"{property}\" was expected to fail ({other:?})",
                config.name
            ),
        }
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
