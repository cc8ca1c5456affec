//! The closed-loop clients: put, range, txn and lease keep-alive, and what they share.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::channel::mpsc;
use futures::SinkExt;
use rampart_proto::etcdserverpb::kv_client::KvClient;
use rampart_proto::etcdserverpb::lease_client::LeaseClient;
use rampart_proto::etcdserverpb::{
    compare, request_op, Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rampart_proto::wire::BatchedConnector;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use crate::args::{key, BenchArgs, Stop, Workload, WATCH_STAMP_BYTES};
use crate::rate::RateLimiter;
use crate::stats::{rate_per_s, Latencies};
use crate::unary::{Rpc, UnaryClient, UnaryConn};
use crate::{progress_interval, BenchResult, MAX_ERROR_SAMPLES};

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters and stop conditions shared by all clients of a run.
pub(crate) struct Shared {
    /// Tickets handed out; ticket n is operation n (for `--total` and the rate schedule).
    issued: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) errors: AtomicU64,
    stop: Stop,
    deadline: Option<Instant>,
    limiter: Option<RateLimiter>,
    /// Set when continuing is pointless (the server does not implement the service).
    halted: AtomicBool,
    pub(crate) fatal: Mutex<Option<String>>,
    pub(crate) error_samples: Mutex<Vec<String>>,
}

impl Shared {
    pub(crate) fn new(args: &BenchArgs, start: Instant) -> Self {
        let stop = args.stop();
        Shared {
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            stop,
            deadline: match stop {
                Stop::After(d) => Some(start + d),
                Stop::Ops(_) => None,
            },
            limiter: RateLimiter::new(args.rate, start),
            halted: AtomicBool::new(false),
            fatal: Mutex::new(None),
            error_samples: Mutex::new(Vec::new()),
        }
    }

    /// The next operation's ticket, after waiting for its slot in the rate schedule; `None` when
    /// the run is over.
    async fn next(&self) -> Option<u64> {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        if let Stop::Ops(total) = self.stop {
            if n >= total {
                return None;
            }
        }
        if let Some(limiter) = &self.limiter {
            limiter.wait(n).await;
        }
        let over = self.deadline.is_some_and(|d| Instant::now() >= d) || self.halted.load(Ordering::Relaxed);
        (!over).then_some(n)
    }

    fn failed(&self, e: OpError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if e.fatal {
            self.halt(e.message);
        } else {
            note_error(&self.error_samples, e.message);
        }
    }

    /// Stops every client and makes the run fail with `why`.
    pub(crate) fn halt(&self, why: String) {
        self.halted.store(true, Ordering::Relaxed);
        self.fatal.lock().unwrap().get_or_insert(why);
    }

    pub(crate) fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap().clone()
    }
}

/// Keeps `message` if it is new and fewer than [`MAX_ERROR_SAMPLES`] are kept.
pub(crate) fn note_error(samples: &Mutex<Vec<String>>, message: String) {
    let mut samples = samples.lock().unwrap();
    if samples.len() < MAX_ERROR_SAMPLES && !samples.contains(&message) {
        samples.push(message);
    }
}

/// A failed operation.
pub(crate) struct OpError {
    pub(crate) message: String,
    /// The run cannot go on (e.g. the service is not implemented).
    pub(crate) fatal: bool,
}

impl OpError {
    pub(crate) fn from_status(endpoint: &str, service: &str, s: tonic::Status) -> Self {
        if s.code() == tonic::Code::Unimplemented {
            return OpError { message: unimplemented_message(endpoint, service, &s), fatal: true };
        }
        OpError { message: format!("{endpoint}: {:?}: {}", s.code(), s.message()), fatal: false }
    }

    fn timeout(endpoint: &str, after: Duration) -> Self {
        OpError { message: format!("{endpoint}: no answer within {after:?} (--timeout)"), fatal: false }
    }
}

