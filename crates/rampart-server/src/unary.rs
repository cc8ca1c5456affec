//! The KV service's unary calls (Range, Put, DeleteRange, Txn) served straight from the HTTP/2
//! request, in front of tonic's router and codec.
//!
//! Every other call (watch and lease streams, the other services, the JSON gateway, health)
//! goes on to tonic unchanged. For these four, tonic routed the request through axum's router,
//! boxed its body into a streaming decoder with its own buffer, and sent the answer through a
//! streaming encoder. A unary call is simpler than that: read the body (one message), decode it,
//! call the same [`KvService`] handler, and answer with one DATA frame and the `grpc-status`
//! trailer. The handlers, their checks and their errors are the ones tonic calls; the limits are
//! those `serve` gives tonic's `KvServer` (finding 30 in docs/performance.md).
//!
//! This layer also decides where a call runs on its connection ([`crate::inline`]): the four
//! KV calls in the connection's own task when they are short (puts, and calls whose reads and
//! answers are about single keys), everything else in a task of its own.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body::{Body as _, Frame, SizeHint};
use prost::Message;
use rampart_proto::etcdserverpb::kv_server::Kv;
use rampart_proto::etcdserverpb::{request_op, DeleteRangeRequest, RangeRequest, TxnRequest};
use rampart_proto::wire::{grpc_frame, GRPC_PREFIX_BYTES};
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::Status;
use tower_layer::Layer;

use crate::api::KvService;

/// The unary KV methods served here.
#[derive(Clone, Copy, Debug)]
enum Rpc {
    Range,
    Put,
    DeleteRange,
    Txn,
}

impl Rpc {
    fn of(path: &str) -> Option<Rpc> {
        Some(match path {
            "/etcdserverpb.KV/Range" => Rpc::Range,
            "/etcdserverpb.KV/Put" => Rpc::Put,
            "/etcdserverpb.KV/DeleteRange" => Rpc::DeleteRange,
            "/etcdserverpb.KV/Txn" => Rpc::Txn,
            _ => return None,
        })
    }
}

/// Puts [`UnaryKv`] in front of a member's client-port service.
#[derive(Clone)]
pub struct UnaryKvLayer {
    kv: KvService,
    /// The largest request message accepted (tonic's `max_decoding_message_size`).
    max_request_bytes: usize,
    /// The largest response message sent (tonic's `max_encoding_message_size`).
    max_response_bytes: usize,
}

impl UnaryKvLayer {
    pub fn new(kv: KvService, max_request_bytes: usize, max_response_bytes: usize) -> Self {
        UnaryKvLayer { kv, max_request_bytes, max_response_bytes }
    }
}

impl<S> Layer<S> for UnaryKvLayer {
    type Service = UnaryKv<S>;

    fn layer(&self, inner: S) -> UnaryKv<S> {
        UnaryKv { layer: self.clone(), inner }
    }
}

/// Serves the unary KV calls of gRPC over HTTP/2 requests; passes everything else to `inner`.
#[derive(Clone)]
pub struct UnaryKv<S> {
    layer: UnaryKvLayer,
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S> tower_service::Service<Request<Body>> for UnaryKv<S>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> BoxFuture {
        let deadline = grpc_timeout(request.headers());
        let call: BoxFuture = match Rpc::of(request.uri().path()) {
            Some(rpc) if is_grpc(&request) => Box::pin(serve(self.layer.clone(), rpc, request)),
            // Streams, maintenance calls and the gateway may run long: a task of their own, so
            // they hold up no other call of their connection (`crate::inline`).
            _ => {
                let grpc = is_grpc(&request);
                let call = crate::inline::off_connection(self.inner.call(request));
                Box::pin(async move {
                    call.await.unwrap_or_else(|e| {
                        let status = failed(e);
                        Ok(if grpc { status.into_http() } else { http_error(status.message()) })
                    })
                })
            }
        };
        match deadline {
            None => call,
            // tonic's server answered a call still running at the client's deadline so.
            Some(d) => Box::pin(async move {
                tokio::time::timeout(d, call).await.unwrap_or_else(|_| Ok(Status::cancelled("Timeout expired").into_http()))
            }),
        }
    }
}

