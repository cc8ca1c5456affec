//! etcd's Maintenance service, and the member-level jobs behind it: the space quota and its
//! NOSPACE alarm, leadership transfer (MoveLeader, and on stop), and the client snapshot file
//! with its offline restore into a new cluster.
//!
//! # Client snapshot file
//!
//! `Maintenance.Snapshot` streams, and `etcdctl snapshot save` stores, this layout:
//!
//! ```text
//! mvcc snapshot   the store as Mvcc::write_snapshot writes it (versioned, a crc32c per chunk)
//! zero padding    so that the length so far, trailer included, is a multiple of 512
//! trailer         magic "RAMPSNAP" | u64 LE length of the mvcc snapshot
//! sha256          of everything above
//! ```
//!
//! etcdctl 3.4 accepts a snapshot only if its length is 32 more than a multiple of 512 (a bbolt
//! file plus etcd's sha256), and checks nothing else, so `snapshot save` works. `etcdctl snapshot
//! status` and `restore` open the file as bbolt and fail: `rampart snapshot restore` is the
//! restore, and it checks the sha256, the trailer and every chunk's crc before writing anything.

use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use openraft::type_config::async_runtime::WatchReceiver;
use prost::Message;
use rampart_core::{limits, EtcdError, MemberId};
use rampart_proto::etcdserverpb::maintenance_server::Maintenance;
use rampart_proto::etcdserverpb::*;
use rampart_raft::Request as RaftRequest;
use rampart_storage::mvcc::Mvcc;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use crate::api::{status, unimplemented, ETCD_VERSION};
use crate::config::{self, Config};
use crate::auth;
use rampart_raft::state_machine;
use crate::member::Member;

#[derive(Clone)]
pub struct MaintenanceService {
    pub member: Arc<Member>,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

/// Runs storage work that may take a while off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, EtcdError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| status(EtcdError::internal(e))).and_then(|r| r.map_err(status))
}

/// etcd's text for an alarm (`AlarmMember.String()`), as Status lists it under `errors`.
fn alarm_text(member_id: MemberId, alarm: i32) -> String {
    let name = AlarmType::try_from(alarm).map(|a| a.as_str_name().to_string()).unwrap_or_else(|_| alarm.to_string());
    format!("memberID:{member_id} alarm:{name} ")
}

impl MaintenanceService {
    /// With auth on, everything but Status (and listing alarms) takes the root role, as etcd's
    /// `authMaintenanceServer` requires.
    fn check_admin(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        auth::caller(&self.member, metadata).and_then(|c| c.check_admin()).map_err(status)
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        use alarm_request::AlarmAction;
        let caller = auth::caller(&self.member, request.metadata()).map_err(status)?;
        let r = request.into_inner();
        if r.action != AlarmAction::Get as i32 {
            caller.check_admin().map_err(status)?;
        }
        let m = &self.member;
        let action = AlarmAction::try_from(r.action)
            .map_err(|_| status(EtcdError::InvalidArgument(format!("etcdserver: unknown alarm action {}", r.action))))?;
        let kind = AlarmType::try_from(r.alarm)
            .map_err(|_| status(EtcdError::InvalidArgument(format!("etcdserver: unknown alarm type {}", r.alarm))))?;
        let activate = match action {
            AlarmAction::Get => {
                // etcd reads alarms through the log; a read barrier gives the same guarantee.
                m.read_barrier().await.map_err(status)?;
                let alarms = m
                    .sm
                    .cluster_meta()
                    .alarms
                    .iter()
                    .copied()
                    .filter(|(_, a)| kind == AlarmType::None || *a == kind as i32)
                    .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                    .collect();
                return Ok(Response::new(AlarmResponse { header: Some(m.header(m.sm.mvcc.current_revision())), alarms }));
            }
            AlarmAction::Activate if kind == AlarmType::None => {
                return Err(status(EtcdError::InvalidArgument("etcdserver: cannot activate alarm NONE".into())));
            }
            AlarmAction::Activate => true,
            AlarmAction::Deactivate => false,
        };
        let reply = m.propose(RaftRequest::Alarm { activate, member_id: r.member_id, alarm: r.alarm }).await.map_err(status)?;
        let mut resp = AlarmResponse::decode(reply.as_slice()).map_err(|e| status(EtcdError::internal(e)))?;
        resp.header = Some(m.header(m.sm.mvcc.current_revision()));
        Ok(Response::new(resp))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = &self.member;
        let metrics = m.raft.metrics().borrow_watched().clone();
        let db_size = m.sm.mvcc.db_size_bytes() as i64;
        let is_learner = metrics.membership_config.membership().learner_ids().any(|id| id == m.id);
        let leader = metrics.current_leader.unwrap_or(0);
        // As etcd: "no leader" first, then every active alarm.
        let mut errors = Vec::new();
        if leader == 0 {
            errors.push(EtcdError::NoLeader.to_string());
        }
        errors.extend(m.sm.cluster_meta().alarms.iter().map(|(id, a)| alarm_text(*id, *a)));
        Ok(Response::new(StatusResponse {
            header: Some(m.header(m.sm.mvcc.current_revision())),
            version: ETCD_VERSION.into(),
            db_size,
            leader,
            raft_index: metrics.last_log_index.unwrap_or(0),
            raft_term: metrics.current_term,
            raft_applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            errors,
            db_size_in_use: db_size,
            is_learner,
        }))
    }

