//! The ambient transaction across gRPC calls, for any tonic service: a client layer that puts
//! the caller's ambient txn id into the request's `twopc-txn-id` metadata (with its
//! `traceparent`, so the callee's spans join the transaction's trace), and a server layer that
//! makes a request's `twopc-txn-id` the ambient transaction of its handler.
//!
//! ```no_run
//! # async fn example(client: twopc::client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use tower_layer::Layer;
//! use twopc::client::propagation::{JoinLayer, PropagateLayer};
//! // A caller: every request made inside a `transact` carries its transaction.
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:7000").connect_lazy();
//! let channel = PropagateLayer.layer(channel);
//! // A server: a handler called with `twopc-txn-id` runs inside that transaction.
//! let server = tonic::transport::Server::builder().layer(JoinLayer::new(client));
//! # let _ = (channel, server);
//! # Ok(())
//! # }
//! ```

use super::Client;
use super::ambient::{current, within};
use crate::proto::{Start, TxnId};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderValue, Request, Response};

/// The metadata key that carries a global transaction's id between services.
pub const TXN_ID_HEADER: &str = "twopc-txn-id";
/// With an id the caller chose: the epoch and timeout its statements carry, so the callee's
/// statements may be the ones that create the transaction (docs/PROTOCOL.md §12).
pub const EPOCH_HEADER: &str = "twopc-epoch";
pub const TIMEOUT_HEADER: &str = "twopc-timeout-ms";
/// On the callee's response: the participants its handler sent statements to, which the
/// caller's Commit must name too.
pub const PARTICIPANTS_HEADER: &str = "twopc-participants";

/// Adds `twopc-txn-id` (and `traceparent`, unless the request has one) to every request made
/// inside an ambient transaction. Requests made outside one go as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateLayer;

impl<S> tower_layer::Layer<S> for PropagateLayer {
    type Service = Propagate<S>;

    fn layer(&self, inner: S) -> Propagate<S> {
        Propagate { inner }
    }
}

/// The service [`PropagateLayer`] makes.
#[derive(Clone, Debug)]
pub struct Propagate<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for Propagate<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(tx) = current() else {
            return Box::pin(self.inner.call(req));
        };
        let headers = req.headers_mut();
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        put(TXN_ID_HEADER, tx.id().to_string());
        if let Some(start) = tx.start() {
            put(EPOCH_HEADER, start.epoch.to_string());
            put(TIMEOUT_HEADER, start.timeout_ms.to_string());
        }
        if !headers.contains_key("traceparent")
            && let Ok(v) = HeaderValue::from_str(&tx.id().traceparent())
        {
            headers.insert("traceparent", v);
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            tx.add_participants(participants_in(&resp));
            Ok(resp)
        })
    }
}

