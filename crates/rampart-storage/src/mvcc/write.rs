//! Applying committed commands inside one redb write transaction: Put, DeleteRange, Txn,
//! Compaction, LeaseGrant and LeaseRevoke with etcd's semantics (`etcdserver/apply.go`,
//! `mvcc/kvstore_txn.go`, `lease/lessor.go`).
//!
//! Every check that can reject a command runs before its first write, as in etcd. A command
//! that fails therefore leaves no trace, and the batch's other commands still apply in the same
//! redb transaction.

use std::collections::BTreeSet;

use rampart_core::{limits, EtcdError};
use rampart_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use rampart_proto::etcdserverpb::request_op::Request;
use rampart_proto::etcdserverpb::response_op::Response;
use rampart_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest,
    PutResponse, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use rampart_proto::mvccpb::event::EventType;
use rampart_proto::mvccpb::{Event, KeyValue};
use rampart_proto::rampartpb::{command, Command};
use redb::{ReadableTable, Table};

use super::codec::{self, Record, Rev};
use super::index::{KeyIndex, Newest};
use super::lease::{self, LeaseIndex};
use super::read::{self, header, IndexRead, KvRead, Span, View, LATEST};
use super::{validate, Applied, Fail, MvccError, WriteResponse};

/// The tables a write touches, opened in one write transaction.
pub(crate) struct Tables<'t> {
    pub kv: Table<'t, u128, &'static [u8]>,
    pub leases: Table<'t, i64, &'static [u8]>,
}

/// Applies commands one after the other; `rev` and `compact_rev` follow along and are written to
/// the meta table by the caller when the batch is done.
pub(crate) struct Writer<'t, 'i> {
    pub tables: Tables<'t>,
    /// Which keys each lease holds, updated with every write (the caller rebuilds it if the
    /// batch is not committed).
    pub leases: &'i mut LeaseIndex,
    /// Every key's versions, updated with every write (see `index`).
    pub index: &'i mut KeyIndex,
    /// Newest revision, counting the commands already applied in this batch.
    pub rev: i64,
    /// Revision of the last compaction, -1 if none (etcd's initial `compactMainRev`).
    pub compact_rev: i64,
}

/// What one command has changed so far. Its writes go to main revision `begin + 1`, one
/// sub-revision each.
struct Changes {
    begin: i64,
    events: Vec<Event>,
}

impl Changes {
    fn new(begin: i64) -> Changes {
        Changes {
            begin,
            events: Vec::new(),
        }
    }

    fn next_rev(&self) -> Rev {
        Rev {
            main: self.begin + 1,
            sub: self.events.len() as i64,
        }
    }

    /// The revision a read inside the command sees, and reports in its header.
    fn view_rev(&self) -> i64 {
        if self.events.is_empty() {
            self.begin
        } else {
            self.begin + 1
        }
    }
}

