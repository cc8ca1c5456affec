//! The etcd v3 Lock and Election services (etcd's `v3lock` and `v3election`).
//!
//! etcd builds both on its client-side recipes (`clientv3/concurrency`), run inside the server;
//! so do we, on the member's own write and read paths, with the same keys and the same
//! transactions, so that a Rampart lock and an etcdctl `lock` (which runs the recipe in the client)
//! exclude each other on the same name:
//!
//! - a contender (lock waiter or candidate) owns the key `NAME/LEASE-IN-HEX`, written with its
//!   lease, so it goes away when the lease does;
//! - the owner is the key of the prefix `NAME/` with the lowest create revision; a contender waits
//!   until every key of the prefix created before its own is deleted (`wait_deletes`);
//! - the create revision of the contender's key is the fencing token: it only grows, and a
//!   holder can guard its writes with `Compare(CREATE, key) == rev`.
//!
//! Waiting uses [`Changes`], a reader of this member's applied changes in revision order (the
//! change feed while it keeps up, MVCC history otherwise), so a waiter never misses the delete it
//! waits for. A waiter whose client goes away deletes its key, as etcd's recipe does.

use std::collections::VecDeque;
use std::sync::Arc;

use rampart_core::{limits, EtcdError};
use rampart_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use rampart_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use rampart_proto::etcdserverpb::request_op::Request as Op;
use rampart_proto::etcdserverpb::response_op::Response as OpResponse;
use rampart_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader,
    TxnRequest, TxnResponse,
};
use rampart_proto::mvccpb::event::EventType;
use rampart_proto::mvccpb::{Event, KeyValue};
use rampart_proto::rampartpb::{command, forward_reply};
use rampart_proto::v3electionpb::election_server::Election;
use rampart_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};
use rampart_proto::v3lockpb::lock_server::Lock;
use rampart_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use rampart_raft::state_machine::Change;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::status_as_go_error as status;
use crate::auth::{self, Caller};
use crate::lease::LeaseService;
use crate::member::Member;

/// The TTL of the lease granted for a Lock or Campaign that names none (lease 0): etcd's
/// `concurrency.NewSession` default. Nobody keeps it alive, so the key goes after this long.
const DEFAULT_SESSION_TTL_S: i64 = 60;
/// Responses queued on an Observe stream before it waits for the client.
const OBSERVE_STREAM_BUFFER: usize = 16;

/// The first key after every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `NAME/`: the prefix every contender's key of `name` lives under.
fn contender_prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// `NAME/LEASE-IN-HEX`, as etcd's recipes name a contender's key.
fn contender_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

fn create_revision_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: vec![],
        target_union: Some(TargetUnion::CreateRevision(rev)),
    }
}

fn op(request: Op) -> RequestOp {
    RequestOp { request: Some(request) }
}

fn get(key: &[u8]) -> RequestOp {
    op(Op::RequestRange(RangeRequest { key: key.to_vec(), ..Default::default() }))
}

fn put(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    op(Op::RequestPut(PutRequest { key: key.to_vec(), value: value.to_vec(), lease, ..Default::default() }))
}

/// The key of `prefix` created first (`WithFirstCreate`) or last (`WithLastCreate`), optionally
/// among those created at or before `max_create_rev`.
fn by_create(prefix: &[u8], order: SortOrder, max_create_rev: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision: max_create_rev,
        ..Default::default()
    }
}

fn range_kvs(r: &OpResponse) -> &[KeyValue] {
    match r {
        OpResponse::ResponseRange(r) => &r.kvs,
        _ => &[],
    }
}

fn event_rev(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

fn is_delete_of(e: &Event, key: &[u8]) -> bool {
    e.r#type == EventType::Delete as i32 && e.kv.as_ref().is_some_and(|kv| kv.key == key)
}

/// This member's applied changes after a revision, in revision order, each event once: from the
/// change feed while it is contiguous, from MVCC history when the feed lagged or jumped (a
/// snapshot was installed). The subscription is taken first, so nothing applied after the
/// starting revision is missed.
struct Changes {
    member: Arc<Member>,
    feed: broadcast::Receiver<Arc<Change>>,
    /// Every event up to this revision has been returned (or skipped by the caller's choice).
    rev: i64,
    pending: VecDeque<Event>,
}

impl Changes {
    /// A subscription whose revision is set by [`Changes::start_after`]; subscribe before reading
    /// the state the wait is about.
    fn subscribe(member: &Arc<Member>) -> Changes {
        Changes { member: member.clone(), feed: member.sm.feed.subscribe(), rev: i64::MAX, pending: VecDeque::new() }
    }

    fn start_after(&mut self, rev: i64) {
        self.rev = rev;
        self.pending.clear();
    }

    async fn next(&mut self) -> Result<Event, EtcdError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let mvcc = &self.member.sm.mvcc;
            let current = mvcc.current_revision();
            if current > self.rev {
                // Read `current` before the history, so a revision applied in between is either
                // in the history or still ahead of `rev`.
                let events = mvcc.events_since(self.rev, limits::WATCH_REPLAY_CHUNK_EVENTS)?;
                self.rev = events.last().map_or(current, event_rev).max(self.rev);
                self.pending.extend(events);
                continue;
            }
            match self.feed.recv().await {
                Ok(change) if change.revision == self.rev + 1 => {
                    self.rev = change.revision;
                    self.pending.extend(change.events.iter().cloned());
                }
                // Already covered, or a jump: the history branch above sorts it out.
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(EtcdError::Stopped),
            }
        }
    }
}