/// The error shown when a server lacks a service (an older Rampart, or a proxy that forwards
/// only some services).
pub(crate) fn unimplemented_message(endpoint: &str, service: &str, s: &tonic::Status) -> String {
    let detail = if s.message().is_empty() { String::new() } else { format!(": {}", s.message()) };
    format!(
        "{endpoint} does not implement etcdserverpb.{service} (gRPC Unimplemented{detail}); \
         this workload needs a server with the {service} service."
    )
}

/// A connection of a run: a tonic channel (for the streams of watch and lease) or a
/// [`UnaryConn`] (for the unary KV calls).
#[derive(Clone)]
pub(crate) enum Conn {
    Grpc { endpoint: String, channel: Channel },
    Unary(Arc<UnaryConn>),
}

impl Conn {
    fn endpoint(&self) -> String {
        match self {
            Conn::Grpc { endpoint, .. } => endpoint.clone(),
            Conn::Unary(conn) => conn.url().to_string(),
        }
    }
}

/// Whether `workload`'s clients make only unary KV calls (and so use [`UnaryConn`]s).
fn unary_only(workload: Workload) -> bool {
    matches!(workload, Workload::Put | Workload::Range | Workload::RangeSerializable | Workload::Txn)
}

/// Opens `n` connections for `workload`, connection i to endpoint i mod the number of endpoints.
pub(crate) async fn connect_for(workload: Workload, urls: &[String], n: usize) -> anyhow::Result<Vec<Conn>> {
    if unary_only(workload) {
        return connect_unary(urls, n).await;
    }
    let channels = connect(urls, n).await?;
    Ok(channels.into_iter().map(|(endpoint, channel)| Conn::Grpc { endpoint, channel }).collect())
}

/// Opens `n` [`UnaryConn`]s, connection i to endpoint i mod the number of endpoints.
async fn connect_unary(urls: &[String], n: usize) -> anyhow::Result<Vec<Conn>> {
    let opens = (0..n).map(|i| UnaryConn::connect(&urls[i % urls.len()]));
    Ok(futures::future::try_join_all(opens).await?.into_iter().map(Conn::Unary).collect())
}

/// Opens `n` tonic channels, channel i to endpoint i mod the number of endpoints. Returns each
/// channel with its endpoint URL.
pub(crate) async fn connect(urls: &[String], n: usize) -> anyhow::Result<Vec<(String, Channel)>> {
    let opens = (0..n).map(|i| {
        let url = urls[i % urls.len()].clone();
        async move {
            let channel = Endpoint::from_shared(url.clone())
                .with_context(|| format!("bad endpoint {url:?}"))?
                .connect_with_connector(BatchedConnector { local_ip: None, connect_timeout: Some(CONNECT_TIMEOUT) })
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            anyhow::Ok((url, channel))
        }
    });
    futures::future::try_join_all(opens).await
}

/// Runs `fut` with the per-request deadline.
pub(crate) async fn with_timeout<T>(
    endpoint: &str,
    service: &str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, OpError> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(s)) => Err(OpError::from_status(endpoint, service, s)),
        Err(_) => Err(OpError::timeout(endpoint, after)),
    }
}

/// The key-space sampling and value of one client.
pub(crate) struct Keys {
    rng: SmallRng,
    key_size: usize,
    key_space: u64,
}

impl Keys {
    pub(crate) fn new(args: &BenchArgs) -> Self {
        Keys { rng: SmallRng::from_rng(&mut rand::rng()), key_size: args.key_size, key_space: args.key_space }
    }

    pub(crate) fn random(&mut self) -> Vec<u8> {
        key(self.rng.random_range(0..self.key_space), self.key_size)
    }

    fn value(&mut self, size: usize) -> Vec<u8> {
        (0..size).map(|_| self.rng.sample(rand::distr::Alphanumeric)).collect()
    }
}