impl<'t> Writer<'t, '_> {
    /// What the writes so far look like to a read.
    fn view(&self) -> View<'_, Table<'t, u128, &'static [u8]>, KeyIndex> {
        View {
            kv: &self.tables.kv,
            index: &*self.index,
        }
    }

    /// Stores one version and indexes it.
    fn write_version(&mut self, key: &[u8], rev: Rev, record: &Record) -> Result<(), MvccError> {
        self.tables
            .kv
            .insert(rev.to_u128(), codec::encode_entry(key, record).as_slice())?;
        let put = match record {
            Record::Put {
                create_revision,
                version,
                lease,
                ..
            } => Some(Newest {
                rev,
                create_revision: *create_revision,
                version: *version,
                lease: *lease,
            }),
            Record::Tombstone => None,
        };
        self.index.push(key, rev, put);
        Ok(())
    }

    /// Applies one command. `Ok(Err(_))`: the command was rejected and changed nothing.
    /// `Err(_)`: storage failed, and the whole batch must be dropped.
    pub fn apply(&mut self, cmd: &Command) -> Result<Result<Applied, EtcdError>, MvccError> {
        let result = match &cmd.request {
            Some(command::Request::Put(r)) => self.put_request(r),
            Some(command::Request::DeleteRange(r)) => self.delete_range_request(r),
            Some(command::Request::Txn(r)) => self.txn_request(r),
            Some(command::Request::Compaction(r)) => self.compaction(r),
            Some(command::Request::LeaseGrant(r)) => self.lease_grant(r),
            Some(command::Request::LeaseRevoke(r)) => self.lease_revoke(r),
            None => {
                Err(EtcdError::InvalidArgument("rampart: command without a request".into()).into())
            }
        };
        match result {
            Ok(applied) => Ok(Ok(applied)),
            Err(Fail::Etcd(e)) => Ok(Err(e)),
            Err(Fail::Store(e)) => Err(e),
        }
    }

    fn put_request(&mut self, r: &PutRequest) -> Result<Applied, Fail> {
        validate::put(r)?;
        // Same order as etcd: the lease first, then the key that ignore_* needs.
        if r.lease != 0 && !self.lease_exists(r.lease)? {
            return Err(EtcdError::LeaseNotFound.into());
        }
        if (r.ignore_value || r.ignore_lease) && !exists(&self.view(), &r.key) {
            return Err(EtcdError::KeyNotFound.into());
        }
        let mut ch = Changes::new(self.rev);
        let resp = self.put(&mut ch, r)?;
        Ok(self.finish(ch, WriteResponse::Put(resp)))
    }

    fn delete_range_request(&mut self, r: &DeleteRangeRequest) -> Result<Applied, Fail> {
        validate::delete_range(r)?;
        let mut ch = Changes::new(self.rev);
        let resp = self.delete_range(&mut ch, r)?;
        Ok(self.finish(ch, WriteResponse::DeleteRange(resp)))
    }

    fn txn_request(&mut self, r: &TxnRequest) -> Result<Applied, Fail> {
        validate::txn(r)?;
        let path = compare_path(&self.view(), r)?;
        check_puts(&self.view(), &self.tables.leases, r, &path)?;
        check_ranges(r, &path, self.rev, self.compact_rev)?;
        let mut ch = Changes::new(self.rev);
        let mut resp = self.txn(&mut ch, r, &path).map_err(|f| match f {
            // Everything that can reject a txn was checked above; failing now would leave half
            // of it written.
            Fail::Etcd(e) => Fail::Store(MvccError::Corrupt(format!(
                "bug: txn rejected after its checks passed: {e}"
            ))),
            store => store,
        })?;
        resp.header = Some(header(ch.view_rev()));
        Ok(self.finish(ch, WriteResponse::Txn(resp)))
    }

    fn compaction(&mut self, r: &CompactionRequest) -> Result<Applied, Fail> {
        if r.revision <= self.compact_rev {
            return Err(EtcdError::Compacted.into());
        }
        if r.revision > self.rev {
            return Err(EtcdError::FutureRev.into());
        }
        let previous = self.compact_rev;
        self.compact_rev = r.revision;
        // `physical` asks to wait for the physical compaction; ours is always done by now.
        self.compact(previous, r.revision)?;
        let resp = CompactionResponse {
            header: Some(header(self.rev)),
        };
        Ok(Applied {
            response: WriteResponse::Compaction(resp),
            revision: self.rev,
            events: Vec::new(),
        })
    }

    /// Ends a command: it used a new revision if it changed anything.
    fn finish(&mut self, ch: Changes, response: WriteResponse) -> Applied {
        self.rev = ch.view_rev();
        Applied {
            response,
            revision: self.rev,
            events: ch.events,
        }
    }

    fn lease_exists(&self, lease: i64) -> Result<bool, MvccError> {
        Ok(self.tables.leases.get(lease)?.is_some())
    }

    /// etcd's `lessor.Grant`. The proposer chose the id and raised the TTL to the minimum; a
    /// TTL below one second would expire at once, so it is raised to one here too.
    fn lease_grant(&mut self, r: &LeaseGrantRequest) -> Result<Applied, Fail> {
        if r.id == 0 {
            return Err(EtcdError::LeaseNotFound.into());
        }
        if r.ttl > limits::MAX_LEASE_TTL_S {
            return Err(EtcdError::LeaseTtlTooLarge.into());
        }
        if self.lease_exists(r.id)? {
            return Err(EtcdError::LeaseExist.into());
        }
        let ttl = r.ttl.max(1);
        self.tables
            .leases
            .insert(r.id, lease::encode_lease(ttl).as_slice())?;
        self.leases.grant(r.id, ttl);
        let resp = LeaseGrantResponse {
            header: Some(header(self.rev)),
            id: r.id,
            ttl,
            error: String::new(),
        };
        Ok(Applied {
            response: WriteResponse::LeaseGrant(resp),
            revision: self.rev,
            events: Vec::new(),
        })
    }

    /// etcd's `lessor.Revoke`: deletes every key attached to the lease, in key order, and the
    /// lease, all at one revision (none if it held no keys).
    fn lease_revoke(&mut self, r: &LeaseRevokeRequest) -> Result<Applied, Fail> {
        if !self.lease_exists(r.id)? {
            return Err(EtcdError::LeaseNotFound.into());
        }
        let keys = self.leases.keys(r.id).cloned().ok_or_else(|| {
            MvccError::Corrupt(format!("lease {:x} is stored but not indexed", r.id))
        })?;
        let mut ch = Changes::new(self.rev);
        for key in keys {
            let del = DeleteRangeRequest {
                key,
                ..Default::default()
            };
            if self.delete_range(&mut ch, &del)?.deleted != 1 {
                return Err(MvccError::Corrupt(format!(
                    "lease {:x} holds key {:?}, which does not exist",
                    r.id,
                    String::from_utf8_lossy(&del.key)
                ))
                .into());
            }
        }
        self.tables.leases.remove(r.id)?;
        // delete_range detached every key; remove checks that none is left.
        self.leases.remove(r.id)?;
        let resp = LeaseRevokeResponse {
            header: Some(header(ch.view_rev())),
        };
        Ok(self.finish(ch, WriteResponse::LeaseRevoke(resp)))
    }

    /// Writes one put. Its watch event carries no `prev_kv`: the watch server reads that at
    /// the revision before, for the watchers that ask (as etcd's does), so a put reads the
    /// version it replaces only when the request itself needs it (`ignore_value`, `prev_kv`).
    fn put(&mut self, ch: &mut Changes, r: &PutRequest) -> Result<PutResponse, MvccError> {
        let current = self.index.current(&r.key);
        let current_kv = match current {
            Some(cur) if r.ignore_value || r.prev_kv => Some(self.view().stored(&r.key, cur.rev)?),
            _ => None,
        };
        let (value, lease) = match (current, r.ignore_value || r.ignore_lease) {
            (None, true) => {
                return Err(MvccError::Corrupt(
                    "bug: ignore_value/ignore_lease put of a missing key".into(),
                ))
            }
            (Some(cur), _) => (
                match &current_kv {
                    Some(kv) if r.ignore_value => kv.value.clone(),
                    _ => r.value.clone(),
                },
                if r.ignore_lease { cur.lease } else { r.lease },
            ),
            (None, false) => (r.value.clone(), r.lease),
        };
        let old_lease = current.map_or(0, |cur| cur.lease);
        let rev = ch.next_rev();
        let (create_revision, version) = match current {
            Some(cur) => (cur.create_revision, cur.version + 1),
            None => (rev.main, 1),
        };
        let record = Record::Put {
            create_revision,
            version,
            lease,
            value,
        };
        self.write_version(&r.key, rev, &record)?;
        let kv = record.into_key_value(&r.key, rev.main).expect("a put");
        // The key follows its newest version's lease (etcd's Detach of the old, Attach of the new).
        if old_lease != kv.lease {
            if old_lease != 0 {
                self.leases.detach(old_lease, &r.key)?;
            }
            if kv.lease != 0 {
                self.leases.attach(kv.lease, &r.key)?;
            }
        }
        ch.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: None,
        });
        Ok(PutResponse {
            header: Some(header(rev.main)),
            prev_kv: if r.prev_kv { current_kv } else { None },
        })
    }

    fn delete_range(
        &mut self,
        ch: &mut Changes,
        r: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, MvccError> {
        let live = self
            .view()
            .range_at(Span::new(&r.key, &r.range_end), LATEST, usize::MAX)?;
        for kv in &live.kvs {
            if kv.lease != 0 {
                self.leases.detach(kv.lease, &kv.key)?;
            }
            let rev = ch.next_rev();
            self.write_version(&kv.key, rev, &Record::Tombstone)?;
            let event_prev = if kv.mod_revision <= ch.begin {
                Some(kv.clone())
            } else {
                self.view().get_at(&kv.key, ch.begin)?
            };
            let gone = KeyValue {
                key: kv.key.clone(),
                mod_revision: rev.main,
                ..Default::default()
            };
            ch.events.push(Event {
                r#type: EventType::Delete as i32,
                kv: Some(gone),
                prev_kv: event_prev,
            });
        }
        Ok(DeleteRangeResponse {
            header: Some(header(ch.view_rev())),
            deleted: live.count,
            prev_kvs: if r.prev_kv { live.kvs } else { Vec::new() },
        })
    }

    /// Runs the ops of the branch `path` chose, in order; reads see the earlier writes.
    fn txn(&mut self, ch: &mut Changes, r: &TxnRequest, path: &Path) -> Result<TxnResponse, Fail> {
        let mut nested = path.nested.iter();
        let mut responses = Vec::new();
        for op in path.ops(r) {
            let response = match &op.request {
                Some(Request::RequestRange(q)) => Response::ResponseRange(read::range_request(
                    &self.view(),
                    q,
                    ch.view_rev(),
                    self.compact_rev,
                )?),
                Some(Request::RequestPut(q)) => Response::ResponsePut(self.put(ch, q)?),
                Some(Request::RequestDeleteRange(q)) => {
                    Response::ResponseDeleteRange(self.delete_range(ch, q)?)
                }
                Some(Request::RequestTxn(q)) => {
                    let p = nested.next().expect("one path per nested txn");
                    Response::ResponseTxn(nested_response(self.txn(ch, q, p)?))
                }
                None => {
                    return Err(
                        MvccError::Corrupt("bug: empty txn op passed validation".into()).into(),
                    )
                }
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        Ok(TxnResponse {
            header: None,
            succeeded: path.succeeded,
            responses,
        })
    }

    /// Removes every version that no read at or after `upto` can see: of each key, all versions
    /// up to `upto` except the newest, and that one too if it is a tombstone (etcd's
    /// `keyIndex.compact`). Keys untouched since the previous compaction at `after` are already
    /// in that shape, so only revisions in `(after, upto]` are visited.
    fn compact(&mut self, after: i64, upto: i64) -> Result<(), MvccError> {
        let lo = Rev {
            main: after.saturating_add(1).max(0),
            sub: 0,
        }
        .to_u128();
        let hi = Rev {
            main: upto,
            sub: i64::MAX,
        }
        .to_u128();
        let mut keys = BTreeSet::new();
        for entry in self.tables.kv.range(lo..=hi)? {
            let (_, v) = entry?;
            keys.insert(codec::decode_entry(v.value())?.key.to_vec());
        }
        for key in keys {
            for rev in self.index.compact_key(&key, upto) {
                self.tables.kv.remove(rev.to_u128())?;
            }
        }
        self.index.set_compacted(upto);
        Ok(())
    }
}

/// Whether `key` exists now (its newest version is not a tombstone).
fn exists<T: KvRead, I: IndexRead>(view: &View<'_, T, I>, key: &[u8]) -> bool {
    view.newest(key, LATEST).is_some_and(|v| !v.tombstone)
}

/// etcd leaves the header of a nested txn's response empty (but present).
fn nested_response(mut resp: TxnResponse) -> TxnResponse {
    resp.header = Some(ResponseHeader::default());
    resp
}

/// Which branch each txn of a request takes: compares are all evaluated against the state
/// before the txn, nested ones included (etcd's `compareToPath`).
pub(crate) struct Path {
    succeeded: bool,
    /// One per nested txn in the chosen branch, in order.
    nested: Vec<Path>,
}

impl Path {
    fn ops<'r>(&self, r: &'r TxnRequest) -> &'r [rampart_proto::etcdserverpb::RequestOp] {
        if self.succeeded {
            &r.success
        } else {
            &r.failure
        }
    }
}

