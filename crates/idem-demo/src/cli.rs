//! The command line: `idem-demo [serve | storm | card-network]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::DemoError;
use crate::app::{CrashPlan, OrderCrashPoint};
use crate::backend::{
    Backend, BackendOptions, DEFAULT_PG_SCHEMA, DEFAULT_REDIS_PREFIX, DEFAULT_STOCK, StoreUrl,
};
use crate::card_network::{CardNetworkOptions, RunningCardNetwork};
use crate::report::StormReport;
use crate::server::RunningServer;
use crate::storm::{self, StormConfig};

/// A payments service protected by idem, and a retry storm that proves no
/// payment is charged twice.
///
/// Without a command: starts the service on SQLite in a temporary directory,
/// runs the retry storm against it, prints the table, and exits non-zero if
/// any payment was charged twice, lost, or answered inconsistently.
///
/// `idem-demo --store redis://127.0.0.1:6379` (the storm's options without
/// a command) is `idem-demo storm --store redis://127.0.0.1:6379`.
#[derive(Debug, Parser)]
#[command(name = "idem-demo", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to run (default: `storm` on SQLite in a temporary directory).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The storm's options, when no command is given.
    #[command(flatten)]
    pub storm: StormArgs,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the payments service until Ctrl-C. Prints `listening on http://ADDR`.
    Serve(ServeArgs),
    /// Run the retry storm, against a service started in this process on
    /// `--store`, or against a running one (`--target`).
    Storm(StormArgs),
    /// Run the simulated card network that `POST /orders` charges at, until
    /// Ctrl-C. Prints `listening on http://ADDR`.
    CardNetwork(CardNetworkArgs),
}

/// `idem-demo card-network`.
#[derive(Debug, Args)]
pub struct CardNetworkArgs {
    /// The address to listen on (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3001")]
    pub listen: SocketAddr,
    /// The charge log: one line `<key> <charge id> <order> <amount>` per
    /// charge, appended before the answer; charges already in it are
    /// remembered (their keys still honoured).
    #[arg(long, value_name = "FILE")]
    pub log: PathBuf,
    /// Probability of answering 503 before charging.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Probability of charging, then answering 502 (the answer is lost).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub drop_rate: f64,
    /// The longest random delay before charging, and again before answering.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub delay_ms: u64,
}

/// Where the records and the ledger live.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The store: `sqlite://PATH` (`sqlite://` = a file in a temporary
    /// directory), `postgres://USER@HOST:PORT/DB`, `redis://HOST:PORT`,
    /// `redis+cluster://HOST:PORT,HOST:PORT`, `memory://`; store options as
    /// query parameters (`?durability=normal`, `?schema=billing`, …; see the
    /// idemkit crate). With SQLite and PostgreSQL the payments ledger is in
    /// the same database and each charge commits with its idempotency
    /// record; otherwise the ledger is a separate SQLite file (at-least-once
    /// window on crashes).
    #[arg(long, value_name = "URL", default_value = "sqlite://")]
    pub store: String,
    /// The idempotency lease: how long a claim holds without a heartbeat
    /// (renewed every third of it while a request runs); after a crash, how
    /// long before a retry may take the key over.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// PostgreSQL: the schema of the demo's tables (created if absent; nothing
    /// else is touched), unless the URL sets `schema`.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_PG_SCHEMA)]
    pub pg_schema: String,
    /// PostgreSQL: the largest connection pool, unless the URL sets
    /// `max_connections`.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub pg_max_connections: u32,
    /// Redis: the key prefix of the demo's records, unless the URL sets
    /// `prefix`.
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_REDIS_PREFIX)]
    pub redis_prefix: String,
    /// Redis and memory: the SQLite file of the payments ledger (default: in
    /// a temporary directory, gone when the process exits).
    #[arg(long, value_name = "PATH")]
    pub ledger: Option<PathBuf>,
    /// An external effect outside the store's transaction: before each
    /// charge's ledger write, append `<tenant> <key> <payment id>` to PATH
    /// (O_APPEND, synced to disk), as a card network call would. A crash
    /// after the call and before the commit cannot undo it, and the retry
    /// calls again: at least once on every store. Default: no effect.
    #[arg(long, value_name = "PATH", env = "IDEM_DEMO_EFFECT_LOG")]
    pub effect_log: Option<PathBuf>,
    /// Test only: probability of aborting inside the charge's transaction.
    #[arg(long, hide = true, value_name = "P", default_value_t = 0.0)]
    pub crash_in_charge: f64,
    /// Test only: probability of aborting after the charge committed, before
    /// the answer.
    #[arg(long, hide = true, value_name = "P", default_value_t = 0.0)]
    pub crash_after_charge: f64,
    /// Test only: probability of aborting at each crash point of an order.
    #[arg(long, hide = true, value_name = "P", default_value_t = 0.0)]
    pub crash_orders: f64,
    /// Test only: abort every time an order reaches this point.
    #[arg(long, hide = true, value_name = "POINT")]
    pub crash_order_at: Option<OrderCrashPoint>,
    /// The stock each sku of `POST /orders` is seeded with on its first
    /// reservation.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STOCK)]
    pub stock: u64,
}

