//! The unary calls of the closed-loop KV workloads (put, range, txn, and the prefill), sent as
//! gRPC over h2 directly rather than through a tonic `Channel`.
//!
//! The load generator shares the machine with the members it measures. Through tonic, a put cost
//! the generator about 20 µs of CPU: tower's buffer hands each call to a worker task, hyper's
//! client dispatcher hands it to the connection task, and tonic's codec streams the body through
//! its own layers (finding 29 in docs/performance.md). Here a call is what gRPC asks for and
//! nothing more: one HEADERS frame and one DATA frame out, the response's frames back, on a
//! stream of a connection that every client on it shares. Both systems under test see the same
//! requests: same headers, same messages.
//!
//! Streams (watch, lease keep-alive) stay on tonic.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::header::{CONTENT_TYPE, TE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use prost::Message;
use rampart_proto::wire::{self, grpc_frame, BatchedWrites, GRPC_PREFIX_BYTES};
use tonic::{Code, Status};

/// The unary methods the workloads call.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rpc {
    Put,
    Range,
    Txn,
}

impl Rpc {
    const ALL: [Rpc; 3] = [Rpc::Put, Rpc::Range, Rpc::Txn];

    fn path(self) -> &'static str {
        match self {
            Rpc::Put => "/etcdserverpb.KV/Put",
            Rpc::Range => "/etcdserverpb.KV/Range",
            Rpc::Txn => "/etcdserverpb.KV/Txn",
        }
    }
}

