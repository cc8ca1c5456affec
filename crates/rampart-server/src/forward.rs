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

use std::sync::Arc;
use std::time::Duration;

use rampart_core::{limits, EtcdError};
use rampart_proto::rampartpb::peer_client::PeerClient;
use rampart_raft::network::{self, RpcKind};
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

impl Forwarder {
    pub fn new(client: PeerClient<Channel>, timeout: Duration) -> Forwarder {
        let (tx, rx) = mpsc::channel(limits::FORWARD_QUEUE_REQUESTS);
        tokio::spawn(run(client, rx, timeout));
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

async fn run(client: PeerClient<Channel>, mut rx: mpsc::Receiver<Pending>, timeout: Duration) {
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
        let mut client = client.clone();
        tokio::spawn(async move {
            let (reqs, replies): (Vec<Request>, Vec<oneshot::Sender<ForwardResult>>) =
                batch.into_iter().map(|p| (p.req, p.reply)).unzip();
            let n = reqs.len();
            let outcome =
                network::call::<_, Vec<Result<Vec<u8>, EtcdError>>>(&mut client, RpcKind::ProposeBatch, &reqs, timeout).await;
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
