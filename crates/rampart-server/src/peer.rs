//! Server half of the peer transport: decodes `rampartpb.Peer/Raft` calls into openraft calls
//! (and the member-level calls: ReadIndex, ProposeBatch, Admin, Lease, ClusterId). The encoding is shared with the client
//! half in `rampart_raft::network`.

use std::sync::Arc;

use rampart_proto::rampartpb::peer_server::Peer;
use rampart_proto::rampartpb::{Command, ForwardReply, RaftReply, RaftRequest};
use rampart_raft::network::{decode, encode, RpcKind, SnapshotMessage};
use rampart_raft::state_machine::SnapshotData;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::lease::Lessor;
use crate::member::Member;

#[derive(Clone)]
pub struct PeerService {
    pub member: Arc<Member>,
    pub lessor: Arc<Lessor>,
}

fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Result<Response<RaftReply>, Status> {
    let r: Result<T, String> = r.map_err(|e| e.to_string());
    Ok(Response::new(RaftReply { payload: encode(&r) }))
}

fn bad(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = &self.member.raft;
        let p = &req.payload;
        match RpcKind::from_u32(req.kind) {
            Some(RpcKind::AppendEntries) => reply(raft.append_entries(decode(p).map_err(bad)?).await),
            Some(RpcKind::Vote) => reply(raft.vote(decode(p).map_err(bad)?).await),
            Some(RpcKind::PreVote) => reply(raft.pre_vote(decode(p).map_err(bad)?).await),
            Some(RpcKind::TransferLeader) => reply(raft.handle_transfer_leader(decode(p).map_err(bad)?).await),
            Some(RpcKind::FullSnapshot) => {
                let (vote, meta, data): SnapshotMessage = decode(p).map_err(bad)?;
                let snapshot = openraft::type_config::alias::SnapshotOf::<rampart_raft::TypeConfig, SnapshotData> {
                    meta,
                    snapshot: SnapshotData::Bytes(data),
                };
                reply(raft.install_full_snapshot(vote, snapshot).await)
            }
            Some(RpcKind::ReadIndex) => {
                let r = self.member.local_read_index().await;
                reply::<_, String>(Ok(r))
            }
            Some(RpcKind::ProposeBatch) => {
                let reqs: Vec<rampart_raft::Request> = decode(p).map_err(bad)?;
                let r = self.member.propose_forwarded(reqs).await.map_err(Status::invalid_argument)?;
                reply::<_, String>(Ok(r))
            }
            Some(RpcKind::Admin) => {
                let r = self.member.admin_local(decode(p).map_err(bad)?).await;
                reply::<_, String>(Ok(r))
            }
            Some(RpcKind::Lease) => {
                let r = self.lessor.answer(decode(p).map_err(bad)?).await;
                reply::<_, String>(Ok(r))
            }
            Some(RpcKind::ClusterId) => reply::<_, String>(Ok(self.member.cluster_id)),
            None => Err(Status::invalid_argument(format!("unknown peer message kind {}", req.kind))),
        }
    }

    async fn forward(&self, _request: Request<Command>) -> Result<Response<ForwardReply>, Status> {
        // Writes are forwarded as RpcKind::ProposeBatch, which also carries non-KV requests.
        Err(Status::unimplemented("use Raft with kind ProposeBatch"))
    }
}
