//! Leases in the MVCC store: the `leases` table (one record per granted lease, with its granted
//! TTL) and the index of which live keys are attached to which lease.
//!
//! The index is etcd's lessor `itemSet`: derived data, kept in memory, rebuilt from the
//! `kv_by_rev` table when the store opens and after a snapshot is restored (etcd recovers it the same way
//! from its key bucket), and kept current by every write that attaches, moves or deletes a
//! leased key. Keeping it out of redb leaves the stored format and the snapshot stream as they
//! were. `Mvcc::apply` holds it write-locked for a whole batch and rebuilds it if the batch
//! fails, so readers only ever see it matching committed data.
//!
//! When a lease expires is not decided here: that is the leader's clock (rampart-server's
//! lessor), and reaches every store as a replicated LeaseRevoke.
//!
//! # `leases` record, format 1
//!
//! `[1]` ++ be64 granted TTL (seconds) ++ be64 remaining TTL (etcd's checkpointed TTL; always 0,
//! as checkpoints are not written yet).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redb::ReadableTable;

use super::{Mvcc, MvccError};

const LEASE_RECORD_V1: u8 = 1;
const LEASE_RECORD_BYTES: usize = 17;

/// A granted lease as the store knows it. How long it has left is the leader's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// The TTL granted, in seconds (after raising it to the minimum).
    pub ttl: i64,
}

pub(crate) fn encode_lease(ttl: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(LEASE_RECORD_BYTES);
    v.push(LEASE_RECORD_V1);
    v.extend_from_slice(&ttl.to_be_bytes());
    v.extend_from_slice(&0i64.to_be_bytes());
    v
}

/// The granted TTL of a stored lease record.
pub(crate) fn decode_lease(id: i64, v: &[u8]) -> Result<i64, MvccError> {
    match v {
        [LEASE_RECORD_V1, rest @ ..] if rest.len() == LEASE_RECORD_BYTES - 1 => {
            Ok(i64::from_be_bytes(rest[..8].try_into().expect("8 bytes")))
        }
        [LEASE_RECORD_V1, ..] => Err(MvccError::Corrupt(format!(
            "lease {id:x} record has {} bytes, want {LEASE_RECORD_BYTES}",
            v.len()
        ))),
        [version, ..] => Err(MvccError::Corrupt(format!(
            "lease {id:x} record has unknown version {version}"
        ))),
        [] => Err(MvccError::Corrupt(format!("lease {id:x} record is empty"))),
    }
}

struct Entry {
    ttl: i64,
    keys: BTreeSet<Vec<u8>>,
    /// Position in the sequence of leases learned (see [`LeaseIndex::seq`]).
    seq: u64,
}

/// Every lease with its attached keys.
///
/// Every lease the index learns about (granted, or loaded on open or restore) takes the next
/// number of an in-memory sequence, so the leader's lessor can start the clock of new leases
/// by asking only for those numbered above the last it saw, instead of scanning them all.
#[derive(Default)]
pub(crate) struct LeaseIndex {
    leases: HashMap<i64, Entry>,
    by_seq: BTreeMap<u64, i64>,
    /// The number of the last lease learned.
    seq: u64,
}

impl LeaseIndex {
    /// Builds the index from the `leases` table and the lease of every key's newest version
    /// (`leased`: key and lease, only for keys that have one). Numbers continue after
    /// `seq_after`, so a rebuild shows every lease to the lessor as new.
    pub fn load<L>(
        leases: &L,
        leased: impl IntoIterator<Item = (Vec<u8>, i64)>,
        seq_after: u64,
    ) -> Result<LeaseIndex, MvccError>
    where
        L: ReadableTable<i64, &'static [u8]>,
    {
        let mut index = LeaseIndex {
            seq: seq_after,
            ..Default::default()
        };
        for entry in leases.iter()? {
            let (id, v) = entry?;
            let id = id.value();
            index.grant(id, decode_lease(id, v.value())?);
        }
        for (key, lease) in leased {
            index.load_key(&key, lease)?;
        }
        Ok(index)
    }

    fn load_key(&mut self, key: &[u8], lease: i64) -> Result<(), MvccError> {
        if lease != 0 {
            self.attach(lease, key)?;
        }
        Ok(())
    }

