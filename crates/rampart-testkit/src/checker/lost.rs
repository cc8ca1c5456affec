//! Lost acknowledged writes, judged directly against the final read of each key.
//!
//! The harness reads every key once after all faults are healed (see `final_reads` for which
//! read counts as final). Then every acknowledged write on the key must still be visible or
//! have been overwritten by a write at a higher revision:
//! - a Put or succeeded Cas at revision r: the final read returns its value, or a value with
//!   mod_revision > r, or "absent" and some delete (acknowledged at a revision > r, or with
//!   unknown outcome) can explain that;
//! - a Delete that deleted the key at revision r: the final read returns "absent", or a value
//!   with mod_revision > r;
//! - an Append: its element is in the final ReadSet.
//!
//! Much of this is implied by linearizability; this check names the failure plainly and counts
//! it. Keys without a final read are not checked here.

use std::collections::BTreeMap;

use super::{acked_change, describe, final_reads, Anomaly, AnomalyKind, Change, Report};
use crate::history::{History, Op, OpResult, Operation};

/// Acknowledged writes missing from the final read of their key; see the module docs.
pub fn check_lost_writes(history: &History) -> Report {
    let finals: BTreeMap<&str, &Operation> = final_reads(history).into_iter().collect();
    let mut writes: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history.ops.iter().filter(|o| o.op.is_write() && !o.is_fail()) {
        writes.entry(op.op.key()).or_default().push(op);
    }
    let mut anomalies = Vec::new();
    for (key, last) in finals {
        let ops = writes.get(key).map(Vec::as_slice).unwrap_or_default();
        let deleted_after = |rev: i64| {
            ops.iter().any(|d| {
                matches!(d.op, Op::Delete { .. })
                    && match d.result() {
                        Some(OpResult::Delete { deleted, revision }) => *deleted > 0 && *revision > rev,
                        _ => d.is_unknown(),
                    }
            })
        };
        for w in ops {
            let Some((change, rev)) = acked_change(w) else { continue };
            let why = match (change, last.result()) {
                (Change::Put(v), Some(OpResult::Get { value: Some(fv), mod_revision })) => {
                    (fv != v && *mod_revision <= rev).then(|| format!("the key holds {fv:?} from revision {mod_revision}"))
                }
                (Change::Put(_), Some(OpResult::Get { value: None, .. })) => {
                    (!deleted_after(rev)).then(|| "the key is absent and no later delete explains it".to_string())
                }
                (Change::Delete, Some(OpResult::Get { value: Some(fv), mod_revision })) => {
                    (*mod_revision <= rev).then(|| format!("the key holds {fv:?} from revision {mod_revision}"))
                }
                (Change::Append(e), Some(OpResult::ReadSet { elements, .. })) => {
                    (!elements.contains(&e)).then(|| format!("element {e} is not in the set"))
                }
                _ => None,
            };
            if let Some(why) = why {
                anomalies.push(Anomaly {
                    kind: AnomalyKind::LostWrite,
                    key: Some(key.to_string()),
                    ops: vec![w.id, last.id],
                    message: format!(
                        "key {key:?}: acknowledged write {} is lost: in the final read {}, {why}",
                        describe(w),
                        describe(last)
                    ),
                });
            }
        }
    }
    Report::new(anomalies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::HistoryBuilder;
    use AnomalyKind::*;

    fn check(h: HistoryBuilder, expected: &[AnomalyKind]) -> Report {
        let report = check_lost_writes(&h.build());
        assert_eq!(report.kinds(), expected, "{report}");
        report
    }

    fn writes() -> HistoryBuilder {
        HistoryBuilder::new()
            .ok(1, Op::put("k", "a"), 0, 10, OpResult::put(2))
            .ok(2, Op::put("k", "b"), 5, 15, OpResult::put(3))
            .unknown(3, Op::put("k", "c"), 12, 20)
    }

    #[test]
    fn overwritten_writes_are_not_lost() {
        check(writes().ok(9, Op::get("k"), 100, 101, OpResult::get(Some("b"), 3)), &[]);
        // The unknown write took effect last.
        check(writes().ok(9, Op::get("k"), 100, 101, OpResult::get(Some("c"), 4)), &[]);
        // Deleted at a higher revision.
        check(
            writes().ok(3, Op::delete("k"), 30, 31, OpResult::delete(1, 5)).ok(9, Op::get("k"), 100, 101, OpResult::get(None, 0)),
            &[],
        );
        // Deleted, then written again.
        check(
            writes()
                .ok(3, Op::delete("k"), 30, 31, OpResult::delete(1, 5))
                .ok(3, Op::cas("k", None, "d"), 32, 33, OpResult::cas(true, 6))
                .ok(9, Op::get("k"), 100, 101, OpResult::get(Some("d"), 6)),
            &[],
        );
    }

    #[test]
    fn lost_write_is_rejected() {
        // "b" (revision 3) was acknowledged, the final read shows "a" from revision 2.
        let r = check(writes().ok(9, Op::get("k"), 100, 101, OpResult::get(Some("a"), 2)), &[LostWrite]);
        assert_eq!(r.anomalies[0].ops, vec![1, 3]);
        assert_eq!(r.lost_acked_writes(), 1);
        // Absent with no delete to explain it: both writes are lost.
        let r = check(writes().ok(9, Op::get("k"), 100, 101, OpResult::get(None, 0)), &[LostWrite]);
        assert_eq!(r.lost_acked_writes(), 2);
        // A failed delete explains nothing.
        check(writes().fail(4, Op::delete("k"), 30, 31).ok(9, Op::get("k"), 100, 101, OpResult::get(None, 0)), &[LostWrite]);
        // A lost delete: the key is back with the value from before it.
        check(
            writes().ok(3, Op::delete("k"), 30, 31, OpResult::delete(1, 5)).ok(
                9,
                Op::get("k"),
                100,
                101,
                OpResult::get(Some("b"), 3),
            ),
            &[LostWrite],
        );
    }

    #[test]
    fn lost_set_element_is_rejected() {
        let h = HistoryBuilder::new()
            .ok(1, Op::append("s/", 1), 0, 10, OpResult::append(2))
            .ok(2, Op::append("s/", 2), 0, 10, OpResult::append(3))
            .unknown(3, Op::append("s/", 3), 0, 10);
        check(h.clone().ok(9, Op::read_set("s/"), 20, 21, OpResult::read_set(&[1, 2], 3)), &[]);
        check(h.clone().ok(9, Op::read_set("s/"), 20, 21, OpResult::read_set(&[1, 2, 3], 4)), &[]);
        let r = check(h.ok(9, Op::read_set("s/"), 20, 21, OpResult::read_set(&[2, 3], 4)), &[LostWrite]);
        assert_eq!(r.anomalies[0].ops, vec![0, 3]);
    }

    #[test]
    fn keys_without_a_final_read_are_not_judged() {
        // The only read is concurrent with the last write.
        check(writes().ok(9, Op::get("k"), 14, 101, OpResult::get(Some("a"), 2)), &[]);
    }
}
