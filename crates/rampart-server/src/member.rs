//! One running member: storage, raft, and the two request paths every API call goes through.
//!
//! - [`Member::propose`]: a write. On the leader it goes into raft; on a follower it is forwarded
//!   to the leader over the peer transport. Retried only while it is certain the write was not
//!   appended (no leader yet, leader unreachable before sending, "not leader" answers), so a write
//!   is never applied twice because of a retry.
//! - [`Member::read_barrier`]: makes a following local read linearizable (etcd's ReadIndex). The
//!   leader confirms its leadership with a quorum; a follower asks the leader for the read index
//!   and waits until it has applied that far.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::errors::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{LinearizerOption, ServerState, SnapshotPolicy};
use rampart_core::{limits, EtcdError, MemberId};
use rampart_proto::etcdserverpb::ResponseHeader;
use prost::Message;
use rampart_proto::rampartpb::peer_client::PeerClient;
use rampart_proto::rampartpb::{command, forward_reply, Command, ForwardReply};
use rampart_raft::log_store::LogStore;
use rampart_raft::network::{self, PeerNetwork, RpcKind};
use rampart_raft::state_machine::{Shared, StateMachine};
use openraft::ChangeMembers;
use rampart_raft::{AdminRequest, MemberInfo, PeerNode, Raft, Request, TypeConfig};
use rampart_storage::meta;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::coalesce::Rounds;
use crate::config::{self, Config};
use crate::forward::Forwarder;

/// How long a request waits between attempts while there is no reachable leader.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Timeout of one forwarded request to the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(limits::REQUEST_TIMEOUT_MS);
/// Timeout of one ReadIndex round trip; readers retry until their own deadline.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);

/// What a data dir remembers about whom it belongs to. Checked on every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    name: String,
    member_id: MemberId,
    cluster_id: u64,
    token: String,
}
const IDENTITY_FILE: &str = "identity.meta";
const IDENTITY_FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("data dir {dir}: {msg}")]
    DataDir { dir: PathBuf, msg: String },
    #[error("storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen on {url}: {err}")]
    Listen { url: String, err: String },
    #[error("{0}")]
    Unsupported(String),
}

pub struct Member {
    pub id: MemberId,
    pub cluster_id: u64,
    pub cfg: Config,
    pub raft: Raft,
    pub sm: Arc<Shared>,
    log: LogStore,
    peers: Mutex<HashMap<MemberId, PeerClient<Channel>>>,
    /// Batching queues of writes forwarded to a leader, per leader (see `forward`).
    forwarders: Mutex<HashMap<MemberId, Arc<Forwarder>>>,
    /// Source address for peer connections (the peer listener's address, unless unspecified).
    local_ip: Option<std::net::IpAddr>,
    /// Reads waiting for the next ReadIndex round trip to the leader (followers).
    follower_reads: Rounds<Option<u64>>,
    /// This member's own `Arc`, for the tasks it spawns.
    me: std::sync::Weak<Member>,
}

