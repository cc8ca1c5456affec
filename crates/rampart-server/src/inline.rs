//! The client port's connections, served run-to-completion: each connection is one task, and
//! the calls arriving on it are polled inside that task instead of as tasks of their own.
//!
//! hyper hands each HTTP/2 stream to an executor; tonic's server gives it tokio's, so every call
//! was a task: the connection's task spawned it, the runtime woke a worker for it, and the call
//! woke the connection's task back to write its answer. Here the executor queues a stream on
//! its own connection and the connection's task polls it next to the connection, so a call is
//! read, handled and answered in one task, and only waits that leave the member's API (raft's
//! commit, the leader's answer to a forwarded write) cost a wake-up. Measured against tonic's
//! server: a fifth less member CPU per put and a quarter more puts at 64 clients
//! (docs/performance.md, finding 36).
//!
//! What the calls of one connection give up is running on two cores at once, so a call must not
//! hold its connection's task for long. [`crate::unary`] decides: the KV calls about single keys
//! (and puts) run in place; every other call's handler runs in a task of its own
//! ([`off_connection`]), as under tonic's server, and is cancelled like one when its stream or
//! connection goes away. A response body is still polled here, by the stream: for streams (watch,
//! lease keep-alive, snapshot) that is the encoding of each message the connection then writes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use futures::FutureExt;
use futures::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use tonic::body::Body;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long an HTTP/2 keep-alive ping may go unanswered (tonic's server default; pings are sent
/// only by clients that ask for them, as before).
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// A failed `accept` (out of file descriptors, say) is retried after this pause.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Accepts connections from `incoming` until `stop` turns true, serving each with `svc` in a
/// task of its own; on `stop`, stops accepting (the listener is dropped), shuts the open
/// connections down gracefully and returns once they have closed, as tonic's server did.
pub async fn serve<I, IO, S>(incoming: I, svc: S, stop: watch::Receiver<bool>)
where
    I: Stream<Item = std::io::Result<IO>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    {
        let mut incoming = std::pin::pin!(incoming);
        let mut stopped = stop.clone();
        loop {
            let accepted = tokio::select! {
                _ = async { let _ = stopped.wait_for(|s| *s).await; } => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = incoming.next() => accepted,
            };
            match accepted {
                Some(Ok(io)) => {
                    connections.spawn(connection(io, svc.clone(), stop.clone()));
                }
                Some(Err(e)) => {
                    tracing::warn!(%e, "accepting a client connection");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
                None => break,
            }
        }
    }
    while connections.join_next().await.is_some() {}
}

/// A call's handler moved off its connection's task into a task of its own; see
/// [`off_connection`].
pub struct OffConnection<T>(tokio::task::JoinHandle<T>);

/// Runs `call` in a task of its own. Dropping the returned future (the client reset the stream,
/// the connection closed, the deadline passed) aborts that task, as it would have dropped the
/// call in place: the Lock and Election services rely on it to give up a waiter whose client
/// went away.
pub fn off_connection<F>(call: F) -> OffConnection<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    OffConnection(tokio::spawn(call))
}

impl<T> Future for OffConnection<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for OffConnection<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The executor hyper gets for one connection: its streams queue here for the connection's task.
#[derive(Clone, Default)]
struct Local {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Vec<Job>>,
    waker: AtomicWaker,
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Local {
    fn execute(&self, fut: F) {
        // A call that panics ends alone, as it did in a task of its own: its stream is reset and
        // the connection's other calls go on.
        let fut = std::panic::AssertUnwindSafe(fut).catch_unwind().map(|r| {
            if r.is_err() {
                tracing::error!("a client call panicked; its stream was reset");
            }
        });
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).push(Box::pin(fut));
        self.shared.waker.wake();
    }
}

/// Serves one connection (HTTP/2, or HTTP/1 for the gateway) until it closes; once `stop` turns
/// true, shuts it down gracefully: calls in progress finish, new ones are refused.
async fn connection<IO, S>(io: IO, svc: S, mut stop: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let local = Local::default();
    // Streams hold the executor, so a stream left in the queue when the connection ends would keep
    // the queue alive through it: empty it however this task ends.
    let _empty_queue = EmptyQueueOnDrop(local.clone());
    // The HTTP/2 settings tonic's server used (all hyper's defaults but these).
    let mut builder = auto::Builder::new(local.clone());
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(None)
        .max_local_error_reset_streams(None);
    builder.http1().timer(TokioTimer::new());
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut svc = svc.clone();
        svc.call(req.map(Body::new))
    });
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(io), svc));
    let mut streams: FuturesUnordered<Job> = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            closed = drive(conn.as_mut(), &local, &mut streams) => {
                if let Err(e) = closed {
                    tracing::debug!(%e, "client connection closed");
                }
                return;
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; }, if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

