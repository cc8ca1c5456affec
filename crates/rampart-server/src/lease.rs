//! The etcd v3 Lease service and the leader's lease clocks (etcd's `lessor` and
//! `v3rpc/lease.go`).
//!
//! What a lease *is* (its id, granted TTL and attached keys) is replicated: LeaseGrant and
//! LeaseRevoke go through the log like any write, and the MVCC store keeps the leases and which
//! keys each holds. *When* a lease expires is not replicated: as in etcd, only the leader keeps a
//! clock per lease ([`Lessor`]), keepalives reset it, and when one runs out the leader proposes a
//! LeaseRevoke, which deletes the lease's keys on every member at one revision. Followers forward
//! keepalives and time-to-live questions to the leader (`RpcKind::Lease`).
//!
//! A member that becomes leader starts every clock afresh at the lease's full TTL plus an
//! election timeout (etcd's `Promote`): the old leader's clocks are gone with it, and a lease
//! must never expire early because its keepalives went to the old leader. Remaining TTLs are not
//! checkpointed (etcd 3.4's default), so a lease can live up to one TTL longer across a failover.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::type_config::async_runtime::WatchReceiver;
use openraft::ServerState;
use prost::Message;
use rampart_core::{limits, EtcdError};
use rampart_proto::etcdserverpb::lease_server::Lease;
use rampart_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use rampart_proto::rampartpb::{command, forward_reply, Command};
use rampart_raft::network::RpcKind;
use rampart_raft::Request as RaftRequest;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::{mismatch, status};
use crate::auth;
use crate::member::Member;

/// Keepalive answers queued for one stream before it waits for the client to read.
const KEEPALIVE_STREAM_BUFFER: usize = 16;
/// How often a renewal of an expired lease looks whether its revoke has been applied.
const REVOKE_POLL: Duration = Duration::from_millis(50);
/// Tries with a fresh id when a chosen lease id turns out to be taken.
const GRANT_ID_ATTEMPTS: usize = 3;

/// A question only the leader can answer, as a follower forwards it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaseCall {
    Renew { id: i64 },
    TimeToLive { id: i64, keys: bool },
}

/// The leader's answer to a [`LeaseCall`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaseAnswer {
    /// The TTL the lease was renewed for.
    Renewed { ttl: i64 },
    TimeToLive { ttl: i64, granted_ttl: i64, keys: Vec<Vec<u8>> },
}

/// etcd's minimum lease TTL: 1.5 election timeouts, in whole seconds rounded up, so a lease
/// outlives a leader election. With our 300 ms default that is 1 s (etcd's 1 s default: 2 s).
pub fn min_ttl_s(election_timeout_ms: u64) -> i64 {
    ((3 * election_timeout_ms / 2).div_ceil(1000) as i64).max(1)
}

/// When a lease runs out, on the leader.
#[derive(Debug, Clone, Copy)]
struct Clock {
    at: Instant,
    /// Ran out and its revoke was proposed; `at` is when to propose it again.
    revoking: bool,
}

/// The leader's clocks: one per lease while this member leads, none otherwise.
#[derive(Default)]
struct Clocks {
    /// The term this member leads in, for which the clocks were started.
    term: Option<u64>,
    /// The last lease learned from the store (`Mvcc::leases_learned_after`).
    seen: u64,
    clocks: HashMap<i64, Clock>,
    /// The same clocks in the order they run out.
    queue: BTreeSet<(Instant, i64)>,
}

impl Clocks {
    fn set(&mut self, id: i64, clock: Clock) {
        if let Some(old) = self.clocks.insert(id, clock) {
            self.queue.remove(&(old.at, id));
        }
        self.queue.insert((clock.at, id));
    }

    fn remove(&mut self, id: i64) {
        if let Some(old) = self.clocks.remove(&id) {
            self.queue.remove(&(old.at, id));
        }
    }
}

