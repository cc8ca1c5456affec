//! The bench driven end to end against small in-process servers that implement only the KV
//! service (as Rampart does today), so every workload path runs without etcd.
//! The real comparison with etcd is `scripts/bench-vs-etcd.sh`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use rampart_bench::{run, BenchArgs, BenchResult};
use rampart_proto::etcdserverpb::kv_server::{Kv, KvServer};
use rampart_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

/// A KV service that stores puts in a map; `fail` makes every request fail.
#[derive(Default)]
struct FakeKv {
    data: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    puts: AtomicU64,
    ranges: AtomicU64,
    txns: AtomicU64,
    serializable: AtomicU64,
    fail: bool,
}

#[tonic::async_trait]
impl Kv for FakeKv {
    async fn range(&self, r: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        if self.fail {
            return Err(Status::unavailable("etcdserver: leader changed"));
        }
        let r = r.into_inner();
        self.ranges.fetch_add(1, Ordering::Relaxed);
        if r.serializable {
            self.serializable.fetch_add(1, Ordering::Relaxed);
        }
        let count = i64::from(self.data.lock().unwrap().contains_key(&r.key));
        Ok(Response::new(RangeResponse { count, ..Default::default() }))
    }

    async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        if self.fail {
            return Err(Status::unavailable("etcdserver: leader changed"));
        }
        let r = r.into_inner();
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.data.lock().unwrap().insert(r.key, r.value);
        Ok(Response::new(PutResponse::default()))
    }

    async fn delete_range(&self, _: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn txn(&self, r: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = r.into_inner();
        assert_eq!((r.compare.len(), r.success.len(), r.failure.len()), (1, 1, 1));
        self.txns.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(TxnResponse { succeeded: true, ..Default::default() }))
    }

    async fn compact(&self, _: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// Starts a fake server on a free loopback port; it lives as long as the test's runtime.
async fn serve(kv: Arc<FakeKv>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvServer::from_arc(kv))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(addrs: &[SocketAddr], flags: &[&str]) -> BenchArgs {
    let endpoints = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let all = ["bench", "--endpoints", &endpoints, "--progress-interval", "0"].into_iter().chain(flags.iter().copied());
    Cli::try_parse_from(all).unwrap().args
}

fn check_ok(r: &BenchResult, ops: u64) {
    assert_eq!((r.ops, r.errors), (ops, 0), "{r:?}");
    assert!(r.ops_per_s > 0.0 && r.elapsed_s > 0.0);
    let l = r.latency;
    assert!(0 < l.p50_us && l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.p999_us && l.p999_us <= l.max_us, "{l:?}");
}

#[tokio::test]
async fn put_spreads_clients_over_connections_and_endpoints() {
    let (a, b) = (Arc::new(FakeKv::default()), Arc::new(FakeKv::default()));
    let addrs = [serve(a.clone()).await, serve(b.clone()).await];
    let r = run(args(&addrs, &["--total", "300", "--clients", "8", "--conns", "4", "--key-space", "1000", "--key-size", "4", "--value-size", "32"]))
        .await
        .unwrap();
    check_ok(&r, 300);
    let (pa, pb) = (a.puts.load(Ordering::Relaxed), b.puts.load(Ordering::Relaxed));
    assert_eq!(pa + pb, 300);
    assert!(pa > 0 && pb > 0, "both endpoints get traffic: {pa} / {pb}");
    let data = a.data.lock().unwrap();
    let (key, value) = data.iter().next().unwrap();
    assert_eq!((key.len(), value.len()), (4, 32));
    assert!(key.iter().all(u8::is_ascii_digit));

    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["workload"], "put");
    assert_eq!(json["ops"], 300);
    assert!(json["latency"]["p999_us"].is_u64());
    assert!(json.get("watch").is_none());
}