    /// The number of the last lease learned.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn get(&self, id: i64) -> Option<Lease> {
        self.leases.get(&id).map(|e| Lease { id, ttl: e.ttl })
    }

    pub fn keys(&self, id: i64) -> Option<&BTreeSet<Vec<u8>>> {
        self.leases.get(&id).map(|e| &e.keys)
    }

    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases learned after number `seq`, oldest first.
    pub fn learned_after(&self, seq: u64) -> Vec<Lease> {
        self.by_seq
            .range(seq.saturating_add(1)..)
            .map(|(_, id)| self.get(*id).expect("by_seq names only held leases"))
            .collect()
    }

    pub fn grant(&mut self, id: i64, ttl: i64) {
        self.seq += 1;
        let old = self.leases.insert(
            id,
            Entry {
                ttl,
                keys: BTreeSet::new(),
                seq: self.seq,
            },
        );
        assert!(old.is_none(), "lease {id:x} granted twice");
        self.by_seq.insert(self.seq, id);
    }

    /// Forgets a lease that has no keys left.
    pub fn remove(&mut self, id: i64) -> Result<(), MvccError> {
        let entry = self
            .leases
            .remove(&id)
            .ok_or_else(|| MvccError::Corrupt(format!("lease {id:x} is not in the index")))?;
        if !entry.keys.is_empty() {
            return Err(MvccError::Corrupt(format!(
                "lease {id:x} removed with {} keys still attached",
                entry.keys.len()
            )));
        }
        self.by_seq.remove(&entry.seq);
        Ok(())
    }

    pub fn attach(&mut self, id: i64, key: &[u8]) -> Result<(), MvccError> {
        let entry = self.leases.get_mut(&id).ok_or_else(|| {
            MvccError::Corrupt(format!(
                "key {:?} is attached to lease {id:x}, which does not exist",
                String::from_utf8_lossy(key)
            ))
        })?;
        entry.keys.insert(key.to_vec());
        Ok(())
    }

    pub fn detach(&mut self, id: i64, key: &[u8]) -> Result<(), MvccError> {
        let detached = self
            .leases
            .get_mut(&id)
            .is_some_and(|e| e.keys.remove(key));
        if !detached {
            return Err(MvccError::Corrupt(format!(
                "key {:?} has lease {id:x} but the lease index does not hold it",
                String::from_utf8_lossy(key)
            )));
        }
        Ok(())
    }
}

/// Reads of the leases as of the last committed batch.
impl Mvcc {
    fn lease_index(&self) -> std::sync::RwLockReadGuard<'_, LeaseIndex> {
        self.leases.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A granted lease; None if it was never granted or has been revoked.
    pub fn lease(&self, id: i64) -> Option<Lease> {
        self.lease_index().get(id)
    }

    /// The live keys attached to a lease, in key order; None if the lease does not exist.
    pub fn lease_keys(&self, id: i64) -> Option<Vec<Vec<u8>>> {
        self.lease_index()
            .keys(id)
            .map(|keys| keys.iter().cloned().collect())
    }

    /// The ids of every lease, in numeric order.
    pub fn lease_ids(&self) -> Vec<i64> {
        self.lease_index().ids()
    }

    /// How many leases there are.
    pub fn lease_count(&self) -> usize {
        self.lease_index().leases.len()
    }

    /// The leases learned (granted, or loaded on open or snapshot restore) after number `seq`,
    /// and the number of the last one learned: the next call passes it back. A caller that
    /// passes 0 gets every lease.
    pub fn leases_learned_after(&self, seq: u64) -> (Vec<Lease>, u64) {
        let index = self.lease_index();
        (index.learned_after(seq), index.seq())
    }
}

#[cfg(test)]
mod tests {
    use rampart_core::EtcdError;
    use rampart_proto::etcdserverpb::request_op::Request as Op;
    use rampart_proto::etcdserverpb::*;
    use rampart_proto::mvccpb::event::EventType;
    use rampart_proto::rampartpb::{command::Request as C, Command};

    use super::super::{Applied, Mvcc, WriteResponse};
    use super::Lease;

    struct Env {
        dir: tempfile::TempDir,
        mvcc: Option<Mvcc>,
    }