/// The client's deadline from the `grpc-timeout` header (gRPC's wire format: at most 8 digits
/// and a unit); none if it is missing or malformed, as tonic's server had it.
fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The status for a call whose task failed: it panicked, or the runtime is shutting down.
fn failed(e: tokio::task::JoinError) -> Status {
    if e.is_panic() {
        tracing::error!(%e, "a client call's task panicked");
    } else {
        tracing::debug!(%e, "a client call's task was cancelled");
    }
    Status::internal(format!("the call failed: {e}"))
}

/// A plain HTTP 500 for a request that did not come as gRPC (the gateway's HTTP/1).
fn http_error(message: &str) -> Response<Body> {
    let mut response = Response::new(Body::new(message.to_string()));
    *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    response
}

/// Whether a range is short to read in the connection's task: a single key. A range over many
/// keys may walk all of them whatever its `limit` (to count them, to sort them, to filter them
/// by revision), so it runs in a task of its own (`crate::inline`).
fn range_is_short(r: &RangeRequest) -> bool {
    r.range_end.is_empty()
}

/// A delete is executed by the state machine; its answer is short unless it returns the
/// previous values of a range.
fn delete_is_short(r: &DeleteRangeRequest) -> bool {
    r.range_end.is_empty() || !r.prev_kv
}

/// A txn is short when every operation in it is: its reads are read here if it only reads, and
/// their results are encoded here in any case.
fn txn_is_short(r: &TxnRequest) -> bool {
    use request_op::Request as R;
    r.success.iter().chain(&r.failure).all(|op| match &op.request {
        Some(R::RequestRange(x)) => range_is_short(x),
        Some(R::RequestDeleteRange(x)) => delete_is_short(x),
        Some(R::RequestTxn(t)) => txn_is_short(t),
        Some(R::RequestPut(_)) | None => true,
    })
}

/// gRPC runs over HTTP/2 with a content type of `application/grpc` or `application/grpc+...`.
/// Anything else on these paths (say, HTTP/1 from a browser) gets tonic's own answer.
fn is_grpc(request: &Request<Body>) -> bool {
    request.version() == Version::HTTP_2
        && request.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| {
            let v = v.as_bytes();
            v == b"application/grpc" || v.starts_with(b"application/grpc+") || v.starts_with(b"application/grpc;")
        })
}

async fn serve(layer: UnaryKvLayer, rpc: Rpc, request: Request<Body>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let answer = async {
        if let Some(encoding) = parts.headers.get("grpc-encoding").filter(|e| e.as_bytes() != b"identity") {
            let encoding = String::from_utf8_lossy(encoding.as_bytes()).into_owned();
            return Err(Status::unimplemented(format!("Content is compressed with `{encoding}` which isn't supported")));
        }
        let message = read_message(body, layer.max_request_bytes).await?;
        let metadata = MetadataMap::from_headers(parts.headers);
        let (kv, extensions, max) = (layer.kv.clone(), parts.extensions, layer.max_response_bytes);
        match rpc {
            Rpc::Range => {
                let r: RangeRequest = decode(message)?;
                let short = range_is_short(&r);
                here_or_spawned(short, async move { call(r, metadata, extensions, max, |r| kv.range(r)).await }).await
            }
            Rpc::Put => call(decode(message)?, metadata, extensions, max, |r| kv.put(r)).await,
            Rpc::DeleteRange => {
                let r: DeleteRangeRequest = decode(message)?;
                let short = delete_is_short(&r);
                here_or_spawned(short, async move { call(r, metadata, extensions, max, |r| kv.delete_range(r)).await }).await
            }
            Rpc::Txn => {
                let r: TxnRequest = decode(message)?;
                let short = txn_is_short(&r);
                here_or_spawned(short, async move { call(r, metadata, extensions, max, |r| kv.txn(r)).await }).await
            }
        }
    };
    Ok(match answer.await {
        Ok(message) => {
            let mut response = Response::new(Body::new(UnaryBody { message: Some(message), trailers: true }));
            response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            response
        }
        // A trailers-only response, as tonic sends for an error.
        Err(status) => status.into_http(),
    })
}

