//! The Maintenance service with real clients: HashKV consistency across members, `etcdctl
//! snapshot save` then `rampart snapshot restore` into a new cluster, defragmentation, the space
//! quota and its NOSPACE alarm, MoveLeader, and the leadership hand-off on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{DeleteOptions, GetOptions};

use crate::etcdctl::etcdctl;
use crate::harness::{connect, Cluster, RAMPART};

/// host:port endpoints, the form etcdctl 3.4's per-endpoint commands need (see etcdctl.rs).
fn bare(cluster: &Cluster, which: &[usize]) -> String {
    which.iter().map(|i| cluster.members[*i].client_url.replace("http://", "")).collect::<Vec<_>>().join(",")
}

fn all(cluster: &Cluster) -> Vec<usize> {
    (0..cluster.members.len()).collect()
}

async fn member_id(cluster: &Cluster, i: usize) -> u64 {
    cluster.client(&[i]).await.status().await.unwrap().header().unwrap().member_id()
}

/// Puts and deletes, then a compaction, then more puts: a history worth hashing.
async fn write_history(client: &mut etcd_client::Client, prefix: &str) -> i64 {
    for i in 0..30 {
        client.put(format!("{prefix}{i:02}"), format!("v{i}"), None).await.unwrap();
    }
    client.delete(format!("{prefix}05"), None).await.unwrap();
    let r = client.put(format!("{prefix}00"), "again", None).await.unwrap();
    client.compact(r.header().unwrap().revision() - 3, None).await.unwrap();
    let r = client.put(format!("{prefix}last"), "x", None).await.unwrap();
    r.header().unwrap().revision()
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_kv_is_equal_on_every_member_at_a_revision() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut client = cluster.client(&all(&cluster)).await;
    let rev = write_history(&mut client, "h/").await;

    let mut hashes = Vec::new();
    for i in all(&cluster) {
        let mut c = cluster.client(&[i]).await;
        // A linearizable read makes this member apply up to `rev` first.
        c.get("h/00", None).await.unwrap();
        let h = c.maintenance_client().hash_kv(rev).await.unwrap();
        assert_eq!(h.header().unwrap().revision(), rev);
        assert_eq!(h.hash_revision(), rev);
        assert_eq!(h.compact_version(), rev - 4);
        hashes.push(h.hash());
        // The whole-store hash agrees too once the members hold the same data.
        hashes.push(c.maintenance_client().hash().await.unwrap().hash());
    }
    assert_eq!(hashes.iter().step_by(2).collect::<Vec<_>>(), vec![&hashes[0]; 3], "{hashes:?}");
    assert_eq!(hashes.iter().skip(1).step_by(2).collect::<Vec<_>>(), vec![&hashes[1]; 3], "{hashes:?}");

    // A further write changes the current hash, not the one at `rev`.
    client.put("h/more", "y", None).await.unwrap();
    let mut c0 = cluster.client(&[0]).await;
    c0.get("h/more", None).await.unwrap();
    let now = c0.maintenance_client().hash_kv(0).await.unwrap();
    assert_eq!(now.hash_revision(), rev + 1);
    assert_ne!(now.hash(), hashes[0]);
    assert_eq!(c0.maintenance_client().hash_kv(rev).await.unwrap().hash(), hashes[0]);

    // etcd's errors outside the history kept.
    let err = c0.maintenance_client().hash_kv(rev + 10).await.unwrap_err().to_string();
    assert!(err.contains("required revision is a future revision"), "{err}");
    let err = c0.maintenance_client().hash_kv(rev - 4).await.unwrap_err().to_string();
    assert!(err.contains("required revision has been compacted"), "{err}");

    // etcdctl's consistency check view.
    let (code, out, err) = etcdctl(&bare(&cluster, &all(&cluster)), &["endpoint", "hashkv", "-w", "json"], None);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<u64> = v.as_array().unwrap().iter().map(|e| e["HashKV"]["hash"].as_u64().unwrap()).collect();
    assert_eq!(got.len(), 3, "{out}");
    assert!(got.iter().all(|h| *h == got[0]), "{out}");
}

/// key, value, create, mod, version
type Kv = (Vec<u8>, Vec<u8>, i64, i64, i64);

fn kvs(r: &etcd_client::GetResponse) -> Vec<Kv> {
    r.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.create_revision(), kv.mod_revision(), kv.version())).collect()
}

