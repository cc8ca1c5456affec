//! Snapshots and log compaction: the log is purged behind a snapshot, and a member that fell
//! further behind than the log keeps catches up by installing the leader's snapshot.

use std::time::{Duration, Instant};

use etcd_client::GetOptions;

use crate::harness::Cluster;

#[tokio::test(flavor = "multi_thread")]
async fn lagging_member_catches_up_from_a_snapshot() {
    let mut c = Cluster::start_with(3, &["--snapshot-count", "100", "--experimental-snapshot-catchup-entries", "20"]);
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    // The lagging member is a follower: killing the leader would make the first writes fail
    // with "outcome unknown" (correctly), which is not what this test is about.
    let lag = (leader + 1) % 3;
    let live: Vec<usize> = (0..3).filter(|i| *i != lag).collect();
    c.kill(lag);
    let mut client = c.client(&live).await;
    for i in 0..400 {
        client.put(format!("snap/{i:04}"), format!("v{i}"), None).await.unwrap();
    }
    client.delete("snap/0000", None).await.unwrap();

    // Snapshots were taken and the log purged behind them on the live members. (The store is
    // the snapshot: nothing is serialized until a follower needs it.)
    for &i in &live {
        let dir = c.members[i].data_dir.join("member");
        assert!(dir.join("wal/purged.meta").exists(), "member {i} never purged its log");
        assert!(!dir.join("snap/current.snap").exists(), "member {i} serialized a snapshot nobody asked for");
    }

    c.spawn(lag);
    let mut m2 = c.client(&[lag]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Serializable: what the lagging member itself holds, no help from the leader.
        let got = m2.get("snap/", Some(GetOptions::new().with_prefix().with_serializable())).await;
        if let Ok(r) = &got {
            if r.count() == 399 {
                assert!(r.kvs().iter().all(|kv| kv.key() != b"snap/0000"));
                assert_eq!(r.kvs().last().unwrap().value(), b"v399");
                break;
            }
        }
        assert!(Instant::now() < deadline, "member {lag} did not catch up: {got:?}\n{}", c.log(lag));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.log(lag).contains("installed a snapshot from the leader"), "member {lag} did not install a snapshot:\n{}", c.log(lag));

    // It keeps up afterwards and survives its own restart.
    client.put("after", "snapshot", None).await.unwrap();
    c.kill(lag);
    c.spawn(lag);
    c.wait_serving(lag, Duration::from_secs(10)).await;
    let got = c.client(&[lag]).await.get("after", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"snapshot");
    let got = c.client(&[lag]).await.get("snap/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(got.count(), 399);
}
