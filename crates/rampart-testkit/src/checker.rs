//! The checkers: each judges a recorded [`History`] (and [`WatchSession`]s) and returns a
//! [`Report`] listing every [`Anomaly`] found, each naming the op ids involved.
//!
//! - [`check_linearizable`]: registers (Get/Put/Cas/Delete), per key, by a WGL search over a
//!   model of etcd's KV; plus direct stale-read and phantom-read checks.
//! - [`check_lost_writes`]: acknowledged writes missing from the final read of their key.
//! - [`check_revisions`]: header revisions never go backwards (per client and in real time);
//!   no two acknowledged writes share a revision.
//! - [`check_sets`]: append-only sets: no lost, phantom or duplicated elements, monotone reads.
//! - [`check_watches`]: etcd's watch guarantees: ordered, unique, atomic, reliable, resumable.
//! - [`check_well_formed`]: the history itself makes sense (results match their ops).
//! - [`check_all`]: all of the above.
//!
//! Every search is bounded by [`Limits`]; a search that runs out reports an
//! [`AnomalyKind::Inconclusive`] anomaly, so [`Report::conclusion`] is neither pass nor fail.
//!
//! Time: op A precedes op B in real time iff `A.complete_ns < B.invoke_ns`; ops whose intervals
//! touch are treated as concurrent. Unknown ops never complete. Failed ops never took effect.
//! Reads that failed or whose outcome is unknown constrain nothing.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::history::{History, Key, Op, OpResult, Operation, WatchSession};

mod linearizable;
mod lost;
mod revisions;
mod sets;
#[cfg(test)]
mod simulation;
mod watch;

pub use linearizable::check_linearizable;
pub use lost::check_lost_writes;
pub use revisions::check_revisions;
pub use sets::check_sets;
pub use watch::check_watches;

/// Bounds on the work a checker may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Model states the linearizability search may explore per key before it gives up and
    /// reports [`AnomalyKind::Inconclusive`] for that key.
    pub max_states: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_states: 1_000_000 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AnomalyKind {
    /// No order of the ops on a key explains what they returned.
    NotLinearizable,
    /// A read returned a state older than a write that completed before the read began.
    StaleRead,
    /// A read returned a value no write (that did not fail) wrote.
    PhantomRead,
    /// An acknowledged write is missing from the final state and nothing later overwrote it.
    LostWrite,
    /// A header revision lower than one already seen: by the same client, or by anyone before
    /// this op was invoked.
    RevisionWentBackwards,
    /// Two acknowledged writes with the same revision, or one set element read twice.
    DuplicateApply,
    /// A set read misses an element whose append was acknowledged before the read began or was
    /// applied at or below the read's revision.
    SetLostElement,
    /// A set read contains an element no append (that did not fail) added, or one appended at
    /// a revision above the read's.
    SetPhantomElement,
    /// A set read misses an element that a read which completed before it began had seen.
    SetNotMonotonic,
    /// A watcher received a revision lower than one it had already received.
    WatchOutOfOrder,
    /// A watcher received the same event (revision and key) twice.
    WatchDuplicate,
    /// A watcher missed an acknowledged write inside the revision range it has covered.
    WatchGap,
    /// The events of one revision were split over several deliveries, or some were left out.
    WatchNotAtomic,
    /// An event no write explains: no such write was attempted, it failed, it carries another
    /// revision, kind or value, or its key is outside the watched prefix.
    WatchFromNowhere,
    /// A session received an event below the revision it started at.
    WatchBeforeStart,
    /// The history itself is wrong (a result that does not match its op, time running
    /// backwards, duplicate op ids): a harness bug, not a store bug.
    MalformedHistory,
    /// A search ran out of its [`Limits`]: neither pass nor fail.
    Inconclusive,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    /// The register key, set prefix or watch prefix concerned, when there is one.
    pub key: Option<Key>,
    /// The op ids involved, the one at fault first (for a lost write: the lost write).
    pub ops: Vec<u64>,
    pub message: String,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// Pass, fail, or could not tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Conclusion {
    Pass,
    Fail,
    /// No anomaly found, but some search ran out of its limits.
    Inconclusive,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// True iff there are no anomalies (an inconclusive search counts as one).
    pub ok: bool,
    pub anomalies: Vec<Anomaly>,
}

impl Report {
    pub fn new(anomalies: Vec<Anomaly>) -> Report {
        Report { ok: anomalies.is_empty(), anomalies }
    }

    /// Fail if any real anomaly was found, else Inconclusive if a search ran out, else Pass.
    pub fn conclusion(&self) -> Conclusion {
        if self.anomalies.iter().any(|a| a.kind != AnomalyKind::Inconclusive) {
            Conclusion::Fail
        } else if self.anomalies.is_empty() {
            Conclusion::Pass
        } else {
            Conclusion::Inconclusive
        }
    }

    pub fn has(&self, kind: AnomalyKind) -> bool {
        self.anomalies.iter().any(|a| a.kind == kind)
    }

