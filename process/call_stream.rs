//! Many calls over one long-lived bidirectional gRPC stream: each request carries a number that
//! its reply repeats, and replies come in any order.
//!
//! Why: on this project's 2-core machines a unary gRPC call costs about 85 µs of CPU over its
//! two ends (a new HTTP/2 stream, HPACK headers, a server task, the token check). A message on
//! a stream that is already open costs a fraction of that, and messages queued together leave
//! in one frame. The coordinator sends its phase calls to each participant this way (Phases),
//! and each participant its enlistments to the coordinator (Enlist).
//!
//! A call over a stream keeps the meaning of the unary call it stands for: the server runs the
//! same step for both, and a call whose stream breaks before its reply fails as a unary call
//! that got no answer, which every caller already handles.

use crate::proto;
use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch};
use tonic::Status;

/// A failed call's status as a reply carries it: code, message and ASCII metadata.
pub fn error(status: &Status) -> proto::PhaseError {
    let metadata = status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                Some((key.to_string(), value.to_str().ok()?.to_string()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    proto::PhaseError {
        code: status.code() as i32,
        message: status.message().to_string(),
        metadata,
    }
}

/// The status a reply's error stands for, as the unary call would have failed.
pub fn status(error: proto::PhaseError) -> Status {
    let mut status = Status::new(tonic::Code::from(error.code), error.message);
    for (key, value) in error.metadata {
        if let (Ok(key), Ok(value)) = (
            key.parse::<tonic::metadata::AsciiMetadataKey>(),
            value.parse(),
        ) {
            status.metadata_mut().insert(key, value);
        }
    }
    status
}

/// A reply that names the call it answers.
pub trait Numbered {
    fn call(&self) -> u64;
}

impl Numbered for proto::PhaseReply {
    fn call(&self) -> u64 {
        self.call
    }
}

impl Numbered for proto::EnlistReply {
    fn call(&self) -> u64 {
        self.call
    }
}

/// The client's end: one stream, opened on first use and again after it breaks.
pub struct Line<Req, Rep> {
    /// Names the stream in logs ("Phases stream to http://...").
    name: String,
    /// Counted each time a stream opens (one per peer unless they break).
    metric: &'static str,
    /// The stream in use; behind an async lock so that one caller opens it while the others
    /// wait for it rather than each opening their own.
    stream: tokio::sync::Mutex<Option<Arc<Open<Req, Rep>>>>,
    /// Call numbers, unique on this line's streams.
    next_call: AtomicU64,
    /// Streams opened so far.
    opened: AtomicU64,
}

/// A stream just opened: where its requests go, and its replies.
pub type Opened<Req, Rep> = (mpsc::UnboundedSender<Req>, tonic::Streaming<Rep>);

/// Why a call over the line brought no reply.
#[derive(Debug)]
pub enum LineError<E> {
    /// Opening the stream failed as the opener said (the caller decides what that means: a
    /// peer that serves no stream gets unary calls).
    Open(E),
    /// The stream broke after the request was sent, before its reply: the call may or may
    /// not have run, exactly as a unary call that got no answer.
    Broke(Status),
}

/// An open stream: where requests go, and who waits for which reply.
struct Open<Req, Rep> {
    requests: mpsc::UnboundedSender<Req>,
    waiting: Arc<Mutex<Waiting<Rep>>>,
}

struct Waiting<Rep> {
    /// The replies stopped (the stream ended or broke): no call may wait on it any more.
    closed: bool,
    calls: HashMap<u64, oneshot::Sender<Rep>>,
}

impl<Req: Send + 'static, Rep: Numbered + Send + 'static> Line<Req, Rep> {
    pub fn new(name: String, metric: &'static str) -> Self {
        Line {
            name,
            metric,
            stream: tokio::sync::Mutex::new(None),
            next_call: AtomicU64::new(1),
            opened: AtomicU64::new(0),
        }
    }

    /// Sends `request(call number)` and waits for its reply; `open` opens a stream when none
    /// is, and answers with where its requests go and its replies. Cancel-safe: a caller that
    /// gives up (its timeout) leaves no entry behind.
    pub async fn call<E, Fut>(
        &self,
        request: impl Fn(u64) -> Req,
        open: impl Fn() -> Fut,
    ) -> Result<Rep, LineError<E>>
    where
        Fut: Future<Output = Result<Opened<Req, Rep>, E>>,
    {
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        // A stream found closed as the call is entered was broken by an earlier call's failure,
        // not this one's: open a fresh one once rather than failing a call nobody sent.
        for _ in 0..2 {
            let open = self.open(&open).await.map_err(LineError::Open)?;
            let (tx, rx) = oneshot::channel();
            {
                let mut waiting = open.waiting.lock().unwrap();
                if waiting.closed {
                    continue;
                }
                waiting.calls.insert(call, tx);
            }
            let _forget = Forget {
                waiting: &open.waiting,
                call,
            };
            if open.requests.unbounded_send(request(call)).is_err() {
                continue;
            }
            return rx.await.map_err(|_| {
                LineError::Broke(Status::unavailable(format!(
                    "the {} broke before the answer came",
                    self.name
                )))
            });
        }
        Err(LineError::Broke(Status::unavailable(format!(
            "the {} keeps closing",
            self.name
        ))))
    }

    /// How many streams have been opened.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// The open stream, or a new one.
    async fn open<E, Fut>(&self, open: &impl Fn() -> Fut) -> Result<Arc<Open<Req, Rep>>, E>
    where
        Fut: Future<Output = Result<Opened<Req, Rep>, E>>,
    {
        let mut stream = self.stream.lock().await;
        if let Some(current) = stream.as_ref()
            && !current.waiting.lock().unwrap().closed
        {
            return Ok(Arc::clone(current));
        }
        // Dropping the old stream's sender ends its requests, which lets the peer end it.
        *stream = None;
        let (requests, mut replies) = open().await?;
        let waiting = Arc::new(Mutex::new(Waiting {
            closed: false,
            calls: HashMap::new(),
        }));
        let current = Arc::new(Open {
            requests,
            waiting: Arc::clone(&waiting),
        });
        let name = self.name.clone();
        tokio::spawn(async move {
            let end = loop {
                match replies.message().await {
                    Ok(Some(reply)) => {
                        // No waiter: the caller gave up.
                        let waiter = waiting.lock().unwrap().calls.remove(&reply.call());
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(reply);
                        }
                    }
                    Ok(None) => break "ended".to_string(),
                    Err(status) => break format!("broke: {}", status.message()),
                }
            };
            let mut waiting = waiting.lock().unwrap();
            tracing::debug!(open_calls = waiting.calls.len(), "{name} {end}");
            waiting.closed = true;
            // Dropping the senders fails every call still waiting, at once.
            waiting.calls.clear();
        });
        *stream = Some(Arc::clone(&current));
        self.opened.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(self.metric).increment(1);
        Ok(current)
    }
}

/// Takes a call's entry out when its caller stops waiting, answered or not.
struct Forget<'a, Rep> {
    waiting: &'a Mutex<Waiting<Rep>>,
    call: u64,
}

