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

/// First bytes of a pipe connection: magic and format version.
pub const PREFACE: [u8; 8] = *b"RPPIPE01";
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
    let (read, write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut write = BufWriter::new(write);
    while let Some(req) = read_frame::<AppendEntriesRequest<TypeConfig>>(&mut read).await? {
        let answer = raft.append_entries(req).await.map_err(|e| e.to_string());
        write_frame(&mut write, &answer).await?;
        write.flush().await?;
    }
    Ok(())
}

/// Reads the 8 bytes a listener sees first and says whether they are a pipe's preface; the bytes
/// stay unread either way (`peek`). Bounded by [`SNIFF_TIMEOUT`]; a connection that sends fewer
/// bytes than that is not a pipe.
pub async fn is_pipe(stream: &TcpStream) -> bool {
    let sniff = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n >= buf.len() => return buf == PREFACE,
                // Closed, or nothing yet to tell by.
                Ok(0) | Err(_) => return false,
                // A preface split over two segments: rare, wait for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    };
    tokio::time::timeout(SNIFF_TIMEOUT, sniff).await.unwrap_or(false)
}

/// Consumes the preface [`is_pipe`] saw.
pub async fn skip_preface(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; PREFACE.len()];
    stream.read_exact(&mut buf).await.map(|_| ())
}

async fn write_frame<T: Serialize>(w: &mut (impl AsyncWriteExt + Unpin), value: &T) -> io::Result<()> {
    let payload = codec::encode(value);
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_PEER_MESSAGE_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("a {}-byte pipe frame is over the peer message limit", payload.len())))?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&payload);
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

    /// A listener that answers pipe requests as a follower would, counting connections.
    async fn follower() -> (u16, tokio::task::JoinHandle<(usize, Vec<u64>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            assert!(is_pipe(&stream).await);
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
    async fn http2_connections_are_not_pipes_and_keep_their_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        client.write_all(preface).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        assert!(!is_pipe(&server).await);
        let mut got = vec![0u8; preface.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, preface);
        // A connection closed before it said anything is not a pipe either.
        let client = TcpStream::connect(addr).await.unwrap();
        drop(client);
        let (server, _) = listener.accept().await.unwrap();
        assert!(!is_pipe(&server).await);
    }

    #[tokio::test]
    async fn a_listener_that_predates_the_pipe_is_recognised() {
        // An older member's gRPC server closes a connection whose preface is not HTTP/2's.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 8];
            stream.read_exact(&mut buf).await.unwrap();
        });
        let mut pipe = PipeClient::connect("127.0.0.1", port, None).await.unwrap();
        assert!(matches!(pipe.append_entries(&request(1)).await, Err(PipeError::NotSupported)));
    }

    #[tokio::test]
    async fn an_oversized_or_undecodable_answer_is_a_protocol_error() {
        for bad in [u32::MAX.to_le_bytes().to_vec(), [3u32.to_le_bytes().to_vec(), vec![0xff; 3]].concat()] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
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
