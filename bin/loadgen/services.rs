//! The `services` and `services-local` systems: what atomicity costs a service architecture,
//! which is how most users deploy twopc.
//!
//! Two ledger services (examples/ledger.rs: their own gRPC API, their own database, the
//! participant embedded, no transaction code) serve on loadgen's server runtime, one on each
//! PostgreSQL server. A client credits one account on each of `--branches` ledgers, calling
//! both at once as the other systems send their statements:
//! - `services`: inside `transact`; the propagation layer carries the transaction to each
//!   ledger, whose Post runs in it, and twopc commits both or neither;
//! - `services-local`: the same calls outside any transaction; each ledger commits its own
//!   write on its own, with no atomicity: what the services cost without twopc.

#[allow(dead_code)] // its own `main` is the example's, not ours
#[path = "../../examples/ledger.rs"]
mod ledger;

use crate::systems::ACCOUNTS;
use anyhow::{Context, Result};
use ledger::pb::ledger_client::LedgerClient;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tower_layer::Layer;
use twopc::client::propagation::{Propagate, PropagateLayer};
use twopc::client::{Client, transact};
use twopc::process::tls::Tls;
use twopc::testkit::cluster::PgCluster;
use twopc::testkit::wait::{self, Health};

/// How long a ledger may take to serve.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The two ledgers, as a client service calls them.
pub struct Services {
    client: Client,
    ledgers: Vec<LedgerClient<Propagate<Channel>>>,
}

/// Starts a ledger on each database, enlisting with the coordinator at `coordinator`, and
/// gives each the accounts the workload credits. Runs on the server runtime; answers with the
/// ledgers' URLs once they serve.
pub async fn start(coordinator: &str, pgs: &[Arc<PgCluster>]) -> Result<Vec<String>> {
    let mut urls = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let args = ledger::Args {
            listen: listener.local_addr()?,
            id: format!("ledger-{}", i + 1),
            coordinator: coordinator.to_string(),
            postgres: pg.conn_str(),
            audit: None,
            resolve_interval_ms: 5_000,
        };
        tokio::spawn(ledger::run(listener, args, std::future::pending()));
        wait::until_serving(&Tls::default(), &url, Health::Serving, READY_TIMEOUT).await?;
        // The ledger made its tables as it started; the balances exist, so a credit updates.
        pg.client()
            .await?
            .batch_execute(&format!(
                "INSERT INTO balances SELECT 'a' || g, 0 FROM generate_series(1, {ACCOUNTS}) g \
                 ON CONFLICT DO NOTHING"
            ))
            .await?;
        urls.push(url);
    }
    Ok(urls)
}

impl Services {
    /// A client service's connections: to the coordinator and to each ledger.
    pub async fn connect(coordinator: &str, urls: &[String]) -> Result<Services> {
        let mut ledgers = Vec::new();
        for url in urls {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to the ledger at {url}"))?;
            ledgers.push(LedgerClient::new(PropagateLayer.layer(channel)));
        }
        Ok(Services {
            client: Client::connect(coordinator)?,
            ledgers,
        })
    }

    /// One credit of a random account on each of `branches` ledgers: in one global
    /// transaction (`global`), or each committed by its ledger alone. Ok: committed.
    pub async fn transfer(&self, branches: usize, global: bool) -> Result<()> {
        let ledgers = &self.ledgers[..branches];
        let post_all = || {
            futures::future::try_join_all(ledgers.iter().map(|ledger| {
                let mut ledger = ledger.clone();
                let account = format!("a{}", rand::rng().random_range(1..=ACCOUNTS));
                async move {
                    ledger
                        .post(ledger::pb::PostRequest {
                            account,
                            amount: 1,
                            memo: "loadgen".into(),
                        })
                        .await
                }
            }))
        };
        match global {
            true => {
                transact(&self.client, |_tx| async {
                    post_all().await?;
                    Ok::<_, anyhow::Error>(())
                })
                .await
            }
            false => {
                post_all().await?;
                Ok(())
            }
        }
    }
}