impl StoreArgs {
    fn resolve(&self) -> Result<(StoreUrl, BackendOptions), DemoError> {
        let probability = |name: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(p)
            } else {
                Err(DemoError::InvalidOption(format!(
                    "{name} must be between 0 and 1"
                )))
            }
        };
        let options = BackendOptions {
            lease: Duration::from_millis(self.lease_ms),
            pg_schema: self.pg_schema.clone(),
            pg_max_connections: self.pg_max_connections,
            redis_prefix: self.redis_prefix.clone(),
            ledger: self.ledger.clone(),
            effect_log: self.effect_log.clone(),
            crash: CrashPlan {
                in_charge: probability("--crash-in-charge", self.crash_in_charge)?,
                after_charge: probability("--crash-after-charge", self.crash_after_charge)?,
                orders: probability("--crash-orders", self.crash_orders)?,
                order_at: self.crash_order_at,
            },
            stock: self.stock,
            ..BackendOptions::default()
        };
        Ok((StoreUrl::parse(&self.store)?, options))
    }
}

/// `idem-demo serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The address to listen on (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    pub addr: SocketAddr,
    /// The card network `POST /orders` charges at (`http://HOST:PORT`, e.g.
    /// an `idem-demo card-network`); default: one started in this process,
    /// logging to a temporary file.
    #[arg(long, value_name = "URL")]
    pub card_network: Option<String>,
    /// Run the completer: orders abandoned mid-way (their server died after
    /// a phase, and their lease lapsed) are finished in the background
    /// without waiting for the client's retry.
    #[arg(long)]
    pub completer: bool,
    /// The store.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `idem-demo storm`.
#[derive(Debug, Args)]
pub struct StormArgs {
    /// Storm a running server (`http://HOST:PORT`) instead of starting one.
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// Logical payments per scenario.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub payments: usize,
    /// Logical payments in flight at once.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub concurrency: usize,
    /// Identical requests per double-click.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub double_clicks: usize,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// The store of the in-process server (ignored with `--target`).
    #[command(flatten)]
    pub store: StoreArgs,
}

impl StormArgs {
    fn config(&self) -> StormConfig {
        StormConfig {
            payments_per_scenario: self.payments,
            concurrency: self.concurrency,
            double_clicks: self.double_clicks,
            progress: !self.no_progress,
            ..StormConfig::full()
        }
    }
}

/// Runs the command line; the exit code is 0 on success, 1 if the storm
/// found a duplicate, a lost payment or an inconsistent answer, 2 on errors.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Some(Command::Serve(args)) => serve(args).await.map(|()| ExitCode::SUCCESS),
        Some(Command::Storm(args)) => storm_command(args).await,
        Some(Command::CardNetwork(args)) => card_network(args).await.map(|()| ExitCode::SUCCESS),
        // No command: `idem-demo storm` with the options given.
        None => storm_command(cli.storm).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idem-demo: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::from(2)
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), DemoError> {
    let (url, mut options) = args.store.resolve()?;
    options.completer = args.completer;
    // Without `--card-network`, a card network in this process.
    let mut local_network = None;
    match args.card_network {
        Some(url) => options.card_network = Some(url),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("idem-demo-card-network-")
                .tempdir()?;
            let network = RunningCardNetwork::start(
                ([127, 0, 0, 1], 0).into(),
                CardNetworkOptions::new(dir.path().join("charges.log")),
            )
            .await?;
            println!(
                "card network: in this process, charges logged to {}",
                network.log().display()
            );
            options.card_network = Some(network.url());
            local_network = Some((network, dir));
        }
    }
    let backend = Backend::open(&url, &options).await?;
    for line in backend.description() {
        println!("{line}");
    }
    println!("idempotency lease: {} ms", options.lease.as_millis());
    let mut server = RunningServer::start(args.addr, backend).await?;
    // The line a parent process waits for.
    println!("listening on {}", server.url());
    tokio::select! {
        result = server.wait() => return result,
        () = shutdown_signal() => {}
    }
    println!("shutting down");
    server.shutdown().await;
    if let Some((network, _dir)) = local_network {
        network.shutdown().await;
    }
    Ok(())
}

