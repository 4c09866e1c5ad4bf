//! Waiting, bounded: for a condition to hold ([`eventually`]) and for a server to answer its
//! health check ([`serving`], [`until_serving`]).
//!
//! Every wait in the test kit, the tests and the tools goes through here, so none of them can
//! wait forever and each says what it was waiting for when it gives up.

use anyhow::{Result, bail};
use std::future::Future;
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::process::tls::Tls;

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(100);

/// The health service name a coordinator reports SERVING under only while it leads.
pub const COORDINATOR_SERVICE: &str = "twopc.v1.Coordinator";

/// Polls `check` until it holds or `within` has passed; whether it held.
pub async fn holds_within<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it holds; panics after `within`, naming `what` (for tests).
pub async fn eventually_within<F, Fut>(what: &str, within: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        holds_within(within, check).await,
        "timed out after {within:?} waiting until {what}"
    );
}

/// [`eventually_within`] 30 s: long enough for recovery and a lease to expire, short enough
/// that a regression fails instead of hanging.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(what, Duration::from_secs(30), check).await
}

/// What a health check must say for a server to count as up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// SERVING for the whole server (service "").
    Serving,
    /// Any answer at all: a coordinator replica that stands by answers NOT_SERVING.
    Answers,
    /// SERVING for `twopc.v1.Coordinator`: the replica leads.
    Leads,
}

/// Whether the gRPC server at `url` answers its health check as `health` asks. Each attempt is
/// bounded (2 s to connect, 2 s to answer).
pub async fn serving(tls: &Tls, url: &str, health: Health) -> bool {
    let Ok(endpoint) = tls.endpoint(url) else {
        return false;
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1));
    let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(2), endpoint.connect()).await
    else {
        return false;
    };
    let service = match health {
        Health::Leads => COORDINATOR_SERVICE,
        Health::Serving | Health::Answers => "",
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: service.into(),
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Ok(resp)) if health == Health::Answers || resp.get_ref().status() == ServingStatus::Serving
    )
}

/// Waits until [`serving`] holds, up to `within`.
pub async fn until_serving(tls: &Tls, url: &str, health: Health, within: Duration) -> Result<()> {
    if !holds_within(within, || serving(tls, url, health)).await {
        bail!("{url} did not answer its health check ({health:?}) within {within:?}");
    }
    Ok(())
}
