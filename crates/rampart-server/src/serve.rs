//! Starts a member's listeners and runs it until asked to stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart_core::limits;
use rampart_proto::etcdserverpb::cluster_server::ClusterServer;
use rampart_proto::etcdserverpb::kv_server::KvServer;
use rampart_proto::etcdserverpb::lease_server::LeaseServer;
use rampart_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use rampart_proto::etcdserverpb::watch_server::WatchServer;
use rampart_proto::rampartpb::peer_server::PeerServer;
use rampart_raft::network::MAX_PEER_MESSAGE_BYTES;
use rampart_raft::pipe::{self, PipeKind};
use rampart_proto::wire::BatchedWrites;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::transport::Server;

use rampart_proto::v3electionpb::election_server::ElectionServer;
use rampart_proto::v3lockpb::lock_server::LockServer;

use rampart_proto::etcdserverpb::auth_server::AuthServer;

use crate::api::{ClusterService, KvService};
use crate::auth::AuthService;
use crate::concurrency::{ElectionService, LockService};
use crate::gateway::{self, Gateway};
use crate::maintenance::{self, MaintenanceService};
use crate::config::{url_to_addr, Config};
use crate::lease::{LeaseService, Lessor};
use crate::member::{Member, StartError};
use crate::peer::PeerService;
use crate::watch::WatchService;
use crate::unary::UnaryKvLayer;

