//! Membership changes: member add (learner and voter), promote, remove, and a new member joining
//! a running cluster with `--initial-cluster-state existing`, through the `etcd-client` crate and
//! etcdctl.

use std::time::{Duration, Instant};

use etcd_client::{GetOptions, MemberAddOptions};

use crate::harness::Cluster;

async fn wait_for_key(cluster: &Cluster, i: usize, key: &str, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = cluster.client(&[i]).await;
        if let Ok(r) = c.get(key, Some(GetOptions::new().with_serializable())).await {
            if r.kvs().first().map(|kv| kv.value()) == Some(want) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "member {i} never saw {key}:\n{}", cluster.log(i));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn add_learner_join_promote_then_remove_an_original_member() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut c = cluster.client(&[0, 1, 2]).await;
    for i in 0..50 {
        c.put(format!("before/{i}"), "x", None).await.unwrap();
    }

    // Add a learner, from a follower's endpoint too: membership changes are forwarded.
    let new = cluster.prepare_joining("m3");
    let url = cluster.members[new].peer_url.clone();
    let mut c1 = cluster.client(&[1]).await;
    let added = c1.member_add([url.as_str()], Some(MemberAddOptions::new().with_is_learner())).await.unwrap();
    let new_id = added.member().unwrap().id();
    assert!(added.member().unwrap().is_learner());
    assert_eq!(added.member_list().len(), 4);

    // Errors, as etcd words them.
    let err = c1.member_add([url.as_str()], None).await.unwrap_err().to_string();
    assert!(err.contains("etcdserver: member ID already exist") || err.contains("Peer URLs already exists"), "{err}");
    let voter = cluster.client(&[0]).await.status().await.unwrap().header().unwrap().member_id();
    let err = c1.member_promote(voter).await.unwrap_err().to_string();
    assert!(err.contains("etcdserver: can only promote a learner member"), "{err}");
    let err = c1.member_remove(0x1234).await.unwrap_err().to_string();
    assert!(err.contains("etcdserver: member not found"), "{err}");

    // The new member joins, catches up, and is promoted.
    cluster.spawn_joining(new);
    wait_for_key(&cluster, new, "before/49", b"x").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c1.member_promote(new_id).await {
            Ok(r) => {
                assert!(r.members().iter().all(|m| !m.is_learner()));
                break;
            }
            Err(e) if e.to_string().contains("in sync with leader") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("promote failed: {e}"),
        }
    }
    c.put("with-four", "yes", None).await.unwrap();
    wait_for_key(&cluster, new, "with-four", b"yes").await;

    // Remove an original member, the leader when it is one (the hardest case: the members that
    // knew it as leader must find the next one, and the new member never talked to it); the
    // remaining three keep serving.
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let victim = if leader == new { 2 } else { leader };
    let victim_id = cluster.client(&[victim]).await.status().await.unwrap().header().unwrap().member_id();
    let r = c1.member_remove(victim_id).await.unwrap();
    assert_eq!(r.members().len(), 3);
    cluster.kill(victim);
    // The new member first, at once: it is the one that may still take the removed member for
    // the leader without ever having had a connection to it.
    let others: Vec<usize> = [new, 0, 1, 2].into_iter().filter(|i| *i != victim).collect();
    for i in &others {
        cluster.client(&[*i]).await.put(format!("after-remove/{i}"), "ok", None).await.unwrap();
    }
    let mut rest = cluster.client(&others).await;
    rest.put("after-remove", "ok", None).await.unwrap();
    // The new member's name shows once it has published its attributes through the log.
    let mut want: Vec<String> = ["m0", "m1", "m2", "m3"].iter().map(|n| n.to_string()).filter(|n| *n != format!("m{victim}")).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = rest.member_list().await.unwrap();
        let mut names: Vec<String> = list.members().iter().map(|m| m.name().to_string()).collect();
        names.sort();
        if names == want {
            break;
        }
        assert!(Instant::now() < deadline, "members: {names:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_key(&cluster, new, "after-remove", b"ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_member_add_promote_remove() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let eps = cluster.endpoints().join(",").replace("http://", "");
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={eps}"))
            .args(args)
            .output()
            .expect("etcdctl");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let new = cluster.prepare_joining("m3");
    let url = cluster.members[new].peer_url.clone();
    let (ok, out) = ctl(&["member", "add", "m3", &format!("--peer-urls={url}"), "--learner"]);
    assert!(ok, "{out}");
    assert!(out.contains("added to cluster") && out.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""), "{out}");
    assert!(out.contains(&format!("m3={url}")), "{out}");
    let id = out.split_whitespace().nth(1).unwrap().to_string(); // "Member <hex-id> added ..."
    cluster.spawn_joining(new);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = ctl(&["member", "promote", &id]);
        if ok {
            assert!(out.contains("promoted in cluster"), "{out}");
            break;
        }
        assert!(out.contains("in sync with leader") && Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The new member shows its name once it has published its attributes through the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out) = ctl(&["member", "list"]);
        if ok && out.lines().count() == 4 && out.contains(", m3, ") {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out) = ctl(&["member", "remove", &id]);
    assert!(ok && out.contains("removed from cluster"), "{out}");
    let (ok, out) = ctl(&["member", "list"]);
    assert!(ok && out.lines().count() == 3, "{out}");
}