    /// The kinds found, sorted, each once.
    pub fn kinds(&self) -> Vec<AnomalyKind> {
        let mut kinds: Vec<AnomalyKind> = self.anomalies.iter().map(|a| a.kind).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    /// Acknowledged writes reported lost: distinct ops at fault in [`AnomalyKind::LostWrite`]
    /// anomalies (one per lost register write or set element).
    pub fn lost_acked_writes(&self) -> usize {
        let lost: HashSet<u64> =
            self.anomalies.iter().filter(|a| a.kind == AnomalyKind::LostWrite).filter_map(|a| a.ops.first().copied()).collect();
        lost.len()
    }

    pub fn merge(&mut self, other: Report) {
        self.anomalies.extend(other.anomalies);
        self.ok = self.anomalies.is_empty();
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {} anomalies", self.conclusion(), self.anomalies.len())?;
        for a in &self.anomalies {
            write!(f, "\n  {a}")?;
        }
        Ok(())
    }
}

/// Every checker, on one history and the watches recorded alongside it.
pub fn check_all(history: &History, watches: &[WatchSession], limits: &Limits) -> Report {
    let mut report = check_well_formed(history);
    report.merge(check_linearizable(history, limits));
    report.merge(check_lost_writes(history));
    report.merge(check_revisions(history));
    report.merge(check_sets(history));
    report.merge(check_watches(history, watches));
    report
}

/// The history makes sense: op ids are unique, every ok result has its op's shape, no op
/// completes before it was invoked, acknowledged writes report positive revisions. The other checkers
/// skip ops whose result does not match their op.
pub fn check_well_formed(history: &History) -> Report {
    let mut anomalies = Vec::new();
    let mut bad = |op: &Operation, what: String| {
        anomalies.push(Anomaly {
            kind: AnomalyKind::MalformedHistory,
            key: Some(op.op.key().to_string()),
            ops: vec![op.id],
            message: format!("op #{} ({:?}): {what}", op.id, op.op),
        })
    };
    let mut ids = HashSet::new();
    for op in &history.ops {
        if !ids.insert(op.id) {
            bad(op, "op id used twice".into());
        }
        if op.complete_ns < op.invoke_ns {
            bad(op, format!("completed at {} ns, before its invocation at {} ns", op.complete_ns, op.invoke_ns));
        }
        if let Some(r) = op.result() {
            if !r.matches(&op.op) {
                bad(op, format!("result {r:?} does not match the op"));
            } else if let Some((_, rev @ ..=0)) = acked_change(op) {
                bad(op, format!("acknowledged write with revision {rev}"));
            }
        }
    }
    Report::new(anomalies)
}

/// What an acknowledged op did to the store, when it changed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change<'a> {
    Put(&'a str),
    Delete,
    Append(u64),
}

/// The change an ok op made and its revision: ok Put, succeeded Cas, Delete that deleted
/// something, Append. None for everything else (reads, failed comparisons, no-op deletes,
/// failed or unknown ops, malformed results).
fn acked_change(op: &Operation) -> Option<(Change<'_>, i64)> {
    match (&op.op, op.result()?) {
        (Op::Put { value, .. }, OpResult::Put { revision }) => Some((Change::Put(value), *revision)),
        (Op::Cas { value, .. }, OpResult::Cas { succeeded: true, revision }) => Some((Change::Put(value), *revision)),
        (Op::Delete { .. }, OpResult::Delete { deleted, revision }) if *deleted > 0 => Some((Change::Delete, *revision)),
        (Op::Append { element, .. }, OpResult::Append { revision }) => Some((Change::Append(*element), *revision)),
        _ => None,
    }
}

/// The final read of each key: its last ok read (Get or ReadSet, by invocation), provided it was
/// invoked after every acknowledged write op on the key had completed. The harness reads every
/// key once after healing all faults; a key without such a read has no final read.
fn final_reads(history: &History) -> HashMap<&str, &Operation> {
    let mut last_write_done: HashMap<&str, u64> = HashMap::new();
    let mut last_read: HashMap<&str, &Operation> = HashMap::new();
    for op in history.ops.iter().filter(|o| o.result().is_some_and(|r| r.matches(&o.op))) {
        let key = op.op.key();
        if op.op.is_write() {
            let t = last_write_done.entry(key).or_insert(0);
            *t = (*t).max(op.complete_ns);
        } else {
            let best = last_read.entry(key).or_insert(op);
            if op.invoke_ns > best.invoke_ns {
                *best = op;
            }
        }
    }
    last_read.retain(|key, read| last_write_done.get(key).is_none_or(|t| read.invoke_ns > *t));
    last_read
}

/// An op and what it returned, short, for messages: `#3 Put "a" -> rev 5`.
fn describe(op: &Operation) -> String {
    let what = match &op.op {
        Op::Get { .. } => "Get".to_string(),
        Op::Put { value, .. } => format!("Put {value:?}"),
        Op::Cas { expect, value, .. } => match expect {
            Some(e) => format!("Cas {e:?}->{value:?}"),
            None => format!("Cas absent->{value:?}"),
        },
        Op::Delete { .. } => "Delete".to_string(),
        Op::Append { element, .. } => format!("Append {element}"),
        Op::ReadSet { .. } => "ReadSet".to_string(),
    };
    let got = match (&op.outcome, op.result()) {
        (_, Some(OpResult::Get { value: Some(v), mod_revision })) => format!("{v:?}@{mod_revision}"),
        (_, Some(OpResult::Get { value: None, .. })) => "absent".to_string(),
        (_, Some(OpResult::Cas { succeeded, revision })) => {
            format!("{} rev {revision}", if *succeeded { "succeeded" } else { "failed" })
        }
        (_, Some(OpResult::Delete { deleted, revision })) => format!("deleted {deleted} rev {revision}"),
        (_, Some(OpResult::ReadSet { elements, revision })) => format!("{} elements rev {revision}", elements.len()),
        (_, Some(r)) => format!("rev {}", r.revision().unwrap_or_default()),
        (crate::history::Outcome::Fail(_), None) => "failed".to_string(),
        (_, None) => "unknown".to_string(),
    };
    format!("#{} {what} -> {got}", op.id)
}

/// Op ids for a message: `#1, #2, #3` or `#1, #2, ... (12 in all)`.
fn fmt_ids(ids: &[u64]) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<String> = ids.iter().take(SHOWN).map(|id| format!("#{id}")).collect();
    if ids.len() > SHOWN {
        s.push(format!("... ({} in all)", ids.len()));
    }
    s.join(", ")
}

