//! Writes a follower forwards to the leader, batched: concurrent proposals share one peer call
//! (`RpcKind::ProposeBatch`), so under load a follower costs itself and the leader one RPC per
//! batch instead of one per write. Each proposal still gets its own answer, in order, and the
//! caller ([`crate::member::Member::propose`]) handles it exactly as it would the answer to a
//! single forwarded write: a transport error reaches every proposal of the batch alike, and
//! whether a retry is safe is decided per proposal from it.
//!
//! Batches form by themselves: a sender takes whatever is queued when it gets one of the
//! [`limits::FORWARD_BATCHES_IN_FLIGHT`] slots, so an idle member sends each write at once, and a
//! busy one sends bigger batches while earlier ones are in flight.
//!
//! A batch travels on the leader's propose pipe (`rampart_raft::pipe`, one connection per batch
//! in flight, kept for the next) rather than as a gRPC call, which costs both ends an HTTP/2
//! stream and two task hand-offs. Whether a failed batch may be retried is decided from the
//! status the caller gets, so the pipe words its failures as gRPC did: a connection that could
//! not be made, or a handshake that did not complete (no write was sent on it), is `Unavailable`
//! and says "tcp connect error" or "(connect)"; anything after the batch was written is
//! `Unknown` or `DeadlineExceeded`, never retried. A leader that does not know the pipe gets gRPC
//! calls for [`PIPE_RETRY`].

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_core::{limits, EtcdError};
use rampart_proto::rampartpb::peer_client::PeerClient;
use rampart_raft::network::{self, RpcKind};
use rampart_raft::pipe::{OpenError, ProposeConn};
use rampart_raft::Request;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Channel;

/// What the caller of a forwarded write gets: the transport outcome (`Err`: the call failed), the
/// leader's own failure to handle the batch (`Ok(Err)`), or this write's result.
pub type ForwardResult = Result<Result<Result<Vec<u8>, EtcdError>, String>, tonic::Status>;

struct Pending {
    req: Request,
    bytes: usize,
    reply: oneshot::Sender<ForwardResult>,
}

/// The batching queue towards one leader. Dropping it stops its task once the queue is empty.
pub struct Forwarder {
    tx: mpsc::Sender<Pending>,
}

/// How long a leader that closed the propose pipe at its preface is sent gRPC calls instead.
pub const PIPE_RETRY: Duration = Duration::from_secs(30);

/// Where the leader's propose pipe is: its peer listener.
#[derive(Debug, Clone)]
pub struct PipeTarget {
    pub host: String,
    pub port: u16,
    /// The address this member's peer connections leave from.
    pub local_ip: Option<IpAddr>,
}

/// How batches reach one leader.
struct Transport {
    client: PeerClient<Channel>,
    pipe: Option<PipeTarget>,
    /// Propose pipe connections between batches (at most one per batch in flight).
    idle: Mutex<Vec<ProposeConn>>,
    /// Until then the leader is taken not to know the propose pipe.
    grpc_until: Mutex<Option<Instant>>,
    timeout: Duration,
}

type BatchAnswer = Result<Result<Vec<Result<Vec<u8>, EtcdError>>, String>, tonic::Status>;

