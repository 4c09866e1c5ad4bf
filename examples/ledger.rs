//! `ledger`: a service with its own PostgreSQL database that takes part in global
//! transactions with no transaction code of its own.
//!
//! It serves `ledger.v1.Ledger` (examples/proto/ledger/v1/ledger.proto) and, on the same port,
//! the participant that twopc's coordinator prepares and commits its database through
//! (`twopc::participant::embedded`), with health and reflection. A `Post` that arrives with
//! `twopc-txn-id` metadata (a caller inside `transact`, or `grpcurl -H 'twopc-txn-id: …'`) runs
//! in that global transaction; one without commits on its own. With `--audit URL`, every Post
//! also records itself with the `audit` service, in the same transaction: a nested call that
//! carries it along (`PropagateLayer`).
//!
//! ```sh
//! cargo run --example ledger -- --listen 127.0.0.1:7001 --id ledger-a \
//!     --coordinator http://127.0.0.1:50051 --postgres 'host=127.0.0.1 port=5432 user=… dbname=…'
//! ```

use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tower_layer::Layer;
use twopc::client::Client;
use twopc::client::propagation::{Propagate, PropagateLayer};
use twopc::participant::{self, embedded::Embedded};

pub mod pb {
    tonic::include_proto!("ledger.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ledger_descriptor.bin"));
}

mod audit_pb {
    tonic::include_proto!("audit.v1");
}

use audit_pb::audit_client::AuditClient;
use pb::ledger_server::LedgerServer;

/// A ledger of accounts whose balances may not go negative.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    /// Where to serve the ledger (and its participant).
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// This service's participant id at the coordinator.
    #[arg(long, default_value = "ledger")]
    pub id: String,
    /// The twopc coordinator.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// This service's own database (libpq key=value string or postgres:// URL).
    #[arg(long)]
    pub postgres: String,
    /// The audit service every Post is recorded with, if any.
    #[arg(long)]
    pub audit: Option<String>,
    /// How often this service's prepared branches are checked with the coordinator, in ms
    /// (also at start): how soon a branch left in doubt by a crash is resolved.
    #[arg(long, default_value_t = 5_000)]
    pub resolve_interval_ms: u64,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS entries (
        id bigserial PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL, memo text NOT NULL);
    CREATE TABLE IF NOT EXISTS balances (
        account text PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));";

/// The `ledger.v1.Ledger` service.
pub struct Ledger {
    /// The participant embedded in this service: its database, in the caller's transaction.
    db: Embedded,
    /// Where each Post is recorded, carrying the ambient transaction along.
    audit: Option<AuditClient<Propagate<Channel>>>,
    id: String,
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for Ledger {
    async fn post(
        &self,
        req: Request<pb::PostRequest>,
    ) -> Result<Response<pb::PostResponse>, Status> {
        let pb::PostRequest {
            account,
            amount,
            memo,
        } = req.into_inner();
        if account.is_empty() {
            return Err(Status::invalid_argument("account is required"));
        }
        let (acct, m) = (account.clone(), memo.clone());
        let entry_id = self
            .db
            .transaction(|pg| {
                Box::pin(async move {
                    let id: i64 = pg
                        .query_one(
                            "INSERT INTO entries (account, amount, memo) VALUES ($1, $2, $3) RETURNING id",
                            &[&acct, &amount, &m],
                        )
                        .await?
                        .get(0);
                    // (Not an upsert: the CHECK would judge the inserted row, `amount`
                    // alone, before the conflict turned it into an update.)
                    let moved = pg
                        .execute(
                            "UPDATE balances SET balance = balance + $2 WHERE account = $1",
                            &[&acct, &amount],
                        )
                        .await?;
                    if moved == 0 {
                        pg.execute("INSERT INTO balances VALUES ($1, $2)", &[&acct, &amount])
                            .await?;
                    }
                    Ok::<_, PostError>(id)
                })
            })
            .await
            .map_err(|e| e.status(&account))?;
        if let Some(audit) = &self.audit {
            audit
                .clone()
                .record(audit_pb::RecordRequest {
                    service: self.id.clone(),
                    account,
                    amount,
                    memo,
                })
                .await?;
        }
        Ok(Response::new(pb::PostResponse { entry_id }))
    }

    async fn balance(
        &self,
        req: Request<pb::BalanceRequest>,
    ) -> Result<Response<pb::BalanceResponse>, Status> {
        let account = req.into_inner().account;
        let balance = self
            .db
            .transaction(|pg| {
                Box::pin(async move {
                    let row = pg
                        .query_opt(
                            "SELECT balance FROM balances WHERE account = $1",
                            &[&account],
                        )
                        .await?;
                    Ok::<_, PostError>(row.map_or(0, |r| r.get(0)))
                })
            })
            .await
            .map_err(|e| e.status(""))?;
        Ok(Response::new(pb::BalanceResponse { balance }))
    }
}

/// A Post that failed: in its database, or as twopc's participant.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("{}", .0.as_db_error().map_or_else(|| .0.to_string(), |e| e.message().to_string()))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Participant(#[from] participant::error::Error),
}

impl PostError {
    fn status(self, account: &str) -> Status {
        match self {
            PostError::Db(e)
                if e.as_db_error()
                    .is_some_and(|d| d.constraint() == Some("balances_balance_check")) =>
            {
                Status::failed_precondition(format!("account {account:?} would go negative"))
            }
            // Coded by its SQLSTATE, which rides along: a caller retries a deadlock's victim.
            PostError::Db(e) => participant::error::statement_status(&e),
            PostError::Participant(e) => e.into(),
        }
    }
}

/// Serves the ledger on `listener` until `shutdown`.
pub async fn run(
    listener: tokio::net::TcpListener,
    args: Args,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let db = Embedded::start(participant::Config {
        advertise: Some(format!("http://{}", listener.local_addr()?)),
        max_connections: 16,
        resolve_interval: Duration::from_millis(args.resolve_interval_ms),
        ..participant::Config::new(
            args.id.clone(),
            args.coordinator.clone(),
            args.postgres.clone(),
        )
    })
    .await?;
    db.transaction(|pg| {
        Box::pin(async move { Ok::<_, PostError>(pg.batch_execute(SCHEMA).await?) })
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the tables: {e}"))?;
    let audit = match &args.audit {
        Some(url) => {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?.connect_lazy();
            Some(AuditClient::new(PropagateLayer.layer(channel)))
        }
        None => None,
    };
    let client = Client::connect(&args.coordinator)?;
    let ledger = Ledger {
        db: db.clone(),
        audit,
        id: args.id.clone(),
    };
    db.router(client, &[pb::FILE_DESCRIPTOR_SET])?
        .add_service(LedgerServer::new(ledger))
        .serve_with_incoming_shutdown(twopc::process::server::incoming(listener), shutdown)
        .await?;
    Ok(())
}

#[allow(dead_code)] // the tests include this file for `run`
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    // Crash-recovery harnesses (`crashtest --embedded`) arm named crash points through the
    // FAILPOINTS variable (docs/FAILPOINTS.md); a build without the `testing` feature refuses it.
    twopc::process::failpoints::setup_from_env().map_err(anyhow::Error::msg)?;
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(listener, args, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
