//! `rampart run-elected --key KEY [--ttl S] -- CMD ARGS...`: active/passive HA for any program.
//!
//! Every instance (one per machine) campaigns in the election KEY (the Election service, etcd's
//! recipe) with a lease of `--ttl` seconds that it keeps alive. Only the leader runs CMD, with
//! the leadership's revision as a fencing token in `RAMPART_FENCING_TOKEN` (it only grows: a
//! program can guard its writes with it, or a resource can refuse a smaller one). The others wait
//! in `Campaign`; when the leader's key goes (its lease expired because it died or was cut off,
//! or it resigned) the next one wins.
//!
//! Never two at once, by construction: the leader measures its lease from the moment it *sent*
//! its last confirmed keepalive, which is no later than the moment the server renewed it, so its
//! own deadline comes first. When that deadline nears with no keepalive confirmed, when the lease
//! is gone, or when its key is no longer the one it won, it sends CMD SIGTERM, and SIGKILL
//! `--grace` seconds later, so CMD is dead before the server can expire the lease and let a
//! standby in. If run-elected itself dies, CMD gets SIGKILL from the kernel (PR_SET_PDEATHSIG).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use std::sync::{Arc, Mutex};

use rampart_proto::etcdserverpb::auth_client::AuthClient;
use rampart_proto::etcdserverpb::kv_client::KvClient;
use rampart_proto::etcdserverpb::lease_client::LeaseClient;
use rampart_proto::etcdserverpb::{AuthenticateRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, RangeRequest};
use rampart_proto::v3electionpb::election_client::ElectionClient;
use rampart_proto::v3electionpb::{CampaignRequest, LeaderKey, ResignRequest};
use tokio::process::Child;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

/// Time to open a connection to one endpoint before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline of each unary call (grant, keepalive, range, resign, revoke).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before trying again after a failed call.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// CMD is killed this long before the lease could expire on the server, for the time a signal
/// and an exit take.
const SAFETY_MARGIN: Duration = Duration::from_millis(300);
/// A token is replaced after this long (etcd's tokens last 5 minutes).
const TOKEN_REFRESH: Duration = Duration::from_secs(120);
/// Shortest TTL accepted: keepalives go every third of it, and a loaded machine needs slack.
const MIN_TTL_S: i64 = 2;

#[derive(Args, Debug)]
pub struct RunElectedArgs {
    /// Comma-separated client endpoints of the cluster (host:port or http://host:port).
    #[arg(long, env = "RAMPART_ENDPOINTS", default_value = "127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379")]
    endpoints: String,
    /// The election: every instance of the same service campaigns on the same key.
    #[arg(long)]
    key: String,
    /// Lease TTL in seconds: a dead leader is replaced about this long after it died.
    #[arg(long, default_value_t = 10)]
    ttl: i64,
    /// Seconds between SIGTERM and SIGKILL when leadership is lost (default: a quarter of the
    /// TTL).
    #[arg(long)]
    grace: Option<f64>,
    /// NAME:PASSWORD, for a cluster with auth enabled (etcdctl's `--user`).
    #[arg(long, env = "RAMPART_USER")]
    user: Option<String>,
    /// The value this instance proclaims while it leads (default: hostname:pid).
    #[arg(long)]
    value: Option<String>,
    /// Log filter for run-elected's own messages (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "RAMPART_LOG", default_value = "warn")]
    pub log: String,
    /// The program to run while leading, and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// `--user`: who run-elected authenticates as, and its current token (shared by every
/// [`Endpoints`] of the process).
#[derive(Clone)]
struct Credentials {
    user: String,
    password: String,
    token: Arc<Mutex<Option<(String, Instant)>>>,
}

/// The cluster's endpoints, tried in turn: a call that fails moves to the next.
#[derive(Clone)]
struct Endpoints {
    urls: Vec<String>,
    next: usize,
    credentials: Option<Credentials>,
}

impl Endpoints {
    /// `request` wrapped for the cluster: with `--user`, the auth token goes along (etcd's
    /// `token` metadata). Tokens last 5 minutes; one older than [`TOKEN_REFRESH`] is replaced
    /// first.
    async fn request<T>(&mut self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        let Some(creds) = self.credentials.clone() else { return r };
        let current = creds.token.lock().unwrap().clone();
        let token = match current {
            Some((t, at)) if at.elapsed() < TOKEN_REFRESH => Some(t),
            _ => self.authenticate(&creds).await,
        };
        if let Some(v) = token.and_then(|t| tonic::metadata::MetadataValue::try_from(t.as_str()).ok()) {
            r.metadata_mut().insert("token", v);
        }
        r
    }