    impl Env {
        fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            let mvcc = Mvcc::open(&dir.path().join("kv.redb")).unwrap();
            Env { dir, mvcc: Some(mvcc) }
        }
        fn m(&self) -> &Mvcc {
            self.mvcc.as_ref().unwrap()
        }
        fn reopen(&mut self) {
            self.mvcc = None;
            self.mvcc = Some(Mvcc::open(&self.dir.path().join("kv.redb")).unwrap());
        }
        fn apply_all(&self, reqs: Vec<C>) -> Vec<Result<Applied, EtcdError>> {
            let cmds: Vec<Command> = reqs.into_iter().map(|r| Command { request: Some(r) }).collect();
            let batch: Vec<Option<&Command>> = cmds.iter().map(Some).collect();
            self.m().apply(&batch, b"meta", false).unwrap()
        }
        fn apply(&self, req: C) -> Result<Applied, EtcdError> {
            self.apply_all(vec![req]).pop().unwrap()
        }
        /// The key's value and lease, or None.
        fn get(&self, key: &str) -> Option<(String, i64)> {
            let r = self.m().range(&RangeRequest { key: key.into(), ..Default::default() }).unwrap();
            r.kvs.first().map(|kv| (String::from_utf8(kv.value.clone()).unwrap(), kv.lease))
        }
        fn keys(&self, id: i64) -> Option<Vec<String>> {
            self.m().lease_keys(id).map(|ks| ks.into_iter().map(|k| String::from_utf8(k).unwrap()).collect())
        }
    }

    fn grant(id: i64, ttl: i64) -> C {
        C::LeaseGrant(LeaseGrantRequest { id, ttl })
    }
    fn revoke(id: i64) -> C {
        C::LeaseRevoke(LeaseRevokeRequest { id })
    }
    fn put(k: &str, v: &str, lease: i64) -> C {
        C::Put(PutRequest { key: k.into(), value: v.into(), lease, ..Default::default() })
    }
    fn del(k: &str) -> C {
        C::DeleteRange(DeleteRangeRequest { key: k.into(), ..Default::default() })
    }

    #[test]
    fn grant_attach_revoke() {
        let env = Env::new();
        let a = env.apply(grant(7, 60)).unwrap();
        // A grant writes no key: the revision stays.
        assert_eq!(a.revision, 1);
        match a.response {
            WriteResponse::LeaseGrant(r) => assert_eq!((r.id, r.ttl, r.header.unwrap().revision), (7, 60, 1)),
            other => panic!("{other:?}"),
        }
        assert_eq!(env.apply(grant(7, 5)).unwrap_err(), EtcdError::LeaseExist);
        assert_eq!(env.apply(grant(8, 9_000_000_001)).unwrap_err(), EtcdError::LeaseTtlTooLarge);
        assert_eq!(env.apply(grant(0, 5)).unwrap_err(), EtcdError::LeaseNotFound);
        assert_eq!(env.m().lease(7), Some(Lease { id: 7, ttl: 60 }));
        assert_eq!(env.m().lease(8), None);

        env.apply(put("a", "1", 7)).unwrap();
        env.apply(put("b", "1", 7)).unwrap();
        env.apply(put("c", "1", 0)).unwrap();
        assert_eq!(env.keys(7), Some(vec!["a".into(), "b".into()]));
        assert_eq!(env.get("a"), Some(("1".into(), 7)));
        assert_eq!(env.m().current_revision(), 4);

        // All the lease's keys go at one revision, in key order, as watchers see them.
        let a = env.apply(revoke(7)).unwrap();
        assert_eq!(a.revision, 5);
        let deleted: Vec<(i32, Vec<u8>, i64)> =
            a.events.iter().map(|e| (e.r#type, e.kv.clone().unwrap().key, e.kv.clone().unwrap().mod_revision)).collect();
        let del = EventType::Delete as i32;
        assert_eq!(deleted, vec![(del, b"a".to_vec(), 5), (del, b"b".to_vec(), 5)]);
        match a.response {
            WriteResponse::LeaseRevoke(r) => assert_eq!(r.header.unwrap().revision, 5),
            other => panic!("{other:?}"),
        }
        assert_eq!((env.get("a"), env.get("b")), (None, None));
        assert_eq!(env.get("c"), Some(("1".into(), 0)));
        assert_eq!((env.m().lease(7), env.keys(7)), (None, None));
        assert_eq!(env.apply(revoke(7)).unwrap_err(), EtcdError::LeaseNotFound);
        assert_eq!(env.apply(put("a", "2", 7)).unwrap_err(), EtcdError::LeaseNotFound);

        // A lease without keys goes without using a revision.
        env.apply(grant(9, 1)).unwrap();
        assert_eq!(env.apply(revoke(9)).unwrap().revision, 5);
    }

    #[test]
    fn keys_follow_their_newest_version() {
        let mut env = Env::new();
        env.apply(grant(1, 10)).unwrap();
        env.apply(grant(2, 10)).unwrap();
        env.apply(put("k", "v", 1)).unwrap();
        // ignore_lease keeps the key's lease.
        env.apply(C::Put(PutRequest { key: "k".into(), value: "w".into(), ignore_lease: true, ..Default::default() }))
            .unwrap();
        assert_eq!(env.keys(1), Some(vec!["k".into()]));
        // Another lease moves it.
        env.apply(put("k", "x", 2)).unwrap();
        assert_eq!((env.keys(1), env.keys(2)), (Some(vec![]), Some(vec!["k".into()])));
        // No lease detaches it.
        env.apply(put("k", "y", 0)).unwrap();
        assert_eq!(env.keys(2), Some(vec![]));
        // A txn attaches; deleting detaches.
        let t = TxnRequest {
            success: vec![RequestOp { request: Some(Op::RequestPut(PutRequest { key: "t".into(), lease: 2, ..Default::default() })) }],
            ..Default::default()
        };
        env.apply(C::Txn(t)).unwrap();
        env.apply(put("u", "1", 2)).unwrap();
        assert_eq!(env.keys(2), Some(vec!["t".into(), "u".into()]));
        env.apply(del("t")).unwrap();
        assert_eq!(env.keys(2), Some(vec!["u".into()]));

        // The index is rebuilt from the stored keys.
        env.reopen();
        assert_eq!((env.keys(1), env.keys(2)), (Some(vec![]), Some(vec!["u".into()])));
        assert_eq!(env.m().lease_ids(), vec![1, 2]);
        let rev = env.m().current_revision();
        assert_eq!(env.apply(revoke(2)).unwrap().revision, rev + 1);
        assert_eq!(env.get("u"), None);
    }

    #[test]
    fn a_batch_sees_its_own_grants_and_attachments() {
        let env = Env::new();
        let out = env.apply_all(vec![grant(3, 5), put("a", "1", 3), put("b", "1", 3), revoke(3), put("c", "1", 3)]);
        assert!(out[..4].iter().all(|r| r.is_ok()), "{out:?}");
        assert_eq!(out[4].as_ref().unwrap_err(), &EtcdError::LeaseNotFound);
        assert_eq!((env.get("a"), env.get("b"), env.m().lease(3)), (None, None, None));
        assert_eq!(env.m().current_revision(), 4);
    }

    #[test]
    fn learned_leases_are_numbered_and_renumbered_by_a_rebuild() {
        let mut env = Env::new();
        env.apply(grant(1, 10)).unwrap();
        let (all, seq) = env.m().leases_learned_after(0);
        assert_eq!(all, vec![Lease { id: 1, ttl: 10 }]);
        env.apply(grant(2, 20)).unwrap();
        let (new, seq2) = env.m().leases_learned_after(seq);
        assert_eq!(new, vec![Lease { id: 2, ttl: 20 }]);
        assert_eq!(env.m().leases_learned_after(seq2).0, vec![]);

        // A snapshot restore may bring any lease: all of them count as new again.
        let mut snap = Vec::new();
        env.m().write_snapshot(&mut snap).unwrap();
        env.m().restore_snapshot(&mut snap.as_slice()).unwrap();
        let (again, _) = env.m().leases_learned_after(seq2);
        assert_eq!(again.len(), 2);
        env.reopen();
        assert_eq!(env.m().leases_learned_after(0).0.len(), 2);
    }

    #[test]
    fn lease_records_are_checked() {
        assert_eq!(super::decode_lease(1, &super::encode_lease(42)).unwrap(), 42);
        assert!(super::decode_lease(1, &[2; 17]).is_err());
        assert!(super::decode_lease(1, &[1; 9]).is_err());
        assert!(super::decode_lease(1, &[]).is_err());
    }
}
