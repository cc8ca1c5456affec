//! What clients did and saw, as the harness records it and the checkers judge it.
//!
//! A [`History`] is a list of [`Operation`]s: what a client invoked ([`Op`]), when it was invoked
//! and when it completed (nanoseconds on one clock shared by all clients), and how it ended
//! ([`Outcome`]): ok with a result, failed (definitely not applied), or unknown (a timeout or a
//! lost connection: it may have been applied, at any time after its invocation).
//! Watches are recorded separately as [`WatchSession`]s.
//!
//! Every type here serializes with serde, so a failing history can be dumped to JSON and replayed
//! through the checkers. [`HistoryBuilder`] and the small constructors on [`Op`], [`OpResult`],
//! [`WatchEvent`] and [`WatchSession`] keep hand-written histories in tests short.
//!
//! Workloads must write a unique value with every write: the checkers tell writes apart by value.
//! Register keys (Get/Put/Cas/Delete) and set keys (Append/ReadSet) must not overlap.

use serde::{Deserialize, Serialize};

pub type ClientId = u32;
/// Workloads use printable keys.
pub type Key = String;
/// Every write writes a unique value.
pub type Value = String;

/// What a client invoked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Get {
        key: Key,
    },
    Put {
        key: Key,
        value: Value,
    },
    /// Txn: if value(key) == expect (None = key absent, i.e. version == 0) then put value.
    Cas {
        key: Key,
        expect: Option<Value>,
        value: Value,
    },
    Delete {
        key: Key,
    },
    /// Append-only set: a txn that adds `element` to the set stored under the prefix `key`. In KV
    /// terms it writes the two keys of [`append_writes`] at one revision.
    Append {
        key: Key,
        element: u64,
    },
    /// A prefix range over `key`, keys only: the elements of the set.
    ReadSet {
        key: Key,
    },
}

impl Op {
    pub fn get(key: &str) -> Op {
        Op::Get { key: key.into() }
    }

    pub fn put(key: &str, value: &str) -> Op {
        Op::Put { key: key.into(), value: value.into() }
    }

    pub fn cas(key: &str, expect: Option<&str>, value: &str) -> Op {
        Op::Cas { key: key.into(), expect: expect.map(Into::into), value: value.into() }
    }

    pub fn delete(key: &str) -> Op {
        Op::Delete { key: key.into() }
    }

    pub fn append(key: &str, element: u64) -> Op {
        Op::Append { key: key.into(), element }
    }

    pub fn read_set(key: &str) -> Op {
        Op::ReadSet { key: key.into() }
    }

    /// The register key or set prefix this op is about.
    pub fn key(&self) -> &str {
        match self {
            Op::Get { key }
            | Op::Put { key, .. }
            | Op::Cas { key, .. }
            | Op::Delete { key }
            | Op::Append { key, .. }
            | Op::ReadSet { key } => key,
        }
    }

    /// Whether this op can change the store.
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. } | Op::ReadSet { .. })
    }

    /// The key-value writes this op makes if it takes effect, as a watcher sees them. A Cas
    /// writes only if its comparison holds and a Delete only if the key exists; `value` is None
    /// for deletes (a delete event carries no value).
    pub fn writes(&self) -> Vec<KeyWrite> {
        let put = |key: &str, value: &str| KeyWrite { kind: EventKind::Put, key: key.into(), value: Some(value.into()) };
        match self {
            Op::Get { .. } | Op::ReadSet { .. } => Vec::new(),
            Op::Put { key, value } | Op::Cas { key, value, .. } => vec![put(key, value)],
            Op::Delete { key } => vec![KeyWrite { kind: EventKind::Delete, key: key.clone(), value: None }],
            Op::Append { key, element } => append_writes(key, *element).iter().map(|(k, v)| put(k, v)).collect(),
        }
    }
}

