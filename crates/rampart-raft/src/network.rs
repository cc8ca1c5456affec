//! Client half of the peer transport.
//!
//! AppendEntries, the hot path, goes over the [`crate::pipe`] (plain TCP on the same port) and
//! falls back to gRPC for a peer that refuses it. Every other raft message travels as one unary
//! gRPC call `rampartpb.Peer/Raft` carrying a [`RpcKind`] and a postcard-encoded openraft
//! message; the reply is a postcard-encoded `Result<Response, String>`. The server half
//! (rampart-server) decodes with the same [`encode`]/[`decode`] pair, so both ends agree by
//! construction.
//!
//! Connections are made lazily and kept per peer; tonic reconnects after a peer restarts.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use rampart_proto::rampartpb::peer_client::PeerClient;
use rampart_proto::rampartpb::RaftRequest;
use rampart_proto::wire::{self, BatchedConnector};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::codec;
use crate::pipe::{PipeClient, PipeError};
use crate::state_machine::SnapshotData;
use crate::{MemberId, PeerNode, TypeConfig};

type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Largest peer message (a full snapshot travels in one). Bounded so a bad peer cannot make us
/// allocate without limit.
pub const MAX_PEER_MESSAGE_BYTES: usize = 1 << 30;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long AppendEntries go over gRPC to a peer that refused the pipe, before it is tried again.
const PIPE_RETRY: Duration = Duration::from_secs(30);
/// Least time given to an AppendEntries or snapshot RPC (see `PeerConnection::rpc`).
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Which raft message a `RaftRequest` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RpcKind {
    AppendEntries = 1,
    Vote = 2,
    PreVote = 3,
    FullSnapshot = 4,
    TransferLeader = 5,
    /// Not an openraft message: a follower asks the leader for a read index (etcd's ReadIndex),
    /// then serves a linearizable read locally once it has applied that far.
    ReadIndex = 6,
    // 7 was Propose (one forwarded write); ProposeBatch (11) replaced it.
    /// Not an openraft message: a membership change (`AdminRequest`) forwarded to the leader.
    Admin = 8,
    /// Not an openraft message: a joining member asks a peer for the cluster id.
    ClusterId = 9,
    /// Not an openraft message: a lease keepalive or time-to-live question, which only the
    /// leader can answer (it alone keeps the lease clocks), forwarded there by a follower.
    Lease = 10,
    /// Not an openraft message: several client writes (`Vec<Request>`) forwarded to the leader
    /// in one call; the reply holds one result per write, in order.
    ProposeBatch = 11,
}

impl RpcKind {
    pub fn from_u32(v: u32) -> Option<RpcKind> {
        use RpcKind::*;
        [AppendEntries, Vote, PreVote, FullSnapshot, TransferLeader, ReadIndex, Admin, ClusterId, Lease, ProposeBatch].into_iter().find(|k| *k as u32 == v)
    }
}

/// The payload of a full snapshot message.
pub type SnapshotMessage = (Vote, openraft::type_config::alias::SnapshotMetaOf<TypeConfig>, Vec<u8>);

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v)
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> std::io::Result<T> {
    codec::decode(b)
}

/// A lazily connected channel to a peer URL such as `http://127.0.0.1:2380`. Connections leave
/// from `local_ip` when given (the member's peer listener address), so peer traffic between two
/// members is identifiable by address pair: what network redundancy and fault injection key on.
pub fn peer_channel(url: &str, local_ip: Option<IpAddr>) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(BatchedConnector { local_ip, connect_timeout: Some(CONNECT_TIMEOUT) }))
}

pub fn peer_client(url: &str, local_ip: Option<IpAddr>) -> Result<PeerClient<Channel>, tonic::transport::Error> {
    Ok(PeerClient::new(peer_channel(url, local_ip)?)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
}

/// Sends one raw peer RPC and decodes the `Result<Resp, String>` reply.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    client: &mut PeerClient<Channel>,
    kind: RpcKind,
    req: &Req,
    timeout: Duration,
) -> Result<Result<Resp, String>, tonic::Status> {
    let mut request = tonic::Request::new(RaftRequest { kind: kind as u32, payload: encode(req) });
    request.set_timeout(timeout);
    let reply = client.raft(request).await?.into_inner();
    decode(&reply.payload).map_err(|e| tonic::Status::internal(format!("undecodable peer reply: {e}")))
}

#[derive(Clone, Default)]
pub struct PeerNetwork {
    /// Source address for outgoing peer connections; `None` lets the kernel choose.
    pub local_ip: Option<IpAddr>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: MemberId, node: &PeerNode) -> PeerConnection {
        let url = node.peer_urls.first().cloned().unwrap_or_default();
        let pipe_addr = url.parse().ok().and_then(|uri| wire::host_port(&uri));
        PeerConnection {
            target,
            client: peer_client(&url, self.local_ip).map_err(|e| e.to_string()),
            local_ip: self.local_ip,
            pipe_addr,
            pipe_refused_until: None,
            pipe: None,
        }
    }
}

