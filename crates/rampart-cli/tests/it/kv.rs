//! The KV API through the `etcd-client` crate: etcd's semantics, revisions and errors.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};

use crate::harness::Cluster;

fn kvs(resp: &etcd_client::GetResponse) -> Vec<(String, String, i64, i64, i64)> {
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
            )
        })
        .collect()
}

fn s(x: &str) -> String {
    x.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_semantics_match_etcd_on_every_member() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    // Talk to each member in turn: followers forward writes and serve linearizable reads.
    let mut c0 = cluster.client(&[0]).await;
    let mut c1 = cluster.client(&[1]).await;
    let mut c2 = cluster.client(&[2]).await;

    // A fresh cluster is at revision 1, like etcd.
    let r = c0.put("foo", "bar", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 2);
    let r = c1.put("foo", "baz", Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 3);
    let prev = r.prev_key().unwrap();
    assert_eq!((prev.value_str().unwrap(), prev.mod_revision(), prev.version()), ("bar", 2, 1));
    c2.put("foo/a", "1", None).await.unwrap(); // rev 4
    c2.put("foo/b", "2", None).await.unwrap(); // rev 5
    c0.put("fop", "3", None).await.unwrap(); // rev 6

    for c in [&mut c0, &mut c1, &mut c2] {
        let got = c.get("foo", None).await.unwrap();
        assert_eq!(kvs(&got), vec![(s("foo"), s("baz"), 2, 3, 2)]);
        assert_eq!(got.header().unwrap().revision(), 6);
        let got = c.get("foo", Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(got.kvs().len(), 3);
        assert_eq!(got.count(), 3);
        let got = c.get("foo", Some(GetOptions::new().with_revision(2))).await.unwrap();
        assert_eq!(kvs(&got), vec![(s("foo"), s("bar"), 2, 2, 1)]);
        let got = c.get("foo", Some(GetOptions::new().with_prefix().with_limit(2))).await.unwrap();
        assert_eq!((got.kvs().len(), got.more(), got.count()), (2, true, 3));
        let got = c
            .get(
                "foo",
                Some(GetOptions::new().with_prefix().with_sort(SortTarget::Mod, SortOrder::Descend)),
            )
            .await
            .unwrap();
        let keys: Vec<_> = got.kvs().iter().map(|k| k.key_str().unwrap().to_string()).collect();
        assert_eq!(keys, vec!["foo/b", "foo/a", "foo"]);
        let got = c.get("foo", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
        assert_eq!((got.kvs().len(), got.count()), (0, 3));
        let got = c.get("", Some(GetOptions::new().with_all_keys().with_keys_only())).await.unwrap();
        assert_eq!(got.count(), 4);
        assert!(got.kvs().iter().all(|kv| kv.value().is_empty()));
        let got = c.get("foo", Some(GetOptions::new().with_from_key().with_serializable())).await.unwrap();
        assert_eq!(got.count(), 4);
    }

    // Delete with prev_kv; the version resets on the next put.
    let d = c1.delete("foo", Some(DeleteOptions::new().with_prev_key())).await.unwrap();
    assert_eq!((d.deleted(), d.header().unwrap().revision()), (1, 7));
    assert_eq!(d.prev_kvs()[0].value_str().unwrap(), "baz");
    let d = c1.delete("nothing-here", None).await.unwrap();
    assert_eq!((d.deleted(), d.header().unwrap().revision()), (0, 7), "a delete of nothing does not bump the revision");
    c2.put("foo", "again", None).await.unwrap(); // rev 8
    let got = c0.get("foo", None).await.unwrap();
    assert_eq!(kvs(&got), vec![(s("foo"), s("again"), 8, 8, 1)]);

    // Txn: create-if-absent, both branches, a compare over a range, nested txn.
    let t = Txn::new()
        .when([Compare::version("lock", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("lock", "me", None), TxnOp::get("foo", None)])
        .or_else([TxnOp::get("lock", None)]);
    let r = c0.txn(t.clone()).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 9);
    let r = c2.txn(t).await.unwrap();
    assert!(!r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 9, "a read-only txn does not bump the revision");
    let t = Txn::new()
        .when([Compare::mod_revision("foo/", CompareOp::Less, 6).with_prefix()])
        .and_then([TxnOp::txn(Txn::new().and_then([TxnOp::delete("foo/", Some(DeleteOptions::new().with_prefix()))]))]);
    let r = c1.txn(t).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 10);
    assert_eq!(c2.get("foo/", Some(GetOptions::new().with_prefix())).await.unwrap().count(), 0);

    // Compaction: old revisions answer etcd's ErrCompacted; the compacted revision itself is readable.
    c0.compact(5, None).await.unwrap();
    for c in [&mut c0, &mut c1, &mut c2] {
        let err = c.get("foo", Some(GetOptions::new().with_revision(4))).await.unwrap_err().to_string();
        assert!(err.contains("required revision has been compacted"), "{err}");
        assert!(c.get("foo", Some(GetOptions::new().with_revision(5))).await.is_ok());
        let err = c.get("foo", Some(GetOptions::new().with_revision(1000))).await.unwrap_err().to_string();
        assert!(err.contains("required revision is a future revision"), "{err}");
    }

    // Status and MemberList.
    let st = c1.status().await.unwrap();
    assert!(st.version().starts_with("3.5"));
    assert_ne!(st.leader(), 0);
    assert!(st.raft_index() >= 10);
    let ml = c2.member_list().await.unwrap();
    assert_eq!(ml.members().len(), 3);
    let mut names: Vec<_> = ml.members().iter().map(|m| m.name().to_string()).collect();
    names.sort();
    // Members publish their names and client URLs through the log shortly after start.
    assert_eq!(names, vec!["m0", "m1", "m2"]);
    for m in ml.members() {
        assert_eq!(m.client_urls().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_etcds_errors() {
    let cluster = Cluster::start_with(3, &["--max-txn-ops", "4", "--max-request-bytes", "1024"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut c = cluster.client(&[1]).await;

    let cases: Vec<(etcd_client::Error, &str)> = vec![
        (c.put("", "v", None).await.unwrap_err(), "etcdserver: key is not provided"),
        (c.get("", None).await.unwrap_err(), "etcdserver: key is not provided"),
        (c.put("big", vec![b'x'; 2048], None).await.unwrap_err(), "etcdserver: request is too large"),
        (
            c.txn(Txn::new().and_then((0..5).map(|i| TxnOp::put(format!("k{i}"), "v", None)).collect::<Vec<_>>()))
                .await
                .unwrap_err(),
            "etcdserver: too many operations in txn request",
        ),
        (
            c.txn(Txn::new().and_then([TxnOp::put("dup", "1", None), TxnOp::put("dup", "2", None)])).await.unwrap_err(),
            "etcdserver: duplicate key given in txn request",
        ),
        (
            c.put("absent", "", Some(PutOptions::new().with_ignore_value())).await.unwrap_err(),
            "etcdserver: key not found",
        ),
        (c.put("k", "v", Some(PutOptions::new().with_lease(42))).await.unwrap_err(), "etcdserver: requested lease not found"),
    ];
    for (err, want) in cases {
        let text = err.to_string();
        assert!(text.contains(want), "{text:?} should contain {want:?}");
    }
    // Nothing above changed the store.
    let r = c.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    assert_eq!((r.count(), r.header().unwrap().revision()), (0, 1));
    // Over the gRPC limit (request limit + 512 KiB) the transport itself refuses it.
    let err = c.put("huge", vec![b'x'; 1024 + 600 * 1024], None).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("message") || err.contains("too large"), "{err}");
}

/// Malformed requests that etcd clients would never send, through a raw gRPC client: every one
/// gets an error or an etcd-like answer, and the member keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_do_not_crash_a_member() {
    use rampart_proto::etcdserverpb::{self as pb, kv_client::KvClient};

    let cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut kv = KvClient::connect(cluster.members[0].client_url.clone()).await.unwrap();
    kv.put(pb::PutRequest { key: b"a".to_vec(), value: b"1".to_vec(), ..Default::default() }).await.unwrap();

    let ranges = vec![
        pb::RangeRequest { key: b"a".to_vec(), sort_order: 99, ..Default::default() },
        pb::RangeRequest { key: b"a".to_vec(), sort_target: 99, sort_order: 1, ..Default::default() },
        pb::RangeRequest { key: b"a".to_vec(), limit: -5, ..Default::default() },
        pb::RangeRequest { key: b"z".to_vec(), range_end: b"a".to_vec(), ..Default::default() },
        pb::RangeRequest { key: b"a".to_vec(), revision: i64::MAX, ..Default::default() },
        pb::RangeRequest { key: b"a".to_vec(), revision: i64::MIN, ..Default::default() },
        pb::RangeRequest { key: vec![0xff; 10_000], range_end: vec![0], ..Default::default() },
    ];
    for r in ranges {
        let _ = kv.range(r).await; // an answer or an error, either is fine; a crash is not
    }
    let bad_compare = pb::Compare { result: 42, target: 42, key: b"a".to_vec(), ..Default::default() };
    let mut deep = pb::TxnRequest::default();
    for _ in 0..64 {
        deep = pb::TxnRequest {
            success: vec![pb::RequestOp { request: Some(pb::request_op::Request::RequestTxn(deep)) }],
            ..Default::default()
        };
    }
    let txns = vec![
        pb::TxnRequest { compare: vec![bad_compare], ..Default::default() },
        pb::TxnRequest { success: vec![pb::RequestOp { request: None }], ..Default::default() },
        deep,
    ];
    for t in txns {
        let _ = kv.txn(t).await;
    }
    let _ = kv.compact(pb::CompactionRequest { revision: -3, physical: true }).await;
    let _ = kv.compact(pb::CompactionRequest { revision: i64::MAX, physical: false }).await;
    let _ = kv.delete_range(pb::DeleteRangeRequest { key: b"z".to_vec(), range_end: b"a".to_vec(), prev_kv: true }).await;

    // Every member still serves, and agrees.
    for i in 0..3 {
        let mut c = cluster.client(&[i]).await;
        let got = c.get("a", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"1");
    }
}

/// Concurrent writes share work (a follower forwards them in shared calls, the leader submits each
/// such batch to raft at once, and one MVCC transaction applies many); every write must still get
/// its own answer. 300 concurrent puts through a follower, then through the leader, each report a
/// distinct revision, and that revision is the one the key was stored at; every tenth put is one
/// etcd refuses (ignore_value on a missing key), and only that put fails.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writes_each_get_their_own_answer() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    for (via, member) in [("follower", follower), ("leader", leader)] {
        let client = cluster.client(&[member]).await;
        let puts = (0..300).map(|i| {
            let mut c = client.clone();
            let key = format!("{via}/{i:03}");
            tokio::spawn(async move {
                if i % 10 == 9 {
                    let err = c.put(key, "", Some(PutOptions::new().with_ignore_value())).await.unwrap_err();
                    (i, Err(err.to_string()))
                } else {
                    let r = c.put(key, format!("v{i}"), None).await.unwrap();
                    (i, Ok(r.header().unwrap().revision()))
                }
            })
        });
        let mut revisions = Vec::new();
        for p in puts {
            match p.await.unwrap() {
                (i, Ok(rev)) => revisions.push((i, rev)),
                (_, Err(e)) => assert!(e.contains("etcdserver: key not found"), "{via}: {e}"),
            }
        }
        let mut distinct: Vec<i64> = revisions.iter().map(|(_, r)| *r).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 270, "{via}: every put has its own revision");
        let mut c = cluster.client(&[leader]).await;
        let got = c.get(format!("{via}/"), Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(got.kvs().len(), 270, "{via}");
        for (i, rev) in revisions {
            let kv = got.kvs().iter().find(|kv| kv.key_str().unwrap() == format!("{via}/{i:03}")).unwrap();
            assert_eq!((kv.value_str().unwrap(), kv.mod_revision()), (format!("v{i}").as_str(), rev), "{via}/{i:03}");
        }
    }
}
