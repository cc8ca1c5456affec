//! Append-only sets: Append adds an element (unique per append) to the set under a prefix in one
//! txn, ReadSet reads the whole set with one range. For every ok ReadSet at header revision r:
//!
//! - no element appears twice ([`AnomalyKind::DuplicateApply`]);
//! - every element was attempted by an Append that did not fail, and none was applied at a
//!   revision above r ([`AnomalyKind::SetPhantomElement`]);
//! - it has every element whose Append was acknowledged before the read was invoked, or was
//!   applied at a revision <= r ([`AnomalyKind::SetLostElement`]);
//! - it has every element seen by any read that completed before it was invoked
//!   ([`AnomalyKind::SetNotMonotonic`]). This covers appends with unknown outcome: once seen,
//!   an element must stay.
//!
//! Not checked: whether a read at revision r is exactly the state at r when appends with
//! unknown outcome are involved (their revision is unknown).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{describe, fmt_ids, Anomaly, AnomalyKind, Report};
use crate::history::{History, Op, OpResult, Operation};

/// Append-only set properties; see the module docs.
pub fn check_sets(history: &History) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in &history.ops {
        if matches!(op.op, Op::Append { .. } | Op::ReadSet { .. }) {
            by_key.entry(op.op.key()).or_default().push(op);
        }
    }
    let mut anomalies = Vec::new();
    for (key, ops) in by_key {
        check_set(key, &ops, &mut anomalies);
    }
    Report::new(anomalies)
}

struct Read<'a> {
    op: &'a Operation,
    revision: i64,
    elements: &'a [u64],
    set: HashSet<u64>,
}