pub struct PeerConnection {
    target: MemberId,
    client: Result<PeerClient<Channel>, String>,
    local_ip: Option<IpAddr>,
    /// Where the AppendEntries pipe connects (the peer URL's host and port); None when the URL
    /// does not parse, and AppendEntries goes over gRPC.
    pipe_addr: Option<(String, u16)>,
    /// The peer refused the pipe (it predates it, or it died just as the pipe was opened):
    /// AppendEntries go over gRPC until then, when the pipe is tried again.
    pipe_refused_until: Option<std::time::Instant>,
    /// The open pipe, if any. Dropped after any failure or timeout: an answer that arrives late
    /// must not be taken for the next request's.
    pipe: Option<PipeClient>,
}

impl PeerConnection {
    /// One AppendEntries over the pipe, opening it first if needed.
    async fn append_via_pipe(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Option<Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>>> {
        if self.pipe_refused_until.is_some_and(|t| std::time::Instant::now() < t) {
            return None;
        }
        let (host, port) = self.pipe_addr.clone()?;
        let local_ip = self.local_ip;
        let slot = &mut self.pipe;
        let call = async {
            if slot.is_none() {
                let opened = tokio::time::timeout(CONNECT_TIMEOUT, PipeClient::connect(&host, port, local_ip)).await;
                *slot = Some(opened.map_err(|_| PipeError::Io(std::io::ErrorKind::TimedOut.into()))??);
            }
            slot.as_mut().expect("opened above").append_entries(rpc).await
        };
        let result = tokio::time::timeout(timeout, call).await;
        let target = self.target;
        let result = match result {
            Ok(Ok(Ok(resp))) => return Some(Ok(resp)),
            Ok(Ok(Err(remote))) => {
                return Some(Err(RPCError::Network(NetworkError::from_string(format!(
                    "member {target:x} failed AppendEntries: {remote}"
                )))))
            }
            Ok(Err(e)) => e,
            Err(_) => {
                // Not an unreachable peer: a slow one (a heartbeat's TTL is one heartbeat
                // interval), as a gRPC deadline was. openraft backs off from unreachable peers,
                // and backing off here would leave a busy follower without heartbeats.
                self.pipe = None;
                return Some(Err(RPCError::Network(NetworkError::from_string(format!(
                    "member {target:x} AppendEntries pipe: no answer within {timeout:?}"
                )))));
            }
        };
        self.pipe = None;
        let msg = format!("member {target:x} AppendEntries pipe: {result}");
        Some(Err(match result {
            PipeError::NotSupported => {
                tracing::warn!(member = format!("{target:x}"), "peer closed the AppendEntries pipe unanswered; using gRPC for it for a while");
                self.pipe_refused_until = Some(std::time::Instant::now() + PIPE_RETRY);
                return None;
            }
            // Refused or reset: back off as for an unreachable peer (tonic's Unavailable).
            PipeError::Io(_) => RPCError::Unreachable(Unreachable::from_string(msg)),
            PipeError::Protocol(_) => RPCError::Network(NetworkError::from_string(msg)),
        }))
    }

    async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: RpcKind,
        req: &Req,
        option: &RPCOption,
        long: bool,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "bad peer URL for member {:x}: {e}",
                    self.target
                ))))
            }
        };
        match call::<Req, Resp>(client, kind, req, rpc_timeout(option, long)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::Network(NetworkError::from_string(format!(
                "member {:x} failed {kind:?}: {remote}",
                self.target
            )))),
            Err(status) => {
                let msg = format!("member {:x} {kind:?}: {status}", self.target);
                match status.code() {
                    // Connection refused or reset: back off instead of hammering a dead peer.
                    tonic::Code::Unavailable => Err(RPCError::Unreachable(Unreachable::from_string(msg))),
                    _ => Err(RPCError::Network(NetworkError::from_string(msg))),
                }
            }
        }
    }
}

/// openraft hands AppendEntries a TTL of one heartbeat interval (50 ms by default). A batch of
/// large entries cannot cross the wire in that time, and retrying it with the same TTL would
/// never end: replication needs the time the bytes take. Heartbeats and votes keep the short
/// TTL, which is what failure detection relies on.
fn rpc_timeout(option: &RPCOption, long: bool) -> Duration {
    if long {
        option.hard_ttl().max(APPEND_TIMEOUT)
    } else {
        option.hard_ttl()
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Entries get the long timeout; an empty AppendEntries is a heartbeat and keeps openraft's.
        let long = !rpc.entries.is_empty();
        if let Some(answer) = self.append_via_pipe(&rpc, rpc_timeout(&option, long)).await {
            return answer;
        }
        self.rpc(RpcKind::AppendEntries, &rpc, &option, long).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(RpcKind::Vote, &rpc, &option, false).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(RpcKind::PreVote, &rpc, &option, false).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // Serializing a view reads the whole store: not on the async runtime's threads.
        let data = snapshot.snapshot;
        let data = match tokio::task::spawn_blocking(move || data.into_bytes()).await {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => return Err(StreamingError::Unreachable(Unreachable::from_string(format!("serializing the snapshot: {e}")))),
            Err(e) => return Err(StreamingError::Unreachable(Unreachable::from_string(format!("serializing the snapshot: {e}")))),
        };
        let msg: SnapshotMessage = (vote, snapshot.meta, data);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = self.rpc(RpcKind::FullSnapshot, &msg, &option, true) => Ok(res?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(RpcKind::TransferLeader, &req, &option, false).await
    }
}
