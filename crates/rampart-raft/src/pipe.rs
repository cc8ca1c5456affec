//! The AppendEntries pipe: raft's hot path between two members on a plain TCP connection,
//! beside the gRPC peer service on the same port.
//!
//! Every other peer message is a gRPC unary call (`network`), and AppendEntries was too. On a
//! write that cost each side an HTTP/2 stream (HEADERS, HPACK, trailers), tonic's service stack,
//! and two task hand-offs: h2's connection task to the request's own task and back. Replication
//! to one follower is one request at a time anyway (openraft sends the next AppendEntries after
//! the answer to the last), so none of HTTP/2's multiplexing is used. The pipe is one TCP
//! connection per leader and follower, on which the leader's replication task writes a request
//! and reads its answer itself, and the follower's connection task calls openraft itself.
//!
//! # Wire format, version 1
//!
//! The connecting side first sends the 8-byte preface [`PREFACE`] (`RPPIPE` and the version as
//! two ASCII digits). The listener tells a pipe from an HTTP/2 connection by it: HTTP/2's own
//! preface starts `PRI * HT`. Then, in both directions, frames of a `u32` payload length
//! (little-endian) and the payload: a postcard-encoded `AppendEntriesRequest` from the leader, a
//! postcard-encoded `Result<AppendEntriesResponse, String>` back, one answer per request, in
//! order. A payload is at most [`MAX_PEER_MESSAGE_BYTES`]. TCP checksums the bytes; a frame that
//! does not decode closes the connection. A listener that does not know the pipe closes the
//! connection at the preface, and the sender then uses gRPC for that peer.
//!
//! # The propose pipe, version 1
//!
//! Writes a follower forwards to the leader (`rampart-server::forward`) travel the same way on
//! connections of their own, which start with [`PROPOSE_PREFACE`] (`RPPROP01`). The listener
//! answers it with the same 8 bytes before anything else, and the follower sends no write before
//! it has them: a listener that does not know this pipe closes the connection at the preface,
//! and the follower then knows for certain that no write was sent, so it may use gRPC instead.
//! Then the follower sends frames holding a batch of requests (a postcard `Vec<Request>`) and the
//! leader answers each, in order, with a postcard `Result<Vec<Result<Vec<u8>, EtcdError>>,
//! String>`: one result per write, or why the batch was refused. One batch at a time per
//! connection; a follower keeps a connection for each batch it has in flight.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

use crate::network::MAX_PEER_MESSAGE_BYTES;
use crate::{codec, Raft, TypeConfig};

/// Room reserved for a frame before encoding it (an AppendEntries under load carries a few
/// entries of a few hundred bytes).
const FRAME_RESERVE_BYTES: usize = 4096;

/// First bytes of a pipe connection: magic and format version.
pub const PREFACE: [u8; 8] = *b"RPPIPE01";
/// First bytes of a propose pipe connection, sent back by the listener as its handshake.
pub const PROPOSE_PREFACE: [u8; 8] = *b"RPPROP01";

/// Which pipe a connection's first bytes announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeKind {
    AppendEntries,
    Propose,
}
/// Longest a listener waits for a new connection's first 8 bytes before handing it to gRPC.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// The leader's end of a pipe to one follower.
pub struct PipeClient {
    stream: BufReader<TcpStream>,
    /// The connection has carried an answer, so the peer speaks the pipe.
    answered: bool,
}

/// Why a pipe call failed. Either way the connection is not used again.
#[derive(Debug)]
pub enum PipeError {
    /// The connection could not be made, or broke.
    Io(io::Error),
    /// The listener closed a fresh connection without answering: it does not know the pipe.
    NotSupported,
    /// The answer did not decode.
    Protocol(String),
}

impl std::fmt::Display for PipeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PipeError::Io(e) => write!(f, "{e}"),
            PipeError::NotSupported => write!(f, "the peer closed the AppendEntries pipe at once (it predates the pipe)"),
            PipeError::Protocol(m) => write!(f, "{m}"),
        }
    }
}

impl PipeClient {
    /// Connects to `host:port` (leaving from `local_ip` when given) and sends the preface.
    pub async fn connect(host: &str, port: u16, local_ip: Option<IpAddr>) -> Result<PipeClient, PipeError> {
        let mut stream = rampart_proto::wire::connect(host, port, local_ip).await.map_err(PipeError::Io)?;
        stream.write_all(&PREFACE).await.map_err(PipeError::Io)?;
        Ok(PipeClient { stream: BufReader::new(stream), answered: false })
    }

