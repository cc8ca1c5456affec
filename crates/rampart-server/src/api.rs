//! The etcd v3 gRPC services a client sees: KV and Cluster (Maintenance is in `maintenance`).
//!
//! This module is the one place where errors become wire statuses ([`status`]); everything
//! below returns `EtcdError`. Request validation that etcd does before proposing (empty keys,
//! sizes, txn op counts, flag conflicts) happens here too, so invalid requests never reach the log.

use std::sync::Arc;

use rampart_core::{Code, EtcdError};
use rampart_proto::etcdserverpb::cluster_server::Cluster;
use rampart_proto::etcdserverpb::kv_server::Kv;
use rampart_proto::etcdserverpb::*;
use rampart_proto::rampartpb::{command, forward_reply};
use rampart_raft::AdminRequest;
use tonic::{Request, Response, Status};

use crate::auth;
use crate::member::Member;

/// The version Maintenance.Status reports. Clients gate features on it; we speak the 3.5 API.
pub const ETCD_VERSION: &str = "3.5.0";

/// `EtcdError` → gRPC status, with etcd's code and message.
pub fn status(e: EtcdError) -> Status {
    let code = match e.code() {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::OutOfRange => tonic::Code::OutOfRange,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::DataLoss => tonic::Code::DataLoss,
        Code::Internal => tonic::Code::Internal,
        Code::Unimplemented => tonic::Code::Unimplemented,
        Code::Unknown => tonic::Code::Unknown,
    };
    Status::new(code, e.to_string())
}

/// `EtcdError` → gRPC status, as etcd's Lock and Election services send it: they run etcd's
/// client recipes inside the server, and the client library turns every status into a plain Go
/// error, which gRPC sends as Unknown with etcd's message. "Try again" errors keep Unavailable
/// here, so clients still retry them.
pub fn status_as_go_error(e: EtcdError) -> Status {
    match e.code() {
        Code::Unavailable => status(e),
        _ => Status::new(tonic::Code::Unknown, e.to_string()),
    }
}

pub(crate) fn unimplemented(what: &str) -> Status {
    status(EtcdError::Unimplemented(format!("{what} (tracked in issue #4)")))
}

// ---- validation, as etcd's v3rpc/key.go does before proposing ----

