//! `RaftStateMachine` over the MVCC store.
//!
//! Each batch of committed entries is applied in one MVCC write transaction that also stores
//! [`SmMeta`] (last applied log id, membership, published member attributes), so the data and
//! the applied index can never disagree after a crash. Batches are committed without fsync: the
//! raft log is the durable record, and the entries after the last durable MVCC commit are replayed
//! from it on restart.
//!
//! The MVCC store is itself the raft snapshot. Building one only makes the applied state durable
//! (one fsync), because the log is purged behind a snapshot; the data is serialized only when a
//! lagging follower needs it, from a read view taken at that moment ([`SnapshotData::View`]).
//! Before, every snapshot serialized the whole store to a file: with a large store that cost
//! the disk and CPU every `--snapshot-count` entries and starved the raft timers.
//!
//! Every applied change is published, in revision order, on the [`ChangeFeed`]: the watch hub,
//! the backup archiver and a standby cluster consume the same stream.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use prost::Message;
use rampart_core::{limits, EtcdError, MemberId, Revision};
use rampart_proto::mvccpb::Event;
use rampart_proto::etcdserverpb::{request_op, AlarmMember, AlarmResponse, AlarmType, TxnRequest};
use rampart_proto::rampartpb::{self, command, forward_reply, Command};
use rampart_storage::mvcc::{Mvcc, SnapshotView, WriteResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::auth::AuthStore;
use crate::codec::{self, META_FORMAT_V1};
use crate::{LogId, Membership, Reply, Request, TypeConfig};

type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Where earlier versions kept a serialized copy of the last snapshot; removed on open.
const OLD_SNAPSHOT_FILE: &str = "current.snap";

/// The data of a raft snapshot.
#[derive(Debug)]
pub enum SnapshotData {
    /// This member's own store, frozen at the snapshot's log id; serialized when sent.
    View(SnapshotView),
    /// A serialized store (`Mvcc::write_snapshot` format) received from the leader.
    Bytes(Vec<u8>),
}

impl SnapshotData {
    /// The snapshot in its wire and file format (versioned, checksummed). Serializing a view
    /// reads the whole store: call it off the async runtime.
    pub fn into_bytes(self) -> io::Result<Vec<u8>> {
        match self {
            SnapshotData::View(view) => {
                let mut data = Vec::new();
                view.write(&mut data).map_err(io_err)?;
                Ok(data)
            }
            SnapshotData::Bytes(data) => Ok(data),
        }
    }
}
/// Changes buffered for slow consumers of the feed before they see a `Lagged` error and must
/// catch up from the MVCC history instead.
pub const CHANGE_FEED_CAPACITY: usize = 4096;
/// The MVCC store commits durably at least this often while entries are applied, so a member
/// restarted after a crash replays at most about this much of its log before it serves (without
/// it, everything since the last snapshot: up to `--snapshot-count` entries, seconds of replay in
/// a debug build, during which the member answers nothing). etcd's backend commits every 100 ms.
pub const MVCC_DURABLE_INTERVAL: Duration = Duration::from_secs(1);

/// Attributes a member publishes about itself through the log (etcd's `publish`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAttrs {
    pub name: String,
    pub client_urls: Vec<String>,
}

/// What the state machine stores next to the data, atomically with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmMeta {
    pub last_applied: Option<LogId>,
    pub membership: Membership,
    pub members: BTreeMap<MemberId, MemberAttrs>,
    /// Active alarms as (member, `etcdserverpb::AlarmType` number), etcd's alarm store. Added in
    /// [`SM_META_FORMAT_V2`].
    pub alarms: BTreeSet<(MemberId, i32)>,
    /// Users, roles and permissions. Added in [`SM_META_FORMAT_V3`].
    pub auth: AuthStore,
}

impl SmMeta {
    /// True if any member has raised an alarm of this kind.
    pub fn has_alarm(&self, kind: AlarmType) -> bool {
        self.alarms.iter().any(|(_, a)| *a == kind as i32)
    }
}

/// Format of the stored [`SmMeta`]: version 1 had no `alarms`; version 2 appends them; version 3
/// appends `auth`. postcard is positional, so a new field means a new version; older versions are
/// still read.
pub const SM_META_FORMAT_V2: u8 = 2;
pub const SM_META_FORMAT_V3: u8 = 3;

