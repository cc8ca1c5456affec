//! etcd's watch guarantees, judged against the write history.
//!
//! etcd documents that watch events are *ordered* (by revision), *unique* (an event is never
//! delivered twice), *atomic* (the events of one revision are delivered together), *reliable*
//! (no event is skipped inside the range a watcher has received) and *resumable* (a watch
//! restarted at revision R gets exactly the events from R on). For each logical watcher, over
//! all its sessions in the order given:
//!
//! - ordered: revisions never decrease ([`AnomalyKind::WatchOutOfOrder`]);
//! - unique: no (revision, key) twice ([`AnomalyKind::WatchDuplicate`]);
//! - atomic: a revision's events arrive in one delivery, and a delivery holding a revision holds
//!   all its acknowledged writes on watched keys ([`AnomalyKind::WatchNotAtomic`]);
//! - reliable: within a session, from its start revision (or its first event, when started "from
//!   now") to the last revision it received, every acknowledged write on a watched key was
//!   received ([`AnomalyKind::WatchGap`]);
//! - resumable: no event below the session's start revision ([`AnomalyKind::WatchBeforeStart`]);
//! - every event is explained by a write ([`AnomalyKind::WatchFromNowhere`]): an acknowledged
//!   write at that revision, with that key, kind and value; or a write with unknown outcome whose
//!   revision is consistent (the same for all its events and all watchers, not taken by another
//!   write, above every revision acknowledged before it was invoked). Events must be on watched
//!   keys and not received before their write was invoked.
//!
//! An op's events are those of [`Op::writes`](crate::history::Op::writes). Not checked: events
//! after the last revision a watcher received (it may lag), progress notifications, and the
//! ranges between sessions (the harness chooses where a session resumes).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{acked_change, describe, fmt_ids, Anomaly, AnomalyKind, Report, RunningMax};
use crate::history::{EventKind, History, KeyWrite, Operation, Outcome, WatchEvent, WatchSession};

/// Watch guarantees of `sessions` against the writes of `history`; see the module docs.
pub fn check_watches(history: &History, sessions: &[WatchSession]) -> Report {
    let writes = Writes::new(history);
    let mut anomalies = Vec::new();
    let mut watchers: BTreeMap<u32, Vec<&WatchSession>> = BTreeMap::new();
    for s in sessions {
        watchers.entry(s.watcher).or_default().push(s);
    }
    let mut unknown = UnknownRevisions::default();
    for (watcher, sessions) in watchers {
        check_watcher(watcher, &sessions, &writes, &mut unknown, &mut anomalies);
    }
    Report::new(anomalies)
}

/// One key written by an acknowledged write.
struct Acked<'a> {
    revision: i64,
    write: KeyWrite,
    op: &'a Operation,
}

/// The write history, indexed for matching events.
struct Writes<'a> {
    /// Every key written by an acknowledged write, by revision.
    acked: Vec<Acked<'a>>,
    /// What a write op would write (any outcome) -> the ops, to explain events.
    by_content: HashMap<KeyWrite, Vec<&'a Operation>>,
    /// Header revisions of ok ops, by completion.
    completed: RunningMax,
}