impl<Rep> Drop for Forget<'_, Rep> {
    fn drop(&mut self) {
        self.waiting.lock().unwrap().calls.remove(&self.call);
    }
}

/// The replies a server sends on a stream of calls.
pub type Replies<Rep> = Pin<Box<dyn Stream<Item = Result<Rep, Status>> + Send>>;

/// The server's end: runs each call from `requests` in a task of its own (a slow one holds no
/// other up) and sends its reply as soon as it is ready, until the caller ends the stream or
/// `closing` completes. A graceful shutdown waits for every stream to end, and the caller keeps
/// its stream open for ever: once `closing` completes no new call is taken, those in flight
/// still answer, then the stream ends.
pub fn serve<Req, Rep, Fut>(
    mut requests: tonic::Streaming<Req>,
    closing: impl Future<Output = ()> + Send + 'static,
    handle: impl Fn(Req) -> Fut + Send + 'static,
) -> Replies<Rep>
where
    Req: Send + 'static,
    Rep: Send + 'static,
    Fut: Future<Output = Rep> + Send + 'static,
{
    let (replies, stream) = mpsc::unbounded();
    tokio::spawn(async move {
        tokio::pin!(closing);
        loop {
            let request = tokio::select! {
                r = requests.message() => r,
                () = &mut closing => break,
            };
            let Ok(Some(request)) = request else { break };
            let (reply, replies) = (handle(request), replies.clone());
            tokio::spawn(async move {
                // The caller may have gone: nothing to do, the step is done.
                let _ = replies.unbounded_send(reply.await);
            });
        }
    });
    Box::pin(stream.map(Ok))
}

/// `closing` as [`serve`] takes it: complete once it turns true, or once its server is gone
/// (its sender dropped, as when the server's task is stopped).
pub async fn closed(mut closing: watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}
