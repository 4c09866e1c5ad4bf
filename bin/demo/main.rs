//! `demo`: a whole twopc system on this machine, and a bank that moves money between two
//! PostgreSQL databases with it.
//!
//! It starts two throwaway PostgreSQL clusters (`bank-east` and `bank-west`), a coordinator and
//! one participant per database, all on loopback, then talks to them over gRPC exactly as a
//! client service would. With `--keep` it stays up afterwards so you can try grpcurl on it.
//!
//! With `--services` (`services.rs`): services that own their databases, with the participant
//! embedded, joined in one transaction by the client library. With `--ha` (`ha.rs`): the bank
//! on three coordinator replicas over etcd, the leader killed mid-run.

#[path = "../example_services.rs"]
mod example_services;
mod ha;
mod saga;
mod services;

use anyhow::{Result, bail};
use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use twopc::coordinator;
use twopc::proto::coordinator_client::CoordinatorClient;
use twopc::proto::participant_client::ParticipantClient;
use twopc::proto::{self, Outcome};
use twopc::testkit::bank::{self, Tables};
use twopc::testkit::cluster::PgCluster;
use twopc::testkit::system::{Client, System};

/// Runs a local twopc system and a bank-transfer demo on it.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Concurrent clients in the load part of the demo.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Transfers each of them makes.
    #[arg(long, default_value_t = 25)]
    transfers: usize,
    /// Keep the system running afterwards (until Ctrl-C) and print how to reach it.
    #[arg(long)]
    keep: bool,
    /// Mutual TLS on every connection and a bearer token on every call, with a throwaway CA
    /// and tokens (docs/SECURITY.md).
    #[arg(long)]
    secure: bool,
    /// Instead: two ledger services and an audit service, each with its own database and the
    /// participant embedded, in one global transaction (examples/ledger.rs, audit.rs).
    #[arg(long, conflicts_with = "secure")]
    services: bool,
    /// Instead: the bank on three coordinator replicas over a three-member etcd, with the
    /// leading replica killed while transfers run (docs/HA.md).
    #[arg(long, conflicts_with_all = ["secure", "services"])]
    ha: bool,
    /// Instead: the order saga (validate the user, reserve, order, charge over gRPC), one that
    /// completes and one whose declined charge is compensated in reverse (docs/SAGAS.md).
    #[arg(long, conflicts_with_all = ["secure", "services", "ha"])]
    saga: bool,
}

/// A channel with the demo client's token (if any) on every call.
type Authed = Client;

struct Bank {
    coordinator: CoordinatorClient<Authed>,
    east: ParticipantClient<Authed>,
    west: ParticipantClient<Authed>,
}