/// The keys an Append of `element` to the set `prefix` (e.g. `set/0/`) writes in one txn: the
/// element's own key `{prefix}{element:020}` (empty value), and the set's "last" marker
/// `{prefix without its trailing '/'}last` holding the element in decimal. The workload and the
/// watch checker must agree on this, so it is defined once, here.
pub fn append_writes(prefix: &str, element: u64) -> [(Key, Value); 2] {
    [(format!("{prefix}{element:020}"), String::new()), (format!("{}last", prefix.trim_end_matches('/')), element.to_string())]
}

/// One key written by an op; see [`Op::writes`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyWrite {
    pub kind: EventKind,
    pub key: Key,
    /// None for a delete.
    pub value: Option<Value>,
}

/// What an ok completion returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpResult {
    /// `mod_revision` is 0 when the key is absent.
    Get {
        value: Option<Value>,
        mod_revision: i64,
    },
    /// `revision`: the header revision after the write.
    Put {
        revision: i64,
    },
    Cas {
        succeeded: bool,
        revision: i64,
    },
    Delete {
        deleted: i64,
        revision: i64,
    },
    Append {
        revision: i64,
    },
    ReadSet {
        elements: Vec<u64>,
        revision: i64,
    },
}

impl OpResult {
    pub fn get(value: Option<&str>, mod_revision: i64) -> OpResult {
        OpResult::Get { value: value.map(Into::into), mod_revision }
    }

    pub fn put(revision: i64) -> OpResult {
        OpResult::Put { revision }
    }

    pub fn cas(succeeded: bool, revision: i64) -> OpResult {
        OpResult::Cas { succeeded, revision }
    }

    pub fn delete(deleted: i64, revision: i64) -> OpResult {
        OpResult::Delete { deleted, revision }
    }

    pub fn append(revision: i64) -> OpResult {
        OpResult::Append { revision }
    }

    pub fn read_set(elements: &[u64], revision: i64) -> OpResult {
        OpResult::ReadSet { elements: elements.to_vec(), revision }
    }

    /// The header revision carried in the result itself (every result but Get's).
    pub fn revision(&self) -> Option<i64> {
        match self {
            OpResult::Get { .. } => None,
            OpResult::Put { revision }
            | OpResult::Cas { revision, .. }
            | OpResult::Delete { revision, .. }
            | OpResult::Append { revision }
            | OpResult::ReadSet { revision, .. } => Some(*revision),
        }
    }