    async fn defragment(&self, r: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.check_admin(r.metadata())?;
        let m = self.member.clone();
        tracing::info!("starting defragment");
        let started = Instant::now();
        let d = blocking(move || {
            m.sm.mvcc.defragment(Duration::from_millis(limits::DEFRAG_WAIT_MS)).map_err(|e| {
                tracing::warn!(%e, "failed to defragment");
                EtcdError::Internal(format!("etcdserver: defragment failed: {e}"))
            })
        })
        .await?;
        tracing::info!(before = d.before_bytes, after = d.after_bytes, took = ?started.elapsed(), "finished defragment");
        let m = &self.member;
        Ok(Response::new(DefragmentResponse { header: Some(m.header(m.sm.mvcc.current_revision())) }))
    }

    async fn hash(&self, r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.check_admin(r.metadata())?;
        let m = self.member.clone();
        let (hash, revision) = blocking(move || m.sm.mvcc.hash().map_err(EtcdError::internal)).await?;
        Ok(Response::new(HashResponse { header: Some(self.member.header(revision)), hash }))
    }

    async fn hash_kv(&self, r: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.check_admin(r.metadata())?;
        let revision = r.into_inner().revision;
        let m = self.member.clone();
        let h = blocking(move || m.sm.mvcc.hash_kv(revision)).await?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.member.header(h.current_revision)),
            hash: h.hash,
            compact_revision: h.compact_revision,
            hash_revision: h.hash_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, r: Request<SnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        self.check_admin(r.metadata())?;
        let m = self.member.clone();
        let (file, total, revision) = blocking(move || {
            write_snapshot_file(&m.sm.mvcc, &m.cfg.data_dir).map_err(|e| EtcdError::Internal(format!("etcdserver: snapshot failed: {e}")))
        })
        .await?;
        tracing::info!(total_bytes = total, revision, "sending database snapshot to client");
        let header = self.member.header(revision);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut file = tokio::fs::File::from_std(file);
            let mut sent = 0u64;
            let mut header = Some(header);
            while sent < total {
                let mut blob = vec![0u8; limits::SNAPSHOT_SEND_CHUNK_BYTES.min((total - sent) as usize)];
                if let Err(e) = file.read_exact(&mut blob).await {
                    let _ = tx.send(Err(status(EtcdError::Internal(format!("etcdserver: snapshot read failed: {e}"))))).await;
                    return;
                }
                sent += blob.len() as u64;
                let msg = SnapshotResponse { header: header.take(), remaining_bytes: total - sent, blob };
                if tx.send(Ok(msg)).await.is_err() {
                    tracing::info!(sent, total, "snapshot client went away");
                    return;
                }
            }
            tracing::info!(total_bytes = total, "sent database snapshot to client");
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn move_leader(&self, r: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.check_admin(r.metadata())?;
        let target = r.into_inner().target_id;
        let m = &self.member;
        move_leader(m, target, Duration::from_millis(limits::MOVE_LEADER_TIMEOUT_MS)).await.map_err(status)?;
        Ok(Response::new(MoveLeaderResponse { header: Some(m.header(m.sm.mvcc.current_revision())) }))
    }