impl<'a> Writes<'a> {
    fn new(history: &'a History) -> Writes<'a> {
        let ok = history.ops.iter().filter(|o| o.result().is_some_and(|r| r.matches(&o.op)));
        let mut w = Writes {
            acked: Vec::new(),
            by_content: HashMap::new(),
            completed: RunningMax::new(ok.filter_map(|o| Some((o.complete_ns, o.revision()?, o.id))).collect()),
        };
        for op in history.ops.iter().filter(|o| o.op.is_write()) {
            if op.result().is_some_and(|r| !r.matches(&op.op)) {
                continue;
            }
            let revision = acked_change(op).map(|(_, rev)| rev);
            for write in op.op.writes() {
                w.by_content.entry(write.clone()).or_default().push(op);
                if let Some(revision) = revision {
                    w.acked.push(Acked { revision, write, op });
                }
            }
        }
        w.acked.sort_by_key(|a| (a.revision, a.op.id));
        w
    }

    /// The acknowledged writes with revisions in `from..=to`.
    fn between(&self, from: i64, to: i64) -> &[Acked<'a>] {
        let lo = self.acked.partition_point(|a| a.revision < from);
        let hi = self.acked.partition_point(|a| a.revision <= to);
        &self.acked[lo..hi.max(lo)]
    }

    /// The acknowledged write that wrote `key` at `revision`, if any, for messages.
    fn writer(&self, revision: i64, key: &str) -> (Vec<u64>, String) {
        match self.between(revision, revision).iter().find(|a| a.write.key == key) {
            Some(a) => (vec![a.op.id], format!(" (written by {})", describe(a.op))),
            None => (Vec::new(), String::new()),
        }
    }

    /// Why no write explains `e`, if none does. `received_ns`: when the event arrived.
    fn unexplained(&self, e: &WatchEvent, received_ns: u64, unknown: &mut UnknownRevisions) -> Option<(String, Vec<u64>)> {
        let content = KeyWrite { kind: e.kind, key: e.key.clone(), value: (e.kind == EventKind::Put).then(|| e.value.clone()) };
        let at = self.between(e.mod_revision, e.mod_revision);
        if !at.is_empty() {
            let ids: Vec<u64> = at.iter().map(|a| a.op.id).collect();
            return match at.iter().find(|a| a.write.key == e.key) {
                Some(a) if a.write != content => Some((
                    format!("revision {} of that key was written by {} as {:?}", e.mod_revision, describe(a.op), a.write),
                    ids,
                )),
                Some(a) if a.op.invoke_ns > received_ns => {
                    Some((format!("it arrived at {received_ns} ns, before its write {} was invoked", describe(a.op)), ids))
                }
                Some(_) => None,
                None => {
                    Some((format!("revision {} belongs to {}, which did not write that key", e.mod_revision, fmt_ids(&ids)), ids))
                }
            };
        }
        let ops = self.by_content.get(&content).map(Vec::as_slice).unwrap_or_default();
        let candidates: Vec<&Operation> = ops.iter().copied().filter(|o| o.is_unknown() && o.invoke_ns < received_ns).collect();
        if candidates.is_empty() {
            let ids: Vec<u64> = ops.iter().map(|o| o.id).collect();
            let why = match ops.first() {
                None => "no write attempted it".to_string(),
                Some(op) => match (acked_change(op), &op.outcome) {
                    (Some((_, rev)), _) => format!("{} wrote it at revision {rev}", describe(op)),
                    (None, Outcome::Fail(_)) => format!("its write {} failed", describe(op)),
                    (None, Outcome::Unknown(_)) => {
                        format!("it arrived at {received_ns} ns, before its write {} was invoked", describe(op))
                    }
                    (None, Outcome::Ok(_)) => format!("its write {} did not change the store", describe(op)),
                },
            };
            return Some((why, ids));
        }
        // A write with unknown outcome: its revision must fit.
        let floor = |o: &Operation| self.completed.before(o.invoke_ns).filter(|(r, _)| *r >= e.mod_revision);
        let floors: Option<Vec<(i64, u64)>> = candidates.iter().map(|o| floor(o)).collect();
        if let Some(&[(r, id), ..]) = floors.as_deref() {
            let op = candidates[0];
            return Some((
                format!("its write {} (unknown outcome) was invoked after #{id} had completed at revision {r}", describe(op)),
                vec![op.id, id],
            ));
        }
        unknown.assign(e, &candidates)
    }
}

/// Revisions that watchers revealed for writes with unknown outcome, kept consistent across
/// events and watchers.
#[derive(Default)]
struct UnknownRevisions {
    /// (revision, key) -> the event first seen there.
    events: HashMap<(i64, String), WatchEvent>,
    /// op id -> its revision, and revision -> op id, for ops identified unambiguously.
    ops: HashMap<u64, i64>,
    owners: HashMap<i64, u64>,
}

impl UnknownRevisions {
    fn assign(&mut self, e: &WatchEvent, candidates: &[&Operation]) -> Option<(String, Vec<u64>)> {
        let first = self.events.entry((e.mod_revision, e.key.clone())).or_insert_with(|| e.clone());
        if first != e {
            return Some((format!("another watcher received {first:?} for the same revision and key"), Vec::new()));
        }
        if let [op] = candidates {
            let rev = *self.ops.entry(op.id).or_insert(e.mod_revision);
            if rev != e.mod_revision {
                return Some((
                    format!("its write {} (unknown outcome) was also seen at revision {rev}", describe(op)),
                    vec![op.id],
                ));
            }
            let owner = *self.owners.entry(rev).or_insert(op.id);
            if owner != op.id {
                return Some((
                    format!("its write {} (unknown outcome) has revision {rev}, as has #{owner}, another write", describe(op)),
                    vec![op.id, owner],
                ));
            }
        }
        None
    }
}

fn check_watcher(
    watcher: u32,
    sessions: &[&WatchSession],
    writes: &Writes,
    unknown: &mut UnknownRevisions,
    anomalies: &mut Vec<Anomaly>,
) {
    let mut seen: HashSet<(i64, &str)> = HashSet::new();
    // revision -> (session, delivery) where it was first received
    let mut delivered_in: HashMap<i64, (usize, usize)> = HashMap::new();
    let mut split: HashSet<i64> = HashSet::new();
    let mut max_rev = 0;
    for (si, s) in sessions.iter().enumerate() {
        let mut anomaly = |kind, ops: Vec<u64>, message: String| {
            anomalies.push(Anomaly {
                kind,
                key: Some(s.key_prefix.clone()),
                ops,
                message: format!(
                    "watcher {watcher} (prefix {:?}, session {si} from revision {}): {message}",
                    s.key_prefix, s.start_revision
                ),
            })
        };
        let watched = |key: &str| key.starts_with(&s.key_prefix);
        let mut first: Option<i64> = None;
        let mut last: Option<i64> = None;
        let mut compacted = 0;
        for (di, d) in s.deliveries.iter().enumerate() {
            compacted = compacted.max(d.compact_revision);
            for e in &d.events {
                let rev = e.mod_revision;
                let (ids, by) = writes.writer(rev, &e.key);
                if !watched(&e.key) {
                    anomaly(AnomalyKind::WatchFromNowhere, ids.clone(), format!("{e:?}{by} is outside the watched prefix"));
                }
                if !seen.insert((rev, e.key.as_str())) {
                    let when = if rev < s.start_revision { ", again after resuming past it" } else { "" };
                    anomaly(AnomalyKind::WatchDuplicate, ids, format!("{e:?}{by} received twice{when}"));
                    continue;
                }
                if let Some((why, ids)) = writes.unexplained(e, d.received_ns, unknown) {
                    anomaly(AnomalyKind::WatchFromNowhere, ids, format!("{e:?} is explained by no write: {why}"));
                }
                if s.start_revision > 0 && rev < s.start_revision {
                    anomaly(
                        AnomalyKind::WatchBeforeStart,
                        ids.clone(),
                        format!("{e:?}{by} is below the session's start revision"),
                    );
                } else if rev < max_rev {
                    anomaly(AnomalyKind::WatchOutOfOrder, ids.clone(), format!("{e:?}{by} arrived after revision {max_rev}"));
                }
                let at = *delivered_in.entry(rev).or_insert((si, di));
                if at != (si, di) && split.insert(rev) {
                    anomaly(
                        AnomalyKind::WatchNotAtomic,
                        ids.clone(),
                        format!(
                            "revision {rev}{by} is split over deliveries: session {} delivery {} and session {si} delivery {di}",
                            at.0, at.1
                        ),
                    );
                }
                max_rev = max_rev.max(rev);
                first.get_or_insert(rev);
                last = last.max(Some(rev));
            }
            // A delivery that holds a revision holds all of it (on watched keys).
            let mut revs: Vec<i64> = d.events.iter().map(|e| e.mod_revision).collect();
            revs.sort_unstable();
            revs.dedup();
            for rev in revs {
                let missing: Vec<&Acked> = writes
                    .between(rev, rev)
                    .iter()
                    .filter(|a| watched(&a.write.key) && !d.events.iter().any(|e| e.mod_revision == rev && e.key == a.write.key))
                    .collect();
                if !missing.is_empty() && split.insert(rev) {
                    let keys: Vec<&str> = missing.iter().map(|a| a.write.key.as_str()).collect();
                    anomaly(
                        AnomalyKind::WatchNotAtomic,
                        missing.iter().map(|a| a.op.id).collect(),
                        format!(
                            "delivery {di} holds only part of revision {rev}: it lacks {keys:?} written by {}",
                            describe(missing[0].op)
                        ),
                    );
                }
            }
        }
        // Reliable: nothing acknowledged is missing from the range this session covered.
        let (Some(first), Some(last)) = (first, last) else { continue };
        let from = if s.start_revision > 0 { s.start_revision } else { first }.max(compacted);
        let missing: Vec<&Acked> = writes
            .between(from, last)
            .iter()
            .filter(|a| watched(&a.write.key) && !seen.contains(&(a.revision, a.write.key.as_str())))
            .collect();
        if !missing.is_empty() {
            let ids: Vec<u64> = missing.iter().map(|a| a.op.id).collect();
            let shown: Vec<String> = missing.iter().take(5).map(|a| format!("{:?}@{}", a.write.key, a.revision)).collect();
            anomaly(
                AnomalyKind::WatchGap,
                ids.clone(),
                format!(
                    "received revisions {from}..={last} but missed {} acknowledged writes ({}): {}",
                    missing.len(),
                    fmt_ids(&ids),
                    shown.join(", ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{append_writes, HistoryBuilder, Op, OpResult};
    use AnomalyKind::*;

    fn check(h: &History, sessions: &[WatchSession], expected: &[AnomalyKind]) -> Report {
        let report = check_watches(h, sessions);
        assert_eq!(report.kinds(), expected, "{report}");
        report
    }

    /// a@2, b@3 (x/1), delete x/1 @4, an unknown put c on x/2, a failed put d, an append of 7
    /// to s/ @5 (two keys), a failed CAS.
    fn history() -> History {
        HistoryBuilder::new()
            .ok(1, Op::put("x/1", "a"), 0, 10, OpResult::put(2))
            .ok(2, Op::put("x/1", "b"), 11, 20, OpResult::put(3))
            .ok(1, Op::delete("x/1"), 21, 30, OpResult::delete(1, 4))
            .unknown(3, Op::put("x/2", "c"), 31, 40)
            .fail(4, Op::put("x/2", "d"), 31, 40)
            .ok(5, Op::append("s/", 7), 41, 50, OpResult::append(5))
            .ok(5, Op::cas("x/1", Some("zz"), "e"), 51, 60, OpResult::cas(false, 5))
            .build()
    }

    fn append_events(rev: i64) -> Vec<WatchEvent> {
        append_writes("s/", 7).iter().map(|(k, v)| WatchEvent::put(k, v, rev)).collect()
    }

    #[test]
    fn complete_ordered_watch_passes() {
        let h = history();
        // Everything, including the unknown write, which took effect at revision 6.
        let all = WatchSession::new(1, "", 1)
            .delivery(12, vec![WatchEvent::put("x/1", "a", 2)])
            .delivery(35, vec![WatchEvent::put("x/1", "b", 3), WatchEvent::delete("x/1", 4)])
            .delivery(55, append_events(5))
            .delivery(65, vec![WatchEvent::put("x/2", "c", 6)]);
        // Resumed after a reconnect, on a prefix.
        let resumed = [
            WatchSession::new(2, "x/", 2).delivery(12, vec![WatchEvent::put("x/1", "a", 2)]),
            WatchSession::new(2, "x/", 3).delivery(25, vec![WatchEvent::put("x/1", "b", 3), WatchEvent::delete("x/1", 4)]),
        ];
        // Started "from now", on the set's element keys only (not its "last" key).
        let now = WatchSession::new(3, "s/", 0).delivery(55, vec![append_events(5).remove(0)]);
        let mut sessions = vec![all, now];
        sessions.extend(resumed);
        check(&h, &sessions, &[]);
        // The unknown write never appearing is fine too.
        let s = WatchSession::new(1, "x/", 1).delivery(25, vec![WatchEvent::put("x/1", "a", 2), WatchEvent::put("x/1", "b", 3)]);
        check(&h, &[s], &[]);
    }

    #[test]
    fn out_of_order_event_is_rejected() {
        let s = WatchSession::new(1, "x/", 1)
            .delivery(25, vec![WatchEvent::put("x/1", "b", 3)])
            .delivery(26, vec![WatchEvent::put("x/1", "a", 2)]);
        check(&history(), &[s], &[WatchOutOfOrder]);
    }

    #[test]
    fn duplicate_event_is_rejected() {
        let s = WatchSession::new(1, "x/", 1)
            .delivery(12, vec![WatchEvent::put("x/1", "a", 2)])
            .delivery(25, vec![WatchEvent::put("x/1", "b", 3)])
            .delivery(26, vec![WatchEvent::put("x/1", "b", 3)]);
        check(&history(), &[s], &[WatchDuplicate]);
        // Redelivered by a session that resumed past it.
        let s = [
            WatchSession::new(1, "x/", 2).delivery(12, vec![WatchEvent::put("x/1", "a", 2)]),
            WatchSession::new(1, "x/", 3).delivery(25, vec![WatchEvent::put("x/1", "a", 2), WatchEvent::put("x/1", "b", 3)]),
        ];
        check(&history(), &s, &[WatchDuplicate]);
    }

    #[test]
    fn gap_is_rejected() {
        let s = WatchSession::new(1, "x/", 1)
            .delivery(12, vec![WatchEvent::put("x/1", "a", 2)])
            .delivery(25, vec![WatchEvent::delete("x/1", 4)]);
        let r = check(&history(), &[s], &[WatchGap]);
        assert_eq!(r.anomalies[0].ops, vec![1]);
        // Missing the first revision after the start.
        let s = WatchSession::new(1, "x/", 2).delivery(25, vec![WatchEvent::put("x/1", "b", 3)]);
        check(&history(), &[s], &[WatchGap]);
        // A session started "from now" is judged from its first event on.
        let s = WatchSession::new(1, "x/", 0).delivery(25, vec![WatchEvent::put("x/1", "b", 3)]);
        check(&history(), &[s], &[]);
    }

    #[test]
    fn non_atomic_delivery_is_rejected() {
        // The append's two keys share revision 5 but arrive in two deliveries.
        let mut events = append_events(5);
        let second = events.pop().unwrap();
        let s = WatchSession::new(1, "", 5).delivery(55, events.clone()).delivery(56, vec![second]);
        check(&history(), &[s], &[WatchNotAtomic]);
        // ... or one of them never arrives, while a later revision does.
        let h = HistoryBuilder::new()
            .ok(5, Op::append("s/", 7), 41, 50, OpResult::append(5))
            .ok(1, Op::put("x/1", "a"), 51, 60, OpResult::put(6))
            .build();
        let s = WatchSession::new(1, "", 5).delivery(55, events).delivery(61, vec![WatchEvent::put("x/1", "a", 6)]);
        check(&h, &[s], &[WatchGap, WatchNotAtomic]);
    }

    #[test]
    fn events_from_nowhere_are_rejected() {
        let h = history();
        let one = |e: WatchEvent| [WatchSession::new(1, "", 0).delivery(1000, vec![e])];
        // Never written; written by a failed put; wrong revision; wrong value; wrong kind;
        // revision of another key; a failed CAS's value.
        check(&h, &one(WatchEvent::put("x/9", "zz", 9)), &[WatchFromNowhere]);
        check(&h, &one(WatchEvent::put("x/2", "d", 9)), &[WatchFromNowhere]);
        check(&h, &one(WatchEvent::put("x/1", "a", 9)), &[WatchFromNowhere]);
        check(&h, &one(WatchEvent::put("x/1", "zz", 2)), &[WatchFromNowhere]);
        check(&h, &one(WatchEvent::delete("x/1", 3)), &[WatchFromNowhere]);
        // (Revision 2 was x/1's, so that delivery also lacks x/1@2.)
        check(&h, &one(WatchEvent::put("x/2", "c", 2)), &[WatchGap, WatchNotAtomic, WatchFromNowhere]);
        check(&h, &one(WatchEvent::put("x/1", "e", 9)), &[WatchFromNowhere]);
        // Outside the watched prefix.
        check(&h, &[WatchSession::new(1, "y/", 2).delivery(12, vec![WatchEvent::put("x/1", "a", 2)])], &[WatchFromNowhere]);
        // Received before the write was invoked.
        check(&h, &[WatchSession::new(1, "x/", 0).delivery(5, vec![WatchEvent::put("x/1", "b", 3)])], &[WatchFromNowhere]);
        // An unknown write at a revision below one acknowledged before it was invoked (the
        // delete at 4 completed at 30; the put was invoked at 31).
        check(&h, &one(WatchEvent::put("x/2", "c", 1)), &[WatchFromNowhere]);
        // The same unknown write at two revisions, seen by two watchers.
        let two = [
            WatchSession::new(1, "x/2", 0).delivery(100, vec![WatchEvent::put("x/2", "c", 6)]),
            WatchSession::new(2, "x/2", 0).delivery(100, vec![WatchEvent::put("x/2", "c", 7)]),
        ];
        check(&h, &two, &[WatchFromNowhere]);
        // Two unknown writes at one revision.
        let h = HistoryBuilder::new().unknown(1, Op::put("x/1", "a"), 0, 10).unknown(2, Op::put("x/2", "b"), 0, 10).build();
        let two =
            [WatchSession::new(1, "x/", 0).delivery(20, vec![WatchEvent::put("x/1", "a", 6), WatchEvent::put("x/2", "b", 6)])];
        check(&h, &two, &[WatchFromNowhere]);
    }

    #[test]
    fn resumed_session_must_not_go_below_its_start() {
        let h = history();
        let s = [
            WatchSession::new(1, "x/", 2).delivery(12, vec![WatchEvent::put("x/1", "a", 2)]),
            // Resumed at 4 (the harness had seen 3 before losing it, say) yet gets 3.
            WatchSession::new(1, "x/", 4).delivery(30, vec![WatchEvent::put("x/1", "b", 3), WatchEvent::delete("x/1", 4)]),
        ];
        check(&h, &s, &[WatchBeforeStart]);
    }
}