fn check_put(r: &PutRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

fn check_key(key: &[u8]) -> Result<(), EtcdError> {
    if key.is_empty() {
        Err(EtcdError::EmptyKey)
    } else {
        Ok(())
    }
}

fn check_txn(r: &TxnRequest, max_ops: usize) -> Result<(), EtcdError> {
    if r.compare.len() > max_ops || r.success.len() > max_ops || r.failure.len() > max_ops {
        return Err(EtcdError::TooManyOps);
    }
    for c in &r.compare {
        check_key(&c.key)?;
    }
    for op in r.success.iter().chain(&r.failure) {
        use request_op::Request as R;
        match &op.request {
            Some(R::RequestRange(x)) => check_key(&x.key)?,
            Some(R::RequestPut(x)) => check_put(x)?,
            Some(R::RequestDeleteRange(x)) => check_key(&x.key)?,
            Some(R::RequestTxn(x)) => check_txn(x, max_ops)?,
            None => return Err(EtcdError::InvalidArgument("etcdserver: request op is empty".into())),
        }
    }
    Ok(())
}

/// True when a txn (and every nested txn) only reads: etcd serves those without the log.
fn txn_is_read_only(r: &TxnRequest) -> bool {
    use request_op::Request as R;
    r.success.iter().chain(&r.failure).all(|op| match &op.request {
        Some(R::RequestRange(_)) => true,
        Some(R::RequestTxn(t)) => txn_is_read_only(t),
        _ => false,
    })
}

/// A txn is serializable only if every range in it asks to be.
fn txn_is_serializable(r: &TxnRequest) -> bool {
    use request_op::Request as R;
    r.success.iter().chain(&r.failure).all(|op| match &op.request {
        Some(R::RequestRange(x)) => x.serializable,
        Some(R::RequestTxn(t)) => txn_is_serializable(t),
        _ => true,
    })
}

#[derive(Clone)]
pub struct KvService {
    pub member: Arc<Member>,
}

impl KvService {
    async fn write(&self, request: command::Request) -> Result<forward_reply::Response, EtcdError> {
        self.member.write(request).await
    }
}

/// A write reply of another kind than the request: a bug, reported rather than guessed at.
pub(crate) fn mismatch() -> Status {
    status(EtcdError::internal("write reply of the wrong kind"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let caller = auth::caller(&self.member, request.metadata()).map_err(status)?;
        let r = request.into_inner();
        check_key(&r.key).map_err(status)?;
        caller.check_range(&r).map_err(status)?;
        if !r.serializable {
            self.member.read_barrier().await.map_err(status)?;
        }
        let mut resp = self.member.sm.mvcc.range(&r).map_err(status)?;
        self.member.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = auth::caller(&self.member, request.metadata()).map_err(status)?;
        let r = request.into_inner();
        check_put(&r).map_err(status)?;
        caller.check_put(&r).map_err(status)?;
        match self.write(command::Request::Put(r)).await.map_err(status)? {
            forward_reply::Response::Put(mut resp) => {
                self.member.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(mismatch()),
        }
    }

    async fn delete_range(&self, request: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = auth::caller(&self.member, request.metadata()).map_err(status)?;
        let r = request.into_inner();
        check_key(&r.key).map_err(status)?;
        caller.check_delete(&r).map_err(status)?;
        match self.write(command::Request::DeleteRange(r)).await.map_err(status)? {
            forward_reply::Response::DeleteRange(mut resp) => {
                self.member.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(mismatch()),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = auth::caller(&self.member, request.metadata()).map_err(status)?;
        let r = request.into_inner();
        check_txn(&r, self.member.cfg.max_txn_ops).map_err(status)?;
        caller.check_txn(&r).map_err(status)?;
        if txn_is_read_only(&r) {
            if !txn_is_serializable(&r) {
                self.member.read_barrier().await.map_err(status)?;
            }
            let mut resp = self.member.sm.mvcc.read_txn(&r).map_err(status)?;
            self.member.fill_header(&mut resp.header);
            return Ok(Response::new(resp));
        }
        match self.write(command::Request::Txn(r)).await.map_err(status)? {
            forward_reply::Response::Txn(mut resp) => {
                self.member.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(mismatch()),
        }
    }

    async fn compact(&self, request: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        // etcd checks no permission for a compaction, but with auth on the caller must be known.
        auth::caller(&self.member, request.metadata()).map_err(status)?;
        let r = request.into_inner();
        match self.write(command::Request::Compaction(r)).await.map_err(status)? {
            forward_reply::Response::Compaction(mut resp) => {
                self.member.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(mismatch()),
        }
    }
}

#[derive(Clone)]
pub struct ClusterService {
    pub member: Arc<Member>,
}

impl ClusterService {
    /// Membership changes take the root role when auth is on (etcd's
    /// `checkMembershipOperationPermission`); MemberList is open, as in etcd.
    fn check_admin(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        auth::caller(&self.member, metadata).and_then(|c| c.check_admin()).map_err(status)
    }

    /// The member list once this member has applied the change (it may have been made by the
    /// leader on our behalf).
    async fn after_change(&self) -> Result<(ResponseHeader, Vec<rampart_proto::etcdserverpb::Member>), Status> {
        self.member.read_barrier().await.map_err(status)?;
        Ok((self.header(), self.members()))
    }

    /// etcd's Cluster responses carry no revision (its `ClusterServer.header`): membership is
    /// not part of the keyspace.
    fn header(&self) -> ResponseHeader {
        self.member.header(0)
    }

    fn members(&self) -> Vec<rampart_proto::etcdserverpb::Member> {
        let meta = self.member.sm.cluster_meta();
        let membership = meta.membership.membership();
        let learners: Vec<u64> = membership.learner_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| {
                let attrs = meta.members.get(id);
                rampart_proto::etcdserverpb::Member {
                    id: *id,
                    // etcd shows an empty name until the member has published its attributes.
                    name: attrs.map(|a| a.name.clone()).unwrap_or_default(),
                    peer_ur_ls: node.peer_urls.clone(),
                    client_ur_ls: attrs.map(|a| a.client_urls.clone()).unwrap_or_default(),
                    is_learner: learners.contains(id),
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, request: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        self.check_admin(request.metadata())?;
        let r = request.into_inner();
        let info = self
            .member
            .admin(AdminRequest::AddMember { peer_urls: r.peer_ur_ls, is_learner: r.is_learner })
            .await
            .map_err(status)?;
        let (header, members) = self.after_change().await?;
        let added = rampart_proto::etcdserverpb::Member {
            id: info.id,
            name: String::new(),
            peer_ur_ls: info.peer_urls,
            client_ur_ls: vec![],
            is_learner: info.is_learner,
        };
        Ok(Response::new(MemberAddResponse { header: Some(header), member: Some(added), members }))
    }

    async fn member_remove(&self, request: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        self.check_admin(request.metadata())?;
        let id = request.into_inner().id;
        self.member.admin(AdminRequest::RemoveMember { id }).await.map_err(status)?;
        let (header, members) = self.after_change().await?;
        Ok(Response::new(MemberRemoveResponse { header: Some(header), members }))
    }

    async fn member_update(&self, request: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        self.check_admin(request.metadata())?;
        let r = request.into_inner();
        self.member.admin(AdminRequest::UpdateMember { id: r.id, peer_urls: r.peer_ur_ls }).await.map_err(status)?;
        let (header, members) = self.after_change().await?;
        Ok(Response::new(MemberUpdateResponse { header: Some(header), members }))
    }

    async fn member_list(&self, request: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.member.read_barrier().await.map_err(status)?;
        }
        Ok(Response::new(MemberListResponse {
            header: Some(self.header()),
            members: self.members(),
        }))
    }

    async fn member_promote(&self, request: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        self.check_admin(request.metadata())?;
        let id = request.into_inner().id;
        self.member.admin(AdminRequest::PromoteMember { id }).await.map_err(status)?;
        let (header, members) = self.after_change().await?;
        Ok(Response::new(MemberPromoteResponse { header: Some(header), members }))
    }
}
