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
use crate::proto::TxnId;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderValue, Request, Response};

/// The metadata key that carries a global transaction's id between services.
pub const TXN_ID_HEADER: &str = "twopc-txn-id";

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

impl<S, B> Service<Request<B>> for Propagate<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(tx) = current() {
            let headers = req.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&tx.id().to_string()) {
                headers.insert(TXN_ID_HEADER, v);
            }
            if !headers.contains_key("traceparent")
                && let Ok(v) = HeaderValue::from_str(&tx.id().traceparent())
            {
                headers.insert("traceparent", v);
            }
        }
        self.inner.call(req)
    }
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
        match header.to_str().ok().and_then(|v| v.parse::<TxnId>().ok()) {
            Some(id) => Box::pin(within(self.client.join(id), self.inner.call(req))),
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
        let tx = client.join(TxnId::generate());
        let echo = tower::service_fn(|req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(req.headers().clone())
        });
        let mut caller = PropagateLayer.layer(echo);

        // As a tonic client does: the call is made from inside the task's code.
        let inside = within(tx.clone(), async { caller.call(request(None)).await })
            .await
            .unwrap();
        let outside = caller.call(request(None)).await.unwrap();

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