/// The recipes' shared steps, on one member.
#[derive(Clone)]
struct Recipes {
    member: Arc<Member>,
    leases: LeaseService,
}

impl Recipes {
    /// The caller, with auth on: etcd's recipes run with the caller's token, so its
    /// permissions decide what they may touch.
    fn caller(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, Status> {
        auth::caller(&self.member, metadata).map_err(status)
    }

    /// The first steps of Lock and Campaign: the caller may contend for `name` (it writes its
    /// key and reads the whole prefix); the lease (granted if 0); the prefix and the key.
    async fn contender(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        name: &[u8],
        lease: i64,
    ) -> Result<(Vec<u8>, Vec<u8>, i64), Status> {
        let caller = self.caller(metadata)?;
        let prefix = contender_prefix(name);
        let end = prefix_end(&prefix);
        caller.check_write(&prefix, &end).and_then(|()| caller.check_read(&prefix, &end)).map_err(status)?;
        let lease = self.session_lease(lease).await?;
        let key = contender_key(&prefix, lease);
        Ok((prefix, key, lease))
    }

    async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, EtcdError> {
        match self.member.write(command::Request::Txn(txn)).await? {
            forward_reply::Response::Txn(mut resp) => {
                self.member.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(EtcdError::internal("write reply of the wrong kind")),
        }
    }

    async fn delete(&self, key: &[u8]) -> Result<ResponseHeader, EtcdError> {
        let req = DeleteRangeRequest { key: key.to_vec(), ..Default::default() };
        match self.member.write(command::Request::DeleteRange(req)).await? {
            forward_reply::Response::DeleteRange(mut resp) => {
                self.member.fill_header(&mut resp.header);
                Ok(resp.header.unwrap_or_default())
            }
            _ => Err(EtcdError::internal("write reply of the wrong kind")),
        }
    }

    /// A linearizable range, as the recipes' `Get` is.
    async fn range(&self, req: &RangeRequest) -> Result<RangeResponse, EtcdError> {
        self.member.read_barrier().await?;
        let mut resp = self.member.sm.mvcc.range(req)?;
        self.member.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// The lease a contender's key is written with: the one asked for, or a new one of etcd's
    /// default session TTL for lease 0.
    async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let grant = LeaseGrantRequest { ttl: DEFAULT_SESSION_TTL_S, id: 0 };
        Ok(self.leases.grant(grant).await?.into_inner().id)
    }

    /// etcd's `waitDeletes`: returns, with the header of the read that saw it, once no key of
    /// `prefix` created at or before `max_create_rev` is left.
    async fn wait_deletes(&self, prefix: &[u8], max_create_rev: i64) -> Result<ResponseHeader, EtcdError> {
        loop {
            let mut changes = Changes::subscribe(&self.member);
            let resp = self.range(&by_create(prefix, SortOrder::Descend, max_create_rev)).await?;
            let header = resp.header.unwrap_or_default();
            let Some(last) = resp.kvs.first() else { return Ok(header) };
            changes.start_after(header.revision);
            while !is_delete_of(&changes.next().await?, &last.key) {}
        }
    }
}

/// Deletes a contender's key when dropped armed: a waiter whose client went away (its request
/// future is dropped) or whose wait failed gives up its place, as etcd's recipe does.
struct GiveUp {
    recipes: Option<(Recipes, Vec<u8>)>,
}

impl GiveUp {
    fn disarm(mut self) {
        self.recipes = None;
    }
}

impl Drop for GiveUp {
    fn drop(&mut self) {
        if let Some((recipes, key)) = self.recipes.take() {
            tokio::spawn(async move {
                if let Err(e) = recipes.delete(&key).await {
                    tracing::info!(key = %String::from_utf8_lossy(&key), %e, "could not delete an abandoned contender key; its lease will");
                }
            });
        }
    }
}

#[derive(Clone)]
pub struct LockService {
    recipes: Recipes,
}

impl LockService {
    pub fn new(member: Arc<Member>, leases: LeaseService) -> LockService {
        LockService { recipes: Recipes { member, leases } }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    /// etcd's `concurrency.Mutex.Lock`.
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let metadata = request.metadata().clone();
        let r = request.into_inner();
        let (prefix, key, lease) = self.recipes.contender(&metadata, &r.name, r.lease).await?;
        let owner = op(Op::RequestRange(by_create(&prefix, SortOrder::Ascend, 0)));
        let txn = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put(&key, b"", lease), owner.clone()],
            failure: vec![get(&key), owner],
        };
        let resp = self.recipes.txn(txn).await.map_err(status)?;
        let header = resp.header.unwrap_or_default();
        let mine = lock_create_revision(&resp, header.revision)?;
        let first = resp.responses.get(1).and_then(|r| r.response.as_ref()).map(range_kvs).unwrap_or_default();
        if first.first().is_none_or(|kv| kv.create_revision == mine) {
            return Ok(Response::new(LockResponse { header: Some(header), key }));
        }
        let give_up = GiveUp { recipes: Some((self.recipes.clone(), key.clone())) };
        let header = self.recipes.wait_deletes(&prefix, mine - 1).await.map_err(status)?;
        give_up.disarm();
        Ok(Response::new(LockResponse { header: Some(header), key }))
    }