/// One client's connection-level state for its workload.
pub(crate) enum Session {
    Kv { kv: UnaryClient, workload: Workload, value: Vec<u8> },
    Lease { lease: LeaseClient<Channel>, id: i64, tx: mpsc::Sender<LeaseKeepAliveRequest>, rx: Box<Streaming<LeaseKeepAliveResponse>> },
    /// The writers of the watch workload: each value starts with its send time.
    WatchPut { kv: KvClient<Channel>, epoch: Instant, value: Vec<u8> },
}

/// A client: its session, its endpoint, its keys.
pub(crate) struct Client {
    pub(crate) session: Session,
    pub(crate) endpoint: String,
    pub(crate) keys: Keys,
    pub(crate) timeout: Duration,
}

impl Client {
    /// Prepares a client for `args.workload` (for lease: grants its lease and opens its stream).
    /// `conn` is of the kind [`connect_for`] opens for the workload.
    pub(crate) async fn open(args: &BenchArgs, conn: Conn, epoch: Instant) -> Result<Self, OpError> {
        let mut keys = Keys::new(args);
        let timeout = args.timeout;
        let endpoint = conn.endpoint();
        let session = match (args.workload, conn) {
            (Workload::Put | Workload::Range | Workload::RangeSerializable | Workload::Txn, Conn::Unary(conn)) => {
                Session::Kv { kv: UnaryClient::new(conn), workload: args.workload, value: keys.value(args.value_size) }
            }
            (Workload::Watch, Conn::Grpc { channel, .. }) => {
                Session::WatchPut { kv: KvClient::new(channel), epoch, value: keys.value(args.value_size) }
            }
            (Workload::Lease, Conn::Grpc { channel, .. }) => {
                let mut lease = LeaseClient::new(channel);
                let grant = LeaseGrantRequest { ttl: args.lease_ttl, id: 0 };
                let granted = with_timeout(&endpoint, "Lease", timeout, lease.lease_grant(grant)).await?.into_inner();
                if !granted.error.is_empty() {
                    return Err(OpError { message: format!("{endpoint}: LeaseGrant: {}", granted.error), fatal: true });
                }
                // The request side stays open for the whole run: closing it ends the stream. etcd
                // sends the response headers only with the first answer, so the first keep-alive
                // is queued before the call and its answer read here, unmeasured.
                let (mut tx, requests) = mpsc::channel(1);
                let first = LeaseKeepAliveRequest { id: granted.id };
                tx.try_send(first).expect("an empty channel has room for one request");
                let opened = async {
                    let mut rx = lease.lease_keep_alive(requests).await?.into_inner();
                    rx.message().await?;
                    Ok(rx)
                };
                match with_timeout(&endpoint, "Lease", timeout, opened).await {
                    Ok(rx) => Session::Lease { lease, id: granted.id, tx, rx: Box::new(rx) },
                    Err(e) => {
                        revoke(&mut lease, granted.id, timeout).await;
                        return Err(e);
                    }
                }
            }
            (workload, _) => unreachable!("connect_for opens the other kind of connection for {workload:?}"),
        };
        Ok(Client { session, endpoint, keys, timeout })
    }