/// [`SmMeta`] as format version 2 stored it.
#[derive(Deserialize)]
struct SmMetaV2 {
    last_applied: Option<LogId>,
    membership: Membership,
    members: BTreeMap<MemberId, MemberAttrs>,
    alarms: BTreeSet<(MemberId, i32)>,
}

/// [`SmMeta`] as format version 1 stored it.
#[derive(Deserialize)]
struct SmMetaV1 {
    last_applied: Option<LogId>,
    membership: Membership,
    members: BTreeMap<MemberId, MemberAttrs>,
}

pub fn encode_sm_meta(meta: &SmMeta) -> Vec<u8> {
    codec::encode_versioned(SM_META_FORMAT_V3, meta)
}

pub fn decode_sm_meta(bytes: &[u8]) -> io::Result<SmMeta> {
    const WHAT: &str = "state machine meta";
    if bytes.first() == Some(&META_FORMAT_V1) {
        let v1: SmMetaV1 = codec::decode_versioned(META_FORMAT_V1, bytes, WHAT)?;
        return Ok(SmMeta {
            last_applied: v1.last_applied,
            membership: v1.membership,
            members: v1.members,
            alarms: BTreeSet::new(),
            auth: AuthStore::default(),
        });
    }
    if bytes.first() == Some(&SM_META_FORMAT_V2) {
        let v2: SmMetaV2 = codec::decode_versioned(SM_META_FORMAT_V2, bytes, WHAT)?;
        return Ok(SmMeta {
            last_applied: v2.last_applied,
            membership: v2.membership,
            members: v2.members,
            alarms: v2.alarms,
            auth: AuthStore::default(),
        });
    }
    codec::decode_versioned(SM_META_FORMAT_V3, bytes, WHAT)
}

/// Applies an alarm change (etcd's `applierV3backend.Alarm`); returns the encoded
/// `AlarmResponse`: the alarm changed, or none if there was nothing to change.
fn apply_alarm(meta: &mut SmMeta, activate: bool, member_id: MemberId, alarm: i32) -> Vec<u8> {
    let entry = (member_id, alarm);
    let changed = if activate { meta.alarms.insert(entry) } else { meta.alarms.remove(&entry) };
    if changed {
        tracing::warn!(member = format!("{member_id:x}"), alarm, activate, "alarm changed");
    }
    // etcd answers an ACTIVATE of an alarm already raised with that alarm too.
    let alarms = if changed || activate { vec![AlarmMember { member_id, alarm }] } else { vec![] };
    AlarmResponse { header: None, alarms }.encode_to_vec()
}

/// The error a KV write gets while alarms are raised (etcd's capped and corrupt appliers): with
/// CORRUPT nothing is written; with NOSPACE whatever could grow the store (a put, a txn with a put
/// in either branch, a lease grant) is refused, while deletes, compactions and lease revokes still
/// run to free space.
fn refused_by_alarm(meta: &SmMeta, cmd: &Command) -> Option<EtcdError> {
    if meta.alarms.is_empty() {
        return None;
    }
    if meta.has_alarm(AlarmType::Corrupt) {
        return Some(EtcdError::Corrupt);
    }
    fn txn_puts(t: &TxnRequest) -> bool {
        use request_op::Request as R;
        t.success.iter().chain(&t.failure).any(|op| match &op.request {
            Some(R::RequestPut(_)) => true,
            Some(R::RequestTxn(t)) => txn_puts(t),
            _ => false,
        })
    }
    let grows = match &cmd.request {
        Some(command::Request::Put(_)) => true,
        Some(command::Request::Txn(t)) => txn_puts(t),
        Some(command::Request::LeaseGrant(_)) => true,
        _ => false,
    };
    (grows && meta.has_alarm(AlarmType::Nospace)).then_some(EtcdError::NoSpace)
}

/// One applied write: the revision it produced and the events it caused.
#[derive(Debug, Clone)]
pub struct Change {
    pub revision: Revision,
    pub events: Vec<Event>,
}

pub type ChangeFeed = broadcast::Sender<Arc<Change>>;

/// The parts of [`SmMeta`] the server's request path reads (membership, member attributes,
/// alarms), as of the last applied batch that changed them. Published after each batch, so a
/// reader never waits for an apply batch: a batch holds `meta` for its whole MVCC commit, a
/// durable one took hundreds of milliseconds under 8 KiB writes, and a reader blocked on it held
/// a runtime worker all that time (bug 14 in docs/robustness.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterMeta {
    pub membership: Membership,
    pub members: BTreeMap<MemberId, MemberAttrs>,
    pub alarms: BTreeSet<(MemberId, i32)>,
}