/// Runs a short call in the caller's task (the connection's, `crate::inline`), any other in a
/// task of its own.
async fn here_or_spawned<F>(short: bool, call: F) -> Result<Bytes, Status>
where
    F: Future<Output = Result<Bytes, Status>> + Send + 'static,
{
    if short {
        call.await
    } else {
        crate::inline::off_connection(call).await.unwrap_or_else(|e| Err(failed(e)))
    }
}

/// Decodes a request message; tonic's words for one that does not decode.
fn decode<Q: Message + Default>(message: Bytes) -> Result<Q, Status> {
    Q::decode(message).map_err(|e| Status::internal(format!("failed to decode Protobuf message: {e}")))
}

/// Calls `handler` with `request` and the request's metadata, and returns the answer framed for
/// the response body.
async fn call<Q, A, F, Fut>(
    request: Q,
    metadata: MetadataMap,
    extensions: http::Extensions,
    max_response_bytes: usize,
    handler: F,
) -> Result<Bytes, Status>
where
    A: Message,
    F: FnOnce(tonic::Request<Q>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<A>, Status>>,
{
    let answer = handler(tonic::Request::from_parts(metadata, extensions, request)).await?.into_inner();
    frame(&answer, max_response_bytes)
}

/// Reads a unary request body: the first gRPC message, unframed. Like tonic, anything after
/// it is ignored.
async fn read_message(mut body: Body, max_request_bytes: usize) -> Result<Bytes, Status> {
    let mut buf = BytesMut::new();
    let mut want = None;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else { continue };
        // The common case, the whole message in one DATA frame, is not copied.
        if buf.is_empty() {
            if let Some(message) = whole_message(&data, max_request_bytes)? {
                return Ok(message);
            }
        }
        buf.extend_from_slice(&data);
        if want.is_none() && buf.len() >= GRPC_PREFIX_BYTES {
            want = Some(GRPC_PREFIX_BYTES + message_len(&buf, max_request_bytes)?);
        }
        if want.is_some_and(|n| buf.len() >= n) {
            let mut message = buf.freeze();
            message.truncate(want.unwrap());
            return Ok(message.slice(GRPC_PREFIX_BYTES..));
        }
    }
    Err(Status::internal("Missing request message."))
}

/// The message of `data` if `data` begins with a whole one.
fn whole_message(data: &Bytes, max_request_bytes: usize) -> Result<Option<Bytes>, Status> {
    if data.len() < GRPC_PREFIX_BYTES {
        return Ok(None);
    }
    let end = GRPC_PREFIX_BYTES + message_len(data, max_request_bytes)?;
    Ok((data.len() >= end).then(|| data.slice(GRPC_PREFIX_BYTES..end)))
}

/// The length of the message whose prefix begins `prefix`, checked against the limit.
fn message_len(mut prefix: &[u8], max_request_bytes: usize) -> Result<usize, Status> {
    match prefix.get_u8() {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        f => return Err(Status::internal(format!("protocol error: received message with invalid compression flag: {f}"))),
    }
    let len = prefix.get_u32() as usize;
    if len > max_request_bytes {
        // grpc-go's words, which etcd clients see for a message over etcd's limit.
        return Err(Status::resource_exhausted(format!("grpc: received message larger than max ({len} vs. {max_request_bytes})")));
    }
    Ok(len)
}

/// `message` with its gRPC prefix, refused over `max` bytes as tonic refuses it.
fn frame<A: Message>(message: &A, max: usize) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    Ok(grpc_frame(message))
}

/// A successful unary response body: the framed message, then `grpc-status: 0`.
struct UnaryBody {
    message: Option<Bytes>,
    trailers: bool,
}

