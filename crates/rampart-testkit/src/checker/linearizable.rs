//! Linearizability of single-key registers (Get, Put, Cas, Delete), one key at a time.
//!
//! Linearizability is compositional: a history is linearizable iff its restriction to each key
//! is, so each key is searched on its own. The search is Wing & Gong's, with Lowe's
//! just-in-time linearization and memoization (as in Porcupine): walk the invocation and
//! completion events in time order, linearize a pending op whenever the model accepts it, and
//! backtrack when an op's completion is reached before it could be linearized. A configuration
//! already explored is never explored again.
//!
//! The model of one key is etcd's: a value (or absent) and the revision of the last write to
//! the key. Revisions are cluster-wide, so along a key's linearization each write's revision is
//! strictly greater than the previous one, and a Get returns exactly the current value and
//! mod_revision (0 when absent). A write with unknown outcome may take effect at any time after
//! its invocation, or never; its revision is then unknown, only bounded below, and a later Get
//! that reads it fixes it.
//!
//! Writes with unknown outcome are what makes such searches blow up (each may or may not take
//! effect, anywhere after its invocation), so the search narrows them down without losing any
//! linearization, each rule an exchange argument (and `search_agrees_with_brute_force` checks
//! the result against plain enumeration):
//! - one whose value was seen (read by a Get, or compared by a Cas that succeeded) did take
//!   effect, before the first such read completed: it gets that as a deadline, like an ok op;
//! - values nobody saw cannot be told apart, so they are one value to the model;
//! - the remaining, optional ones are grouped by kind (same step): within a kind they are
//!   interchangeable, so only the earliest-invoked pending one is ever tried;
//! - an optional op is applied only right before an op it enables (one that could not take
//!   effect before it and can after);
//! - a configuration is skipped when an explored one covers it: the same ops with a deadline
//!   linearized, the same value, a subset of the optional ops applied, and a revision bound at
//!   most as high.
//!
//! Besides the search, two direct checks name the common failures precisely: a read older than
//! a write (or another read) that completed before it ([`AnomalyKind::StaleRead`]), and a read of
//! a value nobody wrote ([`AnomalyKind::PhantomRead`]). Both imply non-linearizability; they are
//! reported in addition to it.
//!
//! Not checked here: ordering across keys (see `check_revisions`), sets (`check_sets`).
//! Assumes the store was empty at the first op, and that every write writes a unique value.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{describe, Anomaly, AnomalyKind, Limits, Report};
use crate::history::{History, Op, OpResult, Operation, Outcome};

/// Linearizability of the register ops of `history`, key by key; see the module docs.
pub fn check_linearizable(history: &History, limits: &Limits) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in &history.ops {
        if matches!(op.op, Op::Get { .. } | Op::Put { .. } | Op::Cas { .. } | Op::Delete { .. }) {
            by_key.entry(op.op.key()).or_default().push(op);
        }
    }
    let mut anomalies = Vec::new();
    for (key, ops) in by_key {
        anomalies.extend(phantom_reads(key, &ops));
        anomalies.extend(stale_reads(key, &ops));
        anomalies.extend(search_key(key, &ops, limits));
    }
    Report::new(anomalies)
}

/// The revision of the key's last write, known exactly or only bounded below (after a write
/// whose outcome is unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Rev {
    Known(i64),
    AtLeast(i64),
}

impl Rev {
    /// The smallest revision it can be. "x > rev is possible" iff x > floor, and so on.
    fn floor(self) -> i64 {
        match self {
            Rev::Known(r) | Rev::AtLeast(r) => r,
        }
    }

    /// Whether every continuation possible from `other` is possible from `self`.
    fn covers(self, other: Rev) -> bool {
        match self {
            Rev::AtLeast(floor) => floor <= other.floor(),
            Rev::Known(_) => self == other,
        }
    }

    /// The revision of a write applied after this one, whose revision nobody saw.
    fn after(self) -> Rev {
        Rev::AtLeast(self.floor() + 1)
    }
}

/// The model of one key. Values are interned per key (`u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct State {
    value: Option<u32>,
    rev: Rev,
}

const EMPTY: State = State { value: None, rev: Rev::Known(0) };

/// An op as the model sees it. A `None` revision means the outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    Get { value: Option<u32>, mod_revision: i64 },
    Put { value: u32, revision: Option<i64> },
    Cas { expect: Option<u32>, value: u32, result: Said },
    Delete { result: Said },
}

/// What a Cas or Delete returned, as far as the model knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Said {
    /// Ok: whether it changed the key (the comparison held, the key existed), and the header
    /// revision.
    Ok(bool, i64),
    /// Unknown outcome, but it did change the key: a later read saw its value.
    Changed,
    /// Unknown outcome.
    Unknown,
}

