//! Clients that drive a cluster through the etcd v3 gRPC API and record every operation: when it
//! was invoked, when it completed, and what it returned (ok, failed, or unknown).
//!
//! Workloads: single-key registers (get, put, compare-and-set through Txn, delete) and
//! append-only sets written with multi-key txns and read with prefix ranges. Every write writes a
//! unique value, so the checkers can tell writes apart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_proto::etcdserverpb::kv_client::KvClient;
use rampart_proto::etcdserverpb::{
    compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::cluster::channel;
use crate::history::{History, Op, OpResult, Operation, Outcome};

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub clients: usize,
    /// Register keys (`reg/0` ...). Few keys mean more contention, which finds more bugs.
    pub register_keys: usize,
    /// Append-only set keys (`set/0/` ...); 0 disables the set workload.
    pub set_keys: usize,
    /// An operation not answered in this time is recorded as unknown.
    pub op_timeout: Duration,
    /// Pause between two operations of one client.
    pub think_time: Duration,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            clients: 6,
            register_keys: 16,
            set_keys: 2,
            op_timeout: Duration::from_secs(2),
            think_time: Duration::from_millis(5),
        }
    }
}

/// Collects operations from all clients, with times relative to one start instant.
pub struct Recorder {
    start: Instant,
    next_id: AtomicU64,
    ops: Mutex<Vec<Operation>>,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder { start: Instant::now(), next_id: AtomicU64::new(0), ops: Mutex::new(Vec::new()) })
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn record(&self, client: u32, op: Op, invoke_ns: u64, outcome: Outcome, header_revision: Option<i64>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let complete_ns = self.now_ns();
        self.ops.lock().unwrap().push(Operation { id, client, op, invoke_ns, complete_ns, outcome, header_revision });
    }

    pub fn history(&self) -> History {
        let mut ops = self.ops.lock().unwrap().clone();
        ops.sort_by_key(|o| o.invoke_ns);
        History { ops }
    }

    /// Longest time in which no operation completed successfully, in ms, between `from_ns` and
    /// `to_ns`: how long the cluster was unavailable to clients.
    pub fn max_unavailable_ms(&self, from_ns: u64, to_ns: u64) -> u64 {
        let mut done: Vec<u64> = self
            .ops
            .lock()
            .unwrap()
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Ok(_)))
            .map(|o| o.complete_ns)
            .filter(|t| *t >= from_ns && *t <= to_ns)
            .collect();
        done.sort();
        let mut prev = from_ns;
        let mut gap = 0;
        for t in done.into_iter().chain(std::iter::once(to_ns)) {
            gap = gap.max(t - prev);
            prev = t;
        }
        gap / 1_000_000
    }
}

pub fn register_key(i: usize) -> String {
    format!("reg/{i}")
}

pub fn set_prefix(i: usize) -> String {
    format!("set/{i}/")
}