    /// A new token, or None (the call then fails with etcd's auth error and is retried).
    async fn authenticate(&mut self, creds: &Credentials) -> Option<String> {
        let mut c = AuthClient::new(self.connect().await);
        let req = AuthenticateRequest { name: creds.user.clone(), password: creds.password.clone() };
        match tokio::time::timeout(CALL_TIMEOUT, c.authenticate(req)).await {
            Ok(Ok(r)) => {
                let token = r.into_inner().token;
                *creds.token.lock().unwrap() = Some((token.clone(), Instant::now()));
                Some(token)
            }
            Ok(Err(s)) => {
                tracing::warn!("authentication as {} failed: {}", creds.user, s.message());
                None
            }
            Err(_) => None,
        }
    }

    fn parse(list: &str, user: Option<&str>) -> anyhow::Result<Endpoints> {
        let credentials = match user {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').context("--user must be NAME:PASSWORD")?;
                Some(Credentials { user: user.into(), password: password.into(), token: Arc::new(Mutex::new(None)) })
            }
        };
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| if s.contains("://") { s.to_string() } else { format!("http://{s}") })
            .collect();
        if urls.is_empty() {
            bail!("--endpoints: no endpoint given");
        }
        Ok(Endpoints { urls, next: 0, credentials })
    }

    /// A connection to the next endpoint that accepts one.
    async fn connect(&mut self) -> Channel {
        loop {
            let url = self.urls[self.next % self.urls.len()].clone();
            self.next += 1;
            let endpoint = match Endpoint::from_shared(url.clone()) {
                Ok(e) => e.tcp_nodelay(true).connect_timeout(CONNECT_TIMEOUT),
                Err(e) => {
                    tracing::warn!("bad endpoint {url}: {e}");
                    continue;
                }
            };
            match endpoint.connect().await {
                Ok(c) => return c,
                Err(e) => {
                    tracing::debug!(%url, %e, "endpoint unreachable");
                    tokio::time::sleep(RETRY_PAUSE / 2).await;
                }
            }
        }
    }
}

/// What the keepalive task knows of the lease.
#[derive(Debug, Clone, Copy)]
enum LeaseState {
    /// Confirmed alive by a keepalive sent at this instant.
    Alive { sent: Instant },
    /// The server no longer has it (expired or revoked).
    Gone,
}

