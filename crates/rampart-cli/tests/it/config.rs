//! `rampart serve` settings from a TOML file, `RAMPART_*` environment variables and flags, in
//! that order of precedence (flags win).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};

use crate::harness::{connect, free_port, RAMPART};

#[tokio::test(flavor = "multi_thread")]
async fn file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let client = format!("http://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let file = dir.path().join("rampart.toml");
    std::fs::write(
        &file,
        format!(
            r#"
name = "from-file"
data_dir = "{data}"
listen_client_urls = ["{client}"]
advertise_client_urls = ["{client}"]
listen_peer_urls = ["{peer}"]
initial_advertise_peer_urls = ["{peer}"]
initial_cluster = "from-file={peer}"
max_txn_ops = 100
max_request_bytes = 100
"#,
            data = dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(RAMPART)
        .arg("serve")
        .arg("--config-file")
        .arg(&file)
        .args(["--max-request-bytes", "4096"]) // flag beats the environment and the file
        .env("RAMPART_MAX_TXN_OPS", "2") // environment beats the file
        .env("RAMPART_MAX_REQUEST_BYTES", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut c = connect(std::slice::from_ref(&client)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.put("probe", "x", None).await.is_err() {
        assert!(Instant::now() < deadline, "member from the config file did not serve on {client}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 1 KiB passes the flag's 4096 (the file's 100 and the environment's 10 would refuse it).
    c.put("k", vec![b'x'; 1024], None).await.unwrap();
    // 3 ops fail against the environment's 2 (the file said 100).
    let err = c
        .txn(Txn::new().and_then([TxnOp::put("a", "1", None), TxnOp::put("b", "1", None), TxnOp::put("c", "1", None)]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too many operations in txn request"), "{err}");
    // The name comes from the file. A member publishes it through the log after it starts (as
    // etcd's does), so a write may be answered before it is in the member list: wait for it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let name = loop {
        let members = c.member_list().await.unwrap();
        let name = members.members()[0].name().to_string();
        if !name.is_empty() || Instant::now() >= deadline {
            break name;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(name, "from-file");

    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn invalid_settings_are_refused_with_etcds_wording() {
    let out = Command::new(RAMPART)
        .args(["serve", "--name", "x", "--heartbeat-interval", "100", "--election-timeout", "200"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("should be at least as 5 times as --heartbeat-interval"), "{err}");
}
