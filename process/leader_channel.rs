//! A channel to a coordinator that may be several replicas, of which one leads (docs/HA.md).
//!
//! Every process that calls the coordinator (participants, `twopc::client`, twopcctl, the
//! tools) takes `--coordinator URL,URL,URL` and dials through this. Calls go to the replica
//! believed to lead. A replica that does not lead refuses a call before doing anything with it
//! (UNAVAILABLE, with the leader's URL in `twopc-leader` when it knows it), so such a call is
//! sent again, to the named leader or else to the next replica, for up to [`FOLLOW_FOR`]: long
//! enough to ride out an election. A call that failed in transport is *not* sent again here (it
//! may have reached a leader that died with it); it fails as it did, and the next call tries the
//! next replica.
//!
//! With one URL this is the plain channel, with nothing buffered or re-sent.

use crate::process::tls::{Tls, TlsError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::transport::Channel;

/// How long a call keeps looking for the leader: the default lease and an election's worth.
pub const FOLLOW_FOR: Duration = Duration::from_secs(6);

/// The metadata key in which a replica that does not lead names the one that does.
pub const LEADER_HEADER: &str = "twopc-leader";

/// One coordinator, or the replicas of one, as a tonic channel.
#[derive(Clone)]
pub struct LeaderChannel {
    inner: Route,
}

#[derive(Clone)]
enum Route {
    One(Channel),
    Replicas(Arc<Replicas>),
}

struct Replicas {
    tls: Tls,
    /// Every replica dialled so far (the configured ones, and any leader named that was not
    /// among them): URL and channel.
    known: Mutex<Vec<(String, Channel)>>,
    /// The index in `known` of the replica believed to lead.
    current: AtomicUsize,
}

impl LeaderChannel {
    /// Dials lazily (nothing connects until the first call): `urls` is one URL, or several
    /// separated by commas.
    pub fn new(urls: &str, tls: &Tls) -> Result<LeaderChannel, TlsError> {
        let urls: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let known = urls
            .iter()
            .map(|url| Ok((url.to_string(), dial(tls, url)?)))
            .collect::<Result<Vec<_>, TlsError>>()?;
        let inner = match <[_; 1]>::try_from(known) {
            Ok([(_, channel)]) => Route::One(channel),
            Err(known) if known.is_empty() => {
                return Err(TlsError::NoUrl);
            }
            Err(known) => Route::Replicas(Arc::new(Replicas {
                tls: tls.clone(),
                known: Mutex::new(known),
                current: AtomicUsize::new(0),
            })),
        };
        Ok(LeaderChannel { inner })
    }

    /// Opens a long-lived stream with `open` on the replica believed to lead. This channel
    /// cannot carry one itself (it keeps a call's body to send it again, and a stream's body
    /// never ends), but opening a stream sends nothing the callee acts on, so it follows
    /// refusals and tries the next replica after a transport failure, for up to
    /// [`FOLLOW_FOR`], as a unary call could not.
    pub async fn open_stream<T, Fut>(
        &self,
        open: impl Fn(Channel) -> Fut,
    ) -> Result<T, tonic::Status>
    where
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let replicas = match &self.inner {
            Route::One(channel) => return open(channel.clone()).await,
            Route::Replicas(replicas) => replicas,
        };
        let until = Instant::now() + FOLLOW_FOR;
        loop {
            let (i, channel) = replicas.current();
            let status = match open(channel).await {
                Ok(opened) => return Ok(opened),
                Err(status) => status,
            };
            let leader = status.metadata().get(LEADER_HEADER).cloned();
            let refused = leader.is_some() || status.code() == tonic::Code::Unavailable;
            if !refused || Instant::now() >= until {
                return Err(status);
            }
            // No leader named: nobody leads yet (an election), or this replica is unreachable.
            replicas
                .refused_by(i, leader.as_ref().and_then(|l| l.to_str().ok()))
                .await;
        }
    }

    /// Moves on to the next replica: for a caller that learnt by other means (a health check
    /// answering NOT_SERVING, say) that the current one does not lead.
    pub fn next_replica(&self) {
        if let Route::Replicas(replicas) = &self.inner {
            replicas.advance_from(replicas.current.load(Ordering::Relaxed));
        }
    }
}