/// A running member. Dropping it does not stop it; call [`Running::stop`].
pub struct Running {
    pub member: Arc<Member>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Accepted connections with Nagle off. tonic's `Server::tcp_nodelay` applies only to listeners
/// it binds itself; ours are bound early (see `start`), so without this every small response
/// waited for the peer's delayed ACK: about 40 ms per read (found by the bench).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Accepted client connections: Nagle off, and small frames batched into one write
/// ([`BatchedWrites`]: one `writev` per response otherwise). Peer listeners keep plain streams:
/// batching there cost put-64 CPU in an A/B run (finding 13 in docs/performance.md).
fn client_incoming(listener: TcpListener) -> impl futures::Stream<Item = std::io::Result<BatchedWrites<TcpStream>>> {
    use futures::StreamExt;
    incoming(listener).map(|accepted| accepted.map(BatchedWrites::new))
}

/// Accepts a peer listener's connections until `stop`: AppendEntries pipes
/// (`rampart_raft::pipe`) are served here, one task each; every other connection is HTTP/2 for
/// the gRPC peer service and comes out of the returned stream. Each connection is told apart in
/// its own task, so one slow to send its first bytes holds up no other.
fn peer_incoming(
    listener: TcpListener,
    member: Arc<Member>,
    mut stop: watch::Receiver<bool>,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<TcpStream>>(limits::PEER_ACCEPT_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: tonic logs and goes on, so do we.
                    tracing::warn!(%e, "accepting a peer connection");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (tx, member, mut stop) = (tx.clone(), member.clone(), stop.clone());
            tokio::spawn(async move {
                let mut stream = stream;
                let Some(kind) = pipe::sniff(&stream).await else {
                    let _ = tx.send(Ok(stream)).await;
                    return;
                };
                let served = async {
                    pipe::skip_preface(&mut stream).await?;
                    match kind {
                        PipeKind::AppendEntries => pipe::serve(stream, member.raft.clone()).await,
                        PipeKind::Propose => pipe::serve_propose(stream, |batch| member.propose_forwarded(batch)).await,
                    }
                };
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    r = served => if let Err(e) = r {
                        tracing::debug!(%e, ?kind, "peer pipe closed");
                    },
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn bind(url: &str) -> Result<TcpListener, StartError> {
    let addr = url_to_addr(url)?;
    TcpListener::bind(addr).await.map_err(|e| StartError::Listen { url: url.to_string(), err: e.to_string() })
}

/// Opens the member and starts serving peers and clients.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    // Bind before opening storage so a port clash fails fast and leaves no state behind.
    let mut peer_listeners = Vec::new();
    for url in &cfg.listen_peer_urls {
        peer_listeners.push(bind(url).await?);
    }
    let mut client_listeners = Vec::new();
    for url in &cfg.listen_client_urls {
        client_listeners.push(bind(url).await?);
    }

    let gateway_routes = gateway::Routes::load()?;

    let member = Member::open(cfg.clone()).await?;
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let lessor = Arc::new(Lessor::new(member.clone()));

    for listener in peer_listeners {
        let svc = PeerServer::new(PeerService { member: member.clone(), lessor: lessor.clone() })
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let mut rx = stop_rx.clone();
        let grpc_conns = peer_incoming(listener, member.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let r = Server::builder()
                .tcp_nodelay(true)
                .add_service(svc)
                .serve_with_incoming_shutdown(grpc_conns, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(%e, "peer server failed");
            }
        }));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let max_recv = cfg.max_request_bytes + limits::GRPC_OVERHEAD_BYTES;
    for listener in client_listeners {
        let kv_svc = KvService { member: member.clone() };
        let maintenance_svc = MaintenanceService { member: member.clone() };
        let cluster_svc = ClusterService { member: member.clone() };
        let leases = LeaseService { member: member.clone(), lessor: lessor.clone(), stop: stop_rx.clone() };
        let lock_svc = LockService::new(member.clone(), leases.clone());
        let election_svc = ElectionService::new(member.clone(), leases.clone(), stop_rx.clone());
        let auth_svc = AuthService { member: member.clone() };
        let gateway = Gateway::new(
            member.clone(),
            gateway::Services {
                kv: kv_svc.clone(),
                lease: leases.clone(),
                cluster: cluster_svc.clone(),
                maintenance: maintenance_svc.clone(),
                watch: WatchService { member: member.clone(), stop: stop_rx.clone() },
                lock: lock_svc.clone(),
                election: election_svc.clone(),
                auth: auth_svc.clone(),
            },
            gateway_routes.clone(),
        );
        let unary_kv = UnaryKvLayer::new(kv_svc.clone(), max_recv, limits::MAX_RESPONSE_BYTES);
        let kv = KvServer::new(kv_svc)
            .max_decoding_message_size(max_recv)
            .max_encoding_message_size(limits::MAX_RESPONSE_BYTES);
        let maintenance = MaintenanceServer::new(maintenance_svc).max_decoding_message_size(max_recv);
        let cluster = ClusterServer::new(cluster_svc);
        let watch = WatchServer::new(WatchService { member: member.clone(), stop: stop_rx.clone() })
            .max_decoding_message_size(max_recv)
            .max_encoding_message_size(limits::MAX_RESPONSE_BYTES);
        let lock = LockServer::new(lock_svc);
        let election = ElectionServer::new(election_svc);
        let lease = LeaseServer::new(leases);
        let auth = AuthServer::new(auth_svc);
        let mut grpc = tonic::service::Routes::builder();
        grpc.add_service(kv)
            .add_service(maintenance)
            .add_service(cluster)
            .add_service(watch)
            .add_service(lease)
            .add_service(auth)
            .add_service(lock)
            .add_service(election)
            .add_service(health_service.clone());
        // The JSON gateway shares the port: HTTP/1 and HTTP/2 are both accepted.
        let svc = tower_layer::Layer::layer(&unary_kv, gateway.add_to(grpc.routes()));
        tasks.push(tokio::spawn(crate::inline::serve(client_incoming(listener), svc, stop_rx.clone())));
    }

    tokio::spawn(member.clone().publish_attributes());
    tasks.push(tokio::spawn(watch_runtime_stalls(stop_rx.clone())));
    tasks.push(tokio::spawn(maintenance::watch_quota(member.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(lessor.run_expiry(stop_rx.clone())));
    tracing::info!(
        name = %cfg.name,
        member = format!("{:x}", member.id),
        cluster = format!("{:x}", member.cluster_id),
        clients = ?cfg.listen_client_urls,
        peers = ?cfg.listen_peer_urls,
        "member started"
    );
    Ok(Running { member, stop, tasks })
}

/// How often [`Running::fatal`] looks at raft's running state.
const FATAL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl Running {
    /// Resolves when raft has stopped on its own with a fatal error (a storage failure such as a
    /// full disk): the member can no longer serve and the process should exit, so a supervisor
    /// restarts it once the cause is fixed. Etcd exits in the same situation.
    ///
    /// Checked every `FATAL_POLL`: the running state is only in openraft's full metrics, which are
    /// sent after every turn of the raft core, and waiting on them woke this task thousands of
    /// times a second under load.
    pub async fn fatal(&self) -> String {
        use openraft::type_config::async_runtime::WatchReceiver;
        let rx = self.member.raft.metrics();
        // Changes rarely; its sender goes away with the raft core.
        let mut server = self.member.raft.server_metrics();
        loop {
            if let Err(e) = &rx.borrow_watched().running_state {
                return e.to_string();
            }
            tokio::select! {
                _ = tokio::time::sleep(FATAL_POLL) => {}
                changed = server.changed() => {
                    if changed.is_err() {
                        if let Err(e) = &rx.borrow_watched().running_state {
                            return e.to_string();
                        }
                        return "raft stopped".into();
                    }
                }
            }
        }
    }

    /// Hands leadership to a follower if this member leads (as etcd does on stop), then stops
    /// serving and shuts raft down.
    pub async fn stop(self) {
        maintenance::hand_off_leadership(&self.member, std::time::Duration::from_millis(limits::STOP_LEADER_TRANSFER_MS)).await;
        let _ = self.stop.send(true);
        if let Err(e) = self.member.raft.shutdown().await {
            tracing::warn!(%e, "raft shutdown");
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
        }
    }
}

/// Warns when a task of this member's runtime waited long for a worker: raft's heartbeats and
/// election timers run on the same workers and waited as long, which is how a busy member can
/// miss the leader's heartbeats and start an election (bug 14 in docs/robustness.md).
/// Ends when the member stops.
async fn watch_runtime_stalls(mut stop: watch::Receiver<bool>) {
    const TICK: Duration = Duration::from_millis(50);
    let threshold = Duration::from_millis(limits::RUNTIME_STALL_WARN_MS);
    loop {
        let start = Instant::now();
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let late = start.elapsed().saturating_sub(TICK);
        if late >= threshold {
            tracing::warn!(
                late_ms = late.as_millis() as u64,
                "runtime stalled: a timer fired late (raft heartbeats and election timers waited as long)"
            );
        }
    }
}