/// etcd's lease id generator (`pkg/idutil`): the low 16 bits of the member id, then 40 bits of
/// the start time in milliseconds and an 8-bit counter that carries into them. Unique per member
/// without coordination; a clash with another member's id is answered "lease already exists"
/// and a new id is tried.
struct IdGen {
    prefix: u64,
    suffix: AtomicU64,
}

impl IdGen {
    const SUFFIX_BITS: u32 = 48;

    fn new(member_id: u64) -> IdGen {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        IdGen { prefix: (member_id & 0xffff) << Self::SUFFIX_BITS, suffix: AtomicU64::new((now_ms & ((1 << 40) - 1)) << 8) }
    }

    /// A positive lease id.
    fn next(&self) -> i64 {
        loop {
            let suffix = self.suffix.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & ((1 << Self::SUFFIX_BITS) - 1);
            let id = ((self.prefix | suffix) & (i64::MAX as u64)) as i64;
            if id != 0 {
                return id;
            }
        }
    }
}

/// The leader's lease clocks, and the answers that need them.
pub struct Lessor {
    member: Arc<Member>,
    clocks: Mutex<Clocks>,
    ids: IdGen,
}

impl Lessor {
    pub fn new(member: Arc<Member>) -> Lessor {
        let ids = IdGen::new(member.id);
        Lessor { member, clocks: Mutex::new(Clocks::default()), ids }
    }

    /// Brings the clocks in line with this member's role and the store; false if it does not
    /// lead. Starting to lead (in a new term) starts every clock at its TTL plus an election
    /// timeout; a lease granted since the last look starts at its TTL.
    fn sync(&self, c: &mut Clocks, now: Instant) -> bool {
        // The server metrics, not the full ones: `run_expiry` wakes on their changes, and
        // openraft sends them first.
        let (leading, term) = {
            let m = self.member.raft.server_metrics();
            let m = m.borrow_watched();
            (m.state == ServerState::Leader, m.vote.leader_id.term)
        };
        if !leading {
            if c.term.is_some() {
                tracing::info!(term = ?c.term, "no longer leader: lease clocks stopped");
                *c = Clocks::default();
            }
            return false;
        }
        let mvcc = &self.member.sm.mvcc;
        if c.term != Some(term) {
            *c = Clocks { term: Some(term), ..Clocks::default() };
            let extend = Duration::from_millis(self.member.cfg.election_timeout_ms);
            let (all, seen) = mvcc.leases_learned_after(0);
            for l in &all {
                c.set(l.id, Clock { at: now + extend + ttl(l.ttl), revoking: false });
            }
            c.seen = seen;
            tracing::info!(term, leases = all.len(), "leader: lease clocks started");
        }
        let (new, seen) = mvcc.leases_learned_after(c.seen);
        for l in new {
            c.set(l.id, Clock { at: now + ttl(l.ttl), revoking: false });
        }
        c.seen = seen;
        // Clocks of revoked leases go when they run out; sweep them early if they pile up (a
        // client granting and revoking long leases).
        if c.clocks.len() > 2 * mvcc.lease_count() + 1024 {
            let gone: Vec<i64> = c.clocks.keys().copied().filter(|id| mvcc.lease(*id).is_none()).collect();
            gone.into_iter().for_each(|id| c.remove(id));
        }
        true
    }

    /// Starts the clocks of leases granted since the last look, if this member leads. Called
    /// right after a grant applied here, so its clock starts then, as etcd's does; a grant that
    /// reached the leader from a follower is picked up by the next tick or lease call instead
    /// (late, never early).
    fn note_grants(&self) {
        let mut c = self.clocks.lock().unwrap();
        self.sync(&mut c, Instant::now());
    }

