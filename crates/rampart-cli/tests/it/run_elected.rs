//! `rampart run-elected`: two instances on a 3-member cluster run a program that appends
//! `INSTANCE TOKEN` lines to one file every 50 ms. Whatever happens to the holder (SIGKILL,
//! SIGTERM, its cluster losing quorum), the file must show one holder at a time: once a line with
//! a newer fencing token appears, no older token ever writes again; and the standby must take over
//! within about one TTL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, RAMPART};

const TTL_S: u64 = 2;

/// The program run-elected supervises: it writes while it runs and says when it is stopped.
const PROGRAM: &str = r#"trap 'echo "$INSTANCE $RAMPART_FENCING_TOKEN stop" >> "$OUT"; exit 0' TERM
while true; do echo "$INSTANCE $RAMPART_FENCING_TOKEN tick" >> "$OUT"; sleep 0.05; done"#;

struct Instance {
    name: &'static str,
    child: Child,
}

fn start_instance(name: &'static str, endpoints: &str, out: &Path) -> Instance {
    start_instance_as(name, endpoints, out, &[])
}

fn start_instance_as(name: &'static str, endpoints: &str, out: &Path, extra: &[&str]) -> Instance {
    let child = Command::new(RAMPART)
        .args(["run-elected", "--endpoints", endpoints, "--key", "svc", "--ttl", &TTL_S.to_string(), "--grace", "0.3"])
        .args(extra)
        .args(["--", "sh", "-c", PROGRAM])
        .env("INSTANCE", name)
        .env("OUT", out)
        .env("RAMPART_LOG", "rampart=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(out.with_extension(name)).unwrap())
        .spawn()
        .unwrap();
    Instance { name, child }
}

fn signal(pid: u32, sig: &str) {
    Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
}

/// (instance, token, what) per line, in the order written.
fn lines(out: &Path) -> Vec<(String, i64, String)> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some((p.next()?.to_string(), p.next()?.parse().ok()?, p.next()?.to_string()))
        })
        .collect()
}

/// One holder at a time: tokens never go back, and each token belongs to one instance.
fn check_exclusive(out: &Path) {
    let all = lines(out);
    let mut newest = 0;
    let mut owner = std::collections::HashMap::new();
    for (i, (who, token, what)) in all.iter().enumerate() {
        assert!(*token >= newest, "line {i}: {who} wrote with token {token} after token {newest} had started ({what}):\n{all:?}");
        newest = *token;
        let first = owner.entry(*token).or_insert_with(|| who.clone());
        assert_eq!(first, who, "token {token} used by two instances");
    }
}

/// Waits until a line from someone holding a token above `above` appears; returns (who, token).
fn wait_holder(out: &Path, above: i64, within: Duration) -> (String, i64, Duration) {
    let start = Instant::now();
    loop {
        if let Some((who, token, _)) = lines(out).into_iter().find(|(_, t, w)| *t > above && w == "tick") {
            return (who, token, start.elapsed());
        }
        assert!(start.elapsed() < within, "no new holder within {within:?}; lines: {:?}", lines(out));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pick<'a>(instances: &'a mut [Instance], name: &str) -> &'a mut Instance {
    instances.iter_mut().find(|i| i.name == name).unwrap()
}