pub(crate) fn compare_path<T: KvRead, I: IndexRead>(
    view: &View<'_, T, I>,
    r: &TxnRequest,
) -> Result<Path, MvccError> {
    let mut succeeded = true;
    for c in &r.compare {
        if !compare(view, c)? {
            succeeded = false;
            break;
        }
    }
    let mut path = Path {
        succeeded,
        nested: Vec::new(),
    };
    for op in path.ops(r) {
        if let Some(Request::RequestTxn(t)) = &op.request {
            path.nested.push(compare_path(view, t)?);
        }
    }
    Ok(path)
}

/// etcd's `applyCompare`: every key of the range must satisfy the compare. With no key at all,
/// a value compare fails and the others compare against zeros.
fn compare<T: KvRead, I: IndexRead>(view: &View<'_, T, I>, c: &Compare) -> Result<bool, MvccError> {
    let live = view.range_at(Span::new(&c.key, &c.range_end), LATEST, usize::MAX)?;
    if live.kvs.is_empty() {
        if c.target == CompareTarget::Value as i32 {
            return Ok(false);
        }
        return Ok(compare_kv(c, &KeyValue::default()));
    }
    Ok(live.kvs.iter().all(|kv| compare_kv(c, kv)))
}

/// etcd's `compareKV`, including its leniency: a target_union of another kind than `target`
/// compares against zero, an unknown target compares equal, an unknown result holds.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let number = |want: Option<i64>, have: i64| have.cmp(&want.unwrap_or(0));
    let union = c.target_union.as_ref();
    let ord = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let want = match union {
                Some(TargetUnion::Value(v)) => v.as_slice(),
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        Ok(CompareTarget::Create) => number(
            match union {
                Some(TargetUnion::CreateRevision(n)) => Some(*n),
                _ => None,
            },
            kv.create_revision,
        ),
        Ok(CompareTarget::Mod) => number(
            match union {
                Some(TargetUnion::ModRevision(n)) => Some(*n),
                _ => None,
            },
            kv.mod_revision,
        ),
        Ok(CompareTarget::Version) => number(
            match union {
                Some(TargetUnion::Version(n)) => Some(*n),
                _ => None,
            },
            kv.version,
        ),
        Ok(CompareTarget::Lease) => number(
            match union {
                Some(TargetUnion::Lease(n)) => Some(*n),
                _ => None,
            },
            kv.lease,
        ),
        Err(_) => std::cmp::Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}

