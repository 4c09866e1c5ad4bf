//! The `twopc.v1.Coordinator` service of a replica that may not lead.
//!
//! A replica serves from the moment it starts, leader or not, so that a client that reached it
//! learns where to go: while it does not lead (or its lease has run out by its own count) every
//! call is UNAVAILABLE with the leader's URL (empty when not known) in the `twopc-leader` metadata; once it
//! leads, calls go to the real service. Health and reflection are served either way.

use super::leader::{Candidacy, LeaseCheck};
use crate::process::leader_channel::LEADER_HEADER;
use std::convert::Infallible;
use std::task::{Context, Poll};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;

/// Where calls go now.
#[derive(Clone)]
pub enum Gate<S> {
    Standing(Candidacy),
    Leading { service: S, lease: LeaseCheck },
}

/// The Coordinator service behind a [`Gate`].
#[derive(Clone)]
pub struct Standby<S> {
    gate: watch::Receiver<Gate<S>>,
}

impl<S> Standby<S> {
    pub fn new(gate: watch::Receiver<Gate<S>>) -> Self {
        Standby { gate }
    }
}

impl<S> tonic::server::NamedService for Standby<S> {
    const NAME: &'static str = crate::proto::coordinator_server::SERVICE_NAME;
}

impl<S> tonic::codegen::Service<http::Request<Body>> for Standby<S>
where
    S: tonic::codegen::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let gate = self.gate.borrow().clone();
        let refusal = match gate {
            Gate::Leading { mut service, lease } if lease.valid() => {
                return Box::pin(async move {
                    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                    service.call(request).await
                });
            }
            Gate::Leading { .. } => Candidacy {
                leader: None,
                why: "this replica's leader lease ran out; it is stepping down".into(),
            },
            Gate::Standing(candidacy) => candidacy,
        };
        Box::pin(async move { Ok(refuse(refusal).into_http()) })
    }
}

/// UNAVAILABLE, saying where to go instead.
fn refuse(candidacy: Candidacy) -> tonic::Status {
    let message = match &candidacy.leader {
        Some(leader) => format!(
            "this coordinator replica does not lead ({}); send calls to the leader at {leader}",
            candidacy.why
        ),
        None => format!(
            "no coordinator replica leads yet ({}); retry shortly",
            candidacy.why
        ),
    };
    let mut status = tonic::Status::unavailable(message);
    // Present even when empty: it tells a client that this call was refused untouched, and so
    // may go to another replica (`process::leader_channel`).
    let leader = candidacy.leader.unwrap_or_default();
    let value = leader
        .parse()
        .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static(""));
    status.metadata_mut().insert(LEADER_HEADER, value);
    status
}
