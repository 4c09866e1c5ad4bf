//! The participant inside a service that owns its database.
//!
//! A service that keeps its own PostgreSQL database needs no participant process next to it:
//! it starts an [`Embedded`] participant (its own pool, its resolver, the same core, gid, xid and
//! PREPARE checks as the standalone `participant`), adds [`Embedded::service`] to its own tonic
//! router so the coordinator can prepare and commit, and runs its statements with
//! [`Embedded::transaction`]: inside an ambient global transaction (`client::transact`, or a
//! request joined through `client::propagation::JoinLayer`) they run in that transaction's
//! branch on this database; outside one, in a local transaction committed on the spot. Either
//! way the work gets the database driver's own client: no gRPC hop per statement.
//!
//! ```no_run
//! # async fn example(db: &twopc::participant::embedded::Embedded) -> Result<(), twopc::participant::error::Error> {
//! let id: i64 = db
//!     .transaction(|pg| Box::pin(async move {
//!         let row = pg
//!             .query_one("INSERT INTO entries (amount) VALUES ($1) RETURNING id", &[&25i64])
//!             .await?;
//!         Ok::<_, twopc::participant::error::Error>(row.get(0))
//!     }))
//!     .await?;
//! # Ok(())
//! # }
//! ```

use super::branches::Participant;
use super::database::Database;
use super::error::Error;
use super::postgres::Postgres;
use super::service::Service;
use super::{Config, start};
use crate::client::Client;
use crate::client::ambient;
use crate::client::propagation::JoinLayer;
use crate::process::leader_channel::LeaderChannel;
use crate::proto::participant_server::ParticipantServer;
use futures::future::BoxFuture;
use std::sync::Arc;
use tonic::transport::server::Router;
use tower_layer::{Identity, Stack};

/// A participant running inside a service, on the service's database.
#[derive(Clone)]
pub struct Embedded {
    core: Arc<Participant>,
    /// To the coordinator: the health watch checks it can be reached.
    coordinator: LeaderChannel,
}

impl Embedded {
    /// Connects to `config.postgres` (checked as the standalone participant checks it) and
    /// starts the in-doubt resolver. `config.advertise` is required: the URL at which the
    /// service serves [`Embedded::service`], which is where the coordinator prepares and
    /// commits this participant's branches.
    pub async fn start(config: Config) -> anyhow::Result<Embedded> {
        let advertise = config.advertise.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "an embedded participant needs `advertise`: the URL of the service it runs in"
            )
        })?;
        let (core, coordinator) = start(&config, advertise).await?;
        tracing::info!(participant_id = %config.id, advertise = %core.advertise(), postgres = core.db.target(), "embedded participant ready");
        Ok(Embedded { core, coordinator })
    }

    /// A server for the service to add its own services to: the `twopc.v1.Participant`
    /// service, health (the overall status is the service's own, SERVING; that of
    /// `twopc.v1.Participant`, which the coordinator checks, is watched as the standalone
    /// participant's is), gRPC reflection of twopc's contract and of `descriptor_sets` (the
    /// service's own), and [`JoinLayer`] in front of everything, so that a request carrying
    /// `twopc-txn-id` runs in that transaction (`client` is whom its handlers' nested
    /// `transact` calls go to).
    pub fn router(
        &self,
        client: Client,
        descriptor_sets: &[&'static [u8]],
    ) -> Result<Router<Stack<JoinLayer, Identity>>, tonic_reflection::server::Error> {
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for set in descriptor_sets {
            v1 = v1.register_encoded_file_descriptor_set(set);
            v1alpha = v1alpha.register_encoded_file_descriptor_set(set);
        }
        let (reporter, health) = tonic_health::server::health_reporter();
        // Ends with the participant (it holds a weak reference).
        super::health::spawn(
            Arc::downgrade(&self.core),
            self.coordinator.clone(),
            reporter,
            super::health::Scope::Participant,
        );
        Ok(tonic::transport::Server::builder()
            .layer(JoinLayer::new(client))
            .add_service(health)
            .add_service(v1.build_v1()?)
            .add_service(v1alpha.build_v1alpha()?)
            .add_service(self.service()))
    }

    /// The `twopc.v1.Participant` service, for the service's own router. It does not serve
    /// `Phases`: that stream stays open for as long as the coordinator runs, and the host's
    /// graceful shutdown, which this service cannot see, would wait on it. The coordinator
    /// then makes its phase calls one RPC each.
    pub fn service(&self) -> ParticipantServer<Service<Postgres, super::link::GrpcCoordinator>> {
        ParticipantServer::new(Service::new(Arc::clone(&self.core)))
    }

    /// Runs `work` on this database: in the ambient global transaction's branch here when the
    /// task is inside one (its outcome is then the coordinator's, and a failure of `work`
    /// dooms the whole transaction), else in a local transaction that commits when `work`
    /// returns `Ok` and rolls back when it returns `Err`.
    pub async fn transaction<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c tokio_postgres::Client) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error> + std::fmt::Display,
    {
        match ambient::current() {
            Some(tx) => {
                // Named whatever the outcome, as a statement sent to a participant is: the
                // caller's Commit must account for a branch that may have enlisted.
                tx.add_participants([self.core.id.clone()]);
                self.core
                    .with_branch(tx.id(), tx.start(), |conn| work(conn.as_ref()))
                    .await
            }
            None => self.local(work).await,
        }
    }

    async fn local<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c tokio_postgres::Client) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error> + std::fmt::Display,
    {
        let db = &self.core.db;
        let conn = Local(Some(db.conn().await?));
        let client = conn.0.as_ref().expect("held until handed back");
        db.begin(client)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let done = work(client).await;
        let conn = conn.hand_back();
        match done {
            Ok(value) => {
                conn.batch_execute("COMMIT").await.map_err(Error::from)?;
                Postgres::release(conn);
                Ok(value)
            }
            Err(e) => {
                db.roll_back_open(conn).await;
                Err(e)
            }
        }
    }
}

/// A local transaction's connection. If the work is dropped halfway (its caller cancelled),
/// the connection is closed, which rolls the transaction back, instead of going back to the
/// pool with the transaction still open for the next user to run in.
struct Local(Option<deadpool_postgres::Object>);

impl Local {
    fn hand_back(mut self) -> deadpool_postgres::Object {
        self.0.take().expect("handed back once")
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}
