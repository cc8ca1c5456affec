//! Revisions, across all keys: etcd's revision is one cluster-wide counter, bumped once per
//! write request, and every response header carries the revision the member had then.
//!
//! - Per client: the header revisions of its ok ops, in completion order, never decrease.
//! - In real time: an ok op invoked after another ok op completed reports a header revision at
//!   least as high (a member serving from an older state fails this, even for another client).
//! - No two acknowledged writes (Put, succeeded Cas, Delete that deleted, Append) report the
//!   same revision: that is one request applied twice, or two applied as one.
//!
//! Ops without a header revision (a Get recorded without one) are skipped. Writes whose outcome
//! is unknown carry no revision and are not checked here (see `check_watches`, which sees them).

use std::collections::{BTreeMap, HashMap};

use super::{acked_change, describe, fmt_ids, Anomaly, AnomalyKind, Report, RunningMax};
use crate::history::{ClientId, History, Operation};

/// Revision monotonicity and uniqueness; see the module docs.
pub fn check_revisions(history: &History) -> Report {
    let ok: Vec<(&Operation, i64)> = history
        .ops
        .iter()
        .filter(|o| o.result().is_some_and(|r| r.matches(&o.op)))
        .filter_map(|o| Some((o, o.revision()?)))
        .collect();
    let mut anomalies = Vec::new();
    let backwards = |op: &Operation, rev: i64, earlier: &Operation, earlier_rev: i64, how: &str| Anomaly {
        kind: AnomalyKind::RevisionWentBackwards,
        key: Some(op.op.key().to_string()),
        ops: vec![op.id, earlier.id],
        message: format!(
            "{} (client {}) has header revision {rev}, below revision {earlier_rev} of {} (client {}) {how}",
            describe(op),
            op.client,
            describe(earlier),
            earlier.client
        ),
    };

    // Per client, in completion order.
    let mut by_client: BTreeMap<ClientId, Vec<(&Operation, i64)>> = BTreeMap::new();
    for &(op, rev) in &ok {
        by_client.entry(op.client).or_default().push((op, rev));
    }
    for ops in by_client.values_mut() {
        ops.sort_by_key(|(o, _)| (o.complete_ns, o.id));
        let mut max: Option<(&Operation, i64)> = None;
        for &(op, rev) in ops.iter() {
            match max {
                Some((m, mrev)) if rev < mrev => anomalies.push(backwards(op, rev, m, mrev, "which completed earlier")),
                _ => max = Some((op, rev)),
            }
        }
    }

    // In real time, across clients (pairs of one client were judged above).
    let by_id: HashMap<u64, &Operation> = ok.iter().map(|(o, _)| (o.id, *o)).collect();
    let completed = RunningMax::new(ok.iter().map(|(o, rev)| (o.complete_ns, *rev, o.id)).collect());
    for &(op, rev) in &ok {
        if let Some((mrev, mid)) = completed.before(op.invoke_ns) {
            let m = by_id[&mid];
            if mrev > rev && m.client != op.client {
                anomalies.push(backwards(op, rev, m, mrev, "which completed before it was invoked"));
            }
        }
    }

    // One revision per acknowledged write.
    let mut by_rev: BTreeMap<i64, Vec<&Operation>> = BTreeMap::new();
    for &(op, _) in &ok {
        if let Some((_, rev)) = acked_change(op) {
            by_rev.entry(rev).or_default().push(op);
        }
    }
    for (rev, ops) in by_rev.into_iter().filter(|(_, ops)| ops.len() > 1) {
        let ids: Vec<u64> = ops.iter().map(|o| o.id).collect();
        let shown: Vec<String> = ops.iter().take(4).map(|o| format!("{} on {:?}", describe(o), o.op.key())).collect();
        anomalies.push(Anomaly {
            kind: AnomalyKind::DuplicateApply,
            key: None,
            ops: ids.clone(),
            message: format!(
                "{} acknowledged writes ({}) report the same revision {rev}: {}",
                ids.len(),
                fmt_ids(&ids),
                shown.join("; ")
            ),
        });
    }
    Report::new(anomalies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{HistoryBuilder, Op, OpResult};
    use AnomalyKind::*;

    fn check(h: HistoryBuilder, expected: &[AnomalyKind]) -> Report {
        let report = check_revisions(&h.build());
        assert_eq!(report.kinds(), expected, "{report}");
        report
    }

    #[test]
    fn increasing_revisions_pass() {
        check(
            HistoryBuilder::new()
                .ok(1, Op::put("a", "1"), 0, 10, OpResult::put(2))
                .ok(2, Op::put("b", "2"), 5, 12, OpResult::put(3))
                // Concurrent with the put at revision 3: may report 2.
                .ok(3, Op::get("a"), 6, 8, OpResult::get(Some("1"), 2))
                .header(2)
                .ok(1, Op::get("b"), 13, 14, OpResult::get(Some("2"), 3))
                .header(3)
                // Reads without a header are skipped; failed and unknown ops carry no revision.
                .ok(3, Op::get("b"), 15, 16, OpResult::get(None, 0))
                .fail(2, Op::put("c", "x"), 15, 16)
                .unknown(2, Op::put("c", "y"), 17, 18)
                .ok(2, Op::cas("a", Some("0"), "z"), 19, 20, OpResult::cas(false, 3))
                .ok(2, Op::delete("zz"), 21, 22, OpResult::delete(0, 3))
                .ok(2, Op::read_set("s/"), 23, 24, OpResult::read_set(&[], 3)),
            &[],
        );
    }

    #[test]
    fn revision_going_backwards_for_a_client_is_rejected() {
        let r = check(
            HistoryBuilder::new()
                .ok(1, Op::put("a", "1"), 0, 10, OpResult::put(5))
                .ok(1, Op::get("b"), 11, 12, OpResult::get(None, 0))
                .header(4),
            &[RevisionWentBackwards],
        );
        assert_eq!(r.anomalies[0].ops, vec![1, 0]);
        // Even when the client's ops overlap, completion order counts.
        check(
            HistoryBuilder::new().ok(1, Op::put("a", "1"), 0, 10, OpResult::put(5)).ok(
                1,
                Op::put("b", "2"),
                1,
                11,
                OpResult::put(4),
            ),
            &[RevisionWentBackwards],
        );
    }

    #[test]
    fn revision_going_backwards_in_real_time_is_rejected() {
        let r = check(
            HistoryBuilder::new().ok(1, Op::put("a", "1"), 0, 10, OpResult::put(5)).ok(
                2,
                Op::read_set("s/"),
                11,
                12,
                OpResult::read_set(&[], 4),
            ),
            &[RevisionWentBackwards],
        );
        assert_eq!(r.anomalies[0].ops, vec![1, 0]);
    }

    #[test]
    fn same_revision_twice_is_a_duplicate_apply() {
        let r = check(
            HistoryBuilder::new()
                .ok(1, Op::put("a", "1"), 0, 10, OpResult::put(5))
                .ok(2, Op::append("s/", 7), 1, 10, OpResult::append(5))
                // Not writes: a failed comparison and a delete of nothing report the current revision.
                .ok(3, Op::cas("a", Some("0"), "z"), 11, 12, OpResult::cas(false, 5))
                .ok(3, Op::delete("b"), 13, 14, OpResult::delete(0, 5)),
            &[DuplicateApply],
        );
        assert_eq!(r.anomalies[0].ops, vec![0, 1]);
    }
}
