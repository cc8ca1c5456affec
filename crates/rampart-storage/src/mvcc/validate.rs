//! Request checks that need no data: etcd does them in `api/v3rpc/key.go` before proposing.
//! We repeat them when applying, so that a command in the log is rejected the same way on every
//! member whatever the API layer let through. The txn op limit (`--max-txn-ops`) is a setting and
//! stays with the API layer.

use std::collections::HashSet;

use rampart_core::EtcdError;
use rampart_proto::etcdserverpb::range_request::SortTarget;
use rampart_proto::etcdserverpb::request_op::Request;
use rampart_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

pub(crate) fn range(r: &RangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    // etcd 3.4 panics on an unknown sort target; an unknown sort order it ignores (so do we).
    if SortTarget::try_from(r.sort_target).is_err() {
        return Err(EtcdError::InvalidArgument(format!(
            "rampart: invalid RangeRequest.sort_target {}",
            r.sort_target
        )));
    }
    Ok(())
}

pub(crate) fn put(r: &PutRequest) -> Result<(), EtcdError> {
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

pub(crate) fn delete_range(r: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkTxnRequest` (without the op count) followed by `checkIntervals` on both branches.
pub(crate) fn txn(r: &TxnRequest) -> Result<(), EtcdError> {
    txn_ops(r)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn txn_ops(r: &TxnRequest) -> Result<(), EtcdError> {
    for c in &r.compare {
        if c.key.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
        // Unknown compare targets and results are not rejected: etcd answers them (see
        // `write::compare_kv`), so we answer them the same way.
    }
    for op in r.success.iter().chain(&r.failure) {
        request_op(op)?;
    }
    Ok(())
}

fn request_op(op: &RequestOp) -> Result<(), EtcdError> {
    match &op.request {
        Some(Request::RequestRange(r)) => range(r),
        Some(Request::RequestPut(r)) => put(r),
        Some(Request::RequestDeleteRange(r)) => delete_range(r),
        Some(Request::RequestTxn(r)) => txn_ops(r),
        // etcd answers an empty op this way.
        None => Err(EtcdError::KeyNotFound),
    }
}

/// A delete of a txn, as etcd's interval tree sees it.
enum Deleted {
    Key(Vec<u8>),
    /// `[begin, end)` in plain byte order. A `range_end` of "\0" ("to the end") is taken
    /// literally here, so it covers nothing: etcd 3.4 and 3.5 accept a put next to a
    /// delete-from-key in one txn, and so must we.
    Range(Vec<u8>, Vec<u8>),
}

fn covers(dels: &[Deleted], key: &[u8]) -> bool {
    dels.iter().any(|d| match d {
        Deleted::Key(k) => k == key,
        Deleted::Range(b, e) => b.as_slice() <= key && key < e.as_slice(),
    })
}

/// etcd's `checkIntervals`: a txn may not put one key twice, nor put a key it also deletes,
/// along any path; the two branches of a nested txn may put the same key since only one runs.
/// Returns the keys put and the deletes, for the enclosing level.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<&[u8]>, Vec<Deleted>), EtcdError> {
    let mut dels: Vec<Deleted> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) if d.range_end.is_empty() => {
                Some(Deleted::Key(d.key.clone()))
            }
            Some(Request::RequestDeleteRange(d)) => {
                Some(Deleted::Range(d.key.clone(), d.range_end.clone()))
            }
            _ => None,
        })
        .collect();

    let mut puts: HashSet<&[u8]> = HashSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || covers(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k);
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) || covers(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }

    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(p.key.as_slice()) || covers(&dels, &p.key) {
            return Err(EtcdError::DuplicateKey);
        }
        puts.insert(&p.key);
    }
    Ok((puts, dels))
}