    async fn unlock(&self, request: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let caller = self.recipes.caller(request.metadata())?;
        let key = request.into_inner().key;
        if key.is_empty() {
            return Err(status(EtcdError::EmptyKey));
        }
        caller.check_write(&key, b"").map_err(status)?;
        let header = self.recipes.delete(&key).await.map_err(status)?;
        Ok(Response::new(UnlockResponse { header: Some(header) }))
    }
}

/// The create revision of the contender's key after the Lock/Campaign txn: the txn's revision if
/// it created the key, the existing key's otherwise.
fn lock_create_revision(resp: &TxnResponse, txn_rev: i64) -> Result<i64, Status> {
    if resp.succeeded {
        return Ok(txn_rev);
    }
    let kvs = resp.responses.first().and_then(|r| r.response.as_ref()).map(range_kvs).unwrap_or_default();
    kvs.first()
        .map(|kv| kv.create_revision)
        .ok_or_else(|| status(EtcdError::internal("contender key vanished inside its own txn")))
}

#[derive(Clone)]
pub struct ElectionService {
    recipes: Recipes,
    stop: watch::Receiver<bool>,
}

impl ElectionService {
    pub fn new(member: Arc<Member>, leases: LeaseService, stop: watch::Receiver<bool>) -> ElectionService {
        ElectionService { recipes: Recipes { member, leases }, stop }
    }