/// How a failed call is recorded. Errors etcd returns before proposing mean "not applied";
/// anything else (timeouts, lost connections, leader changes) may have been applied.
fn classify(status: &tonic::Status, is_read: bool) -> Outcome {
    use tonic::Code::*;
    if is_read {
        return Outcome::Fail(status.message().to_string());
    }
    match status.code() {
        InvalidArgument | FailedPrecondition | OutOfRange | NotFound | PermissionDenied | Unauthenticated => {
            Outcome::Fail(status.message().to_string())
        }
        _ => Outcome::Unknown(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// One client executing one operation.
pub async fn execute(kv: &mut KvClient<Channel>, op: &Op, timeout: Duration) -> (Outcome, Option<i64>) {
    let is_read = matches!(op, Op::Get { .. } | Op::ReadSet { .. });
    let fut = async {
        match op {
            Op::Get { key } => {
                let r = kv.range(RangeRequest { key: key.clone().into_bytes(), ..Default::default() }).await?.into_inner();
                let rev = r.header.map(|h| h.revision);
                let (value, mod_revision) = match r.kvs.first() {
                    Some(kv) => (Some(String::from_utf8_lossy(&kv.value).into_owned()), kv.mod_revision),
                    None => (None, 0),
                };
                Ok::<_, tonic::Status>((OpResult::Get { value, mod_revision }, rev))
            }
            Op::Put { key, value } => {
                let r = kv
                    .put(PutRequest { key: key.clone().into_bytes(), value: value.clone().into_bytes(), ..Default::default() })
                    .await?
                    .into_inner();
                let rev = r.header.map(|h| h.revision).unwrap_or(0);
                Ok((OpResult::Put { revision: rev }, Some(rev)))
            }
            Op::Cas { key, expect, value } => {
                let cmp = match expect {
                    None => Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Version as i32,
                        key: key.clone().into_bytes(),
                        target_union: Some(compare::TargetUnion::Version(0)),
                        ..Default::default()
                    },
                    Some(v) => Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Value as i32,
                        key: key.clone().into_bytes(),
                        target_union: Some(compare::TargetUnion::Value(v.clone().into_bytes())),
                        ..Default::default()
                    },
                };
                let put = RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone().into_bytes(),
                        ..Default::default()
                    })),
                };
                let r = kv.txn(TxnRequest { compare: vec![cmp], success: vec![put], failure: vec![] }).await?.into_inner();
                let rev = r.header.map(|h| h.revision).unwrap_or(0);
                Ok((OpResult::Cas { succeeded: r.succeeded, revision: rev }, Some(rev)))
            }
            Op::Delete { key } => {
                let r = kv
                    .delete_range(DeleteRangeRequest { key: key.clone().into_bytes(), ..Default::default() })
                    .await?
                    .into_inner();
                let rev = r.header.map(|h| h.revision).unwrap_or(0);
                Ok((OpResult::Delete { deleted: r.deleted, revision: rev }, Some(rev)))
            }
            Op::Append { key, element } => {
                // Two keys in one txn: the element and the set's "last" marker.
                let ops = crate::history::append_writes(key, *element)
                    .into_iter()
                    .map(|(k, v)| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: k.into_bytes(),
                            value: v.into_bytes(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let r = kv.txn(TxnRequest { compare: vec![], success: ops, failure: vec![] }).await?.into_inner();
                let rev = r.header.map(|h| h.revision).unwrap_or(0);
                Ok((OpResult::Append { revision: rev }, Some(rev)))
            }
            Op::ReadSet { key } => {
                let mut end = key.clone().into_bytes();
                *end.last_mut().unwrap() += 1;
                let r = kv
                    .range(RangeRequest { key: key.clone().into_bytes(), range_end: end, keys_only: true, ..Default::default() })
                    .await?
                    .into_inner();
                let rev = r.header.map(|h| h.revision).unwrap_or(0);
                let elements = r
                    .kvs
                    .iter()
                    .filter_map(|kv| std::str::from_utf8(&kv.key[key.len()..]).ok()?.parse::<u64>().ok())
                    .collect();
                Ok((OpResult::ReadSet { elements, revision: rev }, Some(rev)))
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok((result, rev))) => (Outcome::Ok(result), rev),
        Ok(Err(status)) => (classify(&status, is_read), None),
        Err(_) if is_read => (Outcome::Fail("timeout".into()), None),
        Err(_) => (Outcome::Unknown("timeout".into()), None),
    }
}

