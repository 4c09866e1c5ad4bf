//! `audit`: a second kind of service with its own database, which `ledger` calls from inside
//! its Post handler. It has no transaction code at all: a `Record` that arrives inside a
//! global transaction (`twopc-txn-id`, set by the ledger's `PropagateLayer`) is written in it,
//! through the participant embedded here; so when anything in the transaction fails, the
//! record is gone too, and when the record is refused, nothing anywhere commits.
//!
//! ```sh
//! cargo run --example audit -- --listen 127.0.0.1:7003 --id audit \
//!     --coordinator http://127.0.0.1:50051 --postgres 'host=127.0.0.1 port=5432 user=… dbname=…'
//! ```

use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::{Request, Response, Status};
use twopc::client::Client;
use twopc::participant::{self, embedded::Embedded};

pub mod pb {
    tonic::include_proto!("audit.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/audit_descriptor.bin"));
}

/// A record of every posting.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    /// Where to serve the audit service (and its participant).
    #[arg(long, default_value = "127.0.0.1:7003")]
    pub listen: SocketAddr,
    /// This service's participant id at the coordinator.
    #[arg(long, default_value = "audit")]
    pub id: String,
    /// The twopc coordinator.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// This service's own database (libpq key=value string or postgres:// URL).
    #[arg(long)]
    pub postgres: String,
    /// How often this service's prepared branches are checked with the coordinator, in ms.
    #[arg(long, default_value_t = 5_000)]
    pub resolve_interval_ms: u64,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS records (
    id bigserial PRIMARY KEY, service text NOT NULL, account text NOT NULL,
    amount bigint NOT NULL, memo text NOT NULL, at timestamptz NOT NULL DEFAULT now())";

/// The `audit.v1.Audit` service.
pub struct Audit {
    db: Embedded,
}

#[tonic::async_trait]
impl pb::audit_server::Audit for Audit {
    async fn record(
        &self,
        req: Request<pb::RecordRequest>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        let r = req.into_inner();
        let refused = r.memo.trim().is_empty();
        let record_id = self
            .db
            .transaction(|pg| {
                Box::pin(async move {
                    if refused {
                        // Failing the work dooms the transaction this call is part of.
                        return Err(Status::invalid_argument("audit: a posting needs a memo"));
                    }
                    let row = pg
                        .query_one(
                            "INSERT INTO records (service, account, amount, memo) VALUES ($1, $2, $3, $4) RETURNING id",
                            &[&r.service, &r.account, &r.amount, &r.memo],
                        )
                        .await
                        .map_err(|e| participant::error::statement_status(&e))?;
                    Ok(row.get::<_, i64>(0))
                })
            })
            .await?;
        Ok(Response::new(pb::RecordResponse { record_id }))
    }
}

/// Serves the audit service on `listener` until `shutdown`.
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
        Box::pin(async move {
            pg.batch_execute(SCHEMA)
                .await
                .map_err(|e| participant::error::statement_status(&e))
        })
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the table: {e}"))?;
    let client = Client::connect(&args.coordinator)?;
    db.router(client, &[pb::FILE_DESCRIPTOR_SET])?
        .add_service(pb::audit_server::AuditServer::new(Audit { db: db.clone() }))
        .serve_with_incoming_shutdown(twopc::process::server::incoming(listener), shutdown)
        .await?;
    Ok(())
}

#[allow(dead_code)] // the tests include this file for `run`
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    // Named crash points for crash-recovery harnesses (docs/FAILPOINTS.md).
    twopc::process::failpoints::setup_from_env().map_err(anyhow::Error::msg)?;
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(listener, args, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
