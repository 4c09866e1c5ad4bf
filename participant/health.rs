//! The participant's `grpc.health.v1` status: SERVING only while it can really serve, that is
//! while its PostgreSQL answers and its coordinator is reachable (a branch cannot open without
//! registering), NOT_SERVING while draining. Checked every second, for `twopc.v1.Participant`
//! (which the coordinator checks) and, in the standalone process, the overall status ("")
//! too. A service embedding the participant keeps "" for itself: it may well serve its own
//! calls while twopc cannot.

use super::branches::Participant;
use super::link::GrpcCoordinator;
use super::postgres::Postgres;
use super::service::Service;
use crate::process::leader_channel::LeaderChannel;
use crate::proto::participant_server::ParticipantServer;
use std::sync::Weak;
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

const EVERY: Duration = Duration::from_secs(1);

/// Whose status the watch sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `twopc.v1.Participant` and "": the standalone participant, which serves nothing else.
    Process,
    /// `twopc.v1.Participant` only: the participant embedded in a service.
    Participant,
}

pub async fn set(reporter: &HealthReporter, scope: Scope, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    if scope == Scope::Process {
        reporter.set_service_status("", status).await;
    }
    reporter
        .set_service_status(
            <ParticipantServer<Service<Postgres, GrpcCoordinator>> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Whether PostgreSQL answers and the coordinator says it is serving; why not, if not.
async fn check(
    core: &Participant,
    own: &mut Option<tokio_postgres::Client>,
    coordinator: &LeaderChannel,
) -> Result<(), String> {
    if own.as_ref().is_none_or(|c| c.is_closed()) {
        *own = Some(
            core.db
                .connect_outside_pool()
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let conn = own.as_ref().expect("connected above");
    // Doubles as the gauges of what this database holds in doubt.
    let row = conn
        .query_one(
            "SELECT count(*)::float8, coalesce(extract(epoch FROM now() - min(prepared)), 0)::float8 \
             FROM pg_prepared_xacts WHERE gid LIKE 'twopc:%'",
            &[],
        )
        .await
        .map_err(|e| format!("PostgreSQL: {e}"))?;
    metrics::gauge!("twopc_participant_prepared_branches").set(row.get::<_, f64>(0));
    metrics::gauge!("twopc_participant_oldest_prepared_seconds").set(row.get::<_, f64>(1));
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(EVERY);
    let resp = tokio::time::timeout(EVERY, HealthClient::new(coordinator.clone()).check(req))
        .await
        .map_err(|_| "the coordinator did not answer a health check".to_string())?
        .map_err(|s| format!("the coordinator is not reachable: {}", s.message()))?;
    if resp.into_inner().status != ServingStatus::Serving as i32 {
        // A replica that does not lead says NOT_SERVING: look for the one that does.
        coordinator.next_replica();
        return Err("the coordinator is not serving".into());
    }
    Ok(())
}

pub fn spawn(
    core: Weak<Participant>,
    coordinator: LeaderChannel,
    reporter: HealthReporter,
    scope: Scope,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut own = None;
        let mut last: Option<bool> = None;
        loop {
            let Some(participant) = core.upgrade() else {
                return;
            };
            let result = check(&participant, &mut own, &coordinator).await;
            drop(participant);
            let serving = result.is_ok();
            if last != Some(serving) {
                match &result {
                    Ok(()) => tracing::info!("health: SERVING"),
                    Err(why) => tracing::warn!(why, "health: NOT_SERVING"),
                }
                set(&reporter, scope, serving).await;
                last = Some(serving);
            }
            tokio::time::sleep(EVERY).await;
        }
    })
}
