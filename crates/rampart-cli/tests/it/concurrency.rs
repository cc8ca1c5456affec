//! Locks and elections, next to etcd 3.4: the gRPC Lock and Election services (driven by the
//! `etcd-client` crate) and etcdctl's `lock` and `elect` (which run etcd's recipes in the client
//! over KV, Lease and Watch). Each scenario runs on a real etcd and on a 3-member Rampart cluster;
//! the transcripts (values, revisions, errors; lease ids named by order) must be the same.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, LockOptions, ProclaimOptions, ResignOptions};

use crate::etcdctl::{start_etcd, wait_ready};
use crate::harness::{connect, Cluster};

/// What one system did, line by line, with its lease ids replaced by `<L1>`, `<L2>`, ...
#[derive(Default)]
struct Transcript {
    lines: Vec<String>,
    leases: Vec<i64>,
}

impl Transcript {
    fn lease(&mut self, id: i64) {
        self.leases.push(id);
    }

    fn say(&mut self, line: impl Into<String>) {
        let mut line = line.into();
        for (n, id) in self.leases.iter().enumerate() {
            line = line.replace(&format!("{id:x}"), &format!("<L{}>", n + 1)).replace(&id.to_string(), &format!("<L{}>", n + 1));
        }
        self.lines.push(line);
    }