    /// Answers a [`LeaseCall`] as the leader; `NotLeader` if this member does not lead.
    pub async fn answer(&self, call: LeaseCall) -> Result<LeaseAnswer, EtcdError> {
        // Leadership confirmed and everything committed applied (etcd's waitAppliedIndex): a
        // lease granted just before is known here.
        self.member.local_read_index().await?;
        match call {
            LeaseCall::Renew { id } => self.renew(id).await.map(|ttl| LeaseAnswer::Renewed { ttl }),
            LeaseCall::TimeToLive { id, keys } => self.time_to_live(id, keys),
        }
    }

    /// etcd's `lessor.Renew`: the lease's clock starts over at its TTL. A lease whose clock has
    /// run out is being revoked; the answer waits for that (then "not found").
    async fn renew(&self, id: i64) -> Result<i64, EtcdError> {
        let deadline = Instant::now() + Duration::from_millis(limits::REQUEST_TIMEOUT_MS);
        loop {
            {
                let mut c = self.clocks.lock().unwrap();
                let now = Instant::now();
                if !self.sync(&mut c, now) {
                    return Err(EtcdError::NotLeader);
                }
                let lease = self.member.sm.mvcc.lease(id).ok_or(EtcdError::LeaseNotFound)?;
                let ran_out = c.clocks.get(&id).is_some_and(|k| k.revoking || k.at <= now);
                if !ran_out {
                    c.set(id, Clock { at: now + ttl(lease.ttl), revoking: false });
                    return Ok(lease.ttl);
                }
            }
            if Instant::now() >= deadline {
                return Err(EtcdError::Timeout);
            }
            tokio::time::sleep(REVOKE_POLL).await;
        }
    }

    fn time_to_live(&self, id: i64, keys: bool) -> Result<LeaseAnswer, EtcdError> {
        let mut c = self.clocks.lock().unwrap();
        let now = Instant::now();
        if !self.sync(&mut c, now) {
            return Err(EtcdError::NotLeader);
        }
        let mvcc = &self.member.sm.mvcc;
        let lease = mvcc.lease(id).ok_or(EtcdError::LeaseNotFound)?;
        // etcd: int64(Remaining().Seconds()), truncated toward zero, negative once run out.
        let remaining = match c.clocks.get(&id) {
            Some(k) if k.at >= now => (k.at - now).as_secs() as i64,
            Some(k) => -((now - k.at).as_secs() as i64),
            None => lease.ttl,
        };
        let keys = if keys { mvcc.lease_keys(id).unwrap_or_default() } else { Vec::new() };
        Ok(LeaseAnswer::TimeToLive { ttl: remaining, granted_ttl: lease.ttl, keys })
    }

    /// The leases whose clocks ran out, at most `limit`; each is marked as being revoked and
    /// will be proposed again after the retry interval if it is still there. Clocks of leases
    /// revoked meanwhile are dropped.
    fn take_expired(&self, limit: usize) -> Vec<i64> {
        let mut c = self.clocks.lock().unwrap();
        let now = Instant::now();
        if !self.sync(&mut c, now) {
            return Vec::new();
        }
        let mut expired = Vec::new();
        while expired.len() < limit {
            let Some(&(at, id)) = c.queue.first() else { break };
            if at > now {
                break;
            }
            if self.member.sm.mvcc.lease(id).is_none() {
                c.remove(id);
                continue;
            }
            c.set(id, Clock { at: now + Duration::from_millis(limits::LEASE_REVOKE_RETRY_MS), revoking: true });
            expired.push(id);
        }
        expired
    }