#[tokio::test]
async fn range_after_prefill_finds_every_key() {
    let kv = Arc::new(FakeKv::default());
    let addr = serve(kv.clone()).await;
    let r = run(args(&[addr], &["--workload", "range", "--prefill", "--key-space", "50", "--total", "100", "--clients", "4"])).await.unwrap();
    check_ok(&r, 100);
    assert_eq!(kv.puts.load(Ordering::Relaxed), 50);
    assert_eq!(kv.data.lock().unwrap().len(), 50);
    assert_eq!((kv.ranges.load(Ordering::Relaxed), kv.serializable.load(Ordering::Relaxed)), (100, 0));

    let r = run(args(&[addr], &["--workload", "range-serializable", "--total", "20"])).await.unwrap();
    check_ok(&r, 20);
    assert_eq!(kv.serializable.load(Ordering::Relaxed), 20);
}

#[tokio::test]
async fn txn_sends_compare_and_put() {
    let kv = Arc::new(FakeKv::default());
    let addr = serve(kv.clone()).await;
    let r = run(args(&[addr], &["--workload", "txn", "--total", "40", "--clients", "2"])).await.unwrap();
    check_ok(&r, 40);
    assert_eq!(kv.txns.load(Ordering::Relaxed), 40);
}

#[tokio::test]
async fn duration_and_rate_limit_bound_the_run() {
    let addr = serve(Arc::new(FakeKv::default())).await;
    let r = run(args(&[addr], &["--duration", "1s", "--rate", "200", "--clients", "4"])).await.unwrap();
    // Loose bounds: the machine may be busy with other tests.
    assert!((150..=210).contains(&r.ops), "{} ops in 1 s at 200 op/s", r.ops);
    assert!((0.95..2.5).contains(&r.elapsed_s), "elapsed {}", r.elapsed_s);
}

#[tokio::test]
async fn watch_and_lease_fail_clearly_on_a_server_without_them() {
    let addr = serve(Arc::new(FakeKv::default())).await;
    for (workload, service) in [("watch", "Watch"), ("lease", "Lease")] {
        let e = run(args(&[addr], &["--workload", workload, "--total", "10"])).await.unwrap_err().to_string();
        let want = format!("does not implement etcdserverpb.{service} (gRPC Unimplemented");
        assert!(e.contains(&want) && e.contains(&format!("needs a server with the {service} service")), "{workload}: {e}");
    }
}

#[tokio::test]
async fn a_server_that_fails_everything_fails_the_run() {
    let addr = serve(Arc::new(FakeKv { fail: true, ..Default::default() })).await;
    let e = run(args(&[addr], &["--total", "10", "--clients", "2"])).await.unwrap_err().to_string();
    assert!(e.contains("all 10 operations failed") && e.contains("leader changed"), "{e}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_named() {
    // Bind then drop: the port is very likely closed now.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let e = run(args(&[addr], &["--total", "1"])).await.unwrap_err();
    assert!(format!("{e:#}").contains(&format!("cannot connect to http://{addr}")), "{e:#}");
}

#[tokio::test]
async fn a_restarted_server_is_reconnected_to() {
    // The first server stops (GOAWAY, connection closed) during the run; a second one takes its
    // port. The clients' calls fail while nothing listens, then reach the second server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = Arc::new(FakeKv::default());
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(KvServer::from_arc(first.clone())).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        ),
    );
    let second = Arc::new(FakeKv::default());
    let restart = {
        let second = second.clone();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            stop.send(()).unwrap();
            server.await.unwrap().unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(KvServer::from_arc(second))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
        }
    };
    let (r, ()) = tokio::join!(run(args(&[addr], &["--duration", "1500ms", "--rate", "200", "--clients", "4"])), restart);
    let r = r.unwrap();
    let (before, after) = (first.puts.load(Ordering::Relaxed), second.puts.load(Ordering::Relaxed));
    assert!(before > 0 && after > 0, "puts before the restart {before}, after {after}: {r:?}");
    assert_eq!(r.ops, before + after, "{r:?}");
}
