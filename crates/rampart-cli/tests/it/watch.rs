//! The Watch service: etcd's semantics through the `etcd-client` crate, a raw gRPC client (for
//! fields that crate hides), etcdctl side by side with etcd 3.4, and a watcher resuming on
//! another member after a SIGKILL while writes go on.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{DeleteOptions, Event, EventType, WatchFilterType, WatchOptions, WatchResponse, WatchStream};

use crate::etcdctl::{etcdctl, normalize, start_etcd, wait_ready};
use crate::harness::{connect, free_port, Cluster};

fn show_event(e: &Event) -> String {
    let kv = e.kv().unwrap();
    let key = kv.key_str().unwrap();
    let mut s = match e.event_type() {
        EventType::Put => format!("put {key}={}@{}/{}", kv.value_str().unwrap(), kv.mod_revision(), kv.version()),
        EventType::Delete => format!("del {key}@{}", kv.mod_revision()),
    };
    if let Some(p) = e.prev_kv() {
        s += &format!(" prev={}={}@{}", p.key_str().unwrap(), p.value_str().unwrap(), p.mod_revision());
    }
    s
}

/// One response as "header revision: event; event".
fn show(r: &WatchResponse) -> String {
    let events: Vec<String> = r.events().iter().map(show_event).collect();
    format!("{}: {}", r.header().unwrap().revision(), events.join("; "))
}

async fn next(s: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a watch response within 5 s")
        .expect("the watch stream works")
        .expect("the watch stream is open")
}

/// Reads a create response and returns its watch id.
async fn created(s: &mut WatchStream) -> i64 {
    let r = next(s).await;
    assert!(r.created() && !r.canceled(), "expected a create response: {r:?}");
    r.watch_id()
}

/// Reads `n` responses and groups them by watch id.
async fn collect(s: &mut WatchStream, n: usize) -> BTreeMap<i64, Vec<String>> {
    let mut got: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for _ in 0..n {
        let r = next(s).await;
        got.entry(r.watch_id()).or_default().push(show(&r));
    }
    got
}

async fn assert_quiet(s: &mut WatchStream) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        panic!("expected nothing more, got {r:?}");
    }
}

