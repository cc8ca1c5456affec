//! The TCP streams under Rampart's gRPC connections where many small messages share one
//! connection: a member's client listeners (`rampart-server::serve`), its outgoing peer
//! connections ([`BatchedConnector`], `rampart-raft::network`) and the load generator's
//! connections (`rampart-bench`). Also [`grpc_frame`], the framing of one gRPC message that
//! those ends write by hand where they bypass tonic's codec.
//!
//! h2 (under tonic) writes to the socket each time its connection task runs out of frames to
//! send, and on a busy connection that was once per message:
//! - It writes a DATA frame of 256 bytes or more by reference when the stream supports
//!   vectored writes, and holds at most one such frame per write, so every response (or put
//!   request) of that size got its own `writev`. A range response with a 256-byte value is
//!   ~300 bytes: a member made about 1.7 `writev` calls per read.
//! - The task that finishes a response wakes the connection task, and tokio runs a task woken
//!   that way next, before the other responses in the queue, so even small frames went out
//!   one at a time.
//!
//! [`BatchedWrites`] answers both: it reports no vectored writes, so h2 copies frames below
//! 1 KiB into its 16 KiB buffer, and it sends the writing task back to the scheduler once
//! before each write, so the responses already queued behind it join the same write. On a
//! 64-client read run a member went from ~1.7 to ~0.15 write calls per response, and used
//! 20–30% less CPU per read (finding 13 in docs/performance.md). The extra cost is one task
//! poll per write; the extra latency, one trip through the run queue.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tonic::codegen::http::Uri;

/// A byte stream that tells its writer it has no vectored writes, so h2 batches small frames,
/// and that lets the writer's task yield once before each write, so that frames other tasks
/// are about to queue (responses of the same batch of requests) go into the same write.
/// Everything else is passed through.
#[derive(Debug)]
pub struct BatchedWrites<T> {
    inner: T,
    /// The writer was sent back to the scheduler once for the write in progress.
    yielded: bool,
}

impl<T> BatchedWrites<T> {
    pub fn new(inner: T) -> Self {
        BatchedWrites { inner, yielded: false }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.yielded = false;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// The point of the type: h2 reads this to choose between chaining and copying frames.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl tonic::transport::server::Connected for BatchedWrites<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Opens the TCP connections of a tonic channel (`Endpoint::connect_with_connector`) as
/// [`BatchedWrites`] streams, with Nagle off, leaving from `local_ip` when it is set (tonic's
/// own connector would make one `writev` per frame: an AppendEntries call was three, its
/// HEADERS, its DATA and the empty DATA frame that ends the request).
///
/// A failed connection attempt (refused, unreachable, or over `connect_timeout`) is reported
/// as a "tcp connect error", as hyper's own connector words it: callers tell from it that a
/// request never left (rampart-server retries a forwarded write only then).
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchedConnector {
    pub local_ip: Option<IpAddr>,
    pub connect_timeout: Option<std::time::Duration>,
}

impl tonic::codegen::Service<Uri> for BatchedConnector {
    type Response = TokioIo<BatchedWrites<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let BatchedConnector { local_ip, connect_timeout } = *self;
        Box::pin(async move {
            let connect = async {
                let (host, port) =
                    host_port(&uri).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
                connect(&host, port, local_ip).await
            };
            let connected = match connect_timeout {
                Some(limit) => tokio::time::timeout(limit, connect)
                    .await
                    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {limit:?}")))),
                None => connect.await,
            };
            let stream = connected.map_err(|e| io::Error::new(e.kind(), format!("tcp connect error: {e}")))?;
            Ok(TokioIo::new(BatchedWrites::new(stream)))
        })
    }
}

/// The host (without IPv6 brackets) and port (80 when absent) a URL such as
/// `http://127.0.0.1:2380` names.
pub fn host_port(uri: &Uri) -> Option<(String, u16)> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_string();
    Some((host, uri.port_u16().unwrap_or(80)))
}

/// A TCP connection to the first address of `host` that answers, with Nagle off, leaving from
/// `local_ip` when it is set: how every peer and bench connection is opened.
pub async fn connect(host: &str, port: u16, local_ip: Option<IpAddr>) -> io::Result<TcpStream> {
    let mut last_err = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
    for addr in tokio::net::lookup_host((host, port)).await? {
        match connect_from(addr, local_ip).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Connects to `addr`, bound to `local_ip` first when it is of the same address family.
async fn connect_from(addr: SocketAddr, local_ip: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = local_ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// The prefix of every gRPC message on the wire: a compressed flag (1 byte) and the message's
/// length (4 bytes, big-endian).
pub const GRPC_PREFIX_BYTES: usize = 5;

/// `message` as one uncompressed gRPC message: the prefix, then its protobuf encoding. Callers
/// keep messages far below 4 GiB (request and response limits).
pub fn grpc_frame<M: prost::Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("a gRPC message is below 4 GiB"));
    message.encode(&mut buf).expect("the buffer was sized by encoded_len");
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::transport::server::Connected;

    #[tokio::test]
    async fn failed_connects_say_tcp_connect_error_whether_refused_or_unanswered() {
        use tonic::codegen::Service;
        let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        // A listener that accepts nothing with a full queue: further SYNs go unanswered.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let silent = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) = tokio::time::timeout(std::time::Duration::from_millis(200), TcpStream::connect(silent)).await {
                fillers.push(s);
            }
        }
        let mut connector = BatchedConnector { local_ip: None, connect_timeout: Some(std::time::Duration::from_millis(300)) };
        for addr in [refused, silent] {
            let uri: Uri = format!("http://{addr}").parse().unwrap();
            let err = connector.call(uri).await.expect_err("no connection");
            assert!(err.to_string().starts_with("tcp connect error"), "{addr}: {err}");
        }
    }

    #[tokio::test]
    async fn passes_bytes_through_both_ways_and_reports_no_vectored_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        let mut server = BatchedWrites::new(server);
        let mut client = BatchedWrites::new(client.await.unwrap());
        assert!(!server.is_write_vectored());
        assert_eq!(server.connect_info().remote_addr(), Some(client.get_ref().local_addr().unwrap()));

        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }

    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn each_write_first_yields_once_and_wakes_the_writer() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = BatchedWrites::new(a);
        let wakes = std::sync::Arc::new(CountWakes(0.into()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        for round in 1..=2 {
            assert!(Pin::new(&mut a).poll_write(&mut cx, b"x").is_pending(), "round {round}: yields first");
            assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), round, "and wakes itself");
            match Pin::new(&mut a).poll_write(&mut cx, b"x") {
                Poll::Ready(Ok(1)) => {}
                other => panic!("round {round}: the second poll writes, got {other:?}"),
            }
        }
        let mut got = [0u8; 2];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"xx");
    }
}