/// For real-time questions ("the highest revision among ops that completed before t?"): items
/// `(time, number, op id)` sorted by time, with the running maximum of the number and the op
/// that holds it.
struct RunningMax {
    times: Vec<u64>,
    /// `max[i]`: the largest number among the first `i + 1` items, and its op id.
    max: Vec<(i64, u64)>,
}

impl RunningMax {
    fn new(mut items: Vec<(u64, i64, u64)>) -> RunningMax {
        items.sort_by_key(|&(time, _, id)| (time, id));
        let mut max: Vec<(i64, u64)> = Vec::with_capacity(items.len());
        for &(_, n, id) in &items {
            let prev = max.last().copied();
            max.push(match prev {
                Some(p) if p.0 >= n => p,
                _ => (n, id),
            });
        }
        RunningMax { times: items.iter().map(|i| i.0).collect(), max }
    }

    /// The largest number among items strictly before `t`, with its op id.
    fn before(&self, t: u64) -> Option<(i64, u64)> {
        let n = self.times.partition_point(|&c| c < t);
        n.checked_sub(1).map(|i| self.max[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::HistoryBuilder;

    #[test]
    fn report_conclusions() {
        let a = |kind| Anomaly { kind, key: None, ops: vec![1], message: String::new() };
        assert_eq!(Report::new(vec![]).conclusion(), Conclusion::Pass);
        assert_eq!(Report::new(vec![a(AnomalyKind::Inconclusive)]).conclusion(), Conclusion::Inconclusive);
        let r = Report::new(vec![a(AnomalyKind::Inconclusive), a(AnomalyKind::LostWrite)]);
        assert_eq!(r.conclusion(), Conclusion::Fail);
        assert!(!r.ok);
        assert_eq!(r.lost_acked_writes(), 1);
    }

    #[test]
    fn malformed_histories_are_reported() {
        let h = HistoryBuilder::new()
            .ok(1, Op::put("k", "a"), 0, 10, OpResult::get(None, 0))
            .ok(1, Op::put("k", "b"), 20, 10, OpResult::put(3))
            .ok(1, Op::put("k", "c"), 30, 40, OpResult::put(0))
            .build();
        let r = check_well_formed(&h);
        assert_eq!(r.anomalies.len(), 3, "{r}");
        assert!(r.anomalies.iter().all(|a| a.kind == AnomalyKind::MalformedHistory));
        // The other checkers skip the op with the wrong result shape instead of panicking.
        let r = check_all(&h, &[], &Limits::default());
        assert!(r.has(AnomalyKind::MalformedHistory));
    }

    #[test]
    fn final_read_must_follow_every_acknowledged_write() {
        let h = HistoryBuilder::new()
            .ok(1, Op::put("k", "a"), 0, 10, OpResult::put(2))
            .ok(2, Op::get("k"), 5, 8, OpResult::get(None, 0))
            .ok(3, Op::put("j", "b"), 0, 100, OpResult::put(3))
            .ok(2, Op::get("j"), 50, 60, OpResult::get(None, 0))
            .unknown(1, Op::put("k", "c"), 11, 1000)
            .ok(2, Op::get("k"), 20, 30, OpResult::get(Some("a"), 2))
            .build();
        let finals = final_reads(&h);
        assert_eq!(finals.get("k").map(|o| o.id), Some(5));
        assert!(!finals.contains_key("j"));
    }

    #[test]
    fn json_round_trip() {
        let h = HistoryBuilder::new()
            .ok(1, Op::cas("k", None, "a"), 0, 10, OpResult::cas(true, 2))
            .unknown(2, Op::append("s/", 7), 1, 2)
            .build();
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<History>(&json).unwrap(), h);
    }
}