/// Why this instance stopped leading or running.
enum Outcome {
    /// CMD exited on its own, with this status.
    Exited(std::process::ExitStatus),
    /// SIGTERM or SIGINT to run-elected.
    Signalled,
    /// Leadership lost: CMD was stopped; campaign again.
    Lost(&'static str),
}

pub async fn run(args: RunElectedArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.ttl < MIN_TTL_S {
        bail!("--ttl must be at least {MIN_TTL_S} seconds");
    }
    let ttl = Duration::from_secs(args.ttl as u64);
    let grace = Duration::from_secs_f64(args.grace.unwrap_or(args.ttl as f64 / 4.0));
    if grace + SAFETY_MARGIN >= ttl / 2 {
        bail!("--grace must be less than half the TTL minus {} ms", SAFETY_MARGIN.as_millis());
    }
    let value = args.value.clone().unwrap_or_else(|| format!("{}:{}", hostname(), std::process::id()));
    let mut endpoints = Endpoints::parse(&args.endpoints, args.user.as_deref())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    loop {
        let lease = tokio::select! {
            l = grant(&mut endpoints, args.ttl) => l,
            _ = term.recv() => return Ok(std::process::ExitCode::SUCCESS),
            _ = int.recv() => return Ok(std::process::ExitCode::SUCCESS),
        };
        let (state_tx, state) = watch::channel(LeaseState::Alive { sent: Instant::now() });
        let keepalive = tokio::spawn(keep_alive(endpoints.clone(), lease, ttl, state_tx));
        tracing::warn!("campaigning on {:?} with lease {lease:x}", args.key);
        let won = tokio::select! {
            w = campaign(&mut endpoints, &args.key, &value, lease) => Some(w),
            _ = lease_gone(state.clone()) => None,
            _ = term.recv() => { finish(&mut endpoints, None, lease).await; return Ok(std::process::ExitCode::SUCCESS) }
            _ = int.recv() => { finish(&mut endpoints, None, lease).await; return Ok(std::process::ExitCode::SUCCESS) }
        };
        let Some(leader) = won else {
            tracing::warn!("lease {lease:x} expired while campaigning; starting over");
            keepalive.abort();
            continue;
        };
        if !still_leader(&mut endpoints, &leader).await.unwrap_or(false) {
            tracing::warn!("won, but the key is gone already; starting over");
            keepalive.abort();
            continue;
        }
        tracing::warn!("leading with fencing token {}; starting {:?}", leader.rev, args.command);
        let mut child = spawn(&args.command, &leader, lease)?;
        let outcome = supervise(&mut child, &mut endpoints, &leader, state.clone(), ttl, grace, &mut term, &mut int).await;
        match outcome {
            Outcome::Exited(status) => {
                tracing::warn!("{:?} exited ({status}); resigning", args.command[0]);
                keepalive.abort();
                finish(&mut endpoints, Some(&leader), lease).await;
                return Ok(exit_code(status));
            }
            Outcome::Signalled => {
                stop(&mut child, grace).await;
                keepalive.abort();
                finish(&mut endpoints, Some(&leader), lease).await;
                return Ok(std::process::ExitCode::SUCCESS);
            }
            Outcome::Lost(why) => {
                tracing::warn!("leadership lost ({why}); stopping {:?}", args.command[0]);
                stop(&mut child, grace).await;
                keepalive.abort();
                // Best effort: if the lease still exists, give the key up at once.
                finish(&mut endpoints, Some(&leader), lease).await;
            }
        }
    }
}

/// Watches the leader's lease and key while CMD runs.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    child: &mut Child,
    endpoints: &mut Endpoints,
    leader: &LeaderKey,
    mut state: watch::Receiver<LeaseState>,
    ttl: Duration,
    grace: Duration,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Outcome {
    let check_every = ttl / 3;
    let mut next_check = tokio::time::Instant::now() + check_every;
    loop {
        let deadline = match *state.borrow() {
            LeaseState::Gone => return Outcome::Lost("lease gone"),
            // SIGTERM so that SIGKILL, `grace` later, still comes before the server's expiry.
            LeaseState::Alive { sent } => sent + ttl - grace - SAFETY_MARGIN,
        };
        if Instant::now() >= deadline {
            return Outcome::Lost("no keepalive confirmed in time");
        }
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(s) => Outcome::Exited(s),
                    Err(_) => Outcome::Lost("cannot wait for the program"),
                };
            }
            _ = term.recv() => return Outcome::Signalled,
            _ = int.recv() => return Outcome::Signalled,
            _ = state.changed() => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = tokio::time::sleep_until(next_check) => {
                next_check = tokio::time::Instant::now() + check_every;
                // A failed read says nothing; the keepalive deadline covers an unreachable cluster.
                // The check never runs past that deadline: found by the quorum-loss test, where a
                // check stuck on an unresponsive member held the loop a second past it.
                let left = deadline.saturating_duration_since(Instant::now());
                let check = tokio::time::timeout(CALL_TIMEOUT.min(left), still_leader(endpoints, leader));
                if let Ok(Ok(false)) = check.await {
                    return Outcome::Lost("the election key was deleted or replaced");
                }
            }
        }
    }
}