async fn card_network(args: CardNetworkArgs) -> Result<(), DemoError> {
    let options = CardNetworkOptions {
        log: args.log,
        fail_rate: args.fail_rate,
        drop_rate: args.drop_rate,
        delay: Duration::from_millis(args.delay_ms),
    };
    let mut network = RunningCardNetwork::start(args.listen, options).await?;
    println!(
        "card network: charges logged to {}",
        network.log().display()
    );
    // The line a parent process waits for.
    println!("listening on {}", network.url());
    tokio::select! {
        result = network.wait() => return result,
        () = shutdown_signal() => {}
    }
    println!("shutting down");
    network.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn storm_command(args: StormArgs) -> Result<ExitCode, DemoError> {
    let config = args.config();
    let intro = format!(
        "storm: 5 scenarios x {} logical payments, {} at once, {} clicks per double-click",
        config.payments_per_scenario, config.concurrency, config.double_clicks
    );
    let report = match &args.target {
        Some(target) => {
            println!("target: {target} (a running idem-demo server)");
            println!("{intro}");
            storm::run(target, config).await?
        }
        None => {
            let (url, options) = args.store.resolve()?;
            let backend = Backend::open(&url, &options).await?;
            println!(
                "idem-demo: a payments service protected by idem, and a retry storm against it"
            );
            for line in backend.description() {
                println!("{line}");
            }
            let server = RunningServer::start(([127, 0, 0, 1], 0).into(), backend).await?;
            println!("server: {} (in this process)", server.url());
            println!("{intro}");
            let report = storm::run(&server.url(), config).await;
            server.shutdown().await;
            report?
        }
    };
    Ok(finish(&report))
}

fn finish(report: &StormReport) -> ExitCode {
    println!();
    print!("{}", report.table());
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    #[test]
    fn no_command_is_the_storm_with_its_options() {
        let cli = Cli::try_parse_from(["idem-demo"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.storm.store.store, "sqlite://");
        assert_eq!(cli.storm.payments, 200);

        let cli = Cli::try_parse_from([
            "idem-demo",
            "--store",
            "redis://127.0.0.1:6379",
            "--payments",
            "7",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.storm.store.store, "redis://127.0.0.1:6379");
        assert_eq!(cli.storm.payments, 7);
    }

    #[test]
    fn serve_takes_its_address_and_store() {
        let cli = Cli::try_parse_from([
            "idem-demo",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--store",
            "postgres://postgres@127.0.0.1:5432/test",
            "--effect-log",
            "/tmp/effects.log",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Serve(args)) => {
                assert_eq!(args.addr.port(), 0);
                assert_eq!(args.store.store, "postgres://postgres@127.0.0.1:5432/test");
                assert_eq!(
                    args.store.effect_log.as_deref(),
                    Some(std::path::Path::new("/tmp/effects.log"))
                );
            }
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn serve_and_the_card_network_take_their_order_options() {
        let cli = Cli::try_parse_from([
            "idem-demo",
            "serve",
            "--card-network",
            "http://127.0.0.1:4000",
            "--completer",
            "--stock",
            "7",
            "--crash-orders",
            "0.5",
            "--crash-order-at",
            "after-charge",
        ])
        .unwrap();
        let Some(Command::Serve(args)) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.card_network.as_deref(), Some("http://127.0.0.1:4000"));
        assert!(args.completer);
        let (_, options) = args.store.resolve().unwrap();
        assert_eq!(options.stock, 7);
        assert_eq!(options.crash.orders, 0.5);
        assert_eq!(
            options.crash.order_at,
            Some(crate::app::OrderCrashPoint::AfterCharge)
        );
        let bad = Cli::try_parse_from(["idem-demo", "serve", "--crash-orders", "2"]).unwrap();
        let Some(Command::Serve(args)) = bad.command else {
            panic!("not serve")
        };
        assert!(args.store.resolve().is_err());

        let cli = Cli::try_parse_from([
            "idem-demo",
            "card-network",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "/tmp/charges.log",
            "--fail-rate",
            "0.1",
            "--drop-rate",
            "0.2",
            "--delay-ms",
            "30",
        ])
        .unwrap();
        let Some(Command::CardNetwork(args)) = cli.command else {
            panic!("not card-network")
        };
        assert_eq!(args.listen.port(), 0);
        assert_eq!(
            (args.fail_rate, args.drop_rate, args.delay_ms),
            (0.1, 0.2, 30)
        );
    }

    #[test]
    fn storm_options_before_a_command_are_refused() {
        assert!(Cli::try_parse_from(["idem-demo", "--payments", "3", "serve"]).is_err());
    }
}