fn check_set(key: &str, ops: &[&Operation], anomalies: &mut Vec<Anomaly>) {
    // element -> the appends that tried to add it
    let mut attempts: HashMap<u64, Vec<&Operation>> = HashMap::new();
    // (completion, revision, element, op) of acknowledged appends
    let mut acked: Vec<(u64, i64, u64, u64)> = Vec::new();
    let mut reads: Vec<Read> = Vec::new();
    for op in ops {
        match (&op.op, op.result()) {
            (Op::Append { element, .. }, result) => {
                attempts.entry(*element).or_default().push(op);
                if let Some(OpResult::Append { revision }) = result {
                    acked.push((op.complete_ns, *revision, *element, op.id));
                }
            }
            (Op::ReadSet { .. }, Some(OpResult::ReadSet { elements, revision })) => {
                let set = elements.iter().copied().collect();
                reads.push(Read { op, revision: op.header_revision.unwrap_or(*revision), elements, set });
            }
            _ => {}
        }
    }
    // element -> the earliest revision an attempt may have been applied at; unknown outcomes
    // count as revision 0 (any time). Elements whose appends all failed are absent.
    let mut earliest: HashMap<u64, i64> = HashMap::new();
    for (e, tries) in &attempts {
        let revs = tries.iter().filter(|o| !o.is_fail()).map(|o| match o.result() {
            Some(OpResult::Append { revision }) => *revision,
            _ => 0,
        });
        if let Some(rev) = revs.min() {
            earliest.insert(*e, rev);
        }
    }
    let mut completes: Vec<u64> = acked.iter().map(|a| a.0).collect();
    completes.sort_unstable();
    let mut revisions: Vec<i64> = acked.iter().map(|a| a.1).collect();
    revisions.sort_unstable();
    let acked_by_element: HashMap<u64, (u64, i64)> = acked.iter().map(|&(complete, rev, e, _)| (e, (complete, rev))).collect();
    let mut anomaly = |kind, ops: Vec<u64>, message: String| {
        anomalies.push(Anomaly { kind, key: Some(key.to_string()), ops, message: format!("set {key:?}: {message}") })
    };

    for read in &reads {
        // Duplicates.
        if read.set.len() < read.elements.len() {
            let mut seen = HashSet::new();
            let mut dups: Vec<u64> = read.elements.iter().copied().filter(|e| !seen.insert(*e)).collect();
            dups.sort_unstable();
            dups.dedup();
            let mut ids = vec![read.op.id];
            ids.extend(dups.iter().flat_map(|e| attempts.get(e).into_iter().flatten().map(|o| o.id)));
            anomaly(
                AnomalyKind::DuplicateApply,
                ids,
                format!("{} contains elements more than once: {dups:?} (an append applied twice)", describe(read.op)),
            );
        }

        // Phantoms: never attempted, failed, or applied above the read's revision.
        for &e in &read.set {
            let applied_at = earliest.get(&e).copied();
            if applied_at.is_some_and(|rev| rev <= read.revision) {
                continue;
            }
            let tries = attempts.get(&e).map(Vec::as_slice).unwrap_or_default();
            let why = match (tries.first(), applied_at) {
                (None, _) => "no append attempted it".to_string(),
                (Some(first), None) => format!("its append {} failed", describe(first)),
                (Some(first), Some(rev)) => {
                    let op = tries.iter().find(|o| o.is_ok()).unwrap_or(first);
                    format!(
                        "its append {} was applied at revision {rev}, after the read's revision {}",
                        describe(op),
                        read.revision
                    )
                }
            };
            let mut ids = vec![read.op.id];
            ids.extend(tries.iter().map(|o| o.id));
            anomaly(AnomalyKind::SetPhantomElement, ids, format!("{} contains element {e}, but {why}", describe(read.op)));
        }

        // Lost: acknowledged before the read began, or applied at or below its revision. Reads
        // list whole sets, so first compare counts, in time linear in the read's size.
        let required =
            (completes.partition_point(|c| *c < read.op.invoke_ns), revisions.partition_point(|r| *r <= read.revision));
        let present = read.set.iter().filter_map(|e| acked_by_element.get(e)).fold((0, 0), |(n, m), (complete, rev)| {
            (n + (*complete < read.op.invoke_ns) as usize, m + (*rev <= read.revision) as usize)
        });
        if present == required {
            continue;
        }
        let missing: Vec<&(u64, i64, u64, u64)> = acked
            .iter()
            .filter(|(complete, rev, e, _)| (*complete < read.op.invoke_ns || *rev <= read.revision) && !read.set.contains(e))
            .collect();
        if !missing.is_empty() {
            let mut ids = vec![read.op.id];
            ids.extend(missing.iter().map(|m| m.3));
            let shown: Vec<String> = missing
                .iter()
                .take(8)
                .map(|(complete, rev, e, id)| {
                    if *rev <= read.revision {
                        format!("{e} (#{id}, applied at revision {rev} <= {})", read.revision)
                    } else {
                        format!("{e} (#{id}, acknowledged at {complete} ns, before the read began)")
                    }
                })
                .collect();
            anomaly(
                AnomalyKind::SetLostElement,
                ids,
                format!("{} misses {} acknowledged elements: {}", describe(read.op), missing.len(), shown.join(", ")),
            );
        }
    }

    // Monotone in real time: a read sees everything any read that completed before it saw.
    let mut by_invoke: Vec<&Read> = reads.iter().collect();
    by_invoke.sort_by_key(|r| (r.op.invoke_ns, r.op.id));
    let mut by_complete: Vec<&Read> = reads.iter().collect();
    by_complete.sort_by_key(|r| (r.op.complete_ns, r.op.id));
    // element -> the first read (by completion) that saw it
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut done = 0;
    for read in by_invoke {
        while done < by_complete.len() && by_complete[done].op.complete_ns < read.op.invoke_ns {
            for &e in by_complete[done].elements {
                seen.entry(e).or_insert(by_complete[done].op.id);
            }
            done += 1;
        }
        if read.set.iter().filter(|e| seen.contains_key(e)).count() == seen.len() {
            continue;
        }
        let mut missing: Vec<(u64, u64)> = seen.iter().filter(|(e, _)| !read.set.contains(e)).map(|(e, r)| (*e, *r)).collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            let mut earlier: Vec<u64> = missing.iter().map(|m| m.1).collect();
            earlier.sort_unstable();
            earlier.dedup();
            let mut ids = vec![read.op.id];
            ids.extend(&earlier);
            let elements: Vec<u64> = missing.iter().take(8).map(|m| m.0).collect();
            anomaly(
                AnomalyKind::SetNotMonotonic,
                ids,
                format!(
                    "{} misses {} elements that earlier reads ({}) had seen, e.g. {elements:?}",
                    describe(read.op),
                    missing.len(),
                    fmt_ids(&earlier)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::HistoryBuilder;
    use AnomalyKind::*;

    fn check(h: HistoryBuilder, expected: &[AnomalyKind]) -> Report {
        let report = check_sets(&h.build());
        assert_eq!(report.kinds(), expected, "{report}");
        report
    }

    /// Appends of 1 (rev 2), 2 (rev 3, unknown to the client), 3 (rev 4), and 4 which failed.
    fn appends() -> HistoryBuilder {
        HistoryBuilder::new()
            .ok(1, Op::append("s/", 1), 0, 10, OpResult::append(2))
            .unknown(2, Op::append("s/", 2), 0, 10)
            .ok(3, Op::append("s/", 3), 5, 20, OpResult::append(4))
            .fail(4, Op::append("s/", 4), 5, 6)
    }

    #[test]
    fn valid_set_reads_pass() {
        check(
            appends()
                // Concurrent with the appends: any consistent subset.
                .ok(5, Op::read_set("s/"), 1, 2, OpResult::read_set(&[], 1))
                .ok(6, Op::read_set("s/"), 11, 12, OpResult::read_set(&[1], 2))
                .ok(5, Op::read_set("s/"), 13, 14, OpResult::read_set(&[1, 2], 3))
                .ok(6, Op::read_set("s/"), 21, 22, OpResult::read_set(&[1, 2, 3], 4))
                // Elements are not in order necessarily.
                .ok(5, Op::read_set("s/"), 23, 24, OpResult::read_set(&[3, 1, 2], 4))
                .fail(5, Op::read_set("s/"), 25, 26),
            &[],
        );
        // The unknown append never took effect.
        check(appends().ok(6, Op::read_set("s/"), 21, 22, OpResult::read_set(&[1, 3], 4)), &[]);
    }

    #[test]
    fn duplicated_element_is_a_duplicate_apply() {
        let r = check(appends().ok(6, Op::read_set("s/"), 21, 22, OpResult::read_set(&[1, 3, 1], 4)), &[DuplicateApply]);
        assert_eq!(r.anomalies[0].ops, vec![4, 0]);
    }

    #[test]
    fn phantom_elements_are_rejected() {
        // Never attempted.
        check(appends().ok(6, Op::read_set("s/"), 21, 22, OpResult::read_set(&[1, 3, 9], 4)), &[SetPhantomElement]);
        // Its append failed.
        check(appends().ok(6, Op::read_set("s/"), 21, 22, OpResult::read_set(&[1, 3, 4], 4)), &[SetPhantomElement]);
        // Applied at revision 4, read at revision 3.
        check(appends().ok(6, Op::read_set("s/"), 6, 7, OpResult::read_set(&[3], 3)), &[SetLostElement, SetPhantomElement]);
    }

    #[test]
    fn lost_elements_are_rejected() {
        // 1 was acknowledged before the read began.
        let r = check(appends().ok(6, Op::read_set("s/"), 11, 12, OpResult::read_set(&[], 1)), &[SetLostElement]);
        assert_eq!(r.anomalies[0].ops, vec![4, 0]);
        // 3 was applied at revision 4 <= the read's revision, even though the read was concurrent.
        check(appends().ok(6, Op::read_set("s/"), 6, 7, OpResult::read_set(&[1], 4)), &[SetLostElement]);
    }

    #[test]
    fn reads_must_be_monotone() {
        // The second read lost 2, which the first read (completed before it) had seen.
        let r = check(
            appends().ok(5, Op::read_set("s/"), 11, 12, OpResult::read_set(&[1, 2], 3)).ok(
                6,
                Op::read_set("s/"),
                13,
                14,
                OpResult::read_set(&[1], 3),
            ),
            &[SetNotMonotonic],
        );
        assert_eq!(r.anomalies[0].ops, vec![5, 4]);
        // Concurrent reads may disagree.
        check(
            appends().ok(5, Op::read_set("s/"), 11, 14, OpResult::read_set(&[1, 2], 3)).ok(
                6,
                Op::read_set("s/"),
                13,
                15,
                OpResult::read_set(&[1], 2),
            ),
            &[],
        );
    }
}