    /// The leader's expiry loop (etcd's `runLoop`): every tick, revokes the leases that ran out,
    /// at most [`limits::LEASE_REVOKE_PER_S`] a second. Runs on every member; only the leader
    /// finds anything to do.
    ///
    /// It also wakes when this member's role changes, so a new leader starts its clocks (with
    /// the election-timeout extension) at once. Started lazily, a lease granted in the new term
    /// before the first look would get the extension meant for leases of the old term, and
    /// TimeToLive would answer more than the granted TTL.
    pub async fn run_expiry(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let tick_ms = limits::LEASE_EXPIRY_TICK_MS;
        let per_tick = (limits::LEASE_REVOKE_PER_S as u64 * tick_ms / 1000).max(1) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut role = self.member.raft.server_metrics();
        loop {
            tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                changed = role.changed() => {
                    if changed.is_err() {
                        return; // raft has shut down
                    }
                    self.note_grants();
                    continue;
                }
                _ = tick.tick() => {}
            }
            let expired = self.take_expired(per_tick);
            if expired.is_empty() {
                continue;
            }
            tracing::debug!(count = expired.len(), "revoking expired leases");
            let member = self.member.clone();
            tokio::spawn(async move {
                let revokes = expired.iter().map(|id| {
                    let cmd = Command { request: Some(command::Request::LeaseRevoke(LeaseRevokeRequest { id: *id })) };
                    // As leader only: a member that lost leadership leaves the decision to the
                    // new leader's clocks.
                    member.propose_local(RaftRequest::Kv(cmd.encode_to_vec()))
                });
                for (id, r) in expired.iter().zip(futures::future::join_all(revokes).await) {
                    match r {
                        Ok(_) => tracing::debug!(lease = format!("{id:x}"), "expired lease revoked"),
                        Err(EtcdError::LeaseNotFound) => {}
                        Err(e) => tracing::info!(lease = format!("{id:x}"), %e, "revoking an expired lease failed; will retry"),
                    }
                }
            });
        }
    }

    /// Renews a lease through the leader; its granted TTL.
    async fn renew_anywhere(&self, id: i64) -> Result<i64, EtcdError> {
        let call = LeaseCall::Renew { id };
        match self.member.ask_leader(RpcKind::Lease, &call, || self.answer(call.clone())).await? {
            LeaseAnswer::Renewed { ttl } => Ok(ttl),
            other => Err(EtcdError::internal(format!("lease renewal answered with {other:?}"))),
        }
    }
}

fn ttl(seconds: i64) -> Duration {
    Duration::from_secs(seconds.max(0) as u64)
}

#[derive(Clone)]
pub struct LeaseService {
    pub member: Arc<Member>,
    pub lessor: Arc<Lessor>,
    /// Becomes true when the member stops: open keepalive streams end with "server stopped".
    pub stop: watch::Receiver<bool>,
}

impl LeaseService {
    async fn propose(&self, request: command::Request) -> Result<forward_reply::Response, EtcdError> {
        self.member.write(request).await
    }