struct EmptyQueueOnDrop(Local);

impl Drop for EmptyQueueOnDrop {
    fn drop(&mut self) {
        let queued = std::mem::take(&mut *self.0.shared.queue.lock().unwrap_or_else(|e| e.into_inner()));
        drop(queued);
    }
}

/// Polls the connection and its streams until the connection ends.
async fn drive<C: Future>(mut conn: Pin<&mut C>, local: &Local, streams: &mut FuturesUnordered<Job>) -> C::Output {
    std::future::poll_fn(|cx: &mut Context<'_>| {
        local.shared.waker.register(cx.waker());
        loop {
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            let new = std::mem::take(&mut *local.shared.queue.lock().unwrap_or_else(|e| e.into_inner()));
            let started = !new.is_empty();
            streams.extend(new);
            let mut finished = false;
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {
                finished = true;
            }
            // A stream that started or finished may have left frames for the connection to
            // write, and the connection may have new streams: go round again. Otherwise every
            // part waits on a waker that wakes this task.
            if !started && !finished {
                return Poll::Pending;
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{watch, Notify};

    use super::*;

    /// `/ok` answers at once, `/wait` once `release` is notified, `/panic` panics.
    #[derive(Clone)]
    struct Calls {
        release: Arc<Notify>,
    }

    impl tower_service::Service<Request<Body>> for Calls {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let release = self.release.clone();
            let path = req.uri().path().to_string();
            Box::pin(async move {
                match path.as_str() {
                    "/wait" => release.notified().await,
                    "/panic" => panic!("a handler's bug"),
                    _ => {}
                }
                Ok(Response::new(Body::new(http_body_util::Full::new(bytes::Bytes::from(path)))))
            })
        }
    }

    async fn start() -> (std::net::SocketAddr, Arc<Notify>, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let release = Arc::new(Notify::new());
        let (stop, stop_rx) = watch::channel(false);
        let incoming = futures::stream::unfold(listener, |l| async move {
            let accepted = l.accept().await.map(|(s, _)| s);
            Some((accepted, l))
        });
        tokio::spawn(serve(incoming, Calls { release: release.clone() }, stop_rx));
        (addr, release, stop)
    }

    type Sender = hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>;

    async fn connect(addr: std::net::SocketAddr) -> Sender {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        send
    }

    async fn get(send: &mut Sender, path: &str) -> Result<String, hyper::Error> {
        let req = Request::get(format!("http://x{path}")).body(Empty::new()).unwrap();
        let resp = send.send_request(req).await?;
        Ok(String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec()).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_of_one_connection_run_side_by_side_and_a_panic_ends_only_its_own() {
        let (addr, release, _stop) = start().await;
        let send = connect(addr).await;
        // A call still waiting holds up none of the others on its connection.
        let waiting = tokio::spawn({
            let mut send = send.clone();
            async move { get(&mut send, "/wait").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(get(&mut send.clone(), "/ok").await.unwrap(), "/ok");
        // A panicking call resets its own stream...
        assert!(get(&mut send.clone(), "/panic").await.is_err());
        // ...and the connection and its other calls go on.
        assert_eq!(get(&mut send.clone(), "/ok").await.unwrap(), "/ok");
        release.notify_one();
        assert_eq!(waiting.await.unwrap().unwrap(), "/wait");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_moved_off_its_connection_is_cancelled_when_dropped() {
        struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.take().unwrap().send(());
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let call = off_connection(async move {
            let _dropped = Dropped(Some(tx));
            let _ = started_tx.send(());
            std::future::pending::<()>().await
        });
        started.await.unwrap();
        drop(call);
        tokio::time::timeout(Duration::from_secs(5), rx).await.expect("the call's task was not aborted").unwrap();
        // And one left alone gives its answer.
        assert_eq!(off_connection(async { 7 }).await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_stop_a_call_in_progress_still_gets_its_answer() {
        let (addr, release, stop) = start().await;
        let send = connect(addr).await;
        let waiting = tokio::spawn({
            let mut send = send.clone();
            async move { get(&mut send, "/wait").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.notify_one();
        assert_eq!(waiting.await.unwrap().unwrap(), "/wait");
        // No new connection is accepted.
        assert!(TcpStream::connect(addr).await.is_err() || get(&mut connect(addr).await, "/ok").await.is_err());
    }
}