    async fn downgrade(&self, _r: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        Err(unimplemented(
            "Maintenance.Downgrade: Rampart has no cluster version to lower; roll back by restarting members on the older binary",
        ))
    }
}

// ---- leadership transfer ----

/// etcd's MoveLeader: this member must be the leader, the target a voter. Returns once the target
/// leads, or `TimeoutLeaderTransfer` after `timeout`.
///
/// openraft stops the old leader from appending and heartbeating while it hands over; if the
/// target never takes over, the followers elect someone after an election timeout, as after a
/// leader crash.
pub async fn move_leader(member: &Member, target: MemberId, timeout: Duration) -> Result<(), EtcdError> {
    let metrics = member.raft.metrics().borrow_watched().clone();
    if metrics.current_leader != Some(member.id) || !member.is_leader() {
        return Err(EtcdError::NotLeader);
    }
    if !metrics.membership_config.membership().voter_ids().any(|id| id == target) {
        return Err(EtcdError::BadLeaderTransferee);
    }
    if target == member.id {
        return Ok(());
    }
    let started = Instant::now();
    tracing::info!(from = format!("{:x}", member.id), to = format!("{target:x}"), "leadership transfer starting");
    member.raft.trigger().transfer_leader(target).await.map_err(|_| EtcdError::Stopped)?;
    let mut rx = member.raft.metrics();
    let done = tokio::time::timeout(timeout, async {
        loop {
            if rx.borrow_watched().current_leader == Some(target) {
                return true;
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    })
    .await;
    match done {
        Ok(true) => {
            tracing::info!(to = format!("{target:x}"), took = ?started.elapsed(), "leadership transfer finished");
            Ok(())
        }
        Ok(false) => Err(EtcdError::Stopped),
        Err(_) => Err(EtcdError::TimeoutLeaderTransfer),
    }
}

/// On stop: if this member leads and another voter is reachable, hands leadership to the follower
/// with the most of the log and waits for it (at most `timeout`), so clients see a short pause
/// instead of an election timeout. etcd's `TransferLeadership` on `Stop`.
pub async fn hand_off_leadership(member: &Member, timeout: Duration) {
    use openraft::Instant as _;
    if !member.is_leader() {
        return;
    }
    let metrics = member.raft.metrics().borrow_watched().clone();
    let matched = |id: &MemberId| {
        metrics.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index)
    };
    // A follower that has not answered within an election timeout is probably down: handing
    // over to it would only stall writes until the others elect someone.
    let alive = |id: &MemberId| {
        let acked = metrics.heartbeat.as_ref().and_then(|h| h.get(id).cloned().flatten());
        acked.is_some_and(|t| t.elapsed() < Duration::from_millis(member.cfg.election_timeout_ms))
    };
    let best = metrics
        .membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != member.id && alive(id))
        .max_by_key(|id| (matched(id), std::cmp::Reverse(*id)));
    let Some(target) = best else {
        tracing::info!("skipped leadership transfer: no other voting member is reachable");
        return;
    };
    if let Err(e) = move_leader(member, target, timeout).await {
        tracing::warn!(%e, to = format!("{target:x}"), "leadership transfer on stop failed");
    }
}

// ---- space quota ----

