//! A data dir is only ever used by the member and cluster it belongs to, and a damaged log is
//! refused, never silently used.

use std::time::Duration;

use crate::harness::Cluster;

#[tokio::test(flavor = "multi_thread")]
async fn data_dir_of_another_cluster_is_refused() {
    let mut a = Cluster::start(1);
    a.wait_leader(Duration::from_secs(10)).await;
    a.client(&[0]).await.put("k", "v", None).await.unwrap();
    a.kill(0);

    // Another cluster (other token) pointed at the same data dir.
    let mut b = Cluster::start_with(1, &["--initial-cluster-token", "some-other-cluster"]);
    b.kill(0);
    b.members[0].data_dir = a.members[0].data_dir.clone();
    let (status, log) = b.spawn_expecting_failure(0);
    assert!(!status.success());
    assert!(log.contains("belongs to member") && log.contains("refusing to use it"), "{log}");

    // Its rightful owner still starts and has its data.
    a.spawn(0);
    a.wait_leader(Duration::from_secs(10)).await;
    let got = a.client(&[0]).await.get("k", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"v");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_log_record_is_refused_with_its_location() {
    let mut c = Cluster::start(1);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut client = c.client(&[0]).await;
    for i in 0..50 {
        client.put(format!("key{i}"), vec![b'v'; 200], None).await.unwrap();
    }
    c.kill(0);

    let wal = c.members[0].data_dir.join("member/wal");
    let seg = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("a log segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    // The segment ends in space allocated ahead of its records (zeros); damage the records.
    let records_end = bytes.iter().rposition(|&b| b != 0).unwrap();
    let mid = records_end / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let (status, log) = c.spawn_expecting_failure(0);
    assert!(!status.success());
    assert!(log.contains("corrupt") && log.contains(seg.file_name().unwrap().to_str().unwrap()), "{log}");
}