    /// etcd's `Election.Proclaim`: sets the leader's value if `leader` still leads.
    async fn proclaim_as(&self, leader: &LeaderKey, value: &[u8]) -> Result<ResponseHeader, EtcdError> {
        let txn = TxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![put(&leader.key, value, leader.lease)],
            failure: vec![],
        };
        let resp = self.recipes.txn(txn).await?;
        if !resp.succeeded {
            return Err(EtcdError::ElectionNotLeader);
        }
        Ok(resp.header.unwrap_or_default())
    }

    /// etcd's `Election.Resign`: deletes the leader key if it is still the one given.
    async fn resign_as(&self, leader: &LeaderKey) -> Result<ResponseHeader, EtcdError> {
        let del = op(Op::RequestDeleteRange(DeleteRangeRequest { key: leader.key.clone(), ..Default::default() }));
        let txn = TxnRequest { compare: vec![create_revision_is(&leader.key, leader.rev)], success: vec![del], failure: vec![] };
        Ok(self.recipes.txn(txn).await?.header.unwrap_or_default())
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    /// etcd's `Election.Campaign`: waits until this candidate leads.
    async fn campaign(&self, request: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let metadata = request.metadata().clone();
        let r = request.into_inner();
        let (prefix, key, lease) = self.recipes.contender(&metadata, &r.name, r.lease).await?;
        let txn = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put(&key, &r.value, lease)],
            failure: vec![get(&key)],
        };
        let resp = self.recipes.txn(txn).await.map_err(status)?;
        let header = resp.header.unwrap_or_default();
        let rev = lock_create_revision(&resp, header.revision)?;
        let leader = LeaderKey { name: r.name, key: key.clone(), rev, lease };
        let give_up = GiveUp { recipes: Some((self.recipes.clone(), key)) };
        if !resp.succeeded {
            let current = resp.responses.first().and_then(|r| r.response.as_ref()).map(range_kvs).unwrap_or_default();
            if current.first().is_some_and(|kv| kv.value != r.value) {
                self.proclaim_as(&leader, &r.value).await.map_err(status)?;
            }
        }
        self.recipes.wait_deletes(&prefix, rev - 1).await.map_err(status)?;
        give_up.disarm();
        Ok(Response::new(CampaignResponse { header: Some(header), leader: Some(leader) }))
    }

    async fn proclaim(&self, request: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let caller = self.recipes.caller(request.metadata())?;
        let r = request.into_inner();
        let leader = r.leader.ok_or_else(|| status(EtcdError::MissingLeaderKey))?;
        caller.check_write(&leader.key, b"").map_err(status)?;
        let header = self.proclaim_as(&leader, &r.value).await.map_err(status)?;
        Ok(Response::new(ProclaimResponse { header: Some(header) }))
    }

    async fn leader(&self, request: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let caller = self.recipes.caller(request.metadata())?;
        let prefix = contender_prefix(&request.into_inner().name);
        caller.check_read(&prefix, &prefix_end(&prefix)).map_err(status)?;
        let resp = self.recipes.range(&by_create(&prefix, SortOrder::Ascend, 0)).await.map_err(status)?;
        let kv = resp.kvs.into_iter().next().ok_or_else(|| status(EtcdError::ElectionNoLeader))?;
        Ok(Response::new(LeaderResponse { header: resp.header, kv: Some(kv) }))
    }

    type ObserveStream = ReceiverStream<Result<LeaderResponse, Status>>;

    /// etcd's `Election.Observe`: the leader now (or the first candidate to come), then every
    /// value it proclaims, then the next leader once its key is deleted, and so on.
    async fn observe(&self, request: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let caller = self.recipes.caller(request.metadata())?;
        let prefix = contender_prefix(&request.into_inner().name);
        caller.check_read(&prefix, &prefix_end(&prefix)).map_err(status)?;
        let (out, rx) = mpsc::channel(OBSERVE_STREAM_BUFFER);
        let recipes = self.recipes.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let observing = observe(&recipes, &prefix, &out);
            let result = tokio::select! {
                r = observing => r,
                _ = out.closed() => return,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => Err(EtcdError::Stopped),
            };
            if let Err(e) = result {
                let _ = out.send(Err(status(e))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn resign(&self, request: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let caller = self.recipes.caller(request.metadata())?;
        let leader = request.into_inner().leader.ok_or_else(|| status(EtcdError::MissingLeaderKey))?;
        caller.check_write(&leader.key, b"").map_err(status)?;
        let header = self.resign_as(&leader).await.map_err(status)?;
        Ok(Response::new(ResignResponse { header: Some(header) }))
    }
}

/// The body of an Observe stream; returns only on an error (a closed stream is noticed by the
/// caller).
async fn observe(
    recipes: &Recipes,
    prefix: &[u8],
    out: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), EtcdError> {
    let member = &recipes.member;
    loop {
        let mut changes = Changes::subscribe(member);
        let resp = recipes.range(&by_create(prefix, SortOrder::Ascend, 0)).await?;
        let mut header = resp.header.unwrap_or_default();
        changes.start_after(header.revision);
        let leader = match resp.kvs.into_iter().next() {
            Some(kv) => kv,
            // No leader: the first key put under the prefix is the next one.
            None => loop {
                let e = changes.next().await?;
                let is_candidate = e.r#type == EventType::Put as i32
                    && e.kv.as_ref().is_some_and(|kv| kv.key.starts_with(prefix));
                if is_candidate {
                    header = member.header(event_rev(&e));
                    break e.kv.unwrap_or_default();
                }
            },
        };
        let key = leader.key.clone();
        if out.send(Ok(LeaderResponse { header: Some(header), kv: Some(leader) })).await.is_err() {
            return Ok(());
        }
        // Every later value of that key, until it is deleted.
        loop {
            let e = changes.next().await?;
            if e.kv.as_ref().is_none_or(|kv| kv.key != key) {
                continue;
            }
            if e.r#type == EventType::Delete as i32 {
                break;
            }
            let resp = LeaderResponse { header: Some(member.header(event_rev(&e))), kv: e.kv };
            if out.send(Ok(resp)).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_like_etcd() {
        assert_eq!(prefix_end(b"lock/"), b"lock0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn contender_keys_like_etcds_recipes() {
        let p = contender_prefix(b"job");
        assert_eq!(contender_key(&p, 0x694d7b0e5f8e4f0a), b"job/694d7b0e5f8e4f0a".to_vec());
    }
}