/// The largest response message accepted, as tonic's default decoding limit.
const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Receive windows: large enough that WINDOW_UPDATE frames are rare (received data is released
/// as soon as it is read, so they only pace the sender).
const STREAM_WINDOW_BYTES: u32 = 2 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 8 << 20;
/// How long opening a connection (TCP and the h2 preface) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One h2 connection and the generation it belongs to.
#[derive(Clone)]
struct Link {
    /// Bumped by every reconnect, so that of many clients seeing one failure only one reconnects.
    generation: u64,
    send: SendRequest<Bytes>,
    /// Set when the connection task has ended (the server closed it, or it failed).
    closed: Arc<AtomicBool>,
}

/// A connection to one endpoint, shared by the clients assigned to it; reopened on the next
/// call after it fails (a member restarted), as a tonic channel would be.
pub(crate) struct UnaryConn {
    url: String,
    authority: Authority,
    link: Mutex<Link>,
    /// Held while reconnecting, so clients waiting for the same reconnect do not open their own.
    reconnecting: tokio::sync::Mutex<()>,
}

impl UnaryConn {
    /// Opens a connection to `url` (`http://host:port`).
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Arc<UnaryConn>> {
        let uri: Uri = url.parse().with_context(|| format!("bad endpoint {url:?}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            bail!("endpoint {url:?}: only http:// endpoints are supported");
        }
        let authority = uri.authority().cloned().ok_or_else(|| anyhow!("endpoint {url:?} has no host"))?;
        let link = open(&uri, 0).await.with_context(|| format!("cannot connect to {url}"))?;
        Ok(Arc::new(UnaryConn { url: url.to_string(), authority, link: Mutex::new(link), reconnecting: Default::default() }))
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// A working link, replacing `stale` (the generation a client saw fail) if nobody has yet.
    async fn relink(&self, stale: u64) -> Result<Link, Status> {
        let _one = self.reconnecting.lock().await;
        let current = self.link.lock().unwrap().clone();
        if current.generation != stale && !current.closed.load(Ordering::Acquire) {
            return Ok(current);
        }
        let uri: Uri = self.url.parse().expect("parsed when the connection was first opened");
        let fresh = open(&uri, current.generation + 1)
            .await
            .map_err(|e| Status::unavailable(format!("cannot connect to {}: {e:#}", self.url)))?;
        *self.link.lock().unwrap() = fresh.clone();
        Ok(fresh)
    }
}

/// Opens TCP (Nagle off, writes batched as on every gRPC connection of ours) and h2 on it.
async fn open(uri: &Uri, generation: u64) -> anyhow::Result<Link> {
    let (host, port) = wire::host_port(uri).ok_or_else(|| anyhow!("no host in {uri}"))?;
    let opening = async {
        let tcp = wire::connect(&host, port, None).await.context("tcp connect error")?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .handshake(BatchedWrites::new(tcp))
            .await
            .context("h2 handshake")?;
        anyhow::Ok((send, connection))
    };
    let (send, connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, opening).await.map_err(|_| anyhow!("no answer within {CONNECT_TIMEOUT:?}"))??;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    tokio::spawn(async move {
        // Its error, if any, reaches the calls in flight; later calls reconnect.
        let _ = connection.await;
        ended.store(true, Ordering::Release);
    });
    Ok(Link { generation, send, closed })
}

/// One client's handle on a shared connection.
pub(crate) struct UnaryClient {
    conn: Arc<UnaryConn>,
    link: Link,
    /// The full URI of each [`Rpc`], built once.
    uris: [Uri; 3],
}

impl UnaryClient {
    pub(crate) fn new(conn: Arc<UnaryConn>) -> Self {
        let link = conn.link.lock().unwrap().clone();
        let uris = Rpc::ALL.map(|rpc| {
            Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(conn.authority.clone())
                .path_and_query(PathAndQuery::from_static(rpc.path()))
                .build()
                .expect("a scheme, an authority and a static path form a URI")
        });
        UnaryClient { conn, link, uris }
    }

    /// Calls `rpc` with `request`; the server's gRPC status, or `Unavailable` for a connection
    /// failure, is the error.
    pub(crate) async fn call<Q: Message, A: Message + Default>(&mut self, rpc: Rpc, request: &Q) -> Result<A, Status> {
        if self.link.closed.load(Ordering::Acquire) {
            self.link = self.conn.relink(self.link.generation).await?;
        }
        let message = self.exchange(rpc, request).await?;
        A::decode(message).map_err(|e| Status::internal(format!("cannot decode the response: {e}")))
    }

    /// Sends one request and returns the response message, without its gRPC prefix.
    async fn exchange<Q: Message>(&mut self, rpc: Rpc, request: &Q) -> Result<Bytes, Status> {
        let send = &mut self.link.send;
        poll_fn(|cx| send.poll_ready(cx)).await.map_err(transport)?;
        let mut head = Request::new(());
        *head.method_mut() = Method::POST;
        *head.uri_mut() = self.uris[rpc as usize].clone();
        let headers = head.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        let (response, mut body_out) = send.send_request(head, false).map_err(transport)?;
        body_out.send_data(grpc_frame(request), true).map_err(transport)?;

        let (parts, mut body) = response.await.map_err(transport)?.into_parts();
        if parts.status != StatusCode::OK {
            return Err(Status::new(http_status_code(parts.status), format!("HTTP status {}", parts.status)));
        }
        // A response without a message carries its status in the headers ("trailers-only").
        if let Some(status) = Status::from_header_map(&parts.headers) {
            return Err(if status.code() == Code::Ok { Status::internal("the response has no message") } else { status });
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(transport)?;
            body.flow_control().release_capacity(chunk.len()).map_err(transport)?;
            if message.len() + chunk.len() > GRPC_PREFIX_BYTES + MAX_RESPONSE_BYTES {
                return Err(Status::resource_exhausted(format!("response over {MAX_RESPONSE_BYTES} bytes")));
            }
            message.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(transport)?;
        match trailers.as_ref().and_then(Status::from_header_map) {
            Some(status) if status.code() == Code::Ok => {}
            Some(status) => return Err(status),
            None => return Err(Status::internal("the response ended without a grpc-status")),
        }
        unframe(message.freeze())
    }
}

/// The one message of a unary response body.
fn unframe(body: Bytes) -> Result<Bytes, Status> {
    if body.len() < GRPC_PREFIX_BYTES {
        return Err(Status::internal(format!("response body of {} bytes has no gRPC message", body.len())));
    }
    if body[0] != 0 {
        return Err(Status::internal("compressed response, but no compression was asked for"));
    }
    let len = u32::from_be_bytes(body[1..GRPC_PREFIX_BYTES].try_into().expect("4 bytes")) as usize;
    if body.len() != GRPC_PREFIX_BYTES + len {
        return Err(Status::internal(format!(
            "response body of {} bytes, but its message says {len} bytes (unary calls have one message)",
            body.len()
        )));
    }
    Ok(body.slice(GRPC_PREFIX_BYTES..))
}

fn transport(e: h2::Error) -> Status {
    Status::unavailable(format!("connection error: {e}"))
}

/// The gRPC code for a non-200 HTTP status, as the gRPC HTTP/2 spec maps them.
fn http_status_code(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_proto::etcdserverpb::PutRequest;

    #[test]
    fn a_framed_message_unframes_to_itself() {
        let put = PutRequest { key: b"k".to_vec(), value: vec![7; 300], ..Default::default() };
        let framed = grpc_frame(&put);
        assert_eq!(framed.len(), GRPC_PREFIX_BYTES + put.encoded_len());
        let back = PutRequest::decode(unframe(framed).unwrap()).unwrap();
        assert_eq!(back, put);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(unframe(Bytes::from_static(b"\0\0\0")).is_err());
        assert!(unframe(Bytes::from_static(b"\x01\0\0\0\0")).unwrap_err().message().contains("compressed"));
        assert!(unframe(Bytes::from_static(b"\0\0\0\0\x05ab")).unwrap_err().message().contains("says 5 bytes"));
        assert_eq!(unframe(Bytes::from_static(b"\0\0\0\0\0")).unwrap(), Bytes::new());
    }
}