/// The state after `step` is applied in `s`, or None if the result it returned is impossible
/// there.
fn apply(s: State, step: Step) -> Option<State> {
    match step {
        Step::Get { value: None, mod_revision } => (s.value.is_none() && mod_revision == 0).then_some(s),
        Step::Get { value: Some(v), mod_revision } => {
            if s.value != Some(v) {
                return None;
            }
            match s.rev {
                Rev::Known(r) => (r == mod_revision).then_some(s),
                Rev::AtLeast(r) => (mod_revision >= r).then_some(State { value: s.value, rev: Rev::Known(mod_revision) }),
            }
        }
        Step::Put { value, revision: Some(r) } => (r > s.rev.floor()).then_some(State { value: Some(value), rev: Rev::Known(r) }),
        Step::Put { value, revision: None } => Some(State { value: Some(value), rev: s.rev.after() }),
        Step::Cas { expect, value, result } => {
            let holds = s.value == expect;
            match result {
                Said::Ok(true, r) => (holds && r > s.rev.floor()).then_some(State { value: Some(value), rev: Rev::Known(r) }),
                // A header revision is at least the revision of every key's last write.
                Said::Ok(false, r) => (!holds && r >= s.rev.floor()).then_some(s),
                Said::Changed | Said::Unknown if holds => Some(State { value: Some(value), rev: s.rev.after() }),
                Said::Changed => None,
                Said::Unknown => Some(s),
            }
        }
        Step::Delete { result } => {
            let present = s.value.is_some();
            match result {
                Said::Ok(true, r) => (present && r > s.rev.floor()).then_some(State { value: None, rev: Rev::Known(r) }),
                Said::Ok(false, r) => (!present && r >= s.rev.floor()).then_some(s),
                Said::Changed | Said::Unknown if present => Some(State { value: None, rev: s.rev.after() }),
                Said::Changed => None,
                Said::Unknown => Some(s),
            }
        }
    }
}

struct RegOp<'a> {
    op: &'a Operation,
    /// When it must have taken effect by: its completion, or for an unknown write whose value
    /// was seen, when it was first seen. None: optional (unknown outcome, value never seen).
    complete: Option<u64>,
    step: Step,
}

/// Values of one key, numbered. Values that no Get returned and no Cas compared against cannot
/// be told apart by any op, so they all share one number, [`UNREAD`]: states that differ only
/// in such values are one state to the search.
struct Interner<'a> {
    ids: HashMap<&'a str, u32>,
    values: Vec<&'a str>,
    /// None: number every value (for tests that check the search against brute force).
    observed: Option<HashSet<&'a str>>,
}

const UNREAD: u32 = u32::MAX;

impl<'a> Interner<'a> {
    fn new(ops: &[&'a Operation]) -> Interner<'a> {
        let mut observed = HashSet::new();
        for op in ops {
            match (&op.op, op.result()) {
                (Op::Cas { expect: Some(e), .. }, _) => observed.insert(e.as_str()),
                (_, Some(OpResult::Get { value: Some(v), .. })) => observed.insert(v.as_str()),
                _ => false,
            };
        }
        Interner { ids: HashMap::new(), values: Vec::new(), observed: Some(observed) }
    }

    #[cfg(test)]
    fn plain() -> Interner<'a> {
        Interner { ids: HashMap::new(), values: Vec::new(), observed: None }
    }

    /// The number of a value some op observed.
    fn id(&mut self, v: &'a str) -> u32 {
        *self.ids.entry(v).or_insert_with(|| {
            self.values.push(v);
            (self.values.len() - 1) as u32
        })
    }

    /// The number of a written value.
    fn written(&mut self, v: &'a str) -> u32 {
        match &self.observed {
            Some(observed) if !observed.contains(v) => UNREAD,
            _ => self.id(v),
        }
    }

    fn show(&self, s: State) -> String {
        let value = match s.value {
            Some(UNREAD) => "a value no read returned".to_string(),
            Some(v) => format!("{:?}", self.values[v as usize]),
            None => "absent".to_string(),
        };
        match s.rev {
            Rev::Known(r) => format!("{value} (last write at revision {r})"),
            Rev::AtLeast(r) => format!("{value} (last write at revision >= {r})"),
        }
    }
}

/// The model's view of an op, or None if it cannot constrain anything: failed ops never took
/// effect, reads without a result say nothing, malformed results are reported elsewhere.
fn to_step<'a>(op: &'a Operation, values: &mut Interner<'a>) -> Option<Step> {
    let result = match &op.outcome {
        Outcome::Fail(_) => return None,
        Outcome::Unknown(_) => None,
        Outcome::Ok(r) => Some(r),
    };
    Some(match (&op.op, result) {
        (Op::Get { .. }, Some(OpResult::Get { value, mod_revision })) => {
            Step::Get { value: value.as_deref().map(|v| values.id(v)), mod_revision: *mod_revision }
        }
        (Op::Get { .. }, _) => return None,
        (Op::Put { value, .. }, Some(OpResult::Put { revision })) => {
            Step::Put { value: values.written(value), revision: Some(*revision) }
        }
        (Op::Put { value, .. }, None) => Step::Put { value: values.written(value), revision: None },
        (Op::Cas { expect, value, .. }, r) => {
            let result = match r {
                Some(OpResult::Cas { succeeded, revision }) => Said::Ok(*succeeded, *revision),
                Some(_) => return None,
                None => Said::Unknown,
            };
            Step::Cas { expect: expect.as_deref().map(|v| values.id(v)), value: values.written(value), result }
        }
        (Op::Delete { .. }, Some(OpResult::Delete { deleted, revision })) => {
            Step::Delete { result: Said::Ok(*deleted > 0, *revision) }
        }
        (Op::Delete { .. }, None) => Step::Delete { result: Said::Unknown },
        _ => return None,
    })
}

enum Verdict {
    Linearizable,
    /// The deepest point the search reached before it had to give up on every order.
    NotLinearizable(Stuck),
    GaveUp,
}

struct Stuck {
    /// Ops linearized at that point, in order (indices).
    order: Vec<usize>,
    state: State,
    /// The op whose deadline was reached before it could be linearized.
    blocked: usize,
    /// Ops pending at that point (invoked, not linearized), which all failed to go next.
    pending: Vec<usize>,
}