fn expect(pairs: &[(i64, &[&str])]) -> BTreeMap<i64, Vec<String>> {
    pairs.iter().map(|(id, rs)| (*id, rs.iter().map(|r| r.to_string()).collect())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_events_prev_kv_filters_and_cancel() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut w = cluster.client(&[0]).await;
    let mut c = cluster.client(&[1]).await;

    // Three watches on one stream; etcd numbers them from 0. A fresh cluster is at revision 1.
    let mut s = w.watch("w/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let r = next(&mut s).await;
    assert!(r.created() && !r.canceled());
    assert_eq!((r.watch_id(), r.header().unwrap().revision()), (0, 1));
    s.watch("w/a", Some(WatchOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(created(&mut s).await, 1);
    let no_put = WatchOptions::new().with_prefix().with_prev_key().with_filters([WatchFilterType::NoPut]);
    s.watch("w/", Some(no_put)).await.unwrap();
    assert_eq!(created(&mut s).await, 2);

    c.put("w/a", "1", None).await.unwrap(); // 2
    c.put("w/b", "2", None).await.unwrap(); // 3
    c.put("x", "3", None).await.unwrap(); // 4, not watched
    c.put("w/a", "4", None).await.unwrap(); // 5
    c.delete("w/", Some(DeleteOptions::new().with_prefix())).await.unwrap(); // 6

    assert_eq!(
        collect(&mut s, 8).await,
        expect(&[
            (0, &["2: put w/a=1@2/1", "3: put w/b=2@3/1", "5: put w/a=4@5/2", "6: del w/a@6; del w/b@6"]),
            (1, &["2: put w/a=1@2/1", "5: put w/a=4@5/2 prev=w/a=1@2", "6: del w/a@6 prev=w/a=4@5"]),
            (2, &["6: del w/a@6 prev=w/a=4@5; del w/b@6 prev=w/b=2@3"]),
        ])
    );

    // Cancel: answered with canceled, and the watch gets nothing more.
    s.cancel(0).await.unwrap();
    let r = next(&mut s).await;
    assert!(r.canceled() && !r.created() && r.events().is_empty(), "{r:?}");
    assert_eq!((r.watch_id(), r.header().unwrap().revision()), (0, 6));
    c.put("w/a", "7", None).await.unwrap(); // 7, a create again: no prev_kv, as in etcd
    assert_eq!(collect(&mut s, 1).await, expect(&[(1, &["7: put w/a=7@7/1"])]));
    assert_quiet(&mut s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_replays_history_and_reports_compaction() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut c = cluster.client(&[0, 1, 2]).await;
    c.put("h/k", "v1", None).await.unwrap(); // 2
    c.put("h/k", "v2", None).await.unwrap(); // 3
    c.put("h/j", "x", None).await.unwrap(); // 4
    c.delete("h/k", None).await.unwrap(); // 5
    c.put("h/k", "v3", None).await.unwrap(); // 6

    // History from revision 3, then live changes. A linearizable read first, so that member 2
    // has applied every write (a watch serves what its member has applied, as in etcd).
    let mut w = cluster.client(&[2]).await;
    w.get("h/k", None).await.unwrap();
    let mut s = w.watch("h/", Some(WatchOptions::new().with_prefix().with_prev_key().with_start_revision(3))).await.unwrap();
    let r = next(&mut s).await;
    assert!(r.created());
    assert_eq!(r.header().unwrap().revision(), 6);
    // One response, headed with the current revision, as etcd's catch-up does.
    assert_eq!(
        show(&next(&mut s).await),
        "6: put h/k=v2@3/2 prev=h/k=v1@2; put h/j=x@4/1; del h/k@5 prev=h/k=v2@3; put h/k=v3@6/1"
    );
    c.put("h/j", "y", None).await.unwrap(); // 7
    assert_eq!(show(&next(&mut s).await), "7: put h/j=y@7/2 prev=h/j=x@4");

    // Below the compaction revision: created, then canceled with the compaction revision.
    c.compact(5, None).await.unwrap();
    w.get("h/k", None).await.unwrap(); // member 2 has applied the compaction too
    s.watch("h/", Some(WatchOptions::new().with_prefix().with_start_revision(4))).await.unwrap();
    let id = created(&mut s).await;
    let r = next(&mut s).await;
    assert!(r.canceled() && !r.created() && r.events().is_empty(), "{r:?}");
    assert_eq!((r.watch_id(), r.compact_revision()), (id, 5));
    // At the compaction revision is still allowed (its deletes are gone, as in etcd).
    s.watch("h/", Some(WatchOptions::new().with_prefix().with_start_revision(5))).await.unwrap();
    let id = created(&mut s).await;
    assert_eq!(collect(&mut s, 1).await, expect(&[(id, &["7: put h/k=v3@6/1; put h/j=y@7/2"])]));
    assert_quiet(&mut s).await;

    // A long history comes in several responses (chunks), every revision once, in order.
    let mut tasks = Vec::new();
    for t in 0..10 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..60 {
                c.put(format!("m/{t}/{i}"), "v", None).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut s = w.watch("m/", Some(WatchOptions::new().with_prefix().with_start_revision(8))).await.unwrap();
    created(&mut s).await;
    let (mut revs, mut responses) = (Vec::new(), 0);
    while revs.len() < 600 {
        let r = next(&mut s).await;
        responses += 1;
        revs.extend(r.events().iter().map(|e| e.kv().unwrap().mod_revision()));
    }
    assert_eq!(revs, (8..608).collect::<Vec<i64>>());
    assert!(responses >= 3, "600 events in {responses} responses");
    assert_quiet(&mut s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn several_watches_on_one_stream() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut w = cluster.client(&[1]).await;
    let mut c = cluster.client(&[0]).await;

    let mut s = w.watch("a", Some(WatchOptions::new().with_watch_id(100))).await.unwrap();
    assert_eq!(created(&mut s).await, 100);
    // Refused creates: canceled, watch id -1, etcd's reasons.
    for (key, opts, reason) in [
        ("a", WatchOptions::new().with_watch_id(100), "mvcc: duplicate watch ID provided on the WatchStream"),
        ("b", WatchOptions::new().with_range("a"), "mvcc: watcher range is empty"),
    ] {
        s.watch(key, Some(opts)).await.unwrap();
        let r = next(&mut s).await;
        assert!(r.created() && r.canceled(), "{r:?}");
        assert_eq!((r.watch_id(), r.cancel_reason()), (-1, reason));
    }
    s.watch("", Some(WatchOptions::new().with_all_keys())).await.unwrap();
    assert_eq!(created(&mut s).await, 0);
    s.watch("b", Some(WatchOptions::new().with_from_key())).await.unwrap();
    assert_eq!(created(&mut s).await, 1);
    s.watch("a", Some(WatchOptions::new().with_watch_id(2))).await.unwrap();
    assert_eq!(created(&mut s).await, 2);
    // Automatic ids skip the ones the client chose.
    s.watch("c", None).await.unwrap();
    assert_eq!(created(&mut s).await, 3);

    c.put("a", "1", None).await.unwrap(); // 2
    c.put("b", "2", None).await.unwrap(); // 3
    c.put("c", "3", None).await.unwrap(); // 4
    assert_eq!(
        collect(&mut s, 8).await,
        expect(&[
            (0, &["2: put a=1@2/1", "3: put b=2@3/1", "4: put c=3@4/1"]),
            (1, &["3: put b=2@3/1", "4: put c=3@4/1"]),
            (2, &["2: put a=1@2/1"]),
            (3, &["4: put c=3@4/1"]),
            (100, &["2: put a=1@2/1"]),
        ])
    );

    // A progress request is answered for the whole stream (watch id -1), headed with the
    // revision every watch has caught up with.
    s.request_progress().await.unwrap();
    let r = next(&mut s).await;
    assert!(!r.created() && !r.canceled() && r.events().is_empty(), "{r:?}");
    assert_eq!((r.watch_id(), r.header().unwrap().revision()), (-1, 4));
    assert_quiet(&mut s).await;
}

/// A watcher on the leader sees some writes; the leader is SIGKILLed; the watcher resumes on
/// another member from the last revision it saw + 1 while writes go on. The union of what it
/// received is every acknowledged write, in order, once, with no gap.
#[tokio::test(flavor = "multi_thread")]
async fn watch_resumes_on_another_member_after_sigkill() {
    let mut cluster = Cluster::start(3);
    let a = cluster.wait_leader(Duration::from_secs(10)).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != a).collect();
    let b = others[0];

    let mut wa = cluster.client(&[a]).await;
    let mut s = wa.watch("r/", Some(WatchOptions::new().with_prefix().with_start_revision(2))).await.unwrap();
    created(&mut s).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut wc = cluster.client(&others).await;
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut acked, mut unknown) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("r/{}", i % 7), format!("v{i}"));
                match tokio::time::timeout(Duration::from_secs(2), wc.put(k.clone(), v.clone(), None)).await {
                    Ok(Ok(r)) => acked.push((k, v, r.header().unwrap().revision())),
                    _ => {
                        unknown.push((k, v));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                i += 1;
            }
            (acked, unknown)
        }
    });

    let mut got: Vec<(String, String, i64)> = Vec::new();
    let push = |got: &mut Vec<(String, String, i64)>, r: &WatchResponse| {
        for e in r.events() {
            let kv = e.kv().unwrap();
            assert_eq!(e.event_type(), EventType::Put);
            got.push((kv.key_str().unwrap().into(), kv.value_str().unwrap().into(), kv.mod_revision()));
        }
    };
    while got.len() < 30 {
        let r = next(&mut s).await;
        push(&mut got, &r);
    }
    cluster.kill(a);
    // Whatever was already on its way from A counts as received.
    while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(5), s.message()).await {
        push(&mut got, &r);
    }
    let resume_at = got.last().unwrap().2 + 1;

    let mut wb = cluster.client(&[b]).await;
    let mut s = wb.watch("r/", Some(WatchOptions::new().with_prefix().with_start_revision(resume_at))).await.unwrap();
    created(&mut s).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, unknown) = writer.await.unwrap();
    let last_acked = acked.iter().map(|w| w.2).max().unwrap();
    assert!(last_acked >= resume_at, "writes went on after the failover: {last_acked} < {resume_at}");
    while got.last().unwrap().2 < last_acked {
        let r = next(&mut s).await;
        push(&mut got, &r);
    }

    // Only this test writes: revisions 2.. are all ours, one put each, so a watcher with no gap
    // and no duplicate saw exactly 2, 3, 4, ...
    let revs: Vec<i64> = got.iter().map(|e| e.2).collect();
    let last = *revs.last().unwrap();
    assert_eq!(revs, (2..=last).collect::<Vec<i64>>(), "events out of order, duplicated or missing");
    let seen: HashMap<i64, (&str, &str)> = got.iter().map(|(k, v, r)| (*r, (k.as_str(), v.as_str()))).collect();
    for (k, v, r) in &acked {
        assert_eq!(seen.get(r), Some(&(k.as_str(), v.as_str())), "acknowledged write at {r}");
    }
    let acked_revs: std::collections::HashSet<i64> = acked.iter().map(|w| w.2).collect();
    for (k, v, r) in &got {
        assert!(
            acked_revs.contains(r) || unknown.iter().any(|(uk, uv)| uk == k && uv == v),
            "event {k}={v}@{r} matches no write"
        );
    }
}

