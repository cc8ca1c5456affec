//! `rampart dev`, the README's run command: three members on etcd's local ports, usable with
//! etcdctl at once, all stopped cleanly by Ctrl-C.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::RAMPART;

fn etcdctl(args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints=127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379")
        .args(args)
        .output()
        .expect("etcdctl is installed by the test command");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn dev_runs_a_three_member_cluster_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rampart-data");
    let mut child = Command::new(RAMPART)
        .arg("dev")
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !etcdctl(&["put", "greeting", "hello"]).0 {
        assert!(Instant::now() < deadline, "rampart dev did not serve in time");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out) = etcdctl(&["get", "greeting", "--print-value-only"]);
    assert!(ok && out.trim() == "hello", "{out}");
    let (ok, out) = etcdctl(&["member", "list"]);
    assert!(ok && out.lines().count() == 3, "{out}");
    for name in ["infra1", "infra2", "infra3"] {
        assert!(data.join(name).join("member").exists(), "no data for {name}");
    }

    // Ctrl-C is SIGINT to the process group in a terminal; here, to the dev process.
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "rampart dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let mut stdout = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(stdout.contains("127.0.0.1:2379") && stdout.contains("etcdctl") && stdout.contains("all members stopped"), "{stdout}");
    // Every member is gone: nobody listens on the client ports any more.
    for port in [2379, 22379, 32379] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still served");
    }
}
