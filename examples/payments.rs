//! `payments`: a payment provider's front, as a saga's gRPC step calls it (docs/SAGAS.md).
//! `Charge` is a step's action and `Refund` its compensation; each runs its work with the step's
//! barrier (`twopc::client::barrier`) in this service's own database, so a Charge the
//! coordinator sends again (its reply was lost) charges once and answers the first charge, and a
//! Refund that overtakes its Charge keeps that Charge from ever happening. It has no
//! transaction of twopc's: each call commits on its own, as a saga's steps do.
//!
//! ```sh
//! cargo run --example payments -- --listen 127.0.0.1:7010 \
//!     --postgres 'host=127.0.0.1 port=5432 user=… dbname=…'
//! ```

use clap::Parser;
use prost::Message;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::{Request, Response, Status};
use twopc::client::barrier;

pub mod pb {
    tonic::include_proto!("payments.v1");
}

#[derive(Parser, Debug, Clone)]
pub struct Args {
    /// Where to serve the payments service.
    #[arg(long, default_value = "127.0.0.1:7010")]
    pub listen: SocketAddr,
    /// This service's own database (libpq key=value string or postgres:// URL).
    #[arg(long)]
    pub postgres: String,
    /// Charges above this amount are declined (FAILED_PRECONDITION: the saga compensates).
    #[arg(long, default_value_t = 100)]
    pub decline_above: i64,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS charges (
    id bigserial PRIMARY KEY, order_ref text NOT NULL, amount bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now())";

/// The `payments.v1.Payments` service on one connection to its database (a saga step's calls
/// are few; a busy service would keep a pool).
pub struct Payments {
    db: tokio::sync::Mutex<tokio_postgres::Client>,
    decline_above: i64,
    /// For tests: this many Charges apply, then answer UNAVAILABLE as a lost reply would.
    pub lose_replies: AtomicUsize,
}

impl Payments {
    /// The service on `db`, whose tables it creates.
    pub async fn new(db: tokio_postgres::Client, decline_above: i64) -> anyhow::Result<Payments> {
        db.batch_execute(SCHEMA).await?;
        db.batch_execute(barrier::SCHEMA).await?;
        Ok(Payments {
            db: tokio::sync::Mutex::new(db),
            decline_above,
            lose_replies: AtomicUsize::new(0),
        })
    }
}

#[tonic::async_trait]
impl pb::payments_server::Payments for Payments {
    async fn charge(
        &self,
        req: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeReply>, Status> {
        let step = barrier::Step::of(&req)?;
        let charge = req.into_inner();
        if charge.amount > self.decline_above {
            // For good: nothing is charged, and the saga compensates what ran before.
            return Err(Status::failed_precondition(format!(
                "card declined: {} is over the limit of {}",
                charge.amount, self.decline_above
            )));
        }
        let mut db = self.db.lock().await;
        let ran = barrier::action(&mut db, &step, async |tx| {
            let row = tx
                .query_one(
                    "INSERT INTO charges (order_ref, amount) VALUES ($1, $2) RETURNING id",
                    &[&charge.order, &charge.amount],
                )
                .await?;
            let reply = pb::ChargeReply {
                payment_id: row.get(0),
            };
            Ok::<_, tokio_postgres::Error>(reply.encode_to_vec())
        })
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
        let lost = self
            .lose_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost {
            return Err(Status::unavailable("the reply was lost"));
        }
        let reply = pb::ChargeReply::decode(ran.into_output()?.as_slice())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(reply))
    }

    async fn refund(
        &self,
        req: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeReply>, Status> {
        let step = barrier::Step::of(&req)?;
        let mut db = self.db.lock().await;
        barrier::compensation(&mut db, &step, async |tx, charged| {
            // The charge's reply, kept by the barrier: which payment to undo.
            let charged = pb::ChargeReply::decode(charged.as_slice()).unwrap_or_default();
            tx.execute("DELETE FROM charges WHERE id = $1", &[&charged.payment_id])
                .await?;
            Ok::<_, tokio_postgres::Error>(())
        })
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ChargeReply::default()))
    }
}

/// Serves `payments` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    payments: Payments,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(pb::payments_server::PaymentsServer::new(payments))
        .serve_with_incoming_shutdown(twopc::process::server::incoming(listener), shutdown)
        .await?;
    Ok(())
}

#[allow(dead_code)] // the tests and the demo include this file for `Payments` and `serve`
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let args = Args::parse();
    let (db, conn) = tokio_postgres::connect(&args.postgres, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    serve(
        listener,
        Payments::new(db, args.decline_above).await?,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await
}