impl ClusterMeta {
    fn of(meta: &SmMeta) -> ClusterMeta {
        ClusterMeta { membership: meta.membership.clone(), members: meta.members.clone(), alarms: meta.alarms.clone() }
    }

    fn differs_from(&self, meta: &SmMeta) -> bool {
        self.membership != meta.membership || self.members != meta.members || self.alarms != meta.alarms
    }
}

/// State shared between the state machine (driven by openraft) and the server's read path.
pub struct Shared {
    pub mvcc: Mvcc,
    meta: Mutex<SmMeta>,
    /// The auth store as of the last applied entry, for the request path: checking a request
    /// must neither wait for an apply batch (which holds `meta`) nor clone the users and roles.
    auth: std::sync::RwLock<Arc<AuthStore>>,
    /// See [`ClusterMeta`].
    cluster: std::sync::RwLock<Arc<ClusterMeta>>,
    /// When the MVCC store last committed durably (see [`MVCC_DURABLE_INTERVAL`]).
    durable_at: Mutex<Instant>,
    /// The index of `meta.last_applied`, readable without waiting for an apply batch (which
    /// holds `meta`). Stored after the batch's MVCC commit: a read that finds it at or above an
    /// index sees every entry up to that index. (It is not a read index for others: entries
    /// committed but not yet applied here may already be visible on another member.)
    applied_index: AtomicU64,
    pub feed: ChangeFeed,
}

impl Shared {
    /// Membership, member attributes and alarms as of the last applied entry, without waiting
    /// for an apply batch in progress.
    pub fn cluster_meta(&self) -> Arc<ClusterMeta> {
        self.cluster.read().unwrap().clone()
    }

    /// The index of the last applied entry (0 before the first).
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::Acquire)
    }

    /// Publishes what readers see of `meta`; the cluster view first, so a reader that finds
    /// the applied index at or above an entry also sees that entry's membership and alarms.
    fn set_applied(&self, meta: &SmMeta) {
        if self.cluster.read().unwrap().differs_from(meta) {
            *self.cluster.write().unwrap() = Arc::new(ClusterMeta::of(meta));
        }
        self.applied_index.store(meta.last_applied.as_ref().map_or(0, |l| l.index), Ordering::Release);
    }

    /// The auth store as of the last applied entry.
    pub fn auth(&self) -> Arc<AuthStore> {
        self.auth.read().unwrap().clone()
    }

    fn publish_auth(&self, auth: &AuthStore) {
        let mut current = self.auth.write().unwrap();
        if **current != *auth {
            *current = Arc::new(auth.clone());
        }
    }
}