#[test]
fn one_holder_at_a_time_and_a_standby_takes_over() {
    let cluster = Cluster::start(3);
    let endpoints = cluster.endpoints().join(",");
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("ticks");
    let mut instances = vec![start_instance("a", &endpoints, &out), start_instance("b", &endpoints, &out)];
    let ttl = Duration::from_secs(TTL_S);

    // Someone leads; the other waits.
    let (holder, token, _) = wait_holder(&out, 0, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(500));
    check_exclusive(&out);

    // 1. The holder is SIGKILLed: its program dies with it (PDEATHSIG), and the standby starts
    //    once the lease runs out, about one TTL later.
    let h = pick(&mut instances, &holder);
    h.child.kill().unwrap();
    h.child.wait().unwrap();
    let (next, token2, took) = wait_holder(&out, token, 4 * ttl);
    eprintln!("SIGKILL of {holder}: {next} took over in {took:?} (TTL {ttl:?})");
    assert_ne!(next, holder);
    assert!(took <= 2 * ttl, "standby took {took:?} with a {ttl:?} TTL");
    check_exclusive(&out);

    // The killed instance comes back as the standby.
    *pick(&mut instances, &holder) = start_instance(named(&holder), &endpoints, &out);
    std::thread::sleep(Duration::from_millis(1500));

    // 2. The holder gets SIGTERM: it stops its program (which says so), resigns, and the standby
    //    starts at once, without waiting for the lease.
    let h = pick(&mut instances, &next);
    signal(h.child.id(), "TERM");
    let (third, token3, took) = wait_holder(&out, token2, 2 * ttl);
    eprintln!("SIGTERM of {next}: {third} took over in {took:?}");
    assert!(h.child.wait().unwrap().success());
    assert_ne!(third, next);
    assert!(took < ttl, "a clean hand-over took {took:?}");
    let all = lines(&out);
    let stop = all.iter().position(|(w, t, what)| w == &next && *t == token2 && what == "stop");
    let first_new = all.iter().position(|(_, t, _)| *t == token3);
    assert!(stop.is_some() && stop < first_new, "the old holder's stop must come before the new holder's first line: {all:?}");
    check_exclusive(&out);

    // Bring the stopped one back as standby.
    *pick(&mut instances, &next) = start_instance(named(&next), &endpoints, &out);
    std::thread::sleep(Duration::from_millis(1500));

    // 3. The cluster loses quorum (two members paused): the holder cannot confirm its lease and
    //    must stop its program before the lease could expire; nobody leads until quorum returns.
    let lost_at = Instant::now();
    let paused: Vec<u32> = [1, 2].iter().map(|i| cluster.members[*i].child.as_ref().unwrap().id()).collect();
    paused.iter().for_each(|p| signal(*p, "STOP"));
    // The lease cannot expire on the server before one TTL after the last keepalive, which was
    // before the pause: the program must have been stopped by then.
    let deadline = lost_at + ttl;
    loop {
        let all = lines(&out);
        if all.iter().any(|(w, t, what)| w == &third && *t == token3 && what == "stop") {
            break;
        }
        assert!(Instant::now() < deadline, "the holder kept running without quorum for a TTL: {all:?}\n{}", holder_log(&out, &third));
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("quorum lost: {third} stopped its program after {:?}", lost_at.elapsed());
    let stopped_lines = lines(&out).len();
    std::thread::sleep(ttl);
    assert_eq!(lines(&out).len(), stopped_lines, "someone ran without quorum");
    paused.iter().for_each(|p| signal(*p, "CONT"));
    let (fourth, _, took) = wait_holder(&out, token3, 6 * ttl);
    eprintln!("quorum back: {fourth} leads after {took:?}");
    std::thread::sleep(Duration::from_millis(500));
    check_exclusive(&out);

    for i in &mut instances {
        let _ = i.child.kill();
        let _ = i.child.wait();
    }
}

fn holder_log(out: &Path, name: &str) -> String {
    std::fs::read_to_string(out.with_extension(name)).unwrap_or_default()
}

fn named(name: &str) -> &'static str {
    if name == "a" { "a" } else { "b" }
}

/// With auth on, run-elected authenticates with `--user`; without it the cluster refuses it and
/// its program never runs.
#[tokio::test(flavor = "multi_thread")]
async fn with_auth_on_only_an_authenticated_instance_runs() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let mut c = cluster.client(&[leader]).await;
    c.user_add("root", "rootpw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("svc").await.unwrap();
    c.role_grant_permission("svc", etcd_client::Permission::read_write("svc/").with_prefix()).await.unwrap();
    c.user_add("svc", "svcpw", None).await.unwrap();
    c.user_grant_role("svc", "svc").await.unwrap();
    c.auth_enable().await.unwrap();

    let endpoints = cluster.endpoints().join(",");
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("ticks");
    let mut anonymous = start_instance("a", &endpoints, &out);
    std::thread::sleep(Duration::from_secs(2));
    assert!(lines(&out).is_empty(), "ran without credentials: {:?}", lines(&out));
    let mut authed = start_instance_as("b", &endpoints, &out, &["--user", "svc:svcpw"]);
    let (who, _, _) = wait_holder(&out, 0, Duration::from_secs(15));
    assert_eq!(who, "b", "{}", holder_log(&out, "b"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(lines(&out).iter().all(|(w, _, _)| w == "b"));
    for i in [&mut anonymous, &mut authed] {
        let _ = i.child.kill();
        let _ = i.child.wait();
    }
}