/// etcd's `checkRequestPut` over the chosen path: ignore_value/ignore_lease need the key to
/// exist before the txn, and a lease must exist.
fn check_puts<T: KvRead, I: IndexRead>(
    view: &View<'_, T, I>,
    leases: &Table<'_, i64, &'static [u8]>,
    r: &TxnRequest,
    path: &Path,
) -> Result<(), Fail> {
    let mut nested = path.nested.iter();
    for op in path.ops(r) {
        match &op.request {
            Some(Request::RequestTxn(t)) => {
                check_puts(view, leases, t, nested.next().expect("one path per nested txn"))?
            }
            Some(Request::RequestPut(p)) => {
                if (p.ignore_value || p.ignore_lease) && !exists(view, &p.key) {
                    return Err(EtcdError::KeyNotFound.into());
                }
                if p.lease != 0 && leases.get(p.lease)?.is_none() {
                    return Err(EtcdError::LeaseNotFound.into());
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// etcd's `checkRequestRange` over the chosen path, against the revision before the txn. Note
/// that a negative revision here is "compacted" (it is below etcd's first revision), while a
/// plain Range treats it as "current": etcd does exactly that.
pub(crate) fn check_ranges(
    r: &TxnRequest,
    path: &Path,
    rev: i64,
    compact_rev: i64,
) -> Result<(), EtcdError> {
    let mut nested = path.nested.iter();
    for op in path.ops(r) {
        match &op.request {
            Some(Request::RequestTxn(t)) => check_ranges(
                t,
                nested.next().expect("one path per nested txn"),
                rev,
                compact_rev,
            )?,
            Some(Request::RequestRange(q)) => match q.revision {
                0 => {}
                n if n > rev => return Err(EtcdError::FutureRev),
                n if n < compact_rev => return Err(EtcdError::Compacted),
                _ => {}
            },
            _ => {}
        }
    }
    Ok(())
}

/// Whether a txn only reads, in both branches at every level.
pub(crate) fn is_read_only(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(_)) => true,
            Some(Request::RequestTxn(t)) => is_read_only(t),
            _ => false,
        })
}

/// A txn that only reads, served from a read view without going through the log.
pub(crate) fn read_only_txn<T: KvRead, I: IndexRead>(
    view: &View<'_, T, I>,
    r: &TxnRequest,
    rev: i64,
    compact_rev: i64,
) -> Result<TxnResponse, Fail> {
    validate::txn(r)?;
    if !is_read_only(r) {
        return Err(EtcdError::InvalidArgument(
            "rampart: a txn that writes must be applied through the log".into(),
        )
        .into());
    }
    let path = compare_path(view, r)?;
    check_ranges(r, &path, rev, compact_rev)?;
    let mut resp = read_txn_ops(view, r, &path, rev, compact_rev)?;
    resp.header = Some(header(rev));
    Ok(resp)
}

fn read_txn_ops<T: KvRead, I: IndexRead>(
    view: &View<'_, T, I>,
    r: &TxnRequest,
    path: &Path,
    rev: i64,
    compact_rev: i64,
) -> Result<TxnResponse, Fail> {
    let mut nested = path.nested.iter();
    let mut responses = Vec::new();
    for op in path.ops(r) {
        let response = match &op.request {
            Some(Request::RequestRange(q)) => {
                Response::ResponseRange(read::range_request(view, q, rev, compact_rev)?)
            }
            Some(Request::RequestTxn(q)) => {
                let p = nested.next().expect("one path per nested txn");
                Response::ResponseTxn(nested_response(read_txn_ops(view, q, p, rev, compact_rev)?))
            }
            _ => return Err(MvccError::Corrupt("bug: a write in a read-only txn".into()).into()),
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: path.succeeded,
        responses,
    })
}