/// Raises this member's NOSPACE alarm (through the log, so every member has it) when its store
/// grows past the quota. Checks after applied writes, at most every few milliseconds, and once a
/// second in any case. Stops when `stop` turns true.
///
/// etcd checks each Put/Txn against the quota before proposing it; this check follows the writes
/// instead, so a burst can overshoot the quota by what is applied between two checks.
pub async fn watch_quota(member: Arc<Member>, mut stop: watch::Receiver<bool>) {
    let Some(quota) = member.cfg.quota_bytes() else { return };
    const MIN_SPACING: Duration = Duration::from_millis(10);
    // openraft's apply progress, not the change feed: a receiver that only wants to know that
    // something was applied would make every event wait for it, and dropping it after a pause
    // walked every event it had skipped (1.5% of a follower's CPU under put-64).
    let mut applied = member.raft.watch_apply_progress();
    let mut tick = tokio::time::interval(Duration::from_millis(limits::QUOTA_CHECK_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_at = Instant::now();
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            r = applied.changed() => match r {
                Err(_) => return,
                // Whatever else is applied meanwhile is covered by this one check.
                Ok(()) => tokio::time::sleep(MIN_SPACING).await,
            },
            _ = tick.tick() => {}
        }
        let size = member.sm.mvcc.db_size_bytes();
        let raised = member.sm.cluster_meta().alarms.contains(&(member.id, AlarmType::Nospace as i32));
        if size <= quota || raised || Instant::now() < retry_at {
            continue;
        }
        tracing::warn!(size_bytes = size, quota_bytes = quota, "database size exceeds the backend quota; raising NOSPACE alarm");
        let req = RaftRequest::Alarm { activate: true, member_id: member.id, alarm: AlarmType::Nospace as i32 };
        if let Err(e) = member.propose(req).await {
            tracing::warn!(%e, "raising NOSPACE alarm failed; will retry");
            retry_at = Instant::now() + Duration::from_millis(limits::QUOTA_CHECK_INTERVAL_MS);
        }
    }
}

// ---- the client snapshot file ----

const TRAILER_MAGIC: &[u8; 8] = b"RAMPSNAP";
const TRAILER_BYTES: u64 = 16;
const SHA_BYTES: u64 = 32;
/// etcdctl's `hasChecksum`: length % 512 == 32.
const ALIGN_BYTES: u64 = 512;

struct Hashing<W> {
    inner: W,
    sha: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the client snapshot file into an unlinked temporary file in the data dir (memory stays
/// flat however big the store is) and returns it rewound, with its length and revision.
fn write_snapshot_file(mvcc: &Mvcc, data_dir: &Path) -> io::Result<(std::fs::File, u64, i64)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = data_dir.join("member").join("snap");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("client-snapshot-{}-{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    // Unlinked at once: a crash cannot leave it behind, and the open handle keeps the data.
    std::fs::remove_file(&path)?;
    let mut w = Hashing { inner: BufWriter::new(file), sha: Sha256::new(), len: 0 };
    let revision = mvcc.write_snapshot_at(&mut w).map_err(io::Error::other)?;
    let inner_len = w.len;
    let pad = (ALIGN_BYTES - (inner_len + TRAILER_BYTES) % ALIGN_BYTES) % ALIGN_BYTES;
    w.write_all(&vec![0u8; pad as usize])?;
    w.write_all(TRAILER_MAGIC)?;
    w.write_all(&inner_len.to_le_bytes())?;
    let sha = w.sha.finalize();
    let mut inner = w.inner;
    inner.write_all(&sha)?;
    let mut file = inner.into_inner().map_err(|e| e.into_error())?;
    let total = inner_len + pad + TRAILER_BYTES + SHA_BYTES;
    debug_assert_eq!(total % ALIGN_BYTES, SHA_BYTES);
    file.rewind()?;
    Ok((file, total, revision))
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("data-dir {0:?} exists")]
    DataDirExists(PathBuf),
    #[error("snapshot file {file}: {why}")]
    BadFile { file: PathBuf, why: String },
    #[error("restoring into {dir}: {why}")]
    Write { dir: PathBuf, why: String },
}

/// What a restore produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub data_dir: PathBuf,
    pub revision: i64,
    pub member_id: MemberId,
    pub cluster_id: u64,
}