    /// Whether this result has the shape of `op`'s result.
    pub fn matches(&self, op: &Op) -> bool {
        matches!(
            (op, self),
            (Op::Get { .. }, OpResult::Get { .. })
                | (Op::Put { .. }, OpResult::Put { .. })
                | (Op::Cas { .. }, OpResult::Cas { .. })
                | (Op::Delete { .. }, OpResult::Delete { .. })
                | (Op::Append { .. }, OpResult::Append { .. })
                | (Op::ReadSet { .. }, OpResult::ReadSet { .. })
        )
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Ok(OpResult),
    /// Definitely not applied, e.g. etcd refused it before proposing.
    Fail(String),
    /// Timeout or connection lost: maybe applied, at any time after the invocation.
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operation {
    pub id: u64,
    pub client: ClientId,
    pub op: Op,
    pub invoke_ns: u64,
    /// For an unknown outcome: when the client gave up. The checkers treat an unknown op as
    /// possibly taking effect at any time after its invocation, i.e. as never completing.
    pub complete_ns: u64,
    pub outcome: Outcome,
    /// The revision in the response header, when ok.
    pub header_revision: Option<i64>,
}

impl Operation {
    /// The result, if the op completed ok.
    pub fn result(&self) -> Option<&OpResult> {
        match &self.outcome {
            Outcome::Ok(r) => Some(r),
            _ => None,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    pub fn is_fail(&self) -> bool {
        matches!(self.outcome, Outcome::Fail(_))
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown(_))
    }

    /// The header revision of an ok op: the recorded one, else the one in its result.
    pub fn revision(&self) -> Option<i64> {
        self.header_revision.or_else(|| self.result().and_then(OpResult::revision))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Operation>,
}

/// Builds hand-written histories: op ids are assigned in call order from 0, and an ok op's
/// header revision is taken from its result (set it with [`HistoryBuilder::header`] for a Get).
///
/// ```
/// use rampart_testkit::history::{HistoryBuilder, Op, OpResult};
/// let h = HistoryBuilder::new()
///     .ok(1, Op::put("k", "a"), 0, 10, OpResult::put(2))
///     .ok(2, Op::get("k"), 20, 30, OpResult::get(Some("a"), 2))
///     .header(2)
///     .unknown(3, Op::put("k", "b"), 25, 40)
///     .build();
/// assert_eq!(h.ops.len(), 3);
/// ```
#[derive(Clone, Debug, Default)]
pub struct HistoryBuilder {
    ops: Vec<Operation>,
}

impl HistoryBuilder {
    pub fn new() -> HistoryBuilder {
        HistoryBuilder::default()
    }

    fn push(mut self, client: ClientId, op: Op, invoke_ns: u64, complete_ns: u64, outcome: Outcome) -> Self {
        let header_revision = match &outcome {
            Outcome::Ok(r) => r.revision(),
            _ => None,
        };
        let id = self.ops.len() as u64;
        self.ops.push(Operation { id, client, op, invoke_ns, complete_ns, outcome, header_revision });
        self
    }

    pub fn ok(self, client: ClientId, op: Op, invoke_ns: u64, complete_ns: u64, result: OpResult) -> Self {
        self.push(client, op, invoke_ns, complete_ns, Outcome::Ok(result))
    }

    pub fn fail(self, client: ClientId, op: Op, invoke_ns: u64, complete_ns: u64) -> Self {
        self.push(client, op, invoke_ns, complete_ns, Outcome::Fail("refused".into()))
    }

    /// `complete_ns` is when the client gave up.
    pub fn unknown(self, client: ClientId, op: Op, invoke_ns: u64, complete_ns: u64) -> Self {
        self.push(client, op, invoke_ns, complete_ns, Outcome::Unknown("timeout".into()))
    }

    /// Sets the header revision of the op added last.
    pub fn header(mut self, revision: i64) -> Self {
        self.ops.last_mut().expect("header() needs an op before it").header_revision = Some(revision);
        self
    }

    pub fn build(self) -> History {
        History { ops: self.ops }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One event of a watch response.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: Key,
    /// Empty for a delete.
    pub value: Value,
    pub mod_revision: i64,
}

impl WatchEvent {
    pub fn put(key: &str, value: &str, mod_revision: i64) -> WatchEvent {
        WatchEvent { kind: EventKind::Put, key: key.into(), value: value.into(), mod_revision }
    }

    pub fn delete(key: &str, mod_revision: i64) -> WatchEvent {
        WatchEvent { kind: EventKind::Delete, key: key.into(), value: String::new(), mod_revision }
    }
}

/// One WatchResponse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchDelivery {
    pub watcher: u32,
    pub received_ns: u64,
    pub events: Vec<WatchEvent>,
    /// Non-zero when the server cancelled the watch because its start revision was compacted.
    pub compact_revision: i64,
}

/// One watch stream of a logical watcher. A watcher that reconnects starts a new session at
/// `start_revision = last revision seen + 1`; its sessions are listed in the order they ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchSession {
    pub watcher: u32,
    /// Every key starting with this prefix is watched ("" = all keys).
    pub key_prefix: Key,
    /// 0 = "from now", as in etcd.
    pub start_revision: i64,
    pub deliveries: Vec<WatchDelivery>,
}

impl WatchSession {
    pub fn new(watcher: u32, key_prefix: &str, start_revision: i64) -> WatchSession {
        WatchSession { watcher, key_prefix: key_prefix.into(), start_revision, deliveries: Vec::new() }
    }

    /// Adds a delivery (compact revision 0).
    pub fn delivery(mut self, received_ns: u64, events: Vec<WatchEvent>) -> Self {
        self.deliveries.push(WatchDelivery { watcher: self.watcher, received_ns, events, compact_revision: 0 });
        self
    }
}