    /// One operation.
    async fn op(&mut self) -> Result<(), OpError> {
        let (endpoint, timeout) = (self.endpoint.as_str(), self.timeout);
        match &mut self.session {
            Session::Kv { kv, workload, value } => {
                let key = self.keys.random();
                match workload {
                    Workload::Put => {
                        let put = PutRequest { key, value: value.clone(), ..Default::default() };
                        with_timeout(endpoint, "KV", timeout, kv.call::<_, PutResponse>(Rpc::Put, &put)).await?;
                    }
                    Workload::Range | Workload::RangeSerializable => {
                        let serializable = *workload == Workload::RangeSerializable;
                        let range = RangeRequest { key, serializable, ..Default::default() };
                        with_timeout(endpoint, "KV", timeout, kv.call::<_, RangeResponse>(Rpc::Range, &range)).await?;
                    }
                    Workload::Txn => {
                        let txn = txn(key, value.clone());
                        with_timeout(endpoint, "KV", timeout, kv.call::<_, TxnResponse>(Rpc::Txn, &txn)).await?;
                    }
                    Workload::Watch | Workload::Lease => unreachable!("not a KV session"),
                }
            }
            Session::WatchPut { kv, epoch, value } => {
                let mut value = value.clone();
                let stamp = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                value[..WATCH_STAMP_BYTES].copy_from_slice(&stamp.to_le_bytes());
                let put = PutRequest { key: self.keys.random(), value, ..Default::default() };
                with_timeout(endpoint, "KV", timeout, kv.put(put)).await?;
            }
            Session::Lease { id, tx, rx, .. } => {
                let id = *id;
                let round_trip = async {
                    tx.send(LeaseKeepAliveRequest { id }).await.map_err(|_| tonic::Status::cancelled("keep-alive stream closed"))?;
                    rx.message().await?.ok_or_else(|| tonic::Status::cancelled("keep-alive stream ended by the server"))
                };
                let answer = with_timeout(endpoint, "Lease", timeout, round_trip).await?;
                if answer.ttl <= 0 {
                    return Err(OpError { message: format!("{endpoint}: lease {id:x} expired or was revoked"), fatal: true });
                }
            }
        }
        Ok(())
    }

    /// Ends the session: a lease is revoked (best effort) so it does not linger for its TTL.
    async fn close(self) {
        if let Session::Lease { mut lease, id, tx, rx } = self.session {
            drop((tx, rx));
            revoke(&mut lease, id, self.timeout).await;
        }
    }
}

/// Revokes a lease, ignoring failure: it then expires after its TTL.
async fn revoke(lease: &mut LeaseClient<Channel>, id: i64, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, lease.lease_revoke(LeaseRevokeRequest { id })).await;
}

/// The txn workload's transaction: if version(key) > -1 (always) then put, else range.
fn txn(key: Vec<u8>, value: Vec<u8>) -> TxnRequest {
    let compare = Compare {
        result: compare::CompareResult::Greater as i32,
        target: compare::CompareTarget::Version as i32,
        key: key.clone(),
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::Version(-1)),
    };
    let put = PutRequest { key: key.clone(), value, ..Default::default() };
    let range = RangeRequest { key, ..Default::default() };
    TxnRequest {
        compare: vec![compare],
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put)) }],
        failure: vec![RequestOp { request: Some(request_op::Request::RequestRange(range)) }],
    }
}

/// One client's loop: operations until the run is over. Returns its latencies.
pub(crate) async fn client_loop(mut client: Client, shared: Arc<Shared>) -> Latencies {
    let mut latencies = Latencies::new();
    while shared.next().await.is_some() {
        let sent = Instant::now();
        match client.op().await {
            Ok(()) => {
                latencies.record(sent.elapsed());
                shared.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.failed(e),
        }
    }
    client.close().await;
    latencies
}

/// Opens one client per `--clients` (client i on connection i mod N), concurrently.
pub(crate) async fn open_clients(args: &BenchArgs, conns: &[Conn], epoch: Instant) -> anyhow::Result<Vec<Client>> {
    let opens = (0..args.clients).map(|i| Client::open(args, conns[i % conns.len()].clone(), epoch));
    futures::future::try_join_all(opens).await.map_err(|e| anyhow!(e.message))
}

/// Starts the clients; the returned handles yield their latencies.
pub(crate) fn spawn_clients(clients: Vec<Client>, shared: &Arc<Shared>) -> Vec<JoinHandle<Latencies>> {
    clients.into_iter().map(|c| tokio::spawn(client_loop(c, shared.clone()))).collect()
}

/// Waits for the clients and merges their latencies.
pub(crate) async fn join_clients(handles: Vec<JoinHandle<Latencies>>) -> anyhow::Result<Latencies> {
    let mut all = Latencies::new();
    for h in handles {
        all.merge(&h.await.context("a client task panicked")?);
    }
    Ok(all)
}

/// Prints a progress line on stderr every `interval` until aborted.
pub(crate) fn spawn_progress(what: &'static str, counter: Arc<Shared>, start: Instant, interval: Option<Duration>) -> Option<JoinHandle<()>> {
    let interval = interval?;
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(start + interval, interval);
        let mut last = 0;
        loop {
            ticks.tick().await;
            let done = counter.completed.load(Ordering::Relaxed);
            let errors = counter.errors.load(Ordering::Relaxed);
            let elapsed = start.elapsed();
            eprintln!(
                "bench: {:>7.1} s  {done} {what}  {:.0} {what}/s (last {interval:?}: {:.0})  {errors} errors",
                elapsed.as_secs_f64(),
                rate_per_s(done, elapsed),
                rate_per_s(done - last, interval),
            );
            last = done;
        }
    }))
}