/// A one-member cluster in this process, so that a test can change process-wide settings such
/// as the progress interval (etcd's tests do the same with SetProgressReportInterval).
async fn solo() -> (tempfile::TempDir, rampart_server::Running, String, etcd_client::Client) {
    let dir = tempfile::tempdir().unwrap();
    let client_url = format!("http://127.0.0.1:{}", free_port());
    let peer_url = format!("http://127.0.0.1:{}", free_port());
    let cfg = rampart_server::Config {
        name: "solo".into(),
        data_dir: dir.path().join("solo"),
        listen_client_urls: vec![client_url.clone()],
        advertise_client_urls: vec![client_url.clone()],
        listen_peer_urls: vec![peer_url.clone()],
        initial_advertise_peer_urls: vec![peer_url.clone()],
        initial_cluster: format!("solo={peer_url}"),
        ..Default::default()
    };
    let running = rampart_server::start(cfg).await.unwrap();
    let mut c = connect(std::slice::from_ref(&client_url)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.put("ready", "1", None).await.is_err() {
        assert!(Instant::now() < deadline, "the member did not accept writes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (dir, running, client_url, c)
}

/// Periodic progress notifications and fragments.
#[tokio::test(flavor = "multi_thread")]
async fn progress_notify_and_fragments() {
    use rampart_proto::etcdserverpb::watch_client::WatchClient;
    use rampart_proto::etcdserverpb::watch_request::RequestUnion;
    use rampart_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};

    rampart_server::watch::set_progress_interval(Duration::from_millis(300));
    let (_dir, running, client_url, mut c) = solo().await;
    let rev = c.put("ready", "2", None).await.unwrap().header().unwrap().revision();

    // An idle watch that asked for progress hears how far it is, with its own id.
    let mut s = c.watch("p", Some(WatchOptions::new().with_progress_notify())).await.unwrap();
    let id = created(&mut s).await;
    let r = next(&mut s).await;
    assert!(!r.created() && !r.canceled() && r.events().is_empty(), "{r:?}");
    assert_eq!((r.watch_id(), r.header().unwrap().revision()), (id, rev));
    // A write elsewhere moves the next notifications on (one more at `rev` may still come).
    c.put("q", "1", None).await.unwrap();
    let r = loop {
        let r = next(&mut s).await;
        assert_eq!((r.watch_id(), r.events().len()), (id, 0), "{r:?}");
        if r.header().unwrap().revision() != rev {
            break r;
        }
    };
    assert_eq!(r.header().unwrap().revision(), rev + 1);
    c.put("p", "1", None).await.unwrap();
    let r = loop {
        let r = next(&mut s).await;
        if !r.events().is_empty() {
            break r;
        }
        assert_eq!(r.header().unwrap().revision(), rev + 1, "{r:?}");
    };
    assert_eq!(show(&r), format!("{}: put p=1@{}/1", rev + 2, rev + 2));
    drop(s);

    // Deleting three keys of 900 kB with prev_kv makes one revision of 2.7 MB: over the 2 MB
    // (request limit + gRPC overhead) etcd fragments at, for a watch that allows fragments.
    let big = "x".repeat(900_000);
    for k in ["f/1", "f/2", "f/3"] {
        c.put(k, big.as_str(), None).await.unwrap();
    }
    let create = |watch_id, fragment| WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"f/".to_vec(),
            range_end: b"f0".to_vec(),
            prev_kv: true,
            watch_id,
            fragment,
            ..Default::default()
        })),
    };
    let mut raw = WatchClient::connect(client_url.clone()).await.unwrap().max_decoding_message_size(16 << 20);
    // The client closes its side right away; etcd keeps sending on the stream.
    let requests = tonic::codegen::tokio_stream::iter(vec![create(1, true), create(2, false)]);
    let mut stream = raw.watch(requests).await.unwrap().into_inner();
    for id in [1, 2] {
        let r = stream.message().await.unwrap().unwrap();
        assert!(r.created && r.watch_id == id, "{r:?}");
    }
    c.delete("f/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    let mut parts: BTreeMap<i64, Vec<(usize, bool)>> = BTreeMap::new();
    while parts.values().map(|p| p.iter().map(|(n, _)| n).sum::<usize>()).sum::<usize>() < 6 {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
        assert!(r.events.iter().all(|e| e.prev_kv.as_ref().unwrap().value.len() == 900_000));
        parts.entry(r.watch_id).or_default().push((r.events.len(), r.fragment));
    }
    assert_eq!(parts[&1], vec![(2, true), (1, false)]);
    assert_eq!(parts[&2], vec![(3, false)]);
    running.stop().await;
}