async fn grant(endpoints: &mut Endpoints, ttl: i64) -> i64 {
    loop {
        let mut c = LeaseClient::new(endpoints.connect().await);
        let req = endpoints.request(LeaseGrantRequest { ttl, id: 0 }).await;
        let call = c.lease_grant(req);
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => return r.into_inner().id,
            Ok(Err(s)) => tracing::warn!("lease grant failed: {}", s.message()),
            Err(_) => tracing::warn!("lease grant timed out"),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Keeps the lease alive every third of the TTL, over whichever endpoint answers, and publishes
/// what it learns.
async fn keep_alive(mut endpoints: Endpoints, lease: i64, ttl: Duration, state: watch::Sender<LeaseState>) {
    let every = ttl / 3;
    loop {
        let mut c = LeaseClient::new(endpoints.connect().await);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let Ok(Ok(resp)) = tokio::time::timeout(CALL_TIMEOUT, c.lease_keep_alive(endpoints.request(tokio_stream::wrappers::ReceiverStream::new(rx)).await)).await else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        let mut answers = resp.into_inner();
        loop {
            let sent = Instant::now();
            if tx.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                break;
            }
            match tokio::time::timeout(CALL_TIMEOUT.min(every), answers.message()).await {
                Ok(Ok(Some(a))) if a.ttl > 0 => {
                    tracing::debug!(lease = format!("{lease:x}"), rtt_ms = sent.elapsed().as_millis() as u64, "keepalive confirmed");
                    let _ = state.send(LeaseState::Alive { sent });
                }
                Ok(Ok(Some(_))) => {
                    let _ = state.send(LeaseState::Gone);
                    return;
                }
                other => {
                    // Stream broken or slow: reconnect, maybe elsewhere.
                    tracing::debug!(lease = format!("{lease:x}"), ?other, "keepalive failed");
                    break;
                }
            }
            tokio::time::sleep_until((sent + every).into()).await;
        }
    }
}

async fn lease_gone(mut state: watch::Receiver<LeaseState>) {
    let _ = state.wait_for(|s| matches!(s, LeaseState::Gone)).await;
}

/// Campaigns until this instance leads; the same lease always means the same key, so a call
/// that failed mid-way is simply made again.
async fn campaign(endpoints: &mut Endpoints, key: &str, value: &str, lease: i64) -> LeaderKey {
    loop {
        let mut c = ElectionClient::new(endpoints.connect().await);
        let req = CampaignRequest { name: key.as_bytes().to_vec(), lease, value: value.as_bytes().to_vec() };
        match c.campaign(endpoints.request(req).await).await {
            Ok(r) => {
                if let Some(leader) = r.into_inner().leader {
                    return leader;
                }
            }
            Err(s) => tracing::warn!("campaign interrupted ({}); trying again", s.message()),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// True if the leader key still exists with the revision it was won at (a linearizable read).
async fn still_leader(endpoints: &mut Endpoints, leader: &LeaderKey) -> anyhow::Result<bool> {
    let mut c = KvClient::new(endpoints.connect().await);
    let req = endpoints.request(RangeRequest { key: leader.key.clone(), ..Default::default() }).await;
    let r = tokio::time::timeout(CALL_TIMEOUT, c.range(req))
        .await
        .context("range timed out")??;
    Ok(r.into_inner().kvs.first().is_some_and(|kv| kv.create_revision == leader.rev))
}

/// Gives leadership and the lease up, best effort and bounded: what fails here (the cluster is
/// unreachable) the lease's expiry does.
async fn finish(endpoints: &mut Endpoints, leader: Option<&LeaderKey>, lease: i64) {
    let _ = tokio::time::timeout(2 * CALL_TIMEOUT, give_up(endpoints, leader, lease)).await;
}

async fn give_up(endpoints: &mut Endpoints, leader: Option<&LeaderKey>, lease: i64) {
    let mut channel = endpoints.connect().await;
    if let Some(leader) = leader {
        let mut e = ElectionClient::new(channel.clone());
        let req = endpoints.request(ResignRequest { leader: Some(leader.clone()) }).await;
        let _ = tokio::time::timeout(CALL_TIMEOUT, e.resign(req)).await;
        channel = endpoints.connect().await;
    }
    let mut l = LeaseClient::new(channel);
    let req = endpoints.request(LeaseRevokeRequest { id: lease }).await;
    let _ = tokio::time::timeout(CALL_TIMEOUT, l.lease_revoke(req)).await;
}

fn spawn(command: &[String], leader: &LeaderKey, lease: i64) -> anyhow::Result<Child> {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("RAMPART_FENCING_TOKEN", leader.rev.to_string())
        .env("RAMPART_ELECTION_KEY", String::from_utf8_lossy(&leader.key).into_owned())
        .env("RAMPART_LEASE_ID", format!("{lease:x}"))
        .kill_on_drop(true);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // If run-elected dies, so does CMD: a dead supervisor's program must not outlive the
            // lease that made it leader.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("cannot start {:?}", command[0]))
}

/// SIGTERM, then SIGKILL after `grace` if it is still running.
async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped before wait() below.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn exit_code(status: std::process::ExitStatus) -> std::process::ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