impl Bank {
    async fn exec(
        db: &ParticipantClient<Authed>,
        txn: &str,
        sql: &str,
        params: Vec<proto::Value>,
    ) -> Result<proto::ExecuteResponse, tonic::Status> {
        db.clone()
            .execute(proto::ExecuteRequest {
                txn_id: txn.into(),
                sql: sql.into(),
                params,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Moves `amount` from `from` (in east) to `to` (in west), recording it in both ledgers;
    /// `west_first`: credits west before it debits east. Returns the txn id, the outcome and
    /// the reason.
    async fn transfer(
        &self,
        from: &str,
        to: &str,
        amount: i64,
        west_first: bool,
    ) -> Result<(String, Outcome, String)> {
        let mut coordinator = self.coordinator.clone();
        let txn = coordinator
            .begin(proto::BeginRequest {
                timeout_ms: 10_000,
                label: format!("transfer {amount} {from}->{to}"),
            })
            .await?
            .into_inner()
            .txn_id;
        let steps = async {
            let debit = (
                &self.east,
                "UPDATE acct SET bal = bal - $1 WHERE name = $2",
                from,
            );
            let credit = (
                &self.west,
                "UPDATE acct SET bal = bal + $1 WHERE name = $2",
                to,
            );
            let order = if west_first {
                [credit, debit]
            } else {
                [debit, credit]
            };
            for (db, sql, name) in order {
                let params = vec![proto::Value::int(amount), proto::Value::text(name)];
                Self::exec(db, &txn, sql, params).await?;
            }
            Self::exec(
                &self.east,
                &txn,
                "INSERT INTO ledger VALUES ($1, $2)",
                vec![proto::Value::text(&txn), proto::Value::int(-amount)],
            )
            .await?;
            Self::exec(
                &self.west,
                &txn,
                "INSERT INTO ledger VALUES ($1, $2)",
                vec![proto::Value::text(&txn), proto::Value::int(amount)],
            )
            .await?;
            Ok::<_, tonic::Status>(())
        }
        .await;
        match steps {
            Ok(()) => {
                let r = coordinator
                    .commit(proto::CommitRequest {
                        txn_id: txn.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok((txn, r.outcome(), r.reason))
            }
            Err(status) => {
                let r = coordinator
                    .abort(proto::AbortRequest {
                        txn_id: txn.clone(),
                        reason: status.message().into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok((txn, r.outcome(), status.message().to_string()))
            }
        }
    }
}

async fn balances(east: &PgCluster, west: &PgCluster) -> Result<String> {
    let mut parts = Vec::new();
    for (name, pg) in [("east", east), ("west", west)] {
        let rows = pg
            .client()
            .await?
            .query("SELECT name, bal FROM acct ORDER BY name", &[])
            .await?;
        let accts: Vec<String> = rows
            .iter()
            .map(|r| format!("{}={}", r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect();
        parts.push(format!("{name}: {}", accts.join(" ")));
    }
    Ok(parts.join(" | "))
}

/// The money in `pg` (`testkit::bank`'s reading of the balances).
async fn total(pg: &PgCluster) -> Result<i64> {
    Ok(bank::read(pg, Tables::STANDARD).await?.balance)
}

#[tokio::main]
async fn main() -> Result<()> {
    // `demo ledger …` / `demo audit …`: an example service, as `--services` starts them.
    if let Some(kind) = example_services::asked() {
        return example_services::serve(&kind).await;
    }
    let args = Args::parse();
    // Ctrl-C (or SIGTERM) drops the run, and with it the throwaway clusters it started.
    tokio::select! {
        done = run(args) => done,
        _ = twopc::process::signal::shutdown() => {
            println!("\n== Stopping: removing the servers and the clusters");
            Ok(())
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.services {
        return services::run(args.keep).await;
    }
    if args.ha {
        return ha::run().await;
    }
    if args.saga {
        return saga::run(args.keep).await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let system = start_system(args.secure).await?;
    let (east, west) = (&*system.pgs[0], &*system.pgs[1]);
    let bank = Arc::new(Bank {
        coordinator: system.coordinator().await,
        east: system.participant(0).await,
        west: system.participant(1).await,
    });
    println!("   balances: {}", balances(east, west).await?);

    commit_across_databases(&bank, east, west).await?;
    a_failed_check_moves_nothing(&bank, east, west).await?;
    a_client_aborts(&bank, east, west).await?;
    concurrent_transfers(&bank, east, west, &args).await?;
    if args.keep {
        print_how_to_reach(&system)?;
        std::future::pending::<()>().await;
    }
    drop(bank);
    println!("\n== Done: stopping the servers and removing the clusters");
    system.shutdown().await
}

/// The bank's tables in each database; its accounts have names, so the scenes read as a story.
pub const SCHEMA: &str = "
    CREATE TABLE acct (name text PRIMARY KEY, bal bigint NOT NULL CHECK (bal >= 0));
    CREATE TABLE ledger (txn_id text NOT NULL, delta bigint NOT NULL);";

/// Each database's accounts and their first balances.
pub const ACCOUNTS: [&str; 2] = [
    "INSERT INTO acct VALUES ('alice', 100), ('carol', 1000)",
    "INSERT INTO acct VALUES ('bob', 100), ('dave', 1000)",
];

/// The two bank databases (`east` and `west`), a coordinator, and a participant for each,
/// served in this process (`twopc::testkit::system`).
async fn start_system(secure: bool) -> Result<System> {
    println!(
        "== Starting two throwaway PostgreSQL clusters (initdb + pg_ctl, max_prepared_transactions=64), a coordinator and a participant for each"
    );
    let system = System::builder()
        .databases(2)
        .names(&["east", "west"])
        .schema(SCHEMA)
        .secure(secure)
        .id("demo")
        .limits(coordinator::Limits::default())
        .start()
        .await?;
    for (pg, accounts) in system.pgs.iter().zip(ACCOUNTS) {
        pg.client().await?.batch_execute(accounts).await?;
    }
    println!(
        "== twopc is up: coordinator {} (decision log in {}), participants east {} and west {}; bank-east on 127.0.0.1:{}, bank-west on 127.0.0.1:{}",
        system.coordinator.addr,
        system.data_dir().display(),
        system.participants[0].addr,
        system.participants[1].addr,
        system.pgs[0].port(),
        system.pgs[1].port(),
    );
    Ok(system)
}

/// Scene 1: a transfer that commits in both databases.
async fn commit_across_databases(bank: &Bank, east: &PgCluster, west: &PgCluster) -> Result<()> {
    println!("\n== 1. alice (east) pays bob (west) 30: one transaction across both databases");
    let (txn, outcome, _) = bank.transfer("alice", "bob", 30, false).await?;
    println!("   txn {txn}: {outcome:?}");
    println!("   balances: {}", balances(east, west).await?);
    let t = bank
        .coordinator
        .clone()
        .get_transaction(proto::GetTransactionRequest {
            txn_id: txn.clone(),
        })
        .await?
        .into_inner();
    for b in &t.branches {
        println!(
            "   branch {} at {}: {:?} (PostgreSQL xid {})",
            b.participant_id,
            b.endpoint,
            b.state(),
            b.xid
        );
    }
    if outcome != Outcome::Committed {
        bail!("transfer 1 should have committed");
    }

    Ok(())
}

/// Scene 2: a CHECK fails in one database, so nothing moves in either.
async fn a_failed_check_moves_nothing(
    bank: &Bank,
    east: &PgCluster,
    west: &PgCluster,
) -> Result<()> {
    println!(
        "\n== 2. alice pays bob 500 but has only 70: east's CHECK (bal >= 0) fails, so nothing moves anywhere"
    );
    let (txn, outcome, reason) = bank.transfer("alice", "bob", 500, false).await?;
    println!("   txn {txn}: {outcome:?} because {reason}");
    println!("   balances: {}", balances(east, west).await?);
    if outcome != Outcome::Aborted {
        bail!("transfer 2 should have aborted");
    }

    Ok(())
}

/// Scene 3: a client runs both halves, then aborts.
async fn a_client_aborts(bank: &Bank, east: &PgCluster, west: &PgCluster) -> Result<()> {
    println!("\n== 3. a client changes its mind: debit and credit run, then Abort");
    let mut coordinator = bank.coordinator.clone();
    let txn = coordinator
        .begin(proto::BeginRequest {
            timeout_ms: 0,
            label: "changed my mind".into(),
        })
        .await?
        .into_inner()
        .txn_id;
    Bank::exec(
        &bank.east,
        &txn,
        "UPDATE acct SET bal = bal - 10 WHERE name = 'carol'",
        vec![],
    )
    .await?;
    Bank::exec(
        &bank.west,
        &txn,
        "UPDATE acct SET bal = bal + 10 WHERE name = 'dave'",
        vec![],
    )
    .await?;
    let aborted = coordinator
        .abort(proto::AbortRequest {
            txn_id: txn.clone(),
            reason: "changed my mind".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let again = coordinator
        .commit(proto::CommitRequest {
            txn_id: txn.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "   txn {txn}: Abort says {:?}; a Commit after it says {:?}",
        aborted.outcome(),
        again.outcome()
    );
    println!("   balances: {}", balances(east, west).await?);

    Ok(())
}

/// Scene 4: concurrent transfers both ways; money conserved, nothing left prepared.
async fn concurrent_transfers(
    bank: &Arc<Bank>,
    east: &PgCluster,
    west: &PgCluster,
    args: &Args,
) -> Result<()> {
    let before = total(east).await? + total(west).await?;
    println!(
        "\n== 4. {} clients make {} transfers each, carol (east) <-> dave (west), concurrently, one client in the opposite order",
        args.clients, args.transfers
    );
    let started = Instant::now();
    // Drawn only on a terminal.
    let progress = indicatif::ProgressBar::new((args.clients * args.transfers) as u64).with_style(
        indicatif::ProgressStyle::with_template("   {bar:40} {pos}/{len} transfers")
            .expect("a valid template"),
    );
    let tasks: Vec<_> = (0..args.clients)
        .map(|c| {
            let bank = Arc::clone(bank);
            let n = args.transfers;
            let progress = progress.clone();
            tokio::spawn(async move {
                let (mut committed, mut aborted, mut deadlocks) = (0usize, 0usize, 0usize);
                for i in 0..n {
                    // One client locks west first: its transfers cross the others', and
                    // deadlock. A victim is retried, as a client retries PostgreSQL's own
                    // deadlock errors.
                    let amount = ((c + i) % 7 + 1) as i64;
                    let west_first = c == 0;
                    loop {
                        match bank.transfer("carol", "dave", amount, west_first).await? {
                            (_, Outcome::Committed, _) => committed += 1,
                            (_, _, reason) if reason.contains("distributed deadlock") => {
                                deadlocks += 1;
                                // A little jitter, so the two do not collide again at once.
                                let pause = rand::random_range(5..50);
                                tokio::time::sleep(Duration::from_millis(pause)).await;
                                continue;
                            }
                            _ => aborted += 1,
                        }
                        break;
                    }
                    progress.inc(1);
                }
                Ok::<_, anyhow::Error>((committed, aborted, deadlocks))
            })
        })
        .collect();
    let (mut committed, mut aborted, mut deadlocks) = (0, 0, 0);
    for t in tasks {
        let (c, a, d) = t.await??;
        committed += c;
        aborted += a;
        deadlocks += d;
    }
    progress.finish_and_clear();
    let elapsed = started.elapsed();
    let after = total(east).await? + total(west).await?;
    println!(
        "   {committed} committed, {aborted} aborted in {:.1}s ({:.0} transfers/s); {deadlocks} distributed deadlocks broken by the coordinator, each victim retried",
        elapsed.as_secs_f64(),
        (committed + aborted) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "   total money before {before}, after {after}: {}",
        if before == after {
            "conserved"
        } else {
            "NOT CONSERVED"
        }
    );
    let left = east.prepared().await? + west.prepared().await?;
    println!("   prepared transactions left in PostgreSQL: {left}");
    println!("   balances: {}", balances(east, west).await?);
    if before != after || left != 0 {
        bail!("the demo found an inconsistency");
    }

    Ok(())
}

/// With --keep: the commands to try on the running system.
fn print_how_to_reach(system: &System) -> Result<()> {
    let caddr = system.coordinator.addr;
    let p = system.participants[0].addr;
    let east = &system.pgs[0];
    // grpcurl's and twopcctl's flags for this system: plaintext, or a client certificate and a
    // token (the client's for grpcurl, the operator's for twopcctl).
    let (grpcurl, twopcctl, scheme) = match (&system.pki, &system.tokens) {
        (Some(pki), Some(tokens)) => {
            let (cert, key) = pki.issue("you")?;
            let ca = pki.ca_path();
            let operator_file = pki.ca_path().with_file_name("operator-token");
            std::fs::write(&operator_file, &tokens.operator)?;
            (
                format!(
                    "-cacert {} -cert {} -key {} -H 'authorization: Bearer {}'",
                    ca.display(),
                    cert.display(),
                    key.display(),
                    tokens.client
                ),
                format!(
                    " --tls-ca {} --tls-cert {} --tls-key {} --token-file {}",
                    ca.display(),
                    cert.display(),
                    key.display(),
                    operator_file.display()
                ),
                "https",
            )
        }
        _ => ("-plaintext".to_string(), String::new(), "http"),
    };
    println!("\n== Still running. From another shell in this directory (grpcurl needs no .proto):");
    println!("   .venv/bin/grpcurl {grpcurl} {caddr} list");
    println!(
        "   .venv/bin/grpcurl {grpcurl} -d '{{\"label\":\"by hand\"}}' {caddr} twopc.v1.Coordinator/Begin"
    );
    println!(
        "   .venv/bin/grpcurl {grpcurl} -d '{{\"txn_id\":\"<id>\",\"sql\":\"UPDATE acct SET bal = bal - 1 WHERE name = $1\",\"params\":[{{\"text_value\":\"carol\"}}]}}' {p} twopc.v1.Participant/Execute"
    );
    println!(
        "   .venv/bin/grpcurl {grpcurl} -d '{{\"txn_id\":\"<id>\"}}' {caddr} twopc.v1.Coordinator/Commit"
    );
    println!("   cargo run -q --bin twopcctl -- --coordinator {scheme}://{caddr}{twopcctl} list");
    println!("   cargo run -q --bin twopcctl -- in-doubt --participant {scheme}://{p}{twopcctl}");
    println!("   psql \"{}\" -c 'SELECT * FROM acct'", east.conn_str());
    println!("   Ctrl-C stops everything and removes the clusters.");
    Ok(())
}