/// A watcher that does not read while thousands of changes are written falls behind the change
/// feed's buffer; it then replays from history and still gets every revision once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn slow_watcher_catches_up_from_history() {
    use rampart_proto::etcdserverpb::watch_client::WatchClient;
    use rampart_proto::etcdserverpb::watch_request::RequestUnion;
    use rampart_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};

    let (_dir, running, client_url, c) = solo().await;
    // A small flow-control window, so that little waits in the connection while nobody reads.
    let channel = tonic::transport::Endpoint::from_shared(client_url.clone())
        .unwrap()
        .initial_stream_window_size(Some(64 << 10))
        .initial_connection_window_size(Some(64 << 10))
        .connect()
        .await
        .unwrap();
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"s/".to_vec(),
            range_end: b"s0".to_vec(),
            ..Default::default()
        })),
    };
    let mut stream =
        WatchClient::new(channel).watch(tonic::codegen::tokio_stream::iter(vec![create])).await.unwrap().into_inner();
    let r = stream.message().await.unwrap().unwrap();
    let start = r.header.unwrap().revision + 1;
    // More revisions than the change feed buffers (4,096), written while the watcher reads
    // nothing. Many connections: one would cap the write rate well below what raft batches.
    let (tasks, per_task) = (160, 28);
    let n = tasks * per_task;
    let value = "v".repeat(1024);
    let mut conns = vec![c];
    while conns.len() < 16 {
        conns.push(connect(std::slice::from_ref(&client_url)).await);
    }
    let mut writers = Vec::new();
    for t in 0..tasks {
        let (mut c, value) = (conns[t % conns.len()].clone(), value.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..per_task {
                c.put(format!("s/{t}/{i}"), value.as_str(), None).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut revs = Vec::new();
    while revs.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
        revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(revs, (start..start + n as i64).collect::<Vec<i64>>());
    running.stop().await;
}

/// Starts etcdctl; stdin stays open (interactive mode reads it) until the process is stopped.
fn spawn_etcdctl(endpoint: &str, args: &[&str]) -> Child {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=2s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl 3.4 must be installed")
}

/// Stops an etcdctl watch (which never ends on its own unless canceled) and returns its exit
/// code, stdout (each JSON line without the ids that differ by nature) and watch messages.
fn finish(mut child: Child) -> (i32, String, String) {
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).lines().map(normalize).collect::<Vec<_>>().join("\n");
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("Error") || l.starts_with("watch was canceled"))
        .collect::<Vec<_>>()
        .join("\n");
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn etcdctl_watch_output_matches_etcd() {
    use std::io::Write;

    let etcd = start_etcd();
    let cluster = Cluster::start(3);
    let rampart = cluster.endpoints().join(",");
    wait_ready(&etcd.endpoint);
    wait_ready(&rampart);
    let writes: &[&[&str]] = &[
        &["put", "foo", "1"],
        &["put", "foo/a", "x"],
        &["put", "foo", "2"],
        &["del", "foo"],
        &["put", "foo", "3"],
        &["put", "foo/b", "y"],
        &["del", "foo/", "--prefix"],
        &["put", "foo", "4"],
    ];
    for args in writes {
        for ep in [&etcd.endpoint, &rampart] {
            let (code, _, err) = etcdctl(ep, args, None);
            assert_eq!(code, 0, "etcdctl {args:?} on {ep}: {err}");
        }
    }

    // A watch serves what its member has applied: a linearizable read on each member first, so
    // that whichever member etcdctl picks has every write (etcd has one member).
    let applied_everywhere = || {
        for ep in cluster.endpoints() {
            assert_eq!(etcdctl(&ep, &["get", "foo"], None).0, 0);
        }
    };
    applied_everywhere();

    // Every watch runs at once against both systems, then all are stopped together.
    let watches: &[(&[&str], Option<&str>)] = &[
        (&["watch", "--rev=2", "--prev-kv", "foo"], None),
        (&["watch", "--rev=2", "--prefix", "foo"], None),
        (&["watch", "--rev=3", "--prev-kv", "--prefix", "foo", "-w", "json"], None),
        (&["watch", "--rev=9", "foo"], None),
        (&["watch", "-i"], Some("watch foo\n")),
    ];
    let run = |phase: &[(&[&str], Option<&str>)]| {
        let mut children: Vec<(String, Child, Child)> = Vec::new();
        for (args, stdin) in phase {
            let mut pair = [spawn_etcdctl(&etcd.endpoint, args), spawn_etcdctl(&rampart, args)];
            if let Some(input) = stdin {
                for child in &mut pair {
                    child.stdin.as_mut().unwrap().write_all(input.as_bytes()).unwrap();
                }
            }
            let [e, r] = pair;
            children.push((args.join(" "), e, r));
        }
        std::thread::sleep(Duration::from_millis(800));
        // Interactive watches: ask for progress once the watch is in place.
        for ((_, stdin), (_, e, r)) in phase.iter().zip(children.iter_mut()) {
            if stdin.is_some() {
                for child in [e, r] {
                    child.stdin.as_mut().unwrap().write_all(b"progress\n").unwrap();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1200));
        children.into_iter().map(|(args, e, r)| (args, finish(e), finish(r))).collect::<Vec<_>>()
    };
    let mut results = run(watches);
    for ep in [&etcd.endpoint, &rampart] {
        assert_eq!(etcdctl(ep, &["compaction", "5"], None).0, 0);
    }
    applied_everywhere();
    results.extend(run(&[(&["watch", "--rev=3", "foo"], None), (&["watch", "--rev=5", "--prev-kv", "foo"], None)]));

    let mismatches: Vec<String> = results
        .iter()
        .filter(|(_, want, got)| want != got)
        .map(|(args, want, got)| format!("etcdctl {args}\n  etcd:    {want:?}\n  rampart: {got:?}"))
        .collect();
    assert!(mismatches.is_empty(), "{} watches differ:\n{}", mismatches.len(), mismatches.join("\n"));
    // The comparison means something: etcd printed what these watches are for.
    let etcd_out = |i: usize| &results[i].1;
    assert!(etcd_out(0).1.starts_with("PUT\nfoo\n1\nPUT\nfoo\n1\nfoo\n2\nDELETE"), "{:?}", etcd_out(0));
    assert!(etcd_out(4).1.contains("progress notify: 9"), "{:?}", etcd_out(4));
    assert!(etcd_out(5).2.contains("required revision has been compacted"), "{:?}", etcd_out(5));
    assert!(etcd_out(6).1.contains("PUT\nfoo\n3\nfoo\n4"), "{:?}", etcd_out(6));
}