    /// Grants a lease (etcd's LeaseGrant) for a caller already checked.
    pub async fn grant(&self, r: LeaseGrantRequest) -> Result<Response<LeaseGrantResponse>, Status> {
        // Checked again when applied; refusing here keeps a hopeless request out of the log.
        if r.ttl > limits::MAX_LEASE_TTL_S {
            return Err(status(EtcdError::LeaseTtlTooLarge));
        }
        // Decided before proposing, so every member applies the same lease.
        let ttl = r.ttl.max(min_ttl_s(self.member.cfg.election_timeout_ms));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = if r.id == 0 { self.lessor.ids.next() } else { r.id };
            match self.propose(command::Request::LeaseGrant(LeaseGrantRequest { id, ttl })).await {
                Ok(forward_reply::Response::LeaseGrant(mut resp)) => {
                    self.lessor.note_grants();
                    self.member.fill_header(&mut resp.header);
                    return Ok(Response::new(resp));
                }
                Ok(_) => return Err(mismatch()),
                Err(EtcdError::LeaseExist) if r.id == 0 && attempt < GRANT_ID_ATTEMPTS => {}
                Err(e) => return Err(status(e)),
            }
        }
    }

    /// With auth on, lease calls take a valid token (etcd checks no permission on them, except
    /// revoke, below).
    fn check_caller(&self, metadata: &tonic::metadata::MetadataMap) -> Result<auth::Caller, Status> {
        auth::caller(&self.member, metadata).map_err(status)
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, request: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        self.check_caller(request.metadata())?;
        self.grant(request.into_inner()).await
    }

    async fn lease_revoke(&self, request: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = self.check_caller(request.metadata())?;
        let r = request.into_inner();
        // Revoking deletes the lease's keys: etcd requires write permission on each of them.
        if !matches!(caller, auth::Caller::Anyone) {
            for key in self.member.sm.mvcc.lease_keys(r.id).unwrap_or_default() {
                caller.check_write(&key, b"").map_err(status)?;
            }
        }
        match self.propose(command::Request::LeaseRevoke(r)).await.map_err(status)? {
            forward_reply::Response::LeaseRevoke(mut resp) => {
                self.member.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(mismatch()),
        }
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        self.check_caller(request.metadata())?;
        let mut input = request.into_inner();
        let (out, rx) = mpsc::channel(KEEPALIVE_STREAM_BUFFER);
        let svc = self.clone();
        tokio::spawn(async move {
            let mut stop = svc.stop.clone();
            loop {
                let next = tokio::select! {
                    r = input.message() => r,
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                        let _ = out.send(Err(status(EtcdError::Stopped))).await;
                        return;
                    }
                    _ = out.closed() => return,
                };
                // End of stream, or the client went away.
                let Ok(Some(req)) = next else { return };
                // The header is taken before the renewal, as etcd does: a client must not see a
                // keepalive succeed at a revision after the lease's revoke.
                let header = svc.member.header(svc.member.sm.mvcc.current_revision());
                let ttl = match svc.lessor.renew_anywhere(req.id).await {
                    Ok(ttl) => ttl,
                    Err(EtcdError::LeaseNotFound) => 0,
                    Err(e) => {
                        let _ = out.send(Err(status(e))).await;
                        return;
                    }
                };
                let resp = LeaseKeepAliveResponse { header: Some(header), id: req.id, ttl };
                if out.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        self.check_caller(request.metadata())?;
        let r = request.into_inner();
        let call = LeaseCall::TimeToLive { id: r.id, keys: r.keys };
        let answer = self.member.ask_leader(RpcKind::Lease, &call, || self.lessor.answer(call.clone())).await;
        let header = Some(self.member.header(self.member.sm.mvcc.current_revision()));
        let resp = match answer {
            Ok(LeaseAnswer::TimeToLive { ttl, granted_ttl, keys }) => {
                LeaseTimeToLiveResponse { header, id: r.id, ttl, granted_ttl, keys }
            }
            // etcd answers an unknown lease with TTL -1, not an error.
            Err(EtcdError::LeaseNotFound) => LeaseTimeToLiveResponse { header, id: r.id, ttl: -1, ..Default::default() },
            Ok(other) => return Err(status(EtcdError::internal(format!("time-to-live answered with {other:?}")))),
            Err(e) => return Err(status(e)),
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(&self, request: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.check_caller(request.metadata())?;
        self.member.read_barrier().await.map_err(status)?;
        let leases = self.member.sm.mvcc.lease_ids().into_iter().map(|id| LeaseStatus { id }).collect();
        let header = Some(self.member.header(self.member.sm.mvcc.current_revision()));
        Ok(Response::new(LeaseLeasesResponse { header, leases }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_ttl_is_etcds() {
        // etcd: ceil(1.5 election timeouts), in seconds.
        assert_eq!(min_ttl_s(1000), 2);
        assert_eq!(min_ttl_s(300), 1);
        assert_eq!(min_ttl_s(2000), 3);
        assert_eq!(min_ttl_s(0), 1);
    }

    #[test]
    fn ids_are_positive_unique_and_carry_the_member() {
        let g = IdGen::new(0xabcd_1234);
        let a = g.next();
        let b = g.next();
        assert!(a > 0 && b > a);
        assert_eq!((a as u64) >> IdGen::SUFFIX_BITS, 0x1234);
        let top = IdGen::new(0xffff);
        assert!(top.next() > 0, "the sign bit is masked");
    }
}