#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Runs a long storage call (an fsync of the MVCC store, a snapshot install) so that it does not
/// hold up the other tasks of this runtime worker: on the multi-threaded runtime the worker hands
/// its queue to another thread first (`block_in_place`). The member runs one worker per core,
/// and raft's heartbeats and election timers must not wait behind a durable commit.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl StateMachine {
    pub fn open(mvcc_path: &Path, snapshot_dir: &Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(snapshot_dir)?;
        match std::fs::remove_file(snapshot_dir.join(OLD_SNAPSHOT_FILE)) {
            Ok(()) => tracing::info!("removed the serialized snapshot copy earlier versions kept; the store is the snapshot now"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mvcc = Mvcc::open(mvcc_path).map_err(io_err)?;
        let sm_meta = match mvcc.raft_meta().map_err(io_err)? {
            Some(bytes) => decode_sm_meta(&bytes)?,
            None => SmMeta::default(),
        };
        let (feed, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let auth = std::sync::RwLock::new(Arc::new(sm_meta.auth.clone()));
        let cluster = std::sync::RwLock::new(Arc::new(ClusterMeta::of(&sm_meta)));
        Ok(StateMachine {
            shared: Arc::new(Shared {
                mvcc,
                auth,
                cluster,
                durable_at: Mutex::new(Instant::now()),
                applied_index: AtomicU64::new(sm_meta.last_applied.as_ref().map_or(0, |l| l.index)),
                meta: Mutex::new(sm_meta),
                feed,
            }),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Makes everything applied so far durable and returns its log id and membership with a
    /// read view of exactly that state. Applies wait meanwhile (one durable commit), so the view
    /// and the meta match.
    fn durable_snapshot(&self) -> io::Result<Snapshot> {
        let meta = self.shared.meta.lock().unwrap();
        let meta_bytes = encode_sm_meta(&meta);
        // The log may be purged behind this snapshot: the state must survive a crash first.
        blocking(|| self.shared.mvcc.apply(&[], &meta_bytes, true)).map_err(io_err)?;
        *self.shared.durable_at.lock().unwrap() = Instant::now();
        let view = self.shared.mvcc.snapshot_view().map_err(io_err)?;
        let snap_meta = SnapshotMeta { last_log_id: meta.last_applied, last_membership: meta.membership.clone() };
        Ok(Snapshot { meta: snap_meta, snapshot: SnapshotData::View(view) })
    }
}

/// Encodes an MVCC write response the way it travels back to a forwarding follower.
pub fn encode_reply(resp: WriteResponse) -> Vec<u8> {
    let response = match resp {
        WriteResponse::Put(r) => forward_reply::Response::Put(r),
        WriteResponse::DeleteRange(r) => forward_reply::Response::DeleteRange(r),
        WriteResponse::Txn(r) => forward_reply::Response::Txn(r),
        WriteResponse::Compaction(r) => forward_reply::Response::Compaction(r),
        WriteResponse::LeaseGrant(r) => forward_reply::Response::LeaseGrant(r),
        WriteResponse::LeaseRevoke(r) => forward_reply::Response::LeaseRevoke(r),
    };
    rampartpb::ForwardReply { response: Some(response) }.encode_to_vec()
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), io::Error> {
        let m = self.shared.meta.lock().unwrap();
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend {
        let items: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        if items.is_empty() {
            return Ok(());
        }

        // Decode first, so one MVCC transaction covers the whole batch.
        let mut meta = self.shared.meta.lock().unwrap();
        let mut next_meta = meta.clone();
        let mut commands: Vec<Option<Command>> = Vec::with_capacity(items.len());
        // Per entry: Some(Ok(index into MVCC results)) for KV writes, or a reply decided here.
        let mut plan: Vec<Result<usize, Reply>> = Vec::with_capacity(items.len());
        let command_bytes: usize = items
            .iter()
            .map(|(entry, _)| match &entry.payload {
                EntryPayload::Normal(Request::Kv(bytes)) => bytes.len(),
                _ => 0,
            })
            .sum();
        for (entry, _) in &items {
            next_meta.last_applied = Some(entry.log_id);
            match &entry.payload {
                EntryPayload::Blank => plan.push(Err(Reply(Ok(Vec::new())))),
                EntryPayload::Membership(m) => {
                    next_meta.membership = Membership::new(Some(entry.log_id), m.clone());
                    plan.push(Err(Reply(Ok(Vec::new()))));
                }
                EntryPayload::Normal(Request::PublishMember { id, name, client_urls }) => {
                    next_meta
                        .members
                        .insert(*id, MemberAttrs { name: name.clone(), client_urls: client_urls.clone() });
                    plan.push(Err(Reply(Ok(Vec::new()))));
                }
                EntryPayload::Normal(Request::Alarm { activate, member_id, alarm }) => {
                    plan.push(Err(Reply(Ok(apply_alarm(&mut next_meta, *activate, *member_id, *alarm)))));
                }
                EntryPayload::Normal(Request::Auth(op)) => {
                    let result = next_meta.auth.apply(op);
                    if result.is_ok() {
                        tracing::info!(op = op.name(), revision = next_meta.auth.revision, "auth store changed");
                    }
                    plan.push(Err(Reply(result.map(|()| Vec::new()))));
                }
                EntryPayload::Normal(Request::Kv(bytes)) => match Command::decode(bytes.as_slice()) {
                    // Alarms raised earlier in this batch count: every member decides alike.
                    Ok(cmd) => match refused_by_alarm(&next_meta, &cmd) {
                        Some(e) => plan.push(Err(Reply(Err(e)))),
                        None => {
                            plan.push(Ok(commands.len()));
                            commands.push(Some(cmd));
                        }
                    },
                    // Clients cannot reach this: the server validated and encoded the command.
                    // A bad record is answered as an error on every member alike, so replicas
                    // stay identical.
                    Err(e) => plan.push(Err(Reply(Err(EtcdError::internal(format!("undecodable command: {e}")))))),
                },
            }
        }

        let batch: Vec<Option<&Command>> = commands.iter().map(|c| c.as_ref()).collect();
        let meta_bytes = encode_sm_meta(&next_meta);
        let durable = {
            let mut at = self.shared.durable_at.lock().unwrap();
            let due = at.elapsed() >= MVCC_DURABLE_INTERVAL;
            if due {
                *at = Instant::now();
            }
            due
        };
        let apply = || self.shared.mvcc.apply(&batch, &meta_bytes, durable);
        // A big batch (8 KiB values from many clients) takes long to write even without fsync.
        let long = durable || command_bytes >= limits::APPLY_INLINE_MAX_BYTES;
        let results = if long { blocking(apply) } else { apply() }.map_err(io_err)?;
        if next_meta.auth.revision != meta.auth.revision {
            self.shared.publish_auth(&next_meta.auth);
        }
        *meta = next_meta;
        self.shared.set_applied(&meta);
        drop(meta);

        let mut results: Vec<Option<Result<rampart_storage::mvcc::Applied, EtcdError>>> =
            results.into_iter().map(Some).collect();
        for ((_, responder), step) in items.into_iter().zip(plan) {
            let reply = match step {
                Err(reply) => reply,
                Ok(i) => match results[i].take().expect("one MVCC result per command") {
                    Ok(applied) => {
                        if !applied.events.is_empty() {
                            // No receiver is fine: nobody is watching.
                            let _ = self
                                .shared
                                .feed
                                .send(Arc::new(Change { revision: applied.revision, events: applied.events }));
                        }
                        // Only the member that proposed the entry has a client waiting for it.
                        if responder.is_none() {
                            continue;
                        }
                        Reply(Ok(encode_reply(applied.response)))
                    }
                    Err(e) => Reply(Err(e)),
                },
            };
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, snap_meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let data = snapshot.into_bytes()?;
        let mut meta = self.shared.meta.lock().unwrap();
        // restore_snapshot verifies the checksum before it replaces anything.
        blocking(|| self.shared.mvcc.restore_snapshot(&mut data.as_slice())).map_err(io_err)?;
        let restored: SmMeta = match self.shared.mvcc.raft_meta().map_err(io_err)? {
            Some(bytes) => decode_sm_meta(&bytes)?,
            None => SmMeta::default(),
        };
        if restored.last_applied != snap_meta.last_log_id {
            return Err(io::Error::other(format!(
                "snapshot data is at {:?} but its meta says {:?}",
                restored.last_applied, snap_meta.last_log_id
            )));
        }
        self.shared.publish_auth(&restored.auth);
        tracing::info!(last_log_id = ?restored.last_applied, bytes = data.len(), "installed a snapshot from the leader");
        *meta = restored;
        self.shared.set_applied(&meta);
        Ok(())
    }

    /// The store as it is now (made durable first), as a lazily serialized snapshot. openraft
    /// asks on start, only for the meta, and when a follower needs entries that were purged.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        if self.shared.meta.lock().unwrap().last_applied.is_none() {
            return Ok(None);
        }
        self.durable_snapshot().map(Some)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    /// One durable commit: openraft keeps only the meta, and purges the log behind it.
    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        self.durable_snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_proto::etcdserverpb::{request_op::Request as R, DeleteRangeRequest, PutRequest, RequestOp};

    #[test]
    fn sm_meta_version_1_is_still_read() {
        #[derive(Serialize)]
        struct V1 {
            last_applied: Option<LogId>,
            membership: Membership,
            members: BTreeMap<MemberId, MemberAttrs>,
        }
        let members = BTreeMap::from([(7, MemberAttrs { name: "m7".into(), client_urls: vec!["http://a:1".into()] })]);
        let last_applied = Some(openraft::testing::log_id::<TypeConfig>(2, 1, 9));
        let old = codec::encode_versioned(META_FORMAT_V1, &V1 { last_applied, membership: Membership::default(), members: members.clone() });
        let meta = decode_sm_meta(&old).unwrap();
        assert_eq!(meta, SmMeta { last_applied, membership: Membership::default(), members, alarms: BTreeSet::new(), auth: AuthStore::default() });

        let mut with_alarm = meta.clone();
        with_alarm.alarms.insert((7, AlarmType::Nospace as i32));
        assert_eq!(decode_sm_meta(&encode_sm_meta(&with_alarm)).unwrap(), with_alarm);
        // Version 2 (alarms, no auth) is read too.
        #[derive(Serialize)]
        struct V2<'a>(&'a Option<LogId>, &'a Membership, &'a BTreeMap<MemberId, MemberAttrs>, &'a BTreeSet<(MemberId, i32)>);
        let v2 = codec::encode_versioned(SM_META_FORMAT_V2, &V2(&with_alarm.last_applied, &with_alarm.membership, &with_alarm.members, &with_alarm.alarms));
        assert_eq!(decode_sm_meta(&v2).unwrap(), with_alarm);
        let mut with_auth = with_alarm.clone();
        with_auth.auth.apply(&crate::auth::AuthOp::RoleAdd { name: "r".into() }).unwrap();
        assert_eq!(decode_sm_meta(&encode_sm_meta(&with_auth)).unwrap(), with_auth);
        let err = decode_sm_meta(&[9, 0]).unwrap_err().to_string();
        assert!(err.contains("unknown format version 9"), "{err}");
    }

    #[test]
    fn nospace_refuses_only_writes_that_grow_the_store() {
        let put = || PutRequest { key: b"k".to_vec(), ..Default::default() };
        let del = || DeleteRangeRequest { key: b"k".to_vec(), ..Default::default() };
        let cmd = |r: command::Request| Command { request: Some(r) };
        let txn = |ops: Vec<R>| TxnRequest { failure: ops.into_iter().map(|r| RequestOp { request: Some(r) }).collect(), ..Default::default() };
        let mut meta = SmMeta::default();
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::Put(put()))), None);

        let r = AlarmResponse::decode(apply_alarm(&mut meta, true, 5, AlarmType::Nospace as i32).as_slice()).unwrap();
        assert_eq!(r.alarms, vec![AlarmMember { member_id: 5, alarm: AlarmType::Nospace as i32 }]);
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::Put(put()))), Some(EtcdError::NoSpace));
        let nested = txn(vec![R::RequestTxn(txn(vec![R::RequestPut(put())]))]);
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::Txn(nested))), Some(EtcdError::NoSpace));
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::DeleteRange(del()))), None);
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::Txn(txn(vec![R::RequestDeleteRange(del())])))), None);
        let grant = rampart_proto::etcdserverpb::LeaseGrantRequest { id: 1, ttl: 5 };
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::LeaseGrant(grant))), Some(EtcdError::NoSpace));
        let revoke = rampart_proto::etcdserverpb::LeaseRevokeRequest { id: 1 };
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::LeaseRevoke(revoke))), None);

        // Disarming an alarm that is not raised changes nothing and reports nothing.
        let r = AlarmResponse::decode(apply_alarm(&mut meta, false, 6, AlarmType::Nospace as i32).as_slice()).unwrap();
        assert!(r.alarms.is_empty());
        apply_alarm(&mut meta, false, 5, AlarmType::Nospace as i32);
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::Put(put()))), None);
        apply_alarm(&mut meta, true, 5, AlarmType::Corrupt as i32);
        assert_eq!(refused_by_alarm(&meta, &cmd(command::Request::DeleteRange(del()))), Some(EtcdError::Corrupt));
    }

    /// The request path's view of alarms and members is read without waiting for an apply
    /// batch, which holds `meta` for its whole MVCC commit (bug 14), and shows what the last
    /// batch published.
    #[test]
    fn the_cluster_view_is_read_while_a_batch_holds_the_meta() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("kv.redb"), &dir.path().join("snap")).unwrap();
        let shared = sm.shared();
        let mut meta = shared.meta.lock().unwrap();
        apply_alarm(&mut meta, true, 5, AlarmType::Nospace as i32);
        shared.set_applied(&meta);
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let shared = shared.clone();
            std::thread::spawn(move || tx.send(shared.cluster_meta().alarms.clone()).unwrap())
        };
        let alarms = rx.recv_timeout(Duration::from_secs(5)).expect("read while `meta` is held");
        assert_eq!(alarms, BTreeSet::from([(5, AlarmType::Nospace as i32)]));
        drop(meta);
        reader.join().unwrap();
    }
}
