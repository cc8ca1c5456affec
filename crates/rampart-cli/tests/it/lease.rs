//! Leases through real clients: grant, attach, time-to-live, revoke, expiry decided by the leader,
//! keepalives through followers and across a leader kill, and etcdctl's output next to etcd's.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions};

use crate::etcdctl::{etcdctl, normalize, start_etcd, wait_ready};
use crate::harness::Cluster;

/// The gRPC code and message of a failed call.
fn grpc_error<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> (tonic::Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

fn strings(keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
}

/// The keys under `prefix` that member `i` has (a linearizable read on that member).
async fn keys_on(cluster: &Cluster, i: usize, prefix: &str) -> Vec<String> {
    let mut c = cluster.client(&[i]).await;
    let r = c.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    r.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect()
}

async fn start() -> (Cluster, usize, Client) {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    let client = cluster.client(&[follower]).await;
    (cluster, leader, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn grant_attach_time_to_live_and_revoke_through_a_follower() {
    let (cluster, _, mut c) = start().await;

    let g = c.lease_grant(60, None).await.unwrap();
    let id = g.id();
    assert!(id > 0 && g.ttl() == 60, "{g:?}");
    // A chosen id is kept; a TTL under the minimum (1.5 election timeouts, here 1 s) is raised.
    let small = c.lease_grant(0, Some(LeaseGrantOptions::new().with_id(0x1234))).await.unwrap();
    assert_eq!((small.id(), small.ttl()), (0x1234, 1));
    assert_eq!(
        grpc_error(c.lease_grant(5, Some(LeaseGrantOptions::new().with_id(0x1234))).await),
        (tonic::Code::FailedPrecondition, "etcdserver: lease already exists".into())
    );
    assert_eq!(
        grpc_error(c.lease_grant(9_000_000_001, None).await),
        (tonic::Code::OutOfRange, "etcdserver: too large lease TTL".into())
    );
    c.lease_revoke(0x1234).await.unwrap();

    c.put("l/a", "1", Some(PutOptions::new().with_lease(id))).await.unwrap();
    c.put("l/b", "1", Some(PutOptions::new().with_lease(id))).await.unwrap();
    c.put("l/c", "1", None).await.unwrap();
    let t = c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    assert_eq!((t.id(), t.granted_ttl(), strings(t.keys())), (id, 60, vec!["l/a".to_string(), "l/b".into()]));
    assert!((55..=60).contains(&t.ttl()), "{t:?}");
    // Without asking for keys, none come.
    assert!(c.lease_time_to_live(id, None).await.unwrap().keys().is_empty());
    let leases: Vec<i64> = c.leases().await.unwrap().leases().iter().map(|l| l.id()).collect();
    assert_eq!(leases, vec![id]);

    // A put without the lease detaches the key; a put with it attaches it again.
    c.put("l/b", "2", None).await.unwrap();
    let t = c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    assert_eq!(strings(t.keys()), vec!["l/a".to_string()]);
    let before = c.put("l/b", "3", Some(PutOptions::new().with_lease(id))).await.unwrap().header().unwrap().revision();

    // Revoking deletes every attached key at one revision.
    let r = c.lease_revoke(id).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), before + 1);
    for i in 0..3 {
        assert_eq!(keys_on(&cluster, i, "l/").await, vec!["l/c".to_string()], "member {i}");
    }
    let old = c.get("l/", Some(GetOptions::new().with_prefix().with_revision(before))).await.unwrap();
    assert_eq!(old.kvs().len(), 3);
    let t = c.lease_time_to_live(id, None).await.unwrap();
    assert_eq!((t.id(), t.ttl(), t.granted_ttl()), (id, -1, 0));
    assert!(c.leases().await.unwrap().leases().is_empty());
    let not_found = (tonic::Code::NotFound, "etcdserver: requested lease not found".to_string());
    assert_eq!(grpc_error(c.lease_revoke(id).await), not_found);
    assert_eq!(grpc_error(c.put("l/d", "1", Some(PutOptions::new().with_lease(id))).await), not_found);
    // A keepalive of a lease that is gone answers TTL 0, which the client reports.
    assert!(c.lease_keep_alive(id).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_without_keepalives_expires_with_its_keys_on_every_member() {
    let (cluster, _, mut c) = start().await;
    let id = c.lease_grant(2, None).await.unwrap().id();
    let granted = Instant::now();
    c.put("e/a", "1", Some(PutOptions::new().with_lease(id))).await.unwrap();
    c.put("e/b", "1", Some(PutOptions::new().with_lease(id))).await.unwrap();
    let rev = c.put("e/keep", "1", None).await.unwrap().header().unwrap().revision();

    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(granted.elapsed())).await;
    assert_eq!(keys_on(&cluster, 0, "e/").await.len(), 3, "expired early");
    for i in 0..3 {
        loop {
            if keys_on(&cluster, i, "e/").await == vec!["e/keep".to_string()] {
                break;
            }
            assert!(granted.elapsed() < Duration::from_secs(5), "member {i} still has the keys");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let took = granted.elapsed();
    assert!(took >= Duration::from_secs(2), "expired after {took:?}");
    // Both keys went at one revision, right after the last put.
    let now = c.get("e/keep", None).await.unwrap().header().unwrap().revision();
    assert_eq!(now, rev + 1);
    assert_eq!(c.lease_time_to_live(id, None).await.unwrap().ttl(), -1);
}

#[tokio::test(flavor = "multi_thread")]
async fn keepalives_through_a_follower_keep_a_lease_alive() {
    let (cluster, _, mut c) = start().await;
    let id = c.lease_grant(2, None).await.unwrap().id();
    c.put("k/a", "1", Some(PutOptions::new().with_lease(id))).await.unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        keeper.keep_alive().await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
        assert_eq!((r.id(), r.ttl()), (id, 2));
    }
    // Three TTLs later, the key is still there everywhere.
    for i in 0..3 {
        assert_eq!(keys_on(&cluster, i, "k/").await, vec!["k/a".to_string()], "member {i}");
    }
    assert!(c.lease_time_to_live(id, None).await.unwrap().ttl() >= 1);
    // Once the keepalives stop, it expires.
    drop((keeper, stream));
    let stopped = Instant::now();
    while !keys_on(&cluster, 1, "k/").await.is_empty() {
        assert!(stopped.elapsed() < Duration::from_secs(5), "the lease did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_lease_survives_a_leader_kill() {
    let (mut cluster, leader, mut c) = start().await;
    let other = (leader + 2) % 3;
    let id = c.lease_grant(5, None).await.unwrap().id();
    c.put("f/a", "1", Some(PutOptions::new().with_lease(id))).await.unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    keeper.keep_alive().await.unwrap();
    stream.message().await.unwrap().unwrap();
    // Right after a keepalive reached the leader, it dies with the lease's clock.
    cluster.kill(leader);

    // The keepalives go on through the survivors, across the election, for longer than a TTL.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        keeper.keep_alive().await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(8), stream.message()).await.unwrap().unwrap().unwrap();
        assert_eq!((r.id(), r.ttl()), (id, 5));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut c2 = cluster.client(&[other]).await;
    assert_eq!(keys_on(&cluster, other, "f/").await, vec!["f/a".to_string()]);
    let t = c2.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    assert!(t.ttl() > 0 && t.granted_ttl() == 5, "{t:?}");
    assert_eq!(strings(t.keys()), vec!["f/a".to_string()]);
}

/// One etcdctl step: arguments, with `{id}` standing for the system's first granted lease.
const SCRIPT: &[&str] = &[
    "lease grant 60",
    "put k v --lease={id}",
    "lease timetolive {id} --keys",
    "lease timetolive {id} --keys -w json",
    "put k2 v --lease={id}",
    "get k --prefix -w json",
    "lease list",
    "lease list -w json",
    "lease keep-alive --once {id}",
    "lease keep-alive --once {id} -w json",
    "lease timetolive {id}",
    "lease revoke {id}",
    "get k --prefix -w json",
    "lease timetolive {id}",
    "lease timetolive {id} -w json",
    "lease revoke {id}",
    "lease keep-alive --once {id}",
    "lease grant 9000000001",
    "put x y --lease=1234",
    // Raised to the minimum TTL: 2 s with a 1 s election timeout, on both.
    "lease grant 0",
    "lease grant 30 -w json",
];

/// What one system printed, with its lease ids named by order of appearance and a remaining TTL
/// close to the granted one made exact.
struct Run {
    ids: Vec<i64>,
}

impl Run {
    fn id_of_grant(&mut self, out: &str) {
        // "lease 694d7b0e5f8e4f0a granted with TTL(60s)"
        if let Some(hex) = out.strip_prefix("lease ").and_then(|s| s.split_whitespace().next()) {
            if let Ok(id) = i64::from_str_radix(hex, 16) {
                self.ids.push(id);
            }
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(out) {
            if let Some(id) = v["ID"].as_i64() {
                self.ids.push(id);
            }
        }
    }

    fn normalize(&self, out: &str) -> String {
        let mut s = normalize(out);
        for (n, id) in self.ids.iter().enumerate() {
            s = s.replace(&format!("{id:016x}"), &format!("<id{n}>")).replace(&id.to_string(), &format!("<id{n}>"));
        }
        // "remaining(59s)" and "ttl":59 differ by the time the command took.
        for (from, to) in [("remaining(59s)", "remaining(60s)"), ("\"ttl\":59}", "\"ttl\":60}")] {
            s = s.replace(from, to);
        }
        s
    }
}

/// etcdctl's stderr without its client-side log lines.
fn errors(stderr: &str) -> String {
    stderr.lines().filter(|l| l.starts_with("Error")).collect::<Vec<_>>().join("\n")
}

#[test]
fn etcdctl_lease_commands_match_etcd() {
    let etcd = start_etcd();
    // etcd's default timing, so both have the same minimum lease TTL.
    let cluster = Cluster::start_with(3, &["--election-timeout", "1000", "--heartbeat-interval", "100"]);
    wait_ready(&etcd.endpoint);
    let rampart_eps = cluster.endpoints().join(",");
    wait_ready(&rampart_eps);

    let (mut want_run, mut got_run) = (Run { ids: vec![] }, Run { ids: vec![] });
    let mut mismatches = Vec::new();
    for step in SCRIPT {
        let mut outs = Vec::new();
        for (endpoint, run) in [(&etcd.endpoint, &mut want_run), (&rampart_eps, &mut got_run)] {
            let first = run.ids.first().map(|id| format!("{id:x}")).unwrap_or_default();
            let line = step.replace("{id}", &first);
            let args: Vec<&str> = line.split_whitespace().collect();
            let (code, out, err) = etcdctl(endpoint, &args, None);
            if step.starts_with("lease grant") {
                run.id_of_grant(out.trim());
            }
            outs.push((code, run.normalize(&out), errors(&err)));
        }
        if outs[0] != outs[1] {
            mismatches.push(format!("etcdctl {step}\n  etcd:    {:?}\n  rampart: {:?}", outs[0], outs[1]));
        }
    }
    assert!(mismatches.is_empty(), "{} of {} commands differ:\n{}", mismatches.len(), SCRIPT.len(), mismatches.join("\n"));
}