/// Puts every key of the key space once, `--clients` at a time, unmeasured, over connections of
/// its own (`--connections` of them).
async fn prefill(args: &BenchArgs, urls: &[String]) -> anyhow::Result<()> {
    eprintln!("bench: prefilling {} keys", args.key_space);
    let conns = connect_unary(urls, args.connections).await?;
    let next = Arc::new(AtomicU64::new(0));
    let tasks = (0..args.clients).map(|i| {
        let Conn::Unary(conn) = conns[i % conns.len()].clone() else { unreachable!("connect_unary opens unary connections") };
        let (next, key_space, key_size, timeout) = (next.clone(), args.key_space, args.key_size, args.timeout);
        let value = Keys::new(args).value(args.value_size);
        tokio::spawn(async move {
            let endpoint = conn.url().to_string();
            let mut kv = UnaryClient::new(conn);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= key_space {
                    return anyhow::Ok(());
                }
                let put = PutRequest { key: key(n, key_size), value: value.clone(), ..Default::default() };
                with_timeout(&endpoint, "KV", timeout, kv.call::<_, PutResponse>(Rpc::Put, &put))
                    .await
                    .map_err(|e| anyhow!("prefill: {}", e.message))?;
            }
        })
    });
    for result in futures::future::join_all(tasks).await {
        result.context("a prefill task panicked")??;
    }
    Ok(())
}

/// The closed-loop workloads: put, range, range-serializable, txn, lease.
pub(crate) async fn run(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    let urls = args.endpoint_urls();
    let conns = connect_for(args.workload, &urls, args.connections).await?;
    if args.prefill {
        prefill(args, &urls).await?;
    }
    let clients = open_clients(args, &conns, Instant::now()).await?;

    let start = Instant::now();
    let shared = Arc::new(Shared::new(args, start));
    let progress = spawn_progress("ops", shared.clone(), start, progress_interval(args));
    let latencies = join_clients(spawn_clients(clients, &shared)).await;
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    let latencies = latencies?;
    if let Some(why) = shared.fatal() {
        bail!(why);
    }
    Ok(result(args, &urls, &shared, &latencies, elapsed))
}

/// The result of a run from its counters.
pub(crate) fn result(args: &BenchArgs, urls: &[String], shared: &Shared, latencies: &Latencies, elapsed: Duration) -> BenchResult {
    let ops = latencies.count();
    BenchResult {
        label: args.label.clone(),
        workload: args.workload,
        endpoints: urls.to_vec(),
        clients: args.clients,
        connections: args.connections,
        key_size: args.key_size,
        value_size: args.value_size,
        key_space: args.key_space,
        rate_limit: args.rate,
        ops,
        errors: shared.errors.load(Ordering::Relaxed),
        elapsed_s: elapsed.as_secs_f64(),
        ops_per_s: rate_per_s(ops, elapsed),
        latency: latencies.summary(),
        error_samples: shared.error_samples.lock().unwrap().clone(),
        watch: None,
    }
}