impl Member {
    /// Opens storage, checks the data dir belongs to this cluster, starts raft and bootstraps a
    /// new cluster if the data dir is fresh. Servers are started by the caller (`server::serve`).
    pub async fn open(cfg: Config) -> Result<Arc<Member>, StartError> {
        cfg.validate()?;
        let members = cfg.initial_members()?;
        let token = cfg.initial_cluster_token.clone();
        let initial: BTreeMap<MemberId, PeerNode> = members
            .iter()
            .map(|(name, urls)| (config::member_id(urls, &token), PeerNode { name: name.clone(), peer_urls: urls.clone() }))
            .collect();
        let id = config::member_id(&cfg.initial_advertise_peer_urls, &token);
        let cluster_id = config::cluster_id(&initial.keys().copied().collect::<Vec<_>>(), &token);

        let member_dir = cfg.data_dir.join("member");
        let identity_path = member_dir.join(IDENTITY_FILE);
        let dd_err = |msg: String| StartError::DataDir { dir: cfg.data_dir.clone(), msg };
        let existing = read_identity(&identity_path).map_err(dd_err)?;
        let (id, cluster_id, fresh) = match existing {
            Some(ident) => {
                if ident.token != token || ident.name != cfg.name {
                    return Err(dd_err(format!(
                        "it belongs to member {:?} ({:x}) of cluster {:x} (token {:?}), not to member {:?} of a cluster with token {:?}; \
                         refusing to use it. Point --data-dir elsewhere, or remove it if that cluster is gone.",
                        ident.name, ident.member_id, ident.cluster_id, ident.token, cfg.name, token
                    )));
                }
                (ident.member_id, ident.cluster_id, false)
            }
            None => {
                if member_dir.join("wal").exists() {
                    return Err(dd_err(
                        "it holds a raft log but no identity file; refusing to guess which cluster it belongs to".into(),
                    ));
                }
                if cfg.initial_cluster_state == "existing" {
                    // Joining: the cluster already knows this member (`member add` computed the
                    // same id from the same peer URLs and token); learn the cluster id from a peer.
                    let peers: Vec<String> = initial.iter().filter(|(pid, _)| **pid != id).flat_map(|(_, n)| n.peer_urls.clone()).collect();
                    let cluster_id = ask_cluster_id(&peers).await.map_err(StartError::Raft)?;
                    (id, cluster_id, true)
                } else {
                    (id, cluster_id, true)
                }
            }
        };
        std::fs::create_dir_all(&member_dir).map_err(|e| dd_err(e.to_string()))?;

        let log = LogStore::open(&member_dir.join("wal")).map_err(|e| StartError::Storage(e.to_string()))?;
        let sm = StateMachine::open(&member_dir.join("kv.redb"), &member_dir.join("snap"))
            .map_err(|e| StartError::Storage(e.to_string()))?;
        let shared = sm.shared();

        let raft_config = openraft::Config {
            cluster_name: token.clone(),
            heartbeat_interval: cfg.heartbeat_interval_ms,
            // openraft waits leader_lease (= election_timeout_max) plus a random election timeout in
            // [min, max) after the last heartbeat before it campaigns. These bounds make that total
            // [E, 1.2 E) for --election-timeout E, close to what an etcd operator expects E to mean.
            election_timeout_min: cfg.election_timeout_ms * 2 / 5,
            election_timeout_max: cfg.election_timeout_ms * 3 / 5,
            enable_pre_vote: Some(true),
            // Send entries to followers as soon as they are written, before the leader's own
            // fsync completes: the leader's and the followers' fsyncs then overlap instead of
            // adding up. Commit still needs a quorum of *flushed* logs.
            broadcast_submitted_on_append: Some(true),
            // A restarted leader must win a new election: restoring leadership from the persisted
            // vote lets it serve ReadIndex with a commit index it has not re-learned yet, which
            // the all-members-SIGKILL test caught as a stale linearizable read.
            enable_leader_restore: Some(false),
            max_payload_entries: limits::MAX_APPEND_ENTRIES,
            state_machine_channel_size: Some(limits::STATE_MACHINE_QUEUE_COMMANDS),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_count),
            max_in_snapshot_log_to_keep: cfg.snapshot_catchup_entries,
            // A peer that just died must be retried soon after it comes back.
            backoff: "50ms ...500ms".into(),
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let local_ip = config::url_to_addr(&cfg.listen_peer_urls[0])?.ip();
        let local_ip = (!local_ip.is_unspecified()).then_some(local_ip);
        let raft = Raft::new(id, Arc::new(raft_config), PeerNetwork { local_ip }, log.clone(), sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        if fresh && cfg.initial_cluster_state == "new" {
            match raft.initialize(initial.clone()).await {
                Ok(()) => {}
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(StartError::Raft(format!("bootstrap failed: {e}"))),
            }
        }
        if fresh {
            let ident = Identity { name: cfg.name.clone(), member_id: id, cluster_id, token };
            let bytes = rampart_raft::codec::encode_versioned(IDENTITY_FORMAT_V1, &ident);
            meta::write_atomic(&identity_path, &bytes).map_err(|e| dd_err(e.to_string()))?;
        }

        Ok(Arc::new_cyclic(|me| Member {
            id,
            cluster_id,
            cfg,
            raft,
            sm: shared,
            log,
            peers: Mutex::new(HashMap::new()),
            forwarders: Mutex::new(HashMap::new()),
            local_ip,
            follower_reads: Rounds::default(),
            me: me.clone(),
        }))
    }

    pub fn header(&self, revision: i64) -> ResponseHeader {
        let term = self.raft.server_metrics().borrow_watched().vote.leader_id.term;
        ResponseHeader { cluster_id: self.cluster_id, member_id: self.id, revision, raft_term: term }
    }

    /// Fills the cluster-wide fields of a header that storage filled with a revision.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let revision = header.as_ref().map(|h| h.revision).unwrap_or_else(|| self.sm.mvcc.current_revision());
        *header = Some(self.header(revision));
    }