/// The ops of one key as the search takes them. An op must be linearized before it completed.
/// So must a write with unknown outcome whose value was seen (by a Get, or by a Cas whose
/// comparison against it succeeded, or by a Cas with unknown outcome that must have succeeded
/// because its own value was seen): it did take effect, before the first of those completed,
/// which becomes its deadline. Ops with a deadline come first, by invocation, then the others.
fn prepare<'a>(ops: &[&'a Operation], values: &mut Interner<'a>) -> Vec<RegOp<'a>> {
    // value -> when it had been seen by
    let mut seen_by: HashMap<&str, u64> = HashMap::new();
    // Records that `value` was seen by `t`; true if that is news.
    let see = |seen_by: &mut HashMap<&'a str, u64>, value: &'a str, t: u64| match seen_by.get_mut(value) {
        Some(d) if *d <= t => false,
        Some(d) => {
            *d = t;
            true
        }
        None => {
            seen_by.insert(value, t);
            true
        }
    };
    for op in ops {
        let seen = match (&op.op, op.result()) {
            (_, Some(OpResult::Get { value: Some(v), .. })) => v,
            (Op::Cas { expect: Some(e), .. }, Some(OpResult::Cas { succeeded: true, .. })) => e,
            _ => continue,
        };
        see(&mut seen_by, seen, op.complete_ns);
    }
    // An unknown Cas whose value was seen by t saw its expected value before t.
    let chained: Vec<(&str, &str)> = ops
        .iter()
        .filter(|op| op.is_unknown())
        .filter_map(|op| match &op.op {
            Op::Cas { expect: Some(e), value, .. } => Some((value.as_str(), e.as_str())),
            _ => None,
        })
        .collect();
    let mut changed = true;
    while changed {
        changed = false;
        for &(value, expect) in &chained {
            if let Some(&t) = seen_by.get(value) {
                changed |= see(&mut seen_by, expect, t);
            }
        }
    }
    let mut reg: Vec<RegOp> = ops
        .iter()
        .filter_map(|op| {
            let mut step = to_step(op, values)?;
            let complete = match (&op.outcome, &op.op) {
                (Outcome::Ok(_), _) => Some(op.complete_ns),
                (_, Op::Put { value, .. } | Op::Cas { value, .. }) => seen_by.get(value.as_str()).copied(),
                _ => None,
            };
            if let (Some(_), Step::Cas { result: result @ Said::Unknown, .. }) = (complete, &mut step) {
                *result = Said::Changed;
            }
            Some(RegOp { op, complete, step })
        })
        .collect();
    reg.sort_by_key(|r| (r.complete.is_none(), r.op.invoke_ns, r.op.id));
    reg
}

fn search_key(key: &str, ops: &[&Operation], limits: &Limits) -> Option<Anomaly> {
    let mut values = Interner::new(ops);
    let reg = prepare(ops, &mut values);
    match search(&reg, limits.max_states) {
        Verdict::Linearizable => None,
        Verdict::GaveUp => Some(Anomaly {
            kind: AnomalyKind::Inconclusive,
            key: Some(key.to_string()),
            ops: Vec::new(),
            message: format!(
                "key {key:?}: linearizability search gave up after {} states ({} ops, {} of them with unknown outcome); \
                 raise Limits::max_states or record a shorter history",
                limits.max_states,
                reg.len(),
                reg.iter().filter(|r| r.op.is_unknown()).count()
            ),
        }),
        Verdict::NotLinearizable(stuck) => {
            let blocked = reg[stuck.blocked].op;
            let deadline = reg[stuck.blocked].complete.expect("only ops with a deadline block");
            let tail: Vec<String> = stuck.order.iter().rev().take(3).rev().map(|&i| describe(reg[i].op)).collect();
            let pending: Vec<String> = stuck.pending.iter().map(|&i| describe(reg[i].op)).collect();
            let mut ids = vec![blocked.id];
            ids.extend(stuck.pending.iter().map(|&i| reg[i].op.id).filter(|&id| id != blocked.id));
            Some(Anomaly {
                kind: AnomalyKind::NotLinearizable,
                key: Some(key.to_string()),
                ops: ids,
                message: format!(
                    "key {key:?}: no order of its {} ops explains their results. The longest explainable prefix has {} ops \
                     (ending {}) and leaves the key {}; from there none of the pending ops [{}] can take effect next, \
                     yet {} had to take effect by {deadline} ns",
                    reg.len(),
                    stuck.order.len(),
                    if tail.is_empty() { "nowhere".to_string() } else { tail.join(", ") },
                    values.show(stuck.state),
                    pending.join(", "),
                    describe(blocked),
                ),
            })
        }
    }
}

/// A set of op indices.
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Bits {
        Bits(vec![0; len.div_ceil(64)])
    }

    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    /// A canonical, compact form: the length p of the longest prefix `0..p` in the set, then
    /// the other members, ascending. Ops are mostly linearized in invocation order, so this
    /// stays short.
    fn key(&self) -> Box<[u32]> {
        let full = self.0.iter().take_while(|w| **w == u64::MAX).count();
        let prefix = full * 64 + self.0.get(full).map_or(0, |w| w.trailing_ones() as usize);
        let mut key = vec![prefix as u32];
        for (i, &word) in self.0.iter().enumerate().skip(prefix / 64) {
            let mut w = if i == prefix / 64 { word & !((1u64 << (prefix % 64)) - 1) } else { word };
            while w != 0 {
                key.push((i * 64) as u32 + w.trailing_zeros());
                w &= w - 1;
            }
        }
        key.into_boxed_slice()
    }

    /// The members, ascending.
    fn members(&self) -> Box<[u32]> {
        let mut out = Vec::new();
        for (i, &word) in self.0.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                out.push((i * 64) as u32 + w.trailing_zeros());
                w &= w - 1;
            }
        }
        out.into_boxed_slice()
    }
}