fn restore(file: &std::path::Path, member: &crate::harness::Member, initial_cluster: &str, token: &str) -> std::process::Output {
    Command::new(RAMPART)
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(&member.data_dir)
        .args(["--name", &member.name])
        .args(["--initial-cluster", initial_cluster])
        .args(["--initial-cluster-token", token])
        .args(["--initial-advertise-peer-urls", &member.peer_url])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_save_then_restore_into_a_new_cluster() {
    let old = Cluster::start(3);
    old.wait_leader(Duration::from_secs(10)).await;
    let mut client = old.client(&all(&old)).await;
    let rev = write_history(&mut client, "s/").await;
    let want = client.get("s/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let old_cluster_id = want.header().unwrap().cluster_id();
    // Users and roles travel with the data, as in etcd's restore.
    client.user_add("keeper", "pw", None).await.unwrap();
    client.role_add("keeper-role").await.unwrap();

    let backups = tempfile::tempdir().unwrap();
    let file = backups.path().join("backup.db");
    let (code, out, err) = etcdctl(&bare(&old, &[1]), &["snapshot", "save", file.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Snapshot saved at"), "{out}");
    let len = std::fs::metadata(&file).unwrap().len();
    assert_eq!(len % 512, 32, "etcdctl's length check: data then a sha256");
    // Documented limitation: etcdctl reads the file as bbolt.
    let (code, _, _) = etcdctl(&bare(&old, &[1]), &["snapshot", "status", file.to_str().unwrap()], None);
    assert_ne!(code, 0);
    drop(old);

    // A new cluster: start it once to get its members' addresses, then swap in restored dirs.
    let token = "restored-cluster";
    let mut new = Cluster::start_with(3, &["--initial-cluster-token", token]);
    for i in all(&new) {
        new.kill(i);
        let _ = std::fs::remove_dir_all(&new.members[i].data_dir);
    }
    let initial_cluster = new.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",");

    // A corrupt copy is refused, and nothing is created.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[200] ^= 0x40;
    let bad = backups.path().join("bad.db");
    std::fs::write(&bad, bytes).unwrap();
    let out = restore(&bad, &new.members[0], &initial_cluster, token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("sha256 mismatch"), "{stderr}");
    assert!(!new.members[0].data_dir.exists());

    for i in all(&new) {
        let out = restore(&file, &new.members[i], &initial_cluster, token);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("revision {rev}")));
    }
    // Restoring over an existing data dir is refused, as etcd refuses it.
    let out = restore(&file, &new.members[0], &initial_cluster, token);
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));

    for i in all(&new) {
        new.spawn(i);
    }
    new.wait_leader(Duration::from_secs(10)).await;
    let mut client = new.client(&all(&new)).await;
    let users = client.user_list().await.unwrap();
    assert_eq!(users.users(), ["keeper".to_string()]);
    let roles = client.role_list().await.unwrap();
    assert_eq!(roles.roles(), ["keeper-role".to_string()]);
    for i in all(&new) {
        let got = new.client(&[i]).await.get("s/", Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(kvs(&got), kvs(&want), "member {i}");
        assert_eq!(got.header().unwrap().revision(), rev);
        assert_ne!(got.header().unwrap().cluster_id(), old_cluster_id, "a new cluster");
    }
    let r = client.put("s/after-restore", "1", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), rev + 1);
    assert_eq!(client.member_list().await.unwrap().members().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn defrag_on_every_member_keeps_the_data() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut client = cluster.client(&all(&cluster)).await;
    let big = "z".repeat(8 * 1024);
    for i in 0..60 {
        client.put(format!("d/{i:02}"), big.as_str(), None).await.unwrap();
    }
    let r = client.delete("d/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    client.compact(r.header().unwrap().revision(), None).await.unwrap();
    let rev = client.put("d/kept", "yes", None).await.unwrap().header().unwrap().revision();

    let mut before = Vec::new();
    for i in all(&cluster) {
        let mut c = cluster.client(&[i]).await;
        c.get("d/kept", None).await.unwrap();
        before.push((c.maintenance_client().hash_kv(rev).await.unwrap().hash(), c.status().await.unwrap().db_size()));
    }
    let (code, out, err) = etcdctl(&bare(&cluster, &all(&cluster)), &["defrag"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("Finished defragmenting etcd member").count(), 3, "{out}");
    for i in all(&cluster) {
        let mut c = cluster.client(&[i]).await;
        let h = c.maintenance_client().hash_kv(rev).await.unwrap().hash();
        let size = c.status().await.unwrap().db_size();
        assert_eq!(h, before[i].0, "member {i}");
        assert!(size < before[i].1, "member {i}: {size} bytes after, {} before", before[i].1);
        let got = c.get("d/kept", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"yes");
    }
    client.put("d/after", "defrag", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn nospace_alarm_stops_growth_until_disarmed() {
    // A fresh store is well under 100 kB; with 10 kB values the file crosses 1 MB after a few
    // dozen puts (redb's file grows faster than the data it holds between durable commits).
    let cluster = Cluster::start_with(3, &["--quota-backend-bytes", "1000000"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let eps = bare(&cluster, &all(&cluster));
    let mut client = cluster.client(&all(&cluster)).await;
    let value = "q".repeat(10 * 1024);
    let mut refused = None;
    for i in 0..400 {
        match client.put(format!("q/{i:03}"), value.as_str(), None).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e.to_string()));
                break;
            }
        }
    }
    let (n, err) = refused.expect("the quota never refused a write");
    assert!(err.contains("etcdserver: mvcc: database space exceeded"), "after {n} puts: {err}");
    assert!(n >= 10, "refused after only {n} puts");

    let (code, out, err) = etcdctl(&eps, &["alarm", "list"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alarm:NOSPACE"), "{out}");
    let status = client.status().await.unwrap();
    assert!(status.errors().iter().any(|e| e.contains("alarm:NOSPACE")), "{:?}", status.errors());

    // Reads, deletes and compaction still work; anything that grows the store does not.
    let err = client.put("q/one-more", "x", None).await.unwrap_err().to_string();
    assert!(err.contains("database space exceeded"), "{err}");
    let (code, _, err) = etcdctl(&eps, &["txn", "--interactive=false"], Some("\nput q/txn x\n\n\n"));
    assert!(code != 0 && err.contains("database space exceeded"), "{err}");
    assert!(client.get("q/000", None).await.unwrap().kvs()[0].value().len() == value.len());
    let r = client.delete("q/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    assert_eq!(r.deleted() as usize, n);
    client.compact(r.header().unwrap().revision(), None).await.unwrap();
    let (code, out, err) = etcdctl(&eps, &["defrag"], None);
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, err) = etcdctl(&eps, &["alarm", "disarm"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alarm:NOSPACE"), "disarm lists what it cleared: {out}");
    let (code, out, _) = etcdctl(&eps, &["alarm", "list"], None);
    assert_eq!((code, out.trim()), (0, ""));
    client.put("q/after", "works", None).await.unwrap();
    // And it stays disarmed: the store is small again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, out, _) = etcdctl(&eps, &["alarm", "list"], None);
    assert_eq!(out.trim(), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn move_leader_and_hand_off_on_sigterm() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let target = (leader + 1) % 3;
    let target_id = member_id(&cluster, target).await;
    let eps = bare(&cluster, &all(&cluster));

    let (code, out, err) = etcdctl(&eps, &["move-leader", &format!("{target_id:x}")], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("Leadership transferred from {:x} to {target_id:x}", member_id(&cluster, leader).await)), "{out}");
    assert_eq!(cluster.wait_leader(Duration::from_secs(5)).await, target);

    let (code, _, err) = etcdctl(&eps, &["move-leader", "1234"], None);
    assert_ne!(code, 0);
    assert!(err.contains("etcdserver: bad leader transferee"), "{err}");
    let follower = (target + 1) % 3;
    let err = cluster.client(&[follower]).await.maintenance_client().move_leader(target_id).await.unwrap_err().to_string();
    assert!(err.contains("etcdserver: not leader"), "{err}");

    // SIGTERM on the leader while a client writes through the two others.
    let survivors: Vec<usize> = all(&cluster).into_iter().filter(|i| *i != target).collect();
    let writer_eps: Vec<String> = survivors.iter().map(|i| cluster.members[*i].client_url.clone()).collect();
    let writer = tokio::spawn(async move {
        let mut c = connect(&writer_eps).await;
        let start = Instant::now();
        let mut ok = Vec::new();
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            i += 1;
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), c.put(format!("w/{i}"), "v", None)).await {
                ok.push(Instant::now());
            }
        }
        ok
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pid = cluster.members[target].child.as_ref().unwrap().id();
    let sent = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());

    // Another member leads soon.
    let mut new_leader = None;
    while sent.elapsed() < Duration::from_secs(3) {
        let mut c = cluster.client(&[survivors[0]]).await;
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), c.status()).await {
            if s.leader() != 0 && s.leader() != target_id {
                new_leader = Some(sent.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = new_leader.expect("no new leader after SIGTERM");
    let ok = writer.await.unwrap();
    let mut child = cluster.members[target].child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the old leader did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    let log = cluster.log(target);
    assert!(log.contains("leadership transfer finished"), "{log}");

    let gap = ok.windows(2).filter(|w| w[1] > sent).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let after = ok.iter().filter(|t| **t > sent).count();
    println!("SIGTERM on the leader: new leader seen after {took:?}; longest write gap {gap:?}; {} writes, {after} after the signal", ok.len());
    assert!(after > 0, "no write succeeded after the SIGTERM");
    assert!(took < Duration::from_secs(1), "new leader after {took:?}");
    assert!(gap < Duration::from_secs(1), "write gap {gap:?}");
}