    /// Sends one AppendEntries and waits for its answer (the remote's error as a string).
    pub async fn append_entries(
        &mut self,
        req: &AppendEntriesRequest<TypeConfig>,
    ) -> Result<Result<AppendEntriesResponse<TypeConfig>, String>, PipeError> {
        let sent = write_frame(self.stream.get_mut(), req).await;
        let answer = match sent {
            Ok(()) => read_frame(&mut self.stream).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Some(answer)) => {
                self.answered = true;
                Ok(answer)
            }
            Ok(None) => Err(self.closed(io::ErrorKind::UnexpectedEof.into())),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(PipeError::Protocol(e.to_string())),
            Err(e) => Err(self.closed(e)),
        }
    }

    /// A connection closed or reset by the listener: before any answer, that is how a member
    /// without the pipe refuses the preface.
    fn closed(&self, e: io::Error) -> PipeError {
        use io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe if !self.answered => PipeError::NotSupported,
            _ => PipeError::Io(e),
        }
    }
}

/// Serves one pipe connection whose preface has been read: answers AppendEntries in order until
/// the leader closes it (or sends something that does not decode).
pub async fn serve(stream: TcpStream, raft: Raft) -> io::Result<()> {
    serve_frames(stream, |req: AppendEntriesRequest<TypeConfig>| {
        let raft = raft.clone();
        async move { raft.append_entries(req).await.map_err(|e| e.to_string()) }
    })
    .await
}

/// Serves a propose pipe whose preface has been read: sends the handshake, then answers each
/// batch with `handle`, in order, until the follower closes the connection.
pub async fn serve_propose<F, Fut>(mut stream: TcpStream, handle: F) -> io::Result<()>
where
    F: FnMut(Vec<crate::Request>) -> Fut,
    Fut: std::future::Future<Output = ProposeAnswer>,
{
    stream.write_all(&PROPOSE_PREFACE).await?;
    serve_frames(stream, handle).await
}

/// The leader's answer to a forwarded batch: one result per write, in order, or why the whole
/// batch was refused.
pub type ProposeAnswer = Result<Vec<Result<Vec<u8>, rampart_core::EtcdError>>, String>;

/// Reads request frames and writes each one's answer, in order, until the peer closes.
async fn serve_frames<Q, A, F, Fut>(stream: TcpStream, mut handle: F) -> io::Result<()>
where
    Q: DeserializeOwned,
    A: Serialize,
    F: FnMut(Q) -> Fut,
    Fut: std::future::Future<Output = A>,
{
    let (read, write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut write = BufWriter::new(write);
    while let Some(req) = read_frame::<Q>(&mut read).await? {
        let answer = handle(req).await;
        write_frame(&mut write, &answer).await?;
        write.flush().await?;
    }
    Ok(())
}

/// Reads the 8 bytes a listener sees first and says which pipe they announce, if any; the bytes
/// stay unread either way (`peek`). Bounded by [`SNIFF_TIMEOUT`]; a connection that sends fewer
/// bytes than that is not a pipe.
pub async fn sniff(stream: &TcpStream) -> Option<PipeKind> {
    let sniff = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n >= buf.len() => {
                    return match buf {
                        PREFACE => Some(PipeKind::AppendEntries),
                        PROPOSE_PREFACE => Some(PipeKind::Propose),
                        _ => None,
                    }
                }
                // Closed, or nothing yet to tell by.
                Ok(0) | Err(_) => return None,
                // A preface split over two segments: rare, wait for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    };
    tokio::time::timeout(SNIFF_TIMEOUT, sniff).await.ok().flatten()
}

/// A follower's connection to the leader's propose pipe, handshake done.
pub struct ProposeConn {
    stream: BufReader<TcpStream>,
}

/// Why a propose pipe could not be opened. In every case no write was sent on it.
#[derive(Debug)]
pub enum OpenError {
    /// The TCP connection could not be made.
    Connect(io::Error),
    /// The listener closed the connection at the preface: it does not know the propose pipe.
    NotSupported,
    /// The handshake broke off or did not come in time.
    Handshake(io::Error),
}

impl ProposeConn {
    /// Connects to the leader's peer port, sends the preface and waits (at most `timeout`) for
    /// the listener to send it back.
    pub async fn open(host: &str, port: u16, local_ip: Option<IpAddr>, timeout: Duration) -> Result<ProposeConn, OpenError> {
        let open = async {
            let mut stream = rampart_proto::wire::connect(host, port, local_ip).await.map_err(OpenError::Connect)?;
            stream.write_all(&PROPOSE_PREFACE).await.map_err(OpenError::Handshake)?;
            let mut echo = [0u8; PROPOSE_PREFACE.len()];
            match stream.read_exact(&mut echo).await {
                Ok(_) if echo == PROPOSE_PREFACE => Ok(ProposeConn { stream: BufReader::new(stream) }),
                Ok(_) => Err(OpenError::Handshake(io::Error::new(io::ErrorKind::InvalidData, "the listener answered the propose preface with other bytes"))),
                Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
                    Err(OpenError::NotSupported)
                }
                Err(e) => Err(OpenError::Handshake(e)),
            }
        };
        match tokio::time::timeout(timeout, open).await {
            Ok(r) => r,
            Err(_) => Err(OpenError::Handshake(io::Error::new(io::ErrorKind::TimedOut, "propose pipe handshake timed out"))),
        }
    }

    /// Whether an idle connection still looks usable: the listener has not closed it (a member
    /// that restarted or stopped) and has sent nothing unasked.
    pub fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        self.stream.buffer().is_empty()
            && matches!(self.stream.get_ref().try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends one batch and waits for its answer. Any error leaves the outcome unknown, and the
    /// connection must not be used again.
    pub async fn call(&mut self, batch: &[crate::Request]) -> io::Result<ProposeAnswer> {
        write_frame(self.stream.get_mut(), &batch).await?;
        read_frame(&mut self.stream).await?.ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

/// Consumes the preface [`sniff`] saw.
pub async fn skip_preface(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; PREFACE.len()];
    stream.read_exact(&mut buf).await.map(|_| ())
}

async fn write_frame<T: Serialize>(w: &mut (impl AsyncWriteExt + Unpin), value: &T) -> io::Result<()> {
    // The payload is encoded behind room for its length, which is filled in after.
    let mut frame = Vec::with_capacity(FRAME_RESERVE_BYTES);
    frame.extend_from_slice(&[0u8; 4]);
    let mut frame = codec::encode_after(frame, value);
    let payload_len = frame.len() - 4;
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|&l| l as usize <= MAX_PEER_MESSAGE_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("a {payload_len}-byte pipe frame is over the peer message limit")))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    w.write_all(&frame).await
}