/// Checks a client snapshot file (length, sha256, trailer) and returns the length of the mvcc
/// snapshot inside it. Reads the whole file.
fn verify_snapshot_file(file: &mut std::fs::File) -> Result<u64, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len < TRAILER_BYTES + SHA_BYTES || len % ALIGN_BYTES != SHA_BYTES {
        return Err(format!("{len} bytes is not the length of a snapshot with its sha256 (truncated?)"));
    }
    let body = len - SHA_BYTES;
    let mut sha = Sha256::new();
    io::copy(&mut (&mut *file).take(body), &mut sha).map_err(|e| e.to_string())?;
    let mut want = [0u8; SHA_BYTES as usize];
    file.read_exact(&mut want).map_err(|e| e.to_string())?;
    if sha.finalize().as_slice() != want {
        return Err("sha256 mismatch: the file is corrupt or incomplete".into());
    }
    let mut trailer = [0u8; TRAILER_BYTES as usize];
    file.seek(io::SeekFrom::Start(body - TRAILER_BYTES)).map_err(|e| e.to_string())?;
    file.read_exact(&mut trailer).map_err(|e| e.to_string())?;
    if &trailer[..8] != TRAILER_MAGIC {
        return Err("not a Rampart snapshot (an etcd snapshot? those are bbolt files, which Rampart cannot restore)".into());
    }
    let inner = u64::from_le_bytes(trailer[8..].try_into().expect("8 bytes"));
    if inner > body - TRAILER_BYTES || body - TRAILER_BYTES - inner >= ALIGN_BYTES {
        return Err(format!("trailer says {inner} bytes of data, which does not fit the file"));
    }
    file.rewind().map_err(|e| e.to_string())?;
    Ok(inner)
}