/// The configurations explored, and whether a new one is worth exploring.
///
/// A configuration is the set of ops with a deadline linearized, the set of optional ops
/// applied, and the model state. One explored earlier covers a new one when both linearized the
/// same ops with a deadline, the key holds the same value, the earlier applied a subset of the
/// optional ops (the others are still pending: it can apply them whenever the new one did) and
/// its revision covers the new one's (see [`Rev::covers`]): whatever the new one can do, the
/// earlier one could.
#[derive(Default)]
struct Memo {
    /// (ops with a deadline linearized, value) -> the configurations explored with them.
    seen: HashMap<Linearized, Vec<Explored>>,
}

/// Ops with a deadline linearized (see [`Bits::key`]), and the value.
type Linearized = (Box<[u32]>, Option<u32>);
/// Optional ops applied, and the revision.
type Explored = (Box<[u32]>, Rev);

impl Memo {
    /// Records the configuration; false if an explored one covers it.
    fn insert(&mut self, must: &Bits, optional: &Bits, state: State) -> bool {
        let entries = self.seen.entry((must.key(), state.value)).or_default();
        let applied = optional.members();
        if entries.iter().any(|(a, rev)| rev.covers(state.rev) && is_subset(a, &applied)) {
            return false;
        }
        // Those the new one covers are no longer needed.
        entries.retain(|(a, rev)| !(state.rev.covers(*rev) && is_subset(&applied, a)));
        entries.push((applied, state.rev));
        true
    }
}

/// Whether sorted `a` is a subset of sorted `b`.
fn is_subset(a: &[u32], b: &[u32]) -> bool {
    let mut b = b.iter();
    a.iter().all(|x| b.any(|y| y == x))
}

/// Where the search stands among the choices at the current depth.
#[derive(Clone, Copy)]
enum Cursor {
    /// Walking the events of the ops that must be linearized, from this node: the next
    /// invocation is a candidate.
    Must(usize),
    /// The walk reached the deadline (at time `limit`) of op `blocked`, not yet linearized: now
    /// the optional ops invoked by then are the candidates, from the `pos`-th kind on (see
    /// [`Optional::kind_at`]).
    Optional { pos: usize, limit: u64, blocked: usize },
}

/// A doubly linked list over nodes `1..=len` (0 is the head, `len + 1` the tail) in which a
/// removed node can be put back in O(1), provided removals are undone in reverse order.
struct Links {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl Links {
    fn new(len: usize) -> Links {
        Links { next: (1..=len + 2).collect(), prev: (0..len + 2).map(|i| i.saturating_sub(1)).collect() }
    }

    fn unlink(&mut self, n: usize) {
        self.next[self.prev[n]] = self.next[n];
        self.prev[self.next[n]] = self.prev[n];
    }

    fn relink(&mut self, n: usize) {
        self.next[self.prev[n]] = n;
        self.prev[self.next[n]] = n;
    }
}

/// The optional ops (unknown outcome, their value never seen), by kind. Ops of one kind (the
/// same step) are interchangeable: whichever of them took effect, the result is the same. So the
/// search applies each kind's ops in invocation order only, rather than trying every subset.
struct Optional {
    /// kind -> its ops, by invocation.
    kinds: Vec<Vec<usize>>,
    /// kind -> how many of its ops are applied.
    applied: Vec<usize>,
    /// op - first optional op -> its kind.
    kind_of: Vec<usize>,
    /// Kinds that change any value (puts), only a present key (deletes), only a given value
    /// (Cas ops, by the value they expect).
    puts: Vec<usize>,
    deletes: Vec<usize>,
    cas_by_expect: HashMap<Option<u32>, Vec<usize>>,
}

impl Optional {
    fn new(ops: &[RegOp], first: usize) -> Optional {
        let mut o = Optional {
            kinds: Vec::new(),
            applied: Vec::new(),
            kind_of: Vec::new(),
            puts: Vec::new(),
            deletes: Vec::new(),
            cas_by_expect: HashMap::new(),
        };
        let mut by_step: HashMap<Step, usize> = HashMap::new();
        for (i, r) in ops.iter().enumerate().skip(first) {
            let kind = *by_step.entry(r.step).or_insert_with(|| {
                let kind = o.kinds.len();
                o.kinds.push(Vec::new());
                o.applied.push(0);
                match r.step {
                    Step::Put { .. } | Step::Get { .. } => o.puts.push(kind),
                    Step::Delete { .. } => o.deletes.push(kind),
                    Step::Cas { expect, .. } => o.cas_by_expect.entry(expect).or_default().push(kind),
                }
                kind
            });
            o.kinds[kind].push(i);
            o.kind_of.push(kind);
        }
        o
    }

    /// The `pos`-th kind that can change `value`, if there are that many.
    fn kind_at(&self, value: Option<u32>, pos: usize) -> Option<usize> {
        let deletes: &[usize] = if value.is_some() { &self.deletes } else { &[] };
        let cas = self.cas_by_expect.get(&value).map(Vec::as_slice).unwrap_or_default();
        self.puts.iter().chain(deletes).chain(cas).nth(pos).copied()
    }

