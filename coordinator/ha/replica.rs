//! One replica of a coordinator cluster on etcd (docs/HA.md).
//!
//! It serves at once, but as a [`Standby`] that sends callers to the leader, and campaigns
//! ([`Election`]). Once it leads it loads the log from etcd, runs recovery exactly as a
//! restarted single coordinator does, and only then opens the gate. A leader that loses its
//! lease stops the process at once, as kube-controller-manager does: its table of live
//! transactions, its phase-2 tasks and its view of the log all belong to a term that is over,
//! and a fresh start (the supervisor restarts it, as a standby) is the one state nobody has to
//! reason about. Its writes could not have landed anyway: they are fenced.

use super::leader::{Candidacy, Election};
use super::standby::{Gate, Standby};
use crate::coordinator::log::{EtcdLog, EtcdTarget, LogError};
use crate::coordinator::{
    Config, Coordinator, EXIT_DEPOSED, EtcdConfig, drain, service, start_core,
};
use crate::proto::coordinator_server::CoordinatorServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Campaigns, leads, and serves on `listener` until `shutdown` completes (or the lead is lost,
/// which ends the process).
pub async fn run(
    listener: TcpListener,
    config: Config,
    etcd: EtcdConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Short per request: a request stuck on a member that just died must give up soon enough
    // to be sent again (to another member) well within a lease.
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout((etcd.lease_ttl / 4).max(Duration::from_millis(250)))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(tls) = etcd.tls.client() {
        options = options.with_tls(tls);
    }
    if let Some(user) = &etcd.user {
        // etcd's default ("simple") tokens live in each member's memory: a member that
        // restarts refuses the token the others still accept, and any token lapses after
        // --auth-token-ttl unused. A refused call was not applied; authenticate and send it again.
        options = options
            .with_user(&user.name, &user.password)
            .with_auto_token_refresh(true);
    }
    let client = etcd_client::Client::connect(&etcd.endpoints, Some(options))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot set up the etcd client for {:?}: {e}",
                etcd.endpoints
            )
        })?;
    let election = Election {
        client: client.clone(),
        key: format!("{}leader", etcd.prefix),
        advertise: etcd.advertise.clone(),
        lease_ttl: etcd.lease_ttl,
    };

    let (gate, gated) = watch::channel(Gate::Standing(Candidacy {
        leader: None,
        why: "campaigning".into(),
    }));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, ServingStatus::NotServing).await;

    // The server runs from the start, beside the campaign and then the term; it ends once
    // `shutdown` completes and a term's transactions are drained.
    let (leading_tx, leading) = watch::channel(None);
    let drain_timeout = config.drain_timeout;
    let (closing, enlist_end) = watch::channel(false);
    let drained = {
        let mut leading = leading.clone();
        let health_reporter = health_reporter.clone();
        async move {
            shutdown.await;
            set_health(&health_reporter, ServingStatus::NotServing).await;
            // A term that started wants its transactions drained; `leading` says so.
            let core: Option<Arc<Coordinator<EtcdLog>>> = leading.borrow_and_update().clone();
            if let Some(core) = core {
                tracing::info!("shutting down: no new transactions; waiting for those in flight");
                drain(&core, drain_timeout).await;
            }
            let _ = closing.send(true);
        }
    };
    let server = crate::process::server::server_with(
        health_service,
        config.tls.server(),
        config.auth.gate(),
    )?
    .add_service(Standby::new(gated))
    .serve_with_incoming_shutdown(crate::process::server::incoming(listener), drained);
    tokio::pin!(server);

    let mut leadership = tokio::select! {
        won = election.win(|candidacy| { gate.send_replace(Gate::Standing(candidacy)); }) => won,
        served = &mut server => {
            served?;
            return Ok(());
        }
    };

    // Leading: load the log this term's fence guards, recover, then open the gate.
    let target = EtcdTarget {
        client,
        prefix: etcd.prefix.clone(),
        fence: leadership.fence.clone(),
        write_timeout: etcd.lease_ttl.max(Duration::from_secs(2)),
    };
    // A read that hit an etcd member that is down fails fast; another may answer. Try again
    // while the lease lasts, rather than give the lead up over one member.
    let (log, id) = loop {
        match EtcdLog::open(target.clone(), config.id.as_deref()).await {
            Ok(opened) => break opened,
            Err(LogError::Etcd(why)) if leadership.check().valid() => {
                tracing::warn!(%why, "cannot load the decision log from etcd yet; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let core = start_core(id, log, &config)?;
    leading_tx.send_replace(Some(Arc::clone(&core)));
    gate.send_replace(Gate::Leading {
        service: CoordinatorServer::new(
            service::Service::new(Arc::clone(&core))
                .with_closing(enlist_end)
                .with_lease({
                    let lease = leadership.check();
                    move || lease.valid()
                }),
        ),
        lease: leadership.check(),
    });
    set_health(&health_reporter, ServingStatus::Serving).await;
    tracing::info!(coordinator_id = core.id(), advertise = %etcd.advertise, prefix = %etcd.prefix, "coordinator replica leads and serves");

    tokio::select! {
        reason = leadership.deposed() => {
            tracing::error!(%reason, "this coordinator replica lost the lead; stopping at once (a supervisor restarts it as a standby)");
            std::process::exit(EXIT_DEPOSED);
        }
        served = &mut server => {
            served?;
        }
    }
    // Shut down cleanly: hand the lead over now rather than after the lease's TTL.
    leadership.resign().await;
    Ok(())
}

/// Health as load balancers read it: only the leader is SERVING, as a whole and as a
/// Coordinator.
async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for service in ["", crate::proto::coordinator_server::SERVICE_NAME] {
        reporter.set_service_status(service, status).await;
    }
}