/// `rampart snapshot restore`: builds a new member data dir from a client snapshot file, holding
/// the snapshot's data and no raft state, so that `rampart serve` with the same `--name`,
/// `--initial-cluster`, `--initial-cluster-token` and `--initial-advertise-peer-urls` bootstraps a
/// new cluster around it (etcd's `snapshot restore`). The file is checked completely before
/// anything is written; the data dir appears only once it is complete.
pub fn restore_snapshot_file(snapshot: &Path, cfg: &Config) -> Result<Restored, RestoreError> {
    cfg.validate()?;
    let members = cfg.initial_members()?;
    let token = &cfg.initial_cluster_token;
    let ids: Vec<MemberId> = members.values().map(|urls| config::member_id(urls, token)).collect();
    let member_id = config::member_id(&cfg.initial_advertise_peer_urls, token);
    let cluster_id = config::cluster_id(&ids, token);

    let dir = cfg.data_dir.clone();
    if dir.exists() {
        return Err(RestoreError::DataDirExists(dir));
    }
    let bad = |why: String| RestoreError::BadFile { file: snapshot.to_path_buf(), why };
    let mut file = std::fs::File::open(snapshot).map_err(|e| bad(e.to_string()))?;
    let inner_len = verify_snapshot_file(&mut file).map_err(bad)?;

    let write_err = |why: String| RestoreError::Write { dir: dir.clone(), why };
    let name = dir.file_name().ok_or_else(|| write_err("--data-dir has no final component".into()))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| write_err(e.to_string()))?;
    let staging = parent.join(format!(".{}.restoring-{}", name.to_string_lossy(), std::process::id()));
    let mut build = || -> Result<i64, RestoreError> {
        let member_dir = staging.join("member");
        std::fs::create_dir_all(&member_dir).map_err(|e| write_err(e.to_string()))?;
        let mvcc = Mvcc::open(&member_dir.join("kv.redb")).map_err(|e| write_err(e.to_string()))?;
        let mut data = BufReader::new((&mut file).take(inner_len));
        // Checks every chunk's crc, the record count and the data format; commits only if all hold.
        mvcc.restore_snapshot(&mut data).map_err(|e| bad(e.to_string()))?;
        // The raft state belongs to the old cluster; users and roles go with the data, as in
        // etcd's restore (its auth buckets are part of the snapshot).
        let old_meta = mvcc.raft_meta().map_err(|e| bad(e.to_string()))?;
        let auth = match old_meta {
            Some(bytes) => state_machine::decode_sm_meta(&bytes).map_err(|e| bad(e.to_string()))?.auth,
            None => Default::default(),
        };
        mvcc.clear_raft_meta().map_err(|e| write_err(e.to_string()))?;
        if auth != Default::default() {
            let meta = state_machine::SmMeta { auth, ..Default::default() };
            mvcc.apply(&[], &state_machine::encode_sm_meta(&meta), true).map_err(|e| write_err(e.to_string()))?;
        }
        Ok(mvcc.current_revision())
    };
    let revision = match build() {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    std::fs::rename(&staging, &dir).map_err(|e| write_err(e.to_string()))?;
    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| write_err(e.to_string()))?;
    Ok(Restored { data_dir: dir, revision, member_id, cluster_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_data(dir: &Path) -> Mvcc {
        use rampart_proto::rampartpb::{command, Command};
        let mvcc = Mvcc::open(&dir.join("src.redb")).unwrap();
        // Raft state of the old cluster, and a user that must survive the restore.
        let mut meta = state_machine::SmMeta::default();
        meta.alarms.insert((1, 1));
        meta.auth.apply(&rampart_raft::auth::AuthOp::UserAdd { name: "keeper".into(), password: None }).unwrap();
        let meta = state_machine::encode_sm_meta(&meta);
        for i in 0..50 {
            let put = PutRequest { key: format!("k{i}").into(), value: vec![7; 3000], ..Default::default() };
            let cmd = Command { request: Some(command::Request::Put(put)) };
            mvcc.apply(&[Some(&cmd)], &meta, false).unwrap();
        }
        mvcc
    }

    fn cfg(data_dir: PathBuf) -> Config {
        Config {
            name: "r1".into(),
            data_dir,
            initial_cluster: "r1=http://127.0.0.1:1,r2=http://127.0.0.1:2".into(),
            initial_advertise_peer_urls: vec!["http://127.0.0.1:1".into()],
            ..Config::default()
        }
    }

    fn snapshot_file(src: &Mvcc, tmp: &Path) -> PathBuf {
        let (mut f, total, rev) = write_snapshot_file(src, tmp).unwrap();
        assert_eq!((total % 512, rev), (32, src.current_revision()));
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, total);
        let path = tmp.join("snap.db");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn restore_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = store_with_data(tmp.path());
        let file = snapshot_file(&src, tmp.path());
        let out = tmp.path().join("restored");
        let r = restore_snapshot_file(&file, &cfg(out.clone())).unwrap();
        assert_eq!(r.revision, src.current_revision());
        let restored = Mvcc::open(&out.join("member").join("kv.redb")).unwrap();
        assert_eq!(restored.hash_kv(0).unwrap(), src.hash_kv(0).unwrap());
        // No raft state of the old cluster (alarms, membership), only its users and roles.
        let meta = state_machine::decode_sm_meta(&restored.raft_meta().unwrap().unwrap()).unwrap();
        assert!(meta.alarms.is_empty() && meta.last_applied.is_none(), "{meta:?}");
        assert!(meta.auth.users.contains_key("keeper"), "{meta:?}");
        drop(restored);

        // A second restore into the same dir is refused, as etcd refuses it.
        let err = restore_snapshot_file(&file, &cfg(out.clone())).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        // Flags are checked as `rampart serve` checks them.
        let mut wrong = cfg(tmp.path().join("other"));
        wrong.name = "nobody".into();
        assert!(restore_snapshot_file(&file, &wrong).is_err());
    }

    #[test]
    fn corrupt_files_are_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let src = store_with_data(tmp.path());
        let file = snapshot_file(&src, tmp.path());
        let good = std::fs::read(&file).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            ({ let mut b = good.clone(); b[100] ^= 1; b }, "sha256 mismatch"),
            (good[..good.len() - 1].to_vec(), "not the length"),
            (good[..good.len() - 512].to_vec(), "sha256 mismatch"),
            ({
                // An etcd-shaped file: right length, valid sha256, not ours.
                let mut b = vec![0u8; 1024];
                let sha = Sha256::digest(&b);
                b.extend_from_slice(&sha);
                b
            }, "not a Rampart snapshot"),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            let path = tmp.path().join(format!("bad{i}.db"));
            std::fs::write(&path, bytes).unwrap();
            let out = tmp.path().join(format!("out{i}"));
            let err = restore_snapshot_file(&path, &cfg(out.clone())).unwrap_err().to_string();
            assert!(err.contains(want), "case {i}: {err}");
            assert!(!out.exists(), "case {i} left {out:?}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("restoring")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