    /// The next op of `kind` to apply, if any is left.
    fn next_of(&self, kind: usize) -> Option<usize> {
        self.kinds[kind].get(self.applied[kind]).copied()
    }
}

/// The WGL search over `ops`: first the ops that must be linearized (with a deadline), then the
/// optional ones, each group by invocation.
///
/// The candidates to linearize next are the ops invoked before the earliest deadline of an op
/// not yet linearized. The ops that must be linearized are tried first, walking their
/// invocation and deadline events in time order; only when the walk reaches a deadline are the
/// optional ops tried. (The order changes how soon an answer is found, not the answer.)
fn search(ops: &[RegOp], max_states: usize) -> Verdict {
    let n_must = ops.iter().take_while(|r| r.complete.is_some()).count();
    debug_assert!(ops[n_must..].iter().all(|r| r.complete.is_none()), "ops with a deadline come first");
    // Events: (time, 0 = invocation / 1 = deadline, op). At equal times invocations come
    // first, so ops whose intervals touch count as concurrent.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n_must);
    for (i, r) in ops[..n_must].iter().enumerate() {
        events.push((r.op.invoke_ns, 0, i));
        events.push((r.complete.expect("has a deadline"), 1, i));
    }
    events.sort_unstable();
    let mut call_node = vec![0; n_must];
    let mut return_node = vec![0; n_must];
    for (j, &(_, kind, i)) in events.iter().enumerate() {
        if kind == 0 {
            call_node[i] = j + 1;
        } else {
            return_node[i] = j + 1;
        }
    }
    let mut must = Links::new(events.len());
    let mut optional = Optional::new(ops, n_must);

    let mut remaining = n_must;
    // Linearized ops: those with a deadline by index, optional ones by index - n_must.
    let mut must_bits = Bits::new(n_must);
    let mut optional_bits = Bits::new(ops.len() - n_must);
    let mut memo = Memo::default();
    let mut explored = 0;
    // (op linearized, state before it, the cursor to resume with when it is undone)
    let mut stack: Vec<(usize, State, Cursor)> = Vec::new();
    let mut state = EMPTY;
    let mut stuck: Option<Stuck> = None;
    let mut cursor = Cursor::Must(must.next[0]);
    loop {
        // Optional ops left over simply never took effect.
        if remaining == 0 {
            return Verdict::Linearizable;
        }
        let (i, resume) = match cursor {
            Cursor::Must(node) => {
                let (time, kind, i) = events[node - 1];
                if kind == 1 {
                    cursor = Cursor::Optional { pos: 0, limit: time, blocked: i };
                    continue;
                }
                (i, Cursor::Must(must.next[node]))
            }
            Cursor::Optional { pos, limit, blocked } => match optional.kind_at(state.value, pos) {
                Some(kind) => {
                    let resume = Cursor::Optional { pos: pos + 1, limit, blocked };
                    match optional.next_of(kind).filter(|&i| ops[i].op.invoke_ns <= limit) {
                        Some(i) => (i, resume),
                        None => {
                            cursor = resume;
                            continue;
                        }
                    }
                }
                None => {
                    // No candidate works: undo the last choice.
                    if stuck.as_ref().is_none_or(|s| stack.len() > s.order.len()) {
                        let mut pending = Vec::new();
                        let mut n = must.next[0];
                        while events[n - 1].1 == 0 && pending.len() < 10 {
                            pending.push(events[n - 1].2);
                            n = must.next[n];
                        }
                        stuck = Some(Stuck { order: stack.iter().map(|s| s.0).collect(), state, blocked, pending });
                    }
                    let Some((j, before, resume)) = stack.pop() else {
                        return Verdict::NotLinearizable(stuck.expect("recorded just above"));
                    };
                    state = before;
                    if j < n_must {
                        must_bits.clear(j);
                        must.relink(return_node[j]);
                        must.relink(call_node[j]);
                        remaining += 1;
                    } else {
                        optional_bits.clear(j - n_must);
                        optional.applied[optional.kind_of[j - n_must]] -= 1;
                    }
                    cursor = resume;
                    continue;
                }
            },
        };
        // An optional op is applied only if that lets a pending op take effect which could not
        // before. Any linearization can be rearranged into one that obeys this: an optional op
        // that enables nothing can move later or go (a higher revision floor only constrains
        // more), and two in a row can be cut to one of them, since each op that must be
        // linearized asks one thing of the value (equal to x, absent, present, not x) and one
        // step reaches it if two do.
        let enables = |after: &State| {
            let mut n = must.next[0];
            while events[n - 1].1 == 0 {
                let m = ops[events[n - 1].2].step;
                if apply(state, m).is_none() && apply(*after, m).is_some() {
                    return true;
                }
                n = must.next[n];
            }
            false
        };
        let Some(after) = apply(state, ops[i].step).filter(|after| i < n_must || enables(after)) else {
            cursor = resume;
            continue;
        };
        if i < n_must {
            must_bits.set(i);
        } else {
            optional_bits.set(i - n_must);
        }
        if !memo.insert(&must_bits, &optional_bits, after) {
            if i < n_must {
                must_bits.clear(i);
            } else {
                optional_bits.clear(i - n_must);
            }
            cursor = resume;
            continue;
        }
        explored += 1;
        if explored > max_states {
            return Verdict::GaveUp;
        }
        stack.push((i, state, resume));
        state = after;
        if i < n_must {
            must.unlink(call_node[i]);
            must.unlink(return_node[i]);
            remaining -= 1;
        } else {
            optional.applied[optional.kind_of[i - n_must]] += 1;
        }
        cursor = Cursor::Must(must.next[0]);
    }
}

/// Gets that returned a value no Put or Cas on the key wrote, or one written only by ops that
/// failed or whose comparison failed.
fn phantom_reads(key: &str, ops: &[&Operation]) -> Vec<Anomaly> {
    // value -> (writer id, could it have been applied)
    let mut writers: HashMap<&str, Vec<(u64, bool)>> = HashMap::new();
    for op in ops {
        let (Op::Put { value, .. } | Op::Cas { value, .. }) = &op.op else { continue };
        let applied = match &op.outcome {
            Outcome::Fail(_) => false,
            Outcome::Unknown(_) => true,
            Outcome::Ok(r) => !matches!(r, OpResult::Cas { succeeded: false, .. }),
        };
        writers.entry(value).or_default().push((op.id, applied));
    }
    let mut anomalies = Vec::new();
    for op in ops {
        let Some(OpResult::Get { value: Some(v), .. }) = op.result() else { continue };
        let ws = writers.get(v.as_str()).map(Vec::as_slice).unwrap_or_default();
        if ws.iter().any(|w| w.1) {
            continue;
        }
        let why = match ws.first() {
            Some((id, _)) => format!("only #{id} tried to write it, and it was not applied (failed, or its comparison failed)"),
            None => "no op wrote it".to_string(),
        };
        let mut ids = vec![op.id];
        ids.extend(ws.iter().map(|w| w.0));
        anomalies.push(Anomaly {
            kind: AnomalyKind::PhantomRead,
            key: Some(key.to_string()),
            ops: ids,
            message: format!("key {key:?}: {} read a value {why}", describe(op)),
        });
    }
    anomalies
}

/// Gets that returned a state older than one already written or read before they were invoked:
/// a lower mod_revision than an acknowledged write (or another Get) that completed before, or
/// "absent" when no delete can explain it.
fn stale_reads(key: &str, ops: &[&Operation]) -> Vec<Anomaly> {
    // (completion, revision the key had reached, op): acknowledged writes and reads of a value.
    let mut writes = Vec::new();
    let mut puts = Vec::new();
    for op in ops {
        let seen = match (super::acked_change(op), op.result()) {
            (Some((change, rev)), _) => Some((change != super::Change::Delete, rev)),
            (None, Some(OpResult::Get { value: Some(_), mod_revision })) => Some((true, *mod_revision)),
            _ => None,
        };
        if let Some((present, rev)) = seen {
            writes.push((op.complete_ns, rev, op.id));
            if present {
                puts.push((op.complete_ns, rev, op.id));
            }
        }
    }
    let writes = super::RunningMax::new(writes);
    let puts = super::RunningMax::new(puts);
    // Deletes that may have removed the key, by invocation: acknowledged ones with their
    // revision, unknown ones with any revision.
    let deletes = super::RunningMax::new(
        ops.iter()
            .filter_map(|d| match (&d.op, &d.outcome) {
                (Op::Delete { .. }, Outcome::Ok(OpResult::Delete { deleted, revision })) if *deleted > 0 => {
                    Some((d.invoke_ns, *revision, d.id))
                }
                (Op::Delete { .. }, Outcome::Unknown(_)) => Some((d.invoke_ns, i64::MAX, d.id)),
                _ => None,
            })
            .collect(),
    );
    let mut anomalies = Vec::new();
    for op in ops {
        let Some(OpResult::Get { value, mod_revision }) = op.result() else { continue };
        let newer = if value.is_some() {
            writes.before(op.invoke_ns).filter(|&(rev, _)| rev > *mod_revision)
        } else {
            // Absent is stale after a put unless a delete after that put, invoked before the
            // read completed, may have removed the key again.
            puts.before(op.invoke_ns)
                .filter(|&(put_rev, _)| deletes.before(op.complete_ns).is_none_or(|(delete_rev, _)| delete_rev <= put_rev))
        };
        if let Some((rev, writer)) = newer {
            anomalies.push(Anomaly {
                kind: AnomalyKind::StaleRead,
                key: Some(key.to_string()),
                ops: vec![op.id, writer],
                message: format!(
                    "key {key:?}: {} (invoked at {} ns) is older than revision {rev}, which #{writer} had \
                     already written or read before the read began",
                    describe(op),
                    op.invoke_ns,
                ),
            });
        }
    }
    anomalies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::HistoryBuilder;
    use AnomalyKind::*;

    /// Runs the checker and compares the kinds it reports.
    fn check(h: HistoryBuilder, expected: &[AnomalyKind]) -> Report {
        let report = check_linearizable(&h.build(), &Limits::default());
        assert_eq!(report.kinds(), expected, "{report}");
        assert_eq!(report.ok, expected.is_empty());
        report
    }

    fn b() -> HistoryBuilder {
        HistoryBuilder::new()
    }

    #[test]
    fn sequential_register_is_linearizable() {
        check(
            b().ok(1, Op::get("k"), 0, 1, OpResult::get(None, 0))
                .ok(1, Op::put("k", "a"), 2, 3, OpResult::put(5))
                .ok(2, Op::get("k"), 4, 5, OpResult::get(Some("a"), 5))
                .ok(2, Op::cas("k", Some("a"), "b"), 6, 7, OpResult::cas(true, 8))
                .ok(1, Op::cas("k", Some("a"), "c"), 8, 9, OpResult::cas(false, 8))
                .ok(1, Op::delete("k"), 10, 11, OpResult::delete(1, 9))
                .ok(2, Op::get("k"), 12, 13, OpResult::get(None, 0))
                .ok(2, Op::delete("k"), 14, 15, OpResult::delete(0, 12))
                .ok(1, Op::cas("k", None, "d"), 16, 17, OpResult::cas(true, 13))
                .ok(1, Op::get("k"), 18, 19, OpResult::get(Some("d"), 13)),
            &[],
        );
    }

    #[test]
    fn overlapping_ops_may_take_effect_in_either_order() {
        // Two concurrent puts; readers after both saw the one with the higher revision.
        let puts = || b().ok(1, Op::put("k", "a"), 0, 10, OpResult::put(3)).ok(2, Op::put("k", "b"), 1, 9, OpResult::put(4));
        check(puts().ok(3, Op::get("k"), 11, 12, OpResult::get(Some("b"), 4)), &[]);
        // A read concurrent with a put may see the value before or after it.
        check(puts().ok(3, Op::get("k"), 2, 3, OpResult::get(None, 0)), &[]);
        check(puts().ok(3, Op::get("k"), 2, 3, OpResult::get(Some("a"), 3)), &[]);
        // Revisions fix the order: "a" (rev 3) cannot be last.
        check(puts().ok(3, Op::get("k"), 11, 12, OpResult::get(Some("a"), 3)), &[NotLinearizable, StaleRead]);
    }

    #[test]
    fn unknown_writes_may_or_may_not_take_effect() {
        let base = || b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).unknown(2, Op::put("k", "b"), 2, 3);
        // Never applied.
        check(base().ok(3, Op::get("k"), 10, 11, OpResult::get(Some("a"), 2)), &[]);
        // Applied, long after the client gave up; its revision is learned from the read.
        check(
            base()
                .ok(3, Op::get("k"), 10, 11, OpResult::get(Some("a"), 2))
                .ok(3, Op::get("k"), 20, 21, OpResult::get(Some("b"), 7))
                .ok(1, Op::put("k", "c"), 22, 23, OpResult::put(9)),
            &[],
        );
        // ... but then every later read agrees on that revision, and the next write is above it.
        check(
            base().ok(3, Op::get("k"), 20, 21, OpResult::get(Some("b"), 7)).ok(
                3,
                Op::get("k"),
                22,
                23,
                OpResult::get(Some("b"), 8),
            ),
            &[NotLinearizable],
        );
        check(
            base().ok(3, Op::get("k"), 20, 21, OpResult::get(Some("b"), 7)).ok(1, Op::put("k", "c"), 22, 23, OpResult::put(6)),
            &[NotLinearizable],
        );
        // An unknown delete and an unknown CAS.
        check(
            base().unknown(2, Op::delete("k"), 4, 5).unknown(1, Op::cas("k", None, "c"), 6, 7).ok(
                3,
                Op::get("k"),
                20,
                21,
                OpResult::get(Some("c"), 9),
            ),
            &[],
        );
        // Once a read has seen the unknown write, it cannot be undone.
        check(
            base().ok(3, Op::get("k"), 20, 21, OpResult::get(Some("b"), 7)).ok(
                3,
                Op::get("k"),
                22,
                23,
                OpResult::get(Some("a"), 2),
            ),
            &[NotLinearizable, StaleRead],
        );
    }