    fn outcome<T>(&mut self, what: &str, r: Result<T, etcd_client::Error>, ok: impl FnOnce(T) -> String) {
        let line = match r {
            Ok(v) => format!("{what}: {}", ok(v)),
            Err(etcd_client::Error::GRpcStatus(s)) => format!("{what}: error {:?} {}", s.code(), s.message()),
            Err(e) => format!("{what}: client error {e}"),
        };
        self.say(line);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// True if `fut` is still pending after `wait`: a lock or campaign that must block.
async fn blocks<F: std::future::Future>(fut: &mut std::pin::Pin<Box<F>>, wait: Duration) -> bool {
    tokio::time::timeout(wait, fut.as_mut()).await.is_err()
}

async fn services_scenario(mut c: Client) -> Vec<String> {
    let mut t = Transcript::default();
    let mut leases = Vec::new();
    for _ in 0..4 {
        let id = c.lease_grant(30, None).await.unwrap().id();
        t.lease(id);
        leases.push(id);
    }
    let (l1, l2, l3, l4) = (leases[0], leases[1], leases[2], leases[3]);

    // Lock: the first comer holds it at once, the second waits for the unlock, and its
    // revision (the fencing token) is higher.
    let first = c.lock("svc", Some(LockOptions::new().with_lease(l1))).await.unwrap();
    t.say(format!("lock svc l1: key {} rev {}", text(first.key()), first.header().unwrap().revision()));
    let mut c2 = c.clone();
    let mut second = Box::pin(async move { c2.lock("svc", Some(LockOptions::new().with_lease(l2))).await });
    t.say(format!("lock svc l2 blocks while l1 holds: {}", blocks(&mut second, Duration::from_millis(700)).await));
    let unlocked = c.unlock(first.key().to_vec()).await.unwrap();
    t.say(format!("unlock l1: rev {}", unlocked.header().unwrap().revision()));
    let second = second.await.unwrap();
    t.say(format!("lock svc l2: key {} rev {}", text(second.key()), second.header().unwrap().revision()));
    let mine = c.get(second.key(), None).await.unwrap();
    t.say(format!("l2's key created at {}", mine.kvs()[0].create_revision()));
    // Locking again with the lease that holds it is the same acquisition.
    let again = c.lock("svc", Some(LockOptions::new().with_lease(l2))).await;
    t.outcome("lock svc l2 again", again, |r| format!("key {}", text(r.key())));
    let r = c.lock("svc", Some(LockOptions::new().with_lease(0x7777))).await;
    t.outcome("lock with an unknown lease", r, |r| text(r.key()));
    c.unlock(second.key().to_vec()).await.unwrap();

    // A holder whose lease is revoked gives the lock up.
    let held = c.lock("dead", Some(LockOptions::new().with_lease(l3))).await.unwrap();
    t.say(format!("lock dead l3: {}", text(held.key())));
    let mut c4 = c.clone();
    let mut waiter = Box::pin(async move { c4.lock("dead", Some(LockOptions::new().with_lease(l4))).await });
    t.say(format!("lock dead l4 blocks: {}", blocks(&mut waiter, Duration::from_millis(500)).await));
    c.lease_revoke(l3).await.unwrap();
    t.outcome("lock dead l4 after l3's lease is revoked", waiter.await, |r| text(r.key()));

    // Election.
    let mut e = c.election_client();
    t.outcome("leader of an empty election", e.leader("job").await, |r| format!("{:?}", r.kv().map(|kv| text(kv.value()))));
    let won = e.campaign("job", "v1", l1).await.unwrap();
    let leader1 = won.leader().unwrap().clone();
    t.say(format!("campaign l1: key {} rev {} header {}", text(leader1.key()), leader1.rev(), won.header().unwrap().revision()));
    let mut observe = e.observe("job").await.unwrap();
    let seen = observe.message().await.unwrap().unwrap();
    t.say(format!("observe: {} at {}", text(seen.kv().unwrap().value()), seen.kv().unwrap().mod_revision()));
    let p = e.proclaim("v2", Some(ProclaimOptions::new().with_leader(leader1.clone()))).await;
    t.outcome("proclaim v2", p, |r| format!("rev {}", r.header().unwrap().revision()));
    let seen = observe.message().await.unwrap().unwrap();
    t.say(format!("observe: {} at {}", text(seen.kv().unwrap().value()), seen.kv().unwrap().mod_revision()));
    let mut e2 = e.clone();
    let mut challenger = Box::pin(async move { e2.campaign("job", "w1", l2).await });
    t.say(format!("campaign l2 blocks: {}", blocks(&mut challenger, Duration::from_millis(500)).await));
    let l = e.leader("job").await.unwrap();
    t.say(format!("leader: {}", text(l.kv().unwrap().value())));
    let r = e.resign(Some(ResignOptions::new().with_leader(leader1.clone()))).await;
    t.outcome("resign l1", r, |r| format!("rev {}", r.header().unwrap().revision()));
    let won2 = challenger.await.unwrap();
    t.say(format!("campaign l2: key {} rev {}", text(won2.leader().unwrap().key()), won2.leader().unwrap().rev()));
    let seen = observe.message().await.unwrap().unwrap();
    t.say(format!("observe: {} at {}", text(seen.kv().unwrap().value()), seen.kv().unwrap().mod_revision()));
    let stale = e.proclaim("late", Some(ProclaimOptions::new().with_leader(leader1.clone()))).await;
    t.outcome("proclaim by the resigned leader", stale, |r| format!("rev {}", r.header().unwrap().revision()));
    let r = e.proclaim("nobody", None).await;
    t.outcome("proclaim without a leader key", r, |_| "ok".into());
    let l = e.leader("job").await.unwrap();
    t.say(format!("leader: {} created at {}", text(l.kv().unwrap().value()), l.kv().unwrap().create_revision()));
    // The leader's lease goes: observers see nothing new until someone campaigns again.
    c.lease_revoke(l2).await.unwrap();
    t.outcome("leader after the leader's lease is revoked", e.leader("job").await, |r| format!("{:?}", r.kv().map(|kv| text(kv.value()))));
    let won3 = e.campaign("job", "x1", l4).await.unwrap();
    t.say(format!("campaign l4: rev {}", won3.leader().unwrap().rev()));
    let seen = observe.message().await.unwrap().unwrap();
    t.say(format!("observe: {} at {}", text(seen.kv().unwrap().value()), seen.kv().unwrap().mod_revision()));

    // A waiter whose client gives up (its call dropped: the stream is reset) gives up its place:
    // once the holder unlocks, the next comer gets the lock at once.
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(c.lease_grant(60, None).await.unwrap().id());
    }
    let held = c.lock("gone", Some(LockOptions::new().with_lease(more[0]))).await.unwrap();
    let mut c5 = c.clone();
    let quitter_lease = more[1];
    let mut quitter = Box::pin(async move { c5.lock("gone", Some(LockOptions::new().with_lease(quitter_lease))).await });
    t.say(format!("lock gone blocks: {}", blocks(&mut quitter, Duration::from_millis(500)).await));
    drop(quitter);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.unlock(held.key().to_vec()).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(3), c.lock("gone", Some(LockOptions::new().with_lease(more[2])))).await;
    t.say(format!("the next comer gets the lock at once: {}", next.is_ok_and(|r| r.is_ok())));
    let waiting = c.get("gone/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    t.say(format!("keys under gone/ afterwards: {}", waiting.kvs().len()));
    t.lines
}

/// The gRPC Lock and Election services behave as etcd's do, on a follower of a 3-member cluster.
#[tokio::test(flavor = "multi_thread")]
async fn lock_and_election_services_match_etcd() {
    let etcd = start_etcd();
    let cluster = Cluster::start(3);
    wait_ready(&etcd.endpoint);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let want = services_scenario(connect(std::slice::from_ref(&etcd.endpoint)).await).await;
    let got = services_scenario(cluster.client(&[(leader + 1) % 3]).await).await;
    let diff: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  etcd:    {a}\n  rampart: {b}"))
        .collect();
    assert!(diff.is_empty() && want.len() == got.len(), "transcripts differ:\n{}\n\netcd:\n{}\n\nrampart:\n{}", diff.join("\n"), want.join("\n"), got.join("\n"));
}

/// An etcdctl started in the background (its output collected when it is stopped).
struct Background(Child);

impl Background {
    fn start(endpoint: &str, args: &[&str]) -> Background {
        let child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Background(child)
    }

    fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// SIGINT (etcdctl then unlocks or resigns and exits), and its output.
    fn interrupt(self) -> String {
        unsafe_kill(self.0.id(), "INT");
        self.finish()
    }

    fn finish(self) -> String {
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
}

/// Replaces every `NAME/HEX` (a contender key with its lease id) by `NAME/<lease N>`.
fn name_leases(out: &str) -> String {
    let mut seen: Vec<String> = Vec::new();
    out.lines()
        .map(|line| match line.split_once('/') {
            Some((name, hex)) if !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) => {
                let n = seen.iter().position(|h| h == hex).unwrap_or_else(|| {
                    seen.push(hex.to_string());
                    seen.len() - 1
                });
                format!("{name}/<lease {n}>")
            }
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn etcdctl_scenario(endpoint: &str) -> Vec<String> {
    let sleep = |ms| std::thread::sleep(Duration::from_millis(ms));
    let mut t = Vec::new();
    // A command run while holding the lock sees the key and its revision.
    let (code, out, _) = crate::etcdctl::etcdctl(endpoint, &["lock", "L", "--", "sh", "-c", "echo $ETCD_LOCK_KEY $ETCD_LOCK_REV"], None);
    t.push(format!("lock with a command: {code} {}", name_leases(&out.trim().replace(" ", "\n"))));

    // Contention: the second waits until the first is interrupted.
    let mut holder = Background::start(endpoint, &["lock", "M"]);
    sleep(700);
    let mut waiter = Background::start(endpoint, &["lock", "M", "--", "echo", "got it"]);
    sleep(1000);
    t.push(format!("holder holds: {}, waiter waits: {}", holder.running(), waiter.running()));
    let held = holder.interrupt();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while waiter.running() && std::time::Instant::now() < deadline {
        sleep(50);
    }
    t.push(format!("holder printed: {}", name_leases(held.trim())));
    t.push(format!("waiter done: {} printed: {}", !waiter.running(), waiter.finish().trim()));

    // Elections: an observer sees each leader's proposal in turn.
    let observer = Background::start(endpoint, &["elect", "-l", "E"]);
    sleep(500);
    let first = Background::start(endpoint, &["elect", "E", "p1"]);
    sleep(700);
    let mut second = Background::start(endpoint, &["elect", "E", "p2"]);
    sleep(700);
    t.push(format!("second candidate waits: {}", second.running()));
    let first_out = first.interrupt();
    sleep(1000);
    let second_out = second.interrupt();
    sleep(500);
    let observed = observer.interrupt();
    t.push(format!("first printed: {}", name_leases(first_out.trim())));
    t.push(format!("second printed: {}", name_leases(second_out.trim())));
    t.push(format!("observer printed: {}", name_leases(observed.trim())));
    t
}

/// etcdctl 3.4's `lock` and `elect` (client-side recipes over KV, Lease and Watch) print the same
/// on Rampart as on etcd, and exclude each other the same way.
#[test]
fn etcdctl_lock_and_elect_match_etcd() {
    let etcd = start_etcd();
    let cluster = Cluster::start(3);
    wait_ready(&etcd.endpoint);
    let endpoints = cluster.endpoints().join(",");
    wait_ready(&endpoints);
    let want = etcdctl_scenario(&etcd.endpoint);
    let got = etcdctl_scenario(&endpoints);
    assert_eq!(want, got, "etcd (left) and rampart (right) differ");
    assert!(want[1].contains("holder holds: true, waiter waits: true"), "{want:?}");
}