/// The participants a callee reported in [`PARTICIPANTS_HEADER`].
fn participants_in<RB>(resp: &Response<RB>) -> Vec<String> {
    resp.headers()
        .get_all(PARTICIPANTS_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// Runs each request that carries `twopc-txn-id` inside that transaction (joined through
/// `client`: the handler's statements and nested calls are part of it; its outcome stays the
/// caller's). A malformed id is refused with INVALID_ARGUMENT rather than run outside any
/// transaction, where its writes would commit on their own.
#[derive(Clone)]
pub struct JoinLayer {
    client: Client,
}

impl JoinLayer {
    pub fn new(client: Client) -> JoinLayer {
        JoinLayer { client }
    }
}

impl<S> tower_layer::Layer<S> for JoinLayer {
    type Service = Join<S>;

    fn layer(&self, inner: S) -> Join<S> {
        Join {
            inner,
            client: self.client.clone(),
        }
    }
}

/// The service [`JoinLayer`] makes.
#[derive(Clone)]
pub struct Join<S> {
    inner: S,
    client: Client,
}

impl<S, B> Service<Request<B>> for Join<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(header) = req.headers().get(TXN_ID_HEADER) else {
            return Box::pin(self.inner.call(req));
        };
        let number = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let start = number(EPOCH_HEADER).and_then(|epoch| {
            let timeout_ms = number(TIMEOUT_HEADER).unwrap_or(0);
            Start::from_fields(epoch, u32::try_from(timeout_ms).unwrap_or(u32::MAX), "")
        });
        match header.to_str().ok().and_then(|v| v.parse::<TxnId>().ok()) {
            Some(id) => {
                let tx = self.client.join(id, start);
                let call = within(tx.clone(), self.inner.call(req));
                Box::pin(async move {
                    let mut resp = call.await?;
                    // Also after an error: a statement that failed may have enlisted.
                    let names = tx.participants().join(",");
                    if !names.is_empty()
                        && let Ok(v) = HeaderValue::from_str(&names)
                    {
                        resp.headers_mut().insert(PARTICIPANTS_HEADER, v);
                    }
                    Ok(resp)
                })
            }
            None => {
                let status = tonic::Status::invalid_argument(format!(
                    "{TXN_ID_HEADER} metadata {:?} is not a transaction id (a UUID as Begin returns it)",
                    crate::proto::shown(&String::from_utf8_lossy(header.as_bytes()))
                ));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_layer::Layer;

    /// A server handler that reports the ambient transaction it runs in.
    fn reporting() -> impl Service<
        Request<()>,
        Response = Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<Response<tonic::body::Body>, std::convert::Infallible>>
                 + Send
                 + 'static,
    > + Clone {
        tower::service_fn(|_req: Request<()>| async {
            let seen = current().map(|tx| tx.id().to_string()).unwrap_or_default();
            let mut resp = Response::new(tonic::body::Body::empty());
            resp.headers_mut()
                .insert("seen", HeaderValue::from_str(&seen).unwrap());
            Ok(resp)
        })
    }

    fn request(id: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(id) = id {
            req.headers_mut()
                .insert(TXN_ID_HEADER, HeaderValue::from_str(id).unwrap());
        }
        req
    }

    #[tokio::test]
    async fn a_request_carrying_an_id_runs_its_handler_inside_that_transaction() {
        let client = Client::connect("http://127.0.0.1:1").unwrap();
        let mut server = JoinLayer::new(client).layer(reporting());
        let id = TxnId::generate().to_string();

        let joined = server.call(request(Some(&id))).await.unwrap();
        let alone = server.call(request(None)).await.unwrap();
        let malformed = server.call(request(Some("not-an-id"))).await.unwrap();

        assert_eq!(joined.headers()["seen"], id.as_str());
        assert_eq!(alone.headers()["seen"], "");
        let status = tonic::Status::from_header_map(malformed.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_call_made_inside_a_transaction_carries_its_id_and_trace() {
        let client = Client::connect("http://127.0.0.1:1").unwrap();
        let start = Start::from_fields(41, 9000, "");
        let tx = client.join(TxnId::generate(), start);
        // A callee that echoes the request's headers and says it ran statements on p9.
        let echo = tower::service_fn(|req: Request<()>| async move {
            let mut resp = Response::new(());
            *resp.headers_mut() = req.headers().clone();
            resp.headers_mut()
                .insert(PARTICIPANTS_HEADER, HeaderValue::from_static("p9"));
            Ok::<_, std::convert::Infallible>(resp)
        });
        let mut caller = PropagateLayer.layer(echo);

        // As a tonic client does: the call is made from inside the task's code.
        let inside = within(tx.clone(), async { caller.call(request(None)).await })
            .await
            .unwrap();
        let outside = caller.call(request(None)).await.unwrap();
        let (inside, outside) = (inside.headers(), outside.headers());

        assert_eq!(
            inside[EPOCH_HEADER], "41",
            "the callee may create the transaction"
        );
        assert_eq!(inside[TIMEOUT_HEADER], "9000");
        assert_eq!(
            tx.participants(),
            ["p9"],
            "the caller's Commit names the callee's"
        );

        assert_eq!(inside[TXN_ID_HEADER], tx.id().to_string().as_str());
        let trace_id = |v: &str| v.split('-').nth(1).map(str::to_string);
        assert_eq!(
            trace_id(inside["traceparent"].to_str().unwrap()),
            trace_id(&tx.id().traceparent()),
            "the transaction's trace"
        );
        assert!(!outside.contains_key(TXN_ID_HEADER));
    }
}