/// Runs one client until `stop`; it starts on endpoint `client % n` and moves to the next one
/// after any failure.
pub async fn client_loop(
    client: u32,
    endpoints: Vec<String>,
    cfg: WorkloadConfig,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e3779b97f4a7c15));
    let mut ep = client as usize % endpoints.len();
    let mut kv = KvClient::new(channel(&endpoints[ep]).expect("valid endpoint"));
    let mut seq: u64 = 0;
    // Last value this client saw per register, to make CAS succeed often enough to matter.
    let mut seen: Vec<Option<String>> = vec![None; cfg.register_keys];
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let value = format!("c{client}-{seq}");
        let r = rng.random_range(0..100);
        let op = if cfg.set_keys > 0 && r >= 88 {
            let k = set_prefix(rng.random_range(0..cfg.set_keys));
            if r >= 94 {
                Op::Append { key: k, element: ((client as u64) << 32) | seq }
            } else {
                Op::ReadSet { key: k }
            }
        } else {
            let i = rng.random_range(0..cfg.register_keys);
            let key = register_key(i);
            match r % 20 {
                0..=7 => Op::Get { key },
                8..=12 => Op::Put { key, value },
                13..=18 => Op::Cas { key, expect: seen[i].clone(), value },
                _ => Op::Delete { key },
            }
        };
        let invoke = recorder.now_ns();
        let (outcome, rev) = execute(&mut kv, &op, cfg.op_timeout).await;
        if let (Op::Get { key }, Outcome::Ok(OpResult::Get { value, .. })) = (&op, &outcome) {
            if let Some(i) = key.strip_prefix("reg/").and_then(|s| s.parse::<usize>().ok()) {
                seen[i] = value.clone();
            }
        }
        let failed = !matches!(outcome, Outcome::Ok(_));
        recorder.record(client, op, invoke, outcome, rev);
        if failed {
            ep = (ep + 1) % endpoints.len();
            kv = KvClient::new(channel(&endpoints[ep]).expect("valid endpoint"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else if !cfg.think_time.is_zero() {
            tokio::time::sleep(cfg.think_time).await;
        }
    }
}

/// After the faults: one linearizable read of every key, retried until it succeeds, recorded in
/// the history so the checkers see the final state.
pub async fn final_reads(endpoints: &[String], cfg: &WorkloadConfig, recorder: &Recorder, deadline: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut keys: Vec<Op> = (0..cfg.register_keys).map(|i| Op::Get { key: register_key(i) }).collect();
    keys.extend((0..cfg.set_keys).map(|i| Op::ReadSet { key: set_prefix(i) }));
    let reader = u32::MAX;
    for op in keys {
        let mut ep = 0;
        loop {
            let mut kv = KvClient::new(channel(&endpoints[ep])?);
            let invoke = recorder.now_ns();
            let (outcome, rev) = execute(&mut kv, &op, Duration::from_secs(2)).await;
            if matches!(outcome, Outcome::Ok(_)) {
                recorder.record(reader, op, invoke, outcome, rev);
                break;
            }
            if start.elapsed() > deadline {
                anyhow::bail!("final read of {op:?} kept failing: {outcome:?}");
            }
            ep = (ep + 1) % endpoints.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A watcher: watches every key under `prefix` from revision 1 and records every response. When
/// its stream breaks (the member died, was cut off), it resumes on the next endpoint from the
/// last revision it saw + 1, as etcd clients do: one [`WatchSession`] per stream.
pub async fn watch_loop(
    watcher: u32,
    endpoints: Vec<String>,
    prefix: String,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> Vec<crate::history::WatchSession> {
    use crate::history::{EventKind, WatchDelivery, WatchEvent, WatchSession};
    use rampart_proto::etcdserverpb::watch_client::WatchClient;
    use rampart_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};

    let mut sessions = Vec::new();
    let mut next_rev: i64 = 1;
    let mut ep = watcher as usize % endpoints.len();
    let mut end = prefix.clone().into_bytes();
    *end.last_mut().unwrap() += 1;
    while !stop.load(Ordering::Relaxed) {
        let mut session = WatchSession::new(watcher, &prefix, next_rev);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.clone().into_bytes(),
                range_end: end.clone(),
                start_revision: next_rev,
                ..Default::default()
            })),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<WatchRequest>(1);
        let _ = tx.send(create).await;
        let stream = async {
            let mut client = WatchClient::new(channel(&endpoints[ep])?);
            let mut responses = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok::<(), anyhow::Error>(());
                }
                // A paused or cut-off member sends nothing: check `stop` now and then.
                let msg = match tokio::time::timeout(Duration::from_millis(500), responses.message()).await {
                    Err(_) => continue,
                    Ok(m) => m?,
                };
                let Some(resp) = msg else { anyhow::bail!("watch stream ended") };
                if resp.compact_revision != 0 {
                    session.deliveries.push(WatchDelivery {
                        watcher,
                        received_ns: recorder.now_ns(),
                        events: vec![],
                        compact_revision: resp.compact_revision,
                    });
                    anyhow::bail!("watch compacted at {}", resp.compact_revision);
                }
                if resp.events.is_empty() {
                    continue;
                }
                let events: Vec<WatchEvent> = resp
                    .events
                    .iter()
                    .filter_map(|e| {
                        let kv = e.kv.as_ref()?;
                        Some(WatchEvent {
                            kind: if e.r#type == 1 { EventKind::Delete } else { EventKind::Put },
                            key: String::from_utf8_lossy(&kv.key).into_owned(),
                            value: String::from_utf8_lossy(&kv.value).into_owned(),
                            mod_revision: kv.mod_revision,
                        })
                    })
                    .collect();
                if let Some(last) = events.last() {
                    next_rev = next_rev.max(last.mod_revision + 1);
                }
                session.deliveries.push(WatchDelivery { watcher, received_ns: recorder.now_ns(), events, compact_revision: 0 });
            }
        };
        let result = stream.await;
        drop(tx);
        sessions.push(session);
        if result.is_err() {
            ep = (ep + 1) % endpoints.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    sessions
}