impl Transport {
    async fn send(&self, reqs: &[Request]) -> BatchAnswer {
        if let Some(target) = self.pipe_now() {
            let idle = loop {
                match self.idle.lock().unwrap().pop() {
                    Some(conn) if conn.is_open() => break Some(conn),
                    Some(_closed) => continue,
                    None => break None,
                }
            };
            let conn = match idle {
                Some(conn) => Ok(conn),
                None => ProposeConn::open(&target.host, target.port, target.local_ip, self.timeout).await,
            };
            match conn {
                Ok(mut conn) => {
                    return match tokio::time::timeout(self.timeout, conn.call(reqs)).await {
                        Ok(Ok(answer)) => {
                            self.idle.lock().unwrap().push(conn);
                            Ok(answer)
                        }
                        Ok(Err(e)) => Err(tonic::Status::unknown(format!("forwarded writes: the propose pipe broke after the batch was sent, outcome unknown: {e}"))),
                        Err(_) => Err(tonic::Status::deadline_exceeded("forwarded writes: no answer on the propose pipe in time, outcome unknown")),
                    };
                }
                Err(OpenError::Connect(e)) => return Err(tonic::Status::unavailable(format!("tcp connect error: {e}"))),
                Err(OpenError::Handshake(e)) => {
                    return Err(tonic::Status::unavailable(format!("propose pipe handshake failed (connect), the writes were not sent: {e}")))
                }
                Err(OpenError::NotSupported) => {
                    tracing::info!(host = %target.host, port = target.port, "the leader does not know the propose pipe; forwarding over gRPC");
                    *self.grpc_until.lock().unwrap() = Some(Instant::now() + PIPE_RETRY);
                }
            }
        }
        network::call::<_, Vec<Result<Vec<u8>, EtcdError>>>(&mut self.client.clone(), RpcKind::ProposeBatch, &reqs, self.timeout).await
    }

    fn pipe_now(&self) -> Option<&PipeTarget> {
        let mut until = self.grpc_until.lock().unwrap();
        match *until {
            Some(t) if Instant::now() < t => return None,
            Some(_) => *until = None,
            None => {}
        }
        self.pipe.as_ref()
    }
}

impl Forwarder {
    /// Batches towards the leader at `client`, on its propose pipe at `pipe` when given.
    pub fn new(client: PeerClient<Channel>, pipe: Option<PipeTarget>, timeout: Duration) -> Forwarder {
        let (tx, rx) = mpsc::channel(limits::FORWARD_QUEUE_REQUESTS);
        let transport = Transport { client, pipe, idle: Mutex::new(Vec::new()), grpc_until: Mutex::new(None), timeout };
        tokio::spawn(run(Arc::new(transport), rx));
        Forwarder { tx }
    }

    /// Queues `req` for the leader and waits for its answer.
    pub async fn send(&self, req: Request) -> ForwardResult {
        let (reply, rx) = oneshot::channel();
        let bytes = request_bytes(&req);
        if self.tx.send(Pending { req, bytes, reply }).await.is_err() {
            return Err(tonic::Status::unavailable("forwarding queue closed (connect): the write was not sent"));
        }
        rx.await.unwrap_or_else(|_| Err(tonic::Status::unknown("forwarding task stopped; the outcome is unknown")))
    }
}

/// Payload size of a request, for the batch byte limit.
fn request_bytes(req: &Request) -> usize {
    match req {
        Request::Kv(b) => b.len(),
        _ => 256,
    }
}

async fn run(transport: Arc<Transport>, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(limits::FORWARD_BATCHES_IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < limits::FORWARD_BATCH_REQUESTS {
            match rx.try_recv() {
                Ok(p) if bytes + p.bytes > limits::FORWARD_BATCH_BYTES => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let transport = transport.clone();
        tokio::spawn(async move {
            let (reqs, replies): (Vec<Request>, Vec<oneshot::Sender<ForwardResult>>) =
                batch.into_iter().map(|p| (p.req, p.reply)).unzip();
            let n = reqs.len();
            let outcome = transport.send(&reqs).await;
            drop(slot);
            match outcome {
                Ok(Ok(results)) if results.len() == n => {
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(Ok(r)));
                    }
                }
                Ok(Ok(results)) => {
                    let msg = format!("leader answered {} results for a batch of {n} writes", results.len());
                    for reply in replies {
                        let _ = reply.send(Ok(Err(msg.clone())));
                    }
                }
                Ok(Err(remote)) => {
                    for reply in replies {
                        let _ = reply.send(Ok(Err(remote.clone())));
                    }
                }
                Err(status) => {
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
        });
    }
}