    pub fn raft_log_bytes(&self) -> u64 {
        self.log.size_bytes()
    }

    /// The leader as far as this member knows, if it can be reached. A leader that is no longer in
    /// the membership was just removed and the next one is not known yet: that is no leader, so
    /// callers wait for the next one instead of failing to find the removed one's address
    /// (bug 10 in docs/robustness.md). This member itself still leads until it steps down.
    fn leader(&self) -> Option<MemberId> {
        let rx = self.raft.server_metrics();
        let m = rx.borrow_watched();
        m.current_leader.filter(|l| *l == self.id || m.membership_config.get_node(l).is_some())
    }

    /// The first peer URL of member `id`, from the membership.
    fn peer_url(&self, id: MemberId) -> Result<String, EtcdError> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let node = metrics.membership_config.get_node(&id).ok_or(EtcdError::NoLeader)?;
        node.peer_urls.first().cloned().ok_or(EtcdError::NoLeader)
    }

    fn peer(&self, id: MemberId) -> Result<PeerClient<Channel>, EtcdError> {
        let mut peers = self.peers.lock().unwrap();
        if let Some(c) = peers.get(&id) {
            return Ok(c.clone());
        }
        let client = network::peer_client(&self.peer_url(id)?, self.local_ip).map_err(EtcdError::internal)?;
        peers.insert(id, client.clone());
        Ok(client)
    }

    /// An etcd write (or lease command): checks the size against `--max-request-bytes`, proposes
    /// it, and unwraps the reply.
    pub async fn write(&self, request: command::Request) -> Result<forward_reply::Response, EtcdError> {
        let bytes = Command { request: Some(request) }.encode_to_vec();
        if bytes.len() > self.cfg.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        let reply = self.propose(Request::Kv(bytes)).await?;
        ForwardReply::decode(reply.as_slice())
            .map_err(EtcdError::internal)?
            .response
            .ok_or_else(|| EtcdError::internal("empty write reply"))
    }

    /// Applies a write through raft and returns the encoded `rampartpb::ForwardReply`.
    pub async fn propose(&self, req: Request) -> Result<Vec<u8>, EtcdError> {
        let deadline = Instant::now() + Duration::from_millis(limits::REQUEST_TIMEOUT_MS);
        loop {
            if Instant::now() >= deadline {
                return Err(EtcdError::Timeout);
            }
            match self.leader() {
                Some(l) if l == self.id => match self.propose_local(req.clone()).await {
                    Err(EtcdError::NotLeader) => {}
                    other => return other,
                },
                Some(l) => {
                    let forwarder = self.forwarder(l)?;
                    let call = forwarder.send(req.clone());
                    // If another leader is elected meanwhile, the old one is stalled or cut off:
                    // answer now, as etcd does, instead of letting the client wait for its timeout.
                    // The outcome is unknown, so this is an error, never a retry.
                    let result = tokio::select! {
                        r = call => r,
                        _ = self.leader_changed_from(l) => return Err(EtcdError::LeaderChanged),
                    };
                    match result {
                        Ok(Ok(Err(EtcdError::NotLeader))) => {}
                        Ok(Ok(result)) => return result,
                        Ok(Err(remote)) => return Err(EtcdError::Internal(remote)),
                        // Nothing was sent: the connection could not be made. Safe to retry.
                        Err(status) if never_sent(&status) => {}
                        Err(status) => {
                            tracing::warn!(leader = format!("{l:x}"), %status, "forwarded write failed, outcome unknown");
                            return Err(EtcdError::TimeoutDueToLeaderFail);
                        }
                    }
                }
                None => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The batching queue of writes forwarded to leader `id`.
    fn forwarder(&self, id: MemberId) -> Result<Arc<Forwarder>, EtcdError> {
        if let Some(f) = self.forwarders.lock().unwrap().get(&id) {
            return Ok(f.clone());
        }
        let client = self.peer(id)?;
        let pipe = self.peer_url(id)?.parse::<tonic::transport::Uri>().ok().and_then(|uri| rampart_proto::wire::host_port(&uri)).map(|(host, port)| {
            crate::forward::PipeTarget { host, port, local_ip: self.local_ip }
        });
        let f = Arc::new(Forwarder::new(client, pipe, FORWARD_TIMEOUT));
        self.forwarders.lock().unwrap().entry(id).or_insert(f.clone());
        Ok(f)
    }

    /// A batch a follower forwarded, as it arrived over the propose pipe or gRPC: refused whole
    /// (`Err`, nothing proposed) if it holds more writes than a follower sends at once.
    pub async fn propose_forwarded(&self, reqs: Vec<Request>) -> Result<Vec<Result<Vec<u8>, EtcdError>>, String> {
        if reqs.len() > limits::FORWARD_BATCH_REQUESTS {
            return Err(format!("a forwarded batch holds at most {} writes", limits::FORWARD_BATCH_REQUESTS));
        }
        Ok(self.propose_local_many(reqs).await)
    }

    /// A batch of writes forwarded by a follower, on this member as leader: one raft submission
    /// for all of them, one result per write, in order. `NotLeader` means that write was not
    /// appended.
    pub async fn propose_local_many(&self, reqs: Vec<Request>) -> Vec<Result<Vec<u8>, EtcdError>> {
        use futures::StreamExt;
        let n = reqs.len();
        let mut out: Vec<Result<Vec<u8>, EtcdError>> = match self.raft.client_write_many(reqs).await {
            Ok(results) => {
                results
                    .map(|r| match r {
                        Ok(Ok(written)) => written.response.0,
                        Ok(Err(e)) => Err(write_error(e)),
                        Err(e) => Err(stopped(e)),
                    })
                    .collect()
                    .await
            }
            Err(e) => {
                stopped(e);
                Vec::new()
            }
        };
        // A stream cut short by a stopping raft: the rest have no answer.
        out.resize(n, Err(EtcdError::Stopped));
        out
    }

    /// Resolves once this member knows of a leader other than `old`.
    ///
    /// Waits on openraft's *server* metrics, which change only with the vote, role, leader or
    /// membership. The full metrics are sent after every turn of the raft core, so each write
    /// waiting on them was woken thousands of times a second under load (finding 17 in
    /// docs/performance.md).
    async fn leader_changed_from(&self, old: MemberId) {
        let mut rx = self.raft.server_metrics();
        loop {
            let now = rx.borrow_watched().current_leader;
            if now.is_some() && now != Some(old) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// A write submitted on this member as leader. `NotLeader` means it was not appended.
    pub async fn propose_local(&self, req: Request) -> Result<Vec<u8>, EtcdError> {
        match self.raft.client_write(req).await {
            Ok(resp) => resp.data.0,
            Err(RaftError::APIError(e)) => Err(write_error(e)),
            Err(RaftError::Fatal(e)) => Err(stopped(e)),
        }
    }

    /// A membership change, on the leader (forwarded there from a follower). Returns the member
    /// it concerns.
    pub async fn admin(&self, req: AdminRequest) -> Result<MemberInfo, EtcdError> {
        let deadline = Instant::now() + Duration::from_millis(limits::REQUEST_TIMEOUT_MS);
        loop {
            if Instant::now() >= deadline {
                return Err(EtcdError::Timeout);
            }
            match self.leader() {
                Some(l) if l == self.id => match self.admin_local(req.clone()).await {
                    Err(EtcdError::NotLeader) => {}
                    other => return other,
                },
                Some(l) => {
                    let mut client = self.peer(l)?;
                    match network::call::<_, Result<MemberInfo, EtcdError>>(&mut client, RpcKind::Admin, &req, FORWARD_TIMEOUT).await {
                        Ok(Ok(Err(EtcdError::NotLeader))) => {}
                        Ok(Ok(result)) => return result,
                        Ok(Err(remote)) => return Err(EtcdError::Internal(remote)),
                        Err(status) if never_sent(&status) => {}
                        Err(_) => return Err(EtcdError::TimeoutDueToLeaderFail),
                    }
                }
                None => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    pub async fn admin_local(&self, req: AdminRequest) -> Result<MemberInfo, EtcdError> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.id) {
            return Err(EtcdError::NotLeader);
        }
        let membership = metrics.membership_config.membership().clone();
        let learners: BTreeSet<MemberId> = membership.learner_ids().collect();
        let node = |id: MemberId| membership.get_node(&id).cloned();
        let changed = match req {
            AdminRequest::AddMember { peer_urls, is_learner } => {
                if peer_urls.is_empty() || peer_urls.iter().any(|u| config::url_to_addr(u).is_err()) {
                    return Err(EtcdError::MemberBadUrls);
                }
                let id = config::member_id(&peer_urls, &self.cfg.initial_cluster_token);
                if node(id).is_some() {
                    return Err(EtcdError::MemberExist);
                }
                if membership.nodes().any(|(_, n)| n.peer_urls.iter().any(|u| peer_urls.contains(u))) {
                    return Err(EtcdError::PeerUrlExist);
                }
                let new = PeerNode { name: String::new(), peer_urls: peer_urls.clone() };
                let r = if is_learner {
                    self.raft.add_learner(id, new, false).await.map(|_| ())
                } else {
                    self.raft.change_membership(ChangeMembers::AddVoters(BTreeMap::from([(id, new)])), false).await.map(|_| ())
                };
                r.map_err(membership_error)?;
                MemberInfo { id, peer_urls, is_learner }
            }
            AdminRequest::RemoveMember { id } => {
                let n = node(id).ok_or(EtcdError::MemberNotFound)?;
                let change = if learners.contains(&id) {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                };
                self.raft.change_membership(change, false).await.map_err(membership_error)?;
                MemberInfo { id, peer_urls: n.peer_urls, is_learner: learners.contains(&id) }
            }
            AdminRequest::PromoteMember { id } => {
                let n = node(id).ok_or(EtcdError::MemberNotFound)?;
                if !learners.contains(&id) {
                    return Err(EtcdError::MemberNotLearner);
                }
                // etcd's rule: a learner is ready once it has 90% of the leader's log.
                let last = metrics.last_log_index.unwrap_or(0);
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|l| l.index)
                    .unwrap_or(0);
                if (matched as f64) < 0.9 * last as f64 {
                    return Err(EtcdError::LearnerNotReady);
                }
                self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await.map_err(membership_error)?;
                MemberInfo { id, peer_urls: n.peer_urls, is_learner: false }
            }
            AdminRequest::UpdateMember { id, peer_urls } => {
                let n = node(id).ok_or(EtcdError::MemberNotFound)?;
                if peer_urls.is_empty() || peer_urls.iter().any(|u| config::url_to_addr(u).is_err()) {
                    return Err(EtcdError::MemberBadUrls);
                }
                let updated = PeerNode { name: n.name, peer_urls: peer_urls.clone() };
                self.raft.change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, updated)])), false).await.map_err(membership_error)?;
                self.peers.lock().unwrap().remove(&id);
                self.forwarders.lock().unwrap().remove(&id);
                MemberInfo { id, peer_urls, is_learner: learners.contains(&id) }
            }
        };
        Ok(changed)
    }

    /// The leader's read index: the log index a linearizable read must wait for, once this
    /// member has applied that far. Each call asks openraft on its own: sharing one confirmation
    /// between concurrent leader reads (as followers share ReadIndex round trips) was measured
    /// slower, 24–29k against 30–31k op/s for range-64 on a dev cluster (docs/performance.md,
    /// finding 12): a lease-based confirmation is already cheap, and a shared round adds a task
    /// hand-off and makes later arrivals wait for the round in flight.
    pub async fn local_read_index(&self) -> Result<u64, EtcdError> {
        let option = LinearizerOption::new(Some(self.max_quorum_ack_age()), true);
        match self.raft.ensure_linearizable(option).await {
            Ok(read_log_id) => Ok(read_log_id.log_id().index),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => Err(EtcdError::NotLeader),
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_))) => Err(EtcdError::Timeout),
            Err(RaftError::Fatal(_)) => Err(EtcdError::Stopped),
        }
    }

    /// How old the leader's last quorum acknowledgement may be for a read to rely on it. One
    /// younger than half the leader lease proves leadership as well as a fresh ReadIndex round
    /// would: no other member can be elected before the lease (and then an election timeout) has
    /// passed since it last heard from us. Half leaves room for clock-rate differences.
    /// Heartbeats (every heartbeat interval) keep the acknowledgement fresh, so most reads need
    /// no extra round trip; with a stale one openraft sends a heartbeat at once.
    fn max_quorum_ack_age(&self) -> Duration {
        Duration::from_millis(self.cfg.election_timeout_ms * 3 / 5) / 2
    }

    /// Returns once a read of local state is linearizable.
    pub async fn read_barrier(&self) -> Result<(), EtcdError> {
        let deadline = Instant::now() + Duration::from_millis(limits::REQUEST_TIMEOUT_MS);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EtcdError::Timeout);
            }
            let index = match self.leader() {
                Some(l) if l == self.id => match self.local_read_index().await {
                    Err(EtcdError::NotLeader) => None,
                    Err(e) => return Err(e),
                    // ensure_linearizable already waited for our own apply.
                    Ok(_) => return Ok(()),
                },
                // Concurrent reads on a follower share one ReadIndex round trip to the leader.
                Some(_) => self.batched_read_index().await,
                None => None,
            };
            match index {
                // Applied here already, the common case on a follower: skip openraft's wait,
                // which clones its whole metrics to check.
                Some(index) if self.sm.applied_index() >= index => return Ok(()),
                Some(index) => {
                    // openraft's apply progress, not `raft.wait()`: that watches the full metrics,
                    // which are sent after every turn of the raft core (finding 17).
                    let left = deadline.saturating_duration_since(Instant::now());
                    let mut applied = self.raft.watch_apply_progress();
                    let reached = applied.wait_until(move |a| a.as_ref().is_some_and(|l| l.index >= index));
                    return match tokio::time::timeout(left, reached).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(_)) => Err(EtcdError::Stopped),
                        Err(_) => Err(EtcdError::Timeout),
                    };
                }
                None => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
    }

    /// A read index from the leader for a read that arrived now. Concurrent reads share one
    /// round trip (see `coalesce`): the index was obtained after each of them arrived, which is
    /// all linearizability asks. `None`: ask again (no leader, leader changed, transport).
    async fn batched_read_index(&self) -> Option<u64> {
        let me = self.me.upgrade()?;
        let spawn = move || {
            drop(tokio::spawn(async move {
                while let Some(round) = me.follower_reads.next_round() {
                    round.answer(me.remote_read_index().await);
                }
            }))
        };
        self.follower_reads.join(spawn).await.flatten()
    }

    async fn remote_read_index(&self) -> Option<u64> {
        let l = self.leader().filter(|l| *l != self.id)?;
        let mut client = self.peer(l).ok()?;
        let call = network::call::<_, Result<u64, EtcdError>>(&mut client, RpcKind::ReadIndex, &(), READ_INDEX_TIMEOUT);
        tokio::select! {
            r = call => match r {
                Ok(Ok(Ok(index))) => Some(index),
                _ => None,
            },
            _ = self.leader_changed_from(l) => None,
        }
    }

    /// Announces this member's client URLs through the log until they are applied, as etcd's
    /// `publish` does. Runs in the background after start.
    pub async fn publish_attributes(self: Arc<Self>) {
        let want = rampart_raft::state_machine::MemberAttrs {
            name: self.cfg.name.clone(),
            client_urls: self.cfg.advertise_client_urls.clone(),
        };
        loop {
            if self.sm.cluster_meta().members.get(&self.id) == Some(&want) {
                return;
            }
            let req = Request::PublishMember { id: self.id, name: want.name.clone(), client_urls: want.client_urls.clone() };
            match self.propose(req).await {
                Ok(_) => tracing::info!(member = format!("{:x}", self.id), "published member attributes"),
                Err(e) => {
                    tracing::debug!(%e, "publish attributes: will retry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.server_metrics().borrow_watched().state == ServerState::Leader
    }

    /// Asks what only the leader can answer (lease renewals and lookups): runs `local` when this
    /// member leads, otherwise sends `req` to the leader as a `kind` peer call, whose handler
    /// replies `Result<Resp, EtcdError>`. Only for calls that are safe to repeat: retried while
    /// there is no leader, on "not leader" and on any transport failure, until the request
    /// timeout.
    pub async fn ask_leader<Req, Resp, F, Fut>(&self, kind: RpcKind, req: &Req, local: F) -> Result<Resp, EtcdError>
    where
        Req: Serialize,
        Resp: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Resp, EtcdError>>,
    {
        let deadline = Instant::now() + Duration::from_millis(limits::REQUEST_TIMEOUT_MS);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EtcdError::Timeout);
            }
            match self.leader() {
                Some(l) if l == self.id => match local().await {
                    Err(EtcdError::NotLeader) => {}
                    other => return other,
                },
                Some(l) => {
                    let mut client = self.peer(l)?;
                    let call = network::call::<_, Result<Resp, EtcdError>>(&mut client, kind, req, left.min(FORWARD_TIMEOUT));
                    let result = tokio::select! {
                        r = call => r,
                        _ = self.leader_changed_from(l) => continue,
                    };
                    match result {
                        Ok(Ok(Err(EtcdError::NotLeader))) => {}
                        Ok(Ok(result)) => return result,
                        Ok(Err(remote)) => return Err(EtcdError::Internal(remote)),
                        Err(status) => tracing::debug!(leader = format!("{l:x}"), %status, ?kind, "leader call failed; retrying"),
                    }
                }
                None => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

fn membership_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> EtcdError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => EtcdError::NotLeader,
        RaftError::APIError(e) => EtcdError::Internal(format!("etcdserver: membership change failed: {e}")),
        RaftError::Fatal(_) => EtcdError::Stopped,
    }
}

/// A write raft refused: `NotLeader` means it was not appended (safe to retry elsewhere).
fn write_error(e: ClientWriteError<TypeConfig>) -> EtcdError {
    match e {
        ClientWriteError::ForwardToLeader(_) => EtcdError::NotLeader,
        e => {
            tracing::warn!(%e, "write failed");
            EtcdError::LeaderChanged
        }
    }
}

fn stopped(e: impl std::fmt::Display) -> EtcdError {
    tracing::error!(%e, "raft stopped");
    EtcdError::Stopped
}

/// True when a peer call failed before the request could have reached the peer.
fn never_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let text = format!("{status:?}").to_lowercase();
    text.contains("tcp connect error") || text.contains("connection refused") || text.contains("(connect)")
}

/// Asks the given peers for the cluster id, for a member joining a running cluster.
async fn ask_cluster_id(peer_urls: &[String]) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for url in peer_urls {
            if let Ok(mut c) = network::peer_client(url, None) {
                if let Ok(Ok(id)) = network::call::<_, u64>(&mut c, RpcKind::ClusterId, &(), Duration::from_secs(1)).await {
                    return Ok(id);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("--initial-cluster-state existing: no member of {peer_urls:?} answered; is the cluster running and was this member added with `member add`?"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn read_identity(path: &Path) -> Result<Option<Identity>, String> {
    match meta::read(path).map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(bytes) => rampart_raft::codec::decode_versioned(IDENTITY_FORMAT_V1, &bytes, "identity file")
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

pub type Metrics = openraft::RaftMetrics<TypeConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_cannot_be_reached_is_known_not_to_have_the_write() {
        // A port nobody listens on: taken, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut client = network::peer_client(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let reqs: Vec<Request> = vec![Request::Kv(vec![1, 2, 3])];
        let status = network::call::<_, Vec<Result<Vec<u8>, EtcdError>>>(&mut client, RpcKind::ProposeBatch, &reqs, Duration::from_secs(2))
            .await
            .expect_err("nothing listens there");
        assert!(never_sent(&status), "{status:?}");
        // An answer that never comes is not such a case: the write may have been applied.
        assert!(!never_sent(&tonic::Status::unavailable("connection reset by peer")));
        assert!(!never_sent(&tonic::Status::deadline_exceeded("timeout expired")));
    }

    /// A forwarder to 127.0.0.1:`port`, on the propose pipe.
    fn forwarder(port: u16) -> Forwarder {
        let client = network::peer_client(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let pipe = crate::forward::PipeTarget { host: "127.0.0.1".into(), port, local_ip: None };
        Forwarder::new(client, Some(pipe), Duration::from_secs(2))
    }

    #[tokio::test]
    async fn forwarded_writes_on_the_propose_pipe_are_retried_only_when_not_sent() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Nobody listens: never sent.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let status = forwarder(port).send(Request::Kv(vec![1])).await.expect_err("nothing listens there");
        assert!(never_sent(&status), "{status:?}");

        // A listener that takes the connection and never completes the handshake: never sent.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let (_stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let status = forwarder(port).send(Request::Kv(vec![1])).await.expect_err("no handshake");
        assert!(never_sent(&status), "{status:?}");
        silent.abort();

        // A leader that takes the batch and dies before answering: the outcome is unknown.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dies = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 8];
            stream.read_exact(&mut preface).await.unwrap();
            assert_eq!(preface, rampart_raft::pipe::PROPOSE_PREFACE);
            stream.write_all(&preface).await.unwrap();
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).await.unwrap();
            let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
            stream.read_exact(&mut frame).await.unwrap();
        });
        let status = forwarder(port).send(Request::Kv(vec![1])).await.expect_err("no answer");
        assert!(!never_sent(&status), "{status:?}");
        dies.await.unwrap();
    }
}