impl http_body::Body for UnaryBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if std::mem::take(&mut self.trailers) {
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && !self.trailers
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.message.as_ref().map_or(0, |m| m.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_proto::etcdserverpb::PutRequest;

    #[test]
    fn only_calls_about_single_keys_are_short() {
        use rampart_proto::etcdserverpb::{request_op::Request as R, RequestOp};
        let get = RangeRequest { key: b"a".to_vec(), ..Default::default() };
        let scan = RangeRequest { key: b"a".to_vec(), range_end: b"z".to_vec(), ..Default::default() };
        // A limit does not bound the work: counting, sorting and revision filters walk the range.
        let page = RangeRequest { limit: 1, ..scan.clone() };
        assert!(range_is_short(&get));
        assert!(!range_is_short(&scan));
        assert!(!range_is_short(&page));

        let delete = DeleteRangeRequest { key: b"a".to_vec(), range_end: b"z".to_vec(), ..Default::default() };
        let delete_returning = DeleteRangeRequest { prev_kv: true, ..delete.clone() };
        let delete_one_returning = DeleteRangeRequest { key: b"a".to_vec(), prev_kv: true, ..Default::default() };
        assert!(delete_is_short(&delete));
        assert!(!delete_is_short(&delete_returning));
        assert!(delete_is_short(&delete_one_returning));

        let op = |r: R| RequestOp { request: Some(r) };
        let txn = |ops: Vec<RequestOp>| TxnRequest { success: ops, ..Default::default() };
        let put = PutRequest { key: b"k".to_vec(), prev_kv: true, ..Default::default() };
        assert!(txn_is_short(&txn(vec![op(R::RequestRange(get.clone())), op(R::RequestPut(put.clone()))])));
        assert!(!txn_is_short(&txn(vec![op(R::RequestRange(get)), op(R::RequestRange(scan.clone()))])));
        // A scan nested in a txn, or the answer of a txn that writes, is still a scan.
        assert!(!txn_is_short(&txn(vec![op(R::RequestTxn(txn(vec![op(R::RequestRange(scan.clone()))])))])));
        assert!(!txn_is_short(&txn(vec![op(R::RequestRange(scan)), op(R::RequestPut(put))])));
        assert!(!txn_is_short(&txn(vec![op(R::RequestDeleteRange(delete_returning))])));
    }

    #[test]
    fn grpc_timeouts_parse_as_tonic_did() {
        use std::time::Duration;
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(of("4999m"), Some(Duration::from_millis(4999)));
        assert_eq!(of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(of("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(of("100n"), Some(Duration::from_nanos(100)));
        assert_eq!(of("123456789S"), None);
        assert_eq!(of("S"), None);
        assert_eq!(of("5s"), None);
        assert_eq!(of("oneS"), None);
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    fn framed(put: &PutRequest) -> Bytes {
        frame(put, usize::MAX).unwrap()
    }

    fn body(chunks: Vec<Bytes>) -> Body {
        let frames = chunks.into_iter().map(|c| Ok::<_, Infallible>(Frame::data(c)));
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_message_is_read_whole_or_in_pieces() {
        let put = PutRequest { key: b"k".to_vec(), value: vec![9; 1000], ..Default::default() };
        let f = framed(&put);
        let whole = read_message(body(vec![f.clone()]), 4096).await.unwrap();
        assert_eq!(PutRequest::decode(whole).unwrap(), put);
        let pieces = vec![f.slice(..3), f.slice(3..500), f.slice(500..)];
        assert_eq!(PutRequest::decode(read_message(body(pieces), 4096).await.unwrap()).unwrap(), put);
        // Trailing bytes after the first message are ignored, as tonic does.
        let extra = vec![f.clone(), f.clone()];
        assert_eq!(PutRequest::decode(read_message(body(extra), 4096).await.unwrap()).unwrap(), put);
    }

    #[tokio::test]
    async fn bad_bodies_get_grpc_errors() {
        let put = PutRequest { key: b"k".to_vec(), value: vec![9; 1000], ..Default::default() };
        let e = read_message(body(vec![framed(&put)]), 100).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().starts_with("grpc: received message larger than max (10"), "{e:?}");
        let e = read_message(body(vec![]), 100).await.unwrap_err();
        assert_eq!(e.message(), "Missing request message.");
        let e = read_message(body(vec![framed(&put).slice(..20)]), 4096).await.unwrap_err();
        assert_eq!(e.message(), "Missing request message.");
        let e = read_message(body(vec![Bytes::from_static(b"\x01\0\0\0\0")]), 100).await.unwrap_err();
        assert!(e.message().contains("compressed-flag"), "{e:?}");
    }

    #[test]
    fn an_answer_over_the_limit_is_refused() {
        let put = PutRequest { key: b"k".to_vec(), value: vec![9; 100], ..Default::default() };
        assert_eq!(frame(&put, 50).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(frame(&put, 500).unwrap().len(), GRPC_PREFIX_BYTES + put.encoded_len());
    }
}