/// One coordinator, on a channel already set up.
impl From<Channel> for LeaderChannel {
    fn from(channel: Channel) -> Self {
        LeaderChannel {
            inner: Route::One(channel),
        }
    }
}

/// While a call is open on a connection that has gone quiet, ping this often...
pub(crate) const PING_EVERY: Duration = Duration::from_secs(1);
/// ...and give the connection up when a ping goes unanswered this long.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// A replica that is frozen (SIGSTOP, a suspended VM) or whose machine vanished keeps its
/// connections open: the kernel, or nobody, answers no segment. Without pings a call to it
/// would wait forever; with them it fails in transport within `PING_EVERY + PING_TIMEOUT`
/// (about when another replica has taken over) and the next call tries the next replica.
fn dial(tls: &Tls, url: &str) -> Result<Channel, TlsError> {
    Ok(tls
        .endpoint(url)?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(PING_EVERY)
        .keep_alive_timeout(PING_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

impl Replicas {
    fn current(&self) -> (usize, Channel) {
        let known = self.known.lock().unwrap();
        let i = self.current.load(Ordering::Relaxed) % known.len();
        (i, known[i].1.clone())
    }

    /// The next replica after `from`, unless another call moved on already.
    fn advance_from(&self, from: usize) {
        let n = self.known.lock().unwrap().len();
        let _ = self.current.compare_exchange(
            from,
            (from + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Believe `url` leads, dialling it if it is new.
    fn follow(&self, url: &str) {
        let mut known = self.known.lock().unwrap();
        let i = match known.iter().position(|(u, _)| u == url) {
            Some(i) => i,
            None => match dial(&self.tls, url) {
                Ok(channel) => {
                    known.push((url.to_string(), channel));
                    known.len() - 1
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, "a coordinator replica named a leader that cannot be dialled");
                    return;
                }
            },
        };
        self.current.store(i, Ordering::Relaxed);
    }

    /// Replica `i` refused a call, naming `leader` (or no one: an election is under way):
    /// follow the leader named, or try the next replica after a pause.
    async fn refused_by(&self, i: usize, leader: Option<&str>) {
        match leader.filter(|l| !l.is_empty()) {
            Some(leader) => self.follow(leader),
            None => {
                self.advance_from(i);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn call(
        self: Arc<Self>,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, tonic::transport::Error> {
        let (parts, body) = request.into_parts();
        // A unary call's body is one small message; keep it to send again.
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(status) => return Ok(status.into_http()),
        };
        let until = Instant::now() + FOLLOW_FOR;
        loop {
            let (i, mut channel) = self.current();
            let mut again = http::Request::new(Body::new(Full::new(Bytes::clone(&body))));
            *again.method_mut() = parts.method.clone();
            *again.uri_mut() = parts.uri.clone();
            *again.version_mut() = parts.version;
            *again.headers_mut() = parts.headers.clone();
            std::future::poll_fn(|cx| Service::poll_ready(&mut channel, cx)).await?;
            let response = match Service::call(&mut channel, again).await {
                Ok(response) => response,
                Err(e) => {
                    self.advance_from(i);
                    return Err(e);
                }
            };
            let Some(leader) = response.headers().get(LEADER_HEADER) else {
                return Ok(response);
            };
            if Instant::now() >= until {
                return Ok(response);
            }
            self.refused_by(i, leader.to_str().ok()).await;
        }
    }
}

impl Service<http::Request<Body>> for LeaderChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.inner {
            Route::One(channel) => channel.poll_ready(cx),
            Route::Replicas(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match &mut self.inner {
            Route::One(channel) => Box::pin(channel.call(request)),
            Route::Replicas(replicas) => Box::pin(Arc::clone(replicas).call(request)),
        }
    }
}
