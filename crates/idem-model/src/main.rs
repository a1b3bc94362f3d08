//! `idem-model [--deep] [--only NAME] [--broken]`: checks the protocol model
//! and prints, per configuration, the states explored, the time taken and
//! each property's verdict (with a trace for every counterexample).
//!
//! - no flag: the CI bound (what the tests check);
//! - `--deep`: the larger bound;
//! - `--only NAME`: only the configurations whose name contains NAME;
//! - `--broken`: also run every broken variant and show its counterexample.
//!
//! Exits non-zero if a property fails for the intended protocol, a
//! reachability check is not reached, or a broken variant is not caught.

use std::process::ExitCode;
use std::time::Instant;

use idem_model::check::{Verdict, check_with_threads};
use idem_model::{Config, check, scenarios};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let deep = args.iter().any(|a| a == "--deep");
    let broken = args.iter().any(|a| a == "--broken");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));

    let started = Instant::now();
    let mut ok = true;
    let configs = if deep {
        scenarios::deep()
    } else {
        scenarios::ci()
    };
    println!(
        "idem-model: {} bound, intended protocol",
        if deep { "deep" } else { "CI" }
    );
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    for config in configs.iter().filter(|c| wanted(c.name)) {
        let report = check_with_threads(config, None, threads);
        print!("{}", report.render());
        for r in &report.results {
            if matches!(r.verdict, Verdict::Fails(_) | Verdict::NotReached) {
                ok = false;
            }
        }
    }
    if broken {
        println!("\nidem-model: broken variants (each must yield a counterexample)");
        let cases = scenarios::broken()
            .into_iter()
            .filter(|(c, _)| wanted(c.name));
        ok &= all_fail(cases, ("COUNTEREXAMPLE found", "NOT CAUGHT"), |c| {
            format!("{} in {}", c.variant, c.name)
        });
        println!("\nidem-model: outside the protocol's assumptions (each must fail)");
        let cases = scenarios::assumptions()
            .into_iter()
            .filter(|(c, _)| wanted(c.name));
        ok &= all_fail(
            cases,
            ("fails, as documented", "HOLDS (limit not tight)"),
            |c| c.bound(),
        );
    }
    println!(
        "idem-model: {} in {:.1?}",
        if ok { "ok" } else { "FAILED" },
        started.elapsed()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Checks each configuration's property, which must fail: prints a line per
/// case (named by `name`, with `verdicts`' first word when it failed and the
/// second when it held) and every counterexample; whether all failed.
fn all_fail(
    cases: impl Iterator<Item = (Config, &'static str)>,
    verdicts: (&str, &str),
    name: impl Fn(&Config) -> String,
) -> bool {
    let mut ok = true;
    for (config, property) in cases {
        let report = check(&config, Some(property));
        let caught = report
            .verdict(property)
            .is_some_and(Verdict::is_counterexample);
        ok &= caught;
        println!(
            "-- {}: \"{property}\" {} ({} states, {:.2?})",
            name(&config),
            if caught { verdicts.0 } else { verdicts.1 },
            report.safety_states + report.liveness_states.unwrap_or(0),
            report.safety_time + report.liveness_time
        );
        if let Some(Verdict::Fails(trace)) = report.verdict(property) {
            println!("{trace}");
        }
    }
    ok
}