    #[test]
    fn failed_writes_never_take_effect() {
        let h = b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).fail(2, Op::put("k", "b"), 2, 3);
        check(h.clone().ok(3, Op::get("k"), 10, 11, OpResult::get(Some("a"), 2)), &[]);
        check(h.ok(3, Op::get("k"), 10, 11, OpResult::get(Some("b"), 3)), &[NotLinearizable, PhantomRead]);
    }

    #[test]
    fn stale_read_is_rejected() {
        let r = check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).ok(1, Op::put("k", "b"), 2, 3, OpResult::put(3)).ok(
                2,
                Op::get("k"),
                4,
                5,
                OpResult::get(Some("a"), 2),
            ),
            &[NotLinearizable, StaleRead],
        );
        let stale = r.anomalies.iter().find(|a| a.kind == StaleRead).unwrap();
        assert_eq!(stale.ops, vec![2, 1]);
        let nl = r.anomalies.iter().find(|a| a.kind == NotLinearizable).unwrap();
        assert_eq!(nl.ops[0], 2, "{}", nl.message);
        // A read of "absent" after a put with no delete in sight.
        check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).ok(2, Op::get("k"), 4, 5, OpResult::get(None, 0)),
            &[NotLinearizable, StaleRead],
        );
        // ... which an unknown delete explains.
        check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).unknown(3, Op::delete("k"), 2, 3).ok(
                2,
                Op::get("k"),
                4,
                5,
                OpResult::get(None, 0),
            ),
            &[],
        );
    }

    #[test]
    fn cas_pair_with_the_same_expectation_cannot_both_succeed() {
        check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2))
                .ok(2, Op::cas("k", Some("a"), "b"), 2, 10, OpResult::cas(true, 3))
                .ok(3, Op::cas("k", Some("a"), "c"), 3, 11, OpResult::cas(true, 4)),
            &[NotLinearizable],
        );
        // One succeeding and one failing is fine.
        check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2))
                .ok(2, Op::cas("k", Some("a"), "b"), 2, 10, OpResult::cas(true, 3))
                .ok(3, Op::cas("k", Some("a"), "c"), 3, 11, OpResult::cas(false, 3)),
            &[],
        );
        // A failed CAS while the comparison must hold is not.
        check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).ok(
                3,
                Op::cas("k", Some("a"), "c"),
                3,
                11,
                OpResult::cas(false, 3),
            ),
            &[NotLinearizable],
        );
    }

    #[test]
    fn revisions_must_increase_and_match() {
        // Same revision twice on one key.
        check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).ok(1, Op::put("k", "b"), 2, 3, OpResult::put(2)),
            &[NotLinearizable],
        );
        // A read reporting another mod_revision than the write's.
        check(
            b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2)).ok(1, Op::get("k"), 2, 3, OpResult::get(Some("a"), 3)),
            &[NotLinearizable],
        );
        // Absent must read as mod_revision 0.
        check(b().ok(1, Op::get("k"), 2, 3, OpResult::get(None, 4)), &[NotLinearizable]);
    }

    #[test]
    fn keys_are_independent() {
        check(
            b().ok(1, Op::put("x", "a"), 0, 10, OpResult::put(3))
                .ok(2, Op::put("y", "b"), 0, 10, OpResult::put(2))
                .ok(1, Op::get("y"), 11, 12, OpResult::get(Some("b"), 2))
                .ok(2, Op::get("x"), 11, 12, OpResult::get(None, 0)),
            &[NotLinearizable, StaleRead],
        );
    }

    #[test]
    fn search_gives_up_within_limits() {
        let mut h = b();
        for i in 0..20 {
            h = h.ok(1, Op::put("k", &format!("v{i}")), 10 * i, 10 * i + 1, OpResult::put(i as i64 + 2));
        }
        let report = check_linearizable(&h.build(), &Limits { max_states: 5 });
        assert_eq!(report.kinds(), [Inconclusive], "{report}");
        assert_eq!(report.conclusion(), super::super::Conclusion::Inconclusive);
    }

    #[test]
    fn many_unknown_writes_stay_tractable() {
        // 200 writes time out during a partition, all concurrent; most never read. A failed CAS
        // shows some of them took effect; a read shows one of them last.
        let mut h = b().ok(1, Op::put("k", "a"), 0, 1, OpResult::put(2));
        for i in 0..200u32 {
            let op = match i % 3 {
                0 => Op::put("k", &format!("u{i}")),
                1 => Op::cas("k", Some("a"), &format!("u{i}")),
                _ => Op::delete("k"),
            };
            h = h.unknown(i, op, 10 + i as u64, 5000);
        }
        let h = h
            .ok(300, Op::cas("k", Some("a"), "z"), 6000, 6001, OpResult::cas(false, 400))
            .ok(300, Op::get("k"), 6002, 6003, OpResult::get(Some("u99"), 300))
            .ok(300, Op::put("k", "b"), 6004, 6005, OpResult::put(401))
            .ok(300, Op::get("k"), 6006, 6007, OpResult::get(Some("b"), 401));
        check(h.clone(), &[]);
        // ... and a stale read at the end is still found.
        check(h.ok(300, Op::get("k"), 6008, 6009, OpResult::get(Some("u99"), 300)), &[NotLinearizable, StaleRead]);
    }

    /// Every order of the ops that respects real time, tried one by one.
    fn brute_force(ops: &[RegOp], done: &mut [bool], state: State, remaining: usize) -> bool {
        if remaining == 0 {
            return true;
        }
        for i in 0..ops.len() {
            let blocked = |j: usize| !done[j] && j != i && ops[j].complete.is_some_and(|c| c < ops[i].op.invoke_ns);
            if done[i] || (0..ops.len()).any(blocked) {
                continue;
            }
            if let Some(next) = apply(state, ops[i].step) {
                done[i] = true;
                if brute_force(ops, done, next, remaining - ops[i].complete.is_some() as usize) {
                    return true;
                }
                done[i] = false;
            }
        }
        false
    }

    #[test]
    fn search_agrees_with_brute_force() {
        use crate::checker::simulation::{simulate, Config, Rng};
        let cfg = Config { clients: 4, ops: 9, register_keys: 1, set_keys: 0, unknown_percent: 40, fail_percent: 5 };
        let (mut valid, mut invalid) = (0, 0);
        for seed in 0..1500 {
            let mut h = simulate(seed, &cfg).history;
            // Half of them get one result changed at random, and some CAS ops expect another value.
            let mut rng = Rng::new(seed);
            for op in &mut h.ops {
                if let Op::Cas { expect, .. } = &mut op.op {
                    if rng.chance(20) {
                        *expect = Some(format!("v{}", rng.below(7))).filter(|_| rng.chance(80));
                    }
                }
            }
            if rng.chance(50) {
                let i = rng.below(h.ops.len() as u64) as usize;
                let bump = rng.below(3) as i64 - 1;
                let value = Some(format!("v{}", rng.below(7))).filter(|_| rng.chance(80));
                if let Outcome::Ok(r) = &mut h.ops[i].outcome {
                    *r = match r.clone() {
                        OpResult::Get { mod_revision, .. } => OpResult::Get { value, mod_revision: mod_revision + bump },
                        OpResult::Put { revision } => OpResult::Put { revision: revision + bump },
                        OpResult::Cas { succeeded, revision } => OpResult::Cas { succeeded: !succeeded, revision },
                        OpResult::Delete { deleted, revision } => OpResult::Delete { deleted: 1 - deleted, revision },
                        other => other,
                    };
                }
            }
            let ops: Vec<&Operation> = h.ops.iter().collect();
            let mut values = Interner::new(&ops);
            let found = matches!(search(&prepare(&ops, &mut values), 1_000_000), Verdict::Linearizable);
            // Brute force sees the ops as they are: each value its own, unknown writes optional.
            let mut values = Interner::plain();
            let plain: Vec<RegOp> = ops
                .iter()
                .filter_map(|op| {
                    Some(RegOp { op, complete: op.is_ok().then_some(op.complete_ns), step: to_step(op, &mut values)? })
                })
                .collect();
            let expected =
                brute_force(&plain, &mut vec![false; plain.len()], EMPTY, plain.iter().filter(|r| r.complete.is_some()).count());
            assert_eq!(found, expected, "seed {seed}: {h:#?}");
            if expected {
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        assert!(valid > 300 && invalid > 200, "{valid} linearizable, {invalid} not");
    }

    #[test]
    fn memo_keys_are_canonical() {
        let key = |words: &[u64]| Bits(words.to_vec()).key();
        assert_eq!(&*key(&[0b1011, 0]), &[2, 3]);
        assert_eq!(&*key(&[u64::MAX, 0b101]), &[65, 66]);
        assert_eq!(&*key(&[u64::MAX, u64::MAX]), &[128]);
        assert_eq!(&*key(&[]), &[0]);
        assert_eq!(&*Bits(vec![0b1011, 1]).members(), &[0, 1, 3, 64]);
        assert!(is_subset(&[1, 5], &[0, 1, 3, 5]));
        assert!(!is_subset(&[1, 6], &[0, 1, 3, 5]));
        assert!(is_subset(&[], &[]));
    }
}