/// The next frame, or None at a clean end of the stream (between frames).
async fn read_frame<T: DeserializeOwned>(r: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_PEER_MESSAGE_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("pipe frame of {len} bytes is over the peer message limit")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    codec::decode(&payload).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("undecodable pipe frame: {e}")))
}

#[cfg(test)]
mod tests {
    use openraft::type_config::alias::VoteOf;
    use tokio::net::TcpListener;

    use super::*;
    use crate::Entry;

    fn request(prev: u64) -> AppendEntriesRequest<TypeConfig> {
        use openraft::entry::RaftEntry;
        let log_id = |i| openraft::testing::log_id::<TypeConfig>(2, 1, i);
        AppendEntriesRequest {
            vote: VoteOf::<TypeConfig>::new_committed(2, 1),
            prev_log_id: Some(log_id(prev)),
            entries: vec![Entry::new_blank(log_id(prev + 1))],
            leader_commit: Some(log_id(prev)),
        }
    }

    /// A listener on a free loopback port.
    async fn listen() -> (TcpListener, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    /// A listener that behaves as a member without the pipes: an older member's gRPC server
    /// reads the first bytes and closes a connection whose preface is not HTTP/2's.
    async fn predating_listener() -> u16 {
        let (listener, port) = listen().await;
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 8];
            stream.read_exact(&mut buf).await.unwrap();
        });
        port
    }

    /// A listener that answers pipe requests as a follower would, counting connections.
    async fn follower() -> (u16, tokio::task::JoinHandle<(usize, Vec<u64>)>) {
        let (listener, port) = listen().await;
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            assert_eq!(sniff(&stream).await, Some(PipeKind::AppendEntries));
            skip_preface(&mut stream).await.unwrap();
            let mut seen = Vec::new();
            while let Some(req) = read_frame::<AppendEntriesRequest<TypeConfig>>(&mut stream).await.unwrap() {
                seen.push(req.prev_log_id.unwrap().index);
                let answer: Result<AppendEntriesResponse<TypeConfig>, String> =
                    if seen.len() == 2 { Err("refused".into()) } else { Ok(AppendEntriesResponse::Success) };
                write_frame(&mut stream, &answer).await.unwrap();
            }
            (1, seen)
        });
        (port, task)
    }

    #[tokio::test]
    async fn requests_and_answers_pair_up_in_order_on_one_connection() {
        let (port, follower) = follower().await;
        let mut pipe = PipeClient::connect("127.0.0.1", port, None).await.unwrap();
        assert!(matches!(pipe.append_entries(&request(4)).await.unwrap(), Ok(AppendEntriesResponse::Success)));
        assert_eq!(pipe.append_entries(&request(5)).await.unwrap(), Err("refused".to_string()));
        assert!(matches!(pipe.append_entries(&request(6)).await.unwrap(), Ok(AppendEntriesResponse::Success)));
        drop(pipe);
        assert_eq!(follower.await.unwrap(), (1, vec![4, 5, 6]));
    }

    #[tokio::test]
    async fn propose_pipe_handshakes_then_answers_batches_in_order() {
        let (listener, port) = listen().await;
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            assert_eq!(sniff(&stream).await, Some(PipeKind::Propose));
            skip_preface(&mut stream).await.unwrap();
            let mut n = 0u8;
            serve_propose(stream, move |batch: Vec<crate::Request>| {
                n += 1;
                let answer: ProposeAnswer = if n == 2 {
                    Err("refused".into())
                } else {
                    Ok(batch.iter().map(|r| match r {
                        crate::Request::Kv(b) => Ok(vec![n, b.len() as u8]),
                        _ => Err(rampart_core::EtcdError::NotLeader),
                    }).collect())
                };
                async move { answer }
            })
            .await
        });
        let mut conn = ProposeConn::open("127.0.0.1", port, None, Duration::from_secs(5)).await.unwrap();
        let batch = [crate::Request::Kv(vec![0; 3]), crate::Request::Kv(vec![0; 5])];
        assert_eq!(conn.call(&batch).await.unwrap(), Ok(vec![Ok(vec![1, 3]), Ok(vec![1, 5])]));
        assert_eq!(conn.call(&batch[..1]).await.unwrap(), Err("refused".to_string()));
        assert_eq!(conn.call(&batch[1..]).await.unwrap(), Ok(vec![Ok(vec![3, 5])]));
        drop(conn);
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_propose_pipe_that_cannot_open_has_sent_nothing() {
        // Refused: a connect error.
        let (listener, port) = listen().await;
        drop(listener);
        let err = ProposeConn::open("127.0.0.1", port, None, Duration::from_secs(5)).await.err().unwrap();
        assert!(matches!(err, OpenError::Connect(_)), "{err:?}");

        // A listener that predates the propose pipe closes it at the preface.
        let port = predating_listener().await;
        let err = ProposeConn::open("127.0.0.1", port, None, Duration::from_secs(5)).await.err().unwrap();
        assert!(matches!(err, OpenError::NotSupported), "{err:?}");

        // One that never answers: the handshake times out.
        let (listener, port) = listen().await;
        let _keep = tokio::spawn(async move {
            let (_stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = ProposeConn::open("127.0.0.1", port, None, Duration::from_millis(200)).await.err().unwrap();
        assert!(matches!(err, OpenError::Handshake(_)), "{err:?}");
    }

    #[tokio::test]
    async fn http2_connections_are_not_pipes_and_keep_their_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        client.write_all(preface).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        assert_eq!(sniff(&server).await, None);
        let mut got = vec![0u8; preface.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, preface);
        // A connection closed before it said anything is not a pipe either.
        let client = TcpStream::connect(addr).await.unwrap();
        drop(client);
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(sniff(&server).await, None);
    }

    #[tokio::test]
    async fn a_listener_that_predates_the_pipe_is_recognised() {
        let port = predating_listener().await;
        let mut pipe = PipeClient::connect("127.0.0.1", port, None).await.unwrap();
        assert!(matches!(pipe.append_entries(&request(1)).await, Err(PipeError::NotSupported)));
    }

    #[tokio::test]
    async fn an_oversized_or_undecodable_answer_is_a_protocol_error() {
        for bad in [u32::MAX.to_le_bytes().to_vec(), [3u32.to_le_bytes().to_vec(), vec![0xff; 3]].concat()] {
            let (listener, port) = listen().await;
            tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                skip_preface(&mut stream).await.unwrap();
                let _ = read_frame::<AppendEntriesRequest<TypeConfig>>(&mut stream).await.unwrap();
                stream.write_all(&bad).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            let mut pipe = PipeClient::connect("127.0.0.1", port, None).await.unwrap();
            match pipe.append_entries(&request(1)).await {
                Err(PipeError::Protocol(m)) => assert!(m.contains("pipe frame"), "{m}"),
                Err(e) => panic!("expected a protocol error, got {e}"),
                Ok(_) => panic!("expected a protocol error, got an answer"),
            }
        }
    }
}
