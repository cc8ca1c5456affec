//! Auth next to etcd 3.4: etcdctl's user, role and auth commands print the same on both, and with
//! auth on nothing is reachable without a valid token (KV, Watch, Lease, Maintenance), through
//! etcdctl and the `etcd-client` crate, on every member.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};

use crate::etcdctl::{etcdctl, start_etcd, wait_ready};
use crate::harness::Cluster;

/// One etcdctl step per line; the first words may be etcdctl flags such as `--user=u:p`.
const SCRIPT: &[&str] = &[
    "user add root:rootpw",
    "user add root:again",
    "role add reader",
    "role add reader",
    "role grant-permission reader read foo --prefix",
    "role grant-permission reader readwrite bar",
    "role grant-permission nosuch read x",
    "user add alice:alicepw",
    "user grant-role alice reader",
    "user grant-role alice nosuch",
    "user list",
    "role list",
    "role get reader",
    "user get alice",
    "user get nobody",
    "auth enable",
    "put foo1 x",
    "get foo1",
    "--user=root:rootpw put foo1 x",
    "--user=alice:alicepw get foo1",
    "--user=alice:alicepw get foo --prefix",
    "--user=alice:alicepw get f --prefix",
    "--user=alice:alicepw put foo1 y",
    "--user=alice:alicepw put bar z",
    "--user=alice:alicepw del bar",
    "--user=alice:wrong get foo1",
    "--user=nobody:x get foo1",
    "--user=alice:alicepw get zzz",
    "--user=alice:alicepw user list",
    "--user=alice:alicepw user add mallory:x",
    "--user=alice:alicepw auth disable",
    "--user=alice:alicepw user get alice",
    "--user=alice:alicepw role get reader",
    "--user=root:rootpw user delete root",
    "--user=root:rootpw user revoke-role root root",
    "--user=root:rootpw role revoke-permission reader bar",
    "--user=root:rootpw role revoke-permission reader bar",
    "--user=alice:alicepw put bar z",
    "--user=root:rootpw user passwd alice --interactive=false",
    "--user=alice:alicepw get foo1",
    "--user=alice:newpw get foo1",
    "--user=root:rootpw role get root",
    "--user=root:rootpw user get root",
    "--user=root:rootpw user revoke-role alice reader",
    "--user=alice:newpw get foo1",
    "--user=root:rootpw role delete reader",
    "--user=root:rootpw user delete alice",
    "--user=root:rootpw auth disable",
    "get foo1",
    "auth enable",
    "--user=root:rootpw get foo1",
];

/// etcdctl's output without its client-side log lines.
fn clean(out: &str) -> String {
    out.lines().filter(|l| !l.starts_with("{\"level") && !l.starts_with("20")).collect::<Vec<_>>().join("\n")
}

#[test]
fn etcdctl_user_role_and_auth_commands_match_etcd() {
    let etcd = start_etcd();
    let cluster = Cluster::start(3);
    wait_ready(&etcd.endpoint);
    let rampart = cluster.endpoints().join(",");
    wait_ready(&rampart);
    let mut mismatches = Vec::new();
    for step in SCRIPT {
        let args: Vec<&str> = step.split_whitespace().collect();
        // `user passwd` reads the new password from stdin.
        let stdin = step.contains("passwd").then_some("newpw\n");
        let run = |endpoint: &str| {
            let (code, out, err) = etcdctl(endpoint, &args, stdin);
            (code, clean(&out), clean(&err))
        };
        let (want, got) = (run(&etcd.endpoint), run(&rampart));
        if want != got {
            mismatches.push(format!("etcdctl {step}\n  etcd:    {want:?}\n  rampart: {got:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{} of {} commands differ:\n{}", mismatches.len(), SCRIPT.len(), mismatches.join("\n"));
}

async fn as_user(endpoints: &[String], user: &str, password: &str) -> Result<Client, etcd_client::Error> {
    Client::connect(endpoints, Some(ConnectOptions::new().with_user(user, password).with_timeout(Duration::from_secs(5)))).await
}

fn code_and_message<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> String {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        other => format!("not a gRPC error: {other:?}"),
    }
}

/// With auth on, through the client library: no token, no access (KV, Lease, Watch,
/// Maintenance); a token from one member is good on the others; watches need read permission.
#[tokio::test(flavor = "multi_thread")]
async fn with_auth_on_nothing_is_reachable_without_a_valid_token() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let mut open = cluster.client(&[leader]).await;
    open.user_add("root", "rootpw", None).await.unwrap();
    open.user_grant_role("root", "root").await.unwrap();
    open.role_add("app").await.unwrap();
    let perm = etcd_client::Permission::read_write("app/").with_prefix();
    open.role_grant_permission("app", perm).await.unwrap();
    open.user_add("svc", "svcpw", None).await.unwrap();
    open.user_grant_role("svc", "app").await.unwrap();
    open.put("other/k", "v", None).await.unwrap();
    open.auth_enable().await.unwrap();

    // No token: etcd's "user name is empty", for every kind of call.
    assert_eq!(code_and_message(open.get("app/x", None).await), "InvalidArgument: etcdserver: user name is empty");
    assert_eq!(code_and_message(open.put("app/x", "1", None).await), "InvalidArgument: etcdserver: user name is empty");
    assert_eq!(code_and_message(open.lease_grant(10, None).await), "InvalidArgument: etcdserver: user name is empty");
    assert_eq!(code_and_message(open.defragment().await), "InvalidArgument: etcdserver: user name is empty");
    assert_eq!(code_and_message(open.user_list().await), "InvalidArgument: etcdserver: user name is empty");
    let mut denied = open.watch("app/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let first = denied.message().await.unwrap().unwrap();
    assert!(first.canceled(), "{first:?}");
    // Status stays open, as in etcd (load balancers and etcdctl endpoint status use it).
    open.status().await.unwrap();

    // Wrong password.
    let bad = as_user(&cluster.endpoints(), "svc", "nope").await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(bad.contains("authentication failed, invalid user ID or password"), "{bad}");

    // A user authenticated through one member works on every member (tokens are not per member).
    let follower = (leader + 1) % 3;
    for i in [leader, follower, (leader + 2) % 3] {
        let mut svc = as_user(&cluster.endpoints()[i..=i], "svc", "svcpw").await.unwrap();
        svc.put(format!("app/{i}"), "1", None).await.unwrap();
        let r = svc.get("app/", Some(GetOptions::new().with_prefix())).await.unwrap();
        assert!(r.count() >= 1);
        assert_eq!(code_and_message(svc.get("other/k", None).await), "PermissionDenied: etcdserver: permission denied");
        assert_eq!(code_and_message(svc.put("other/k", "x", None).await), "PermissionDenied: etcdserver: permission denied");
        assert_eq!(code_and_message(svc.defragment().await), "PermissionDenied: etcdserver: permission denied");
        assert_eq!(code_and_message(svc.user_list().await), "PermissionDenied: etcdserver: permission denied");
        // A txn is checked on every op of both branches.
        let txn = etcd_client::Txn::new()
            .when(vec![etcd_client::Compare::version("app/0", etcd_client::CompareOp::Greater, 0)])
            .and_then(vec![etcd_client::TxnOp::put("app/t", "1", None)])
            .or_else(vec![etcd_client::TxnOp::put("other/t", "1", None)]);
        assert_eq!(code_and_message(svc.txn(txn).await), "PermissionDenied: etcdserver: permission denied");
        // Leases take a token too; revoking one needs write permission on its keys.
        let lease = svc.lease_grant(30, None).await.unwrap().id();
        svc.lease_time_to_live(lease, None).await.unwrap();
        svc.lease_revoke(lease).await.unwrap();
    }

    // Watches: permitted on the user's range, refused elsewhere.
    let mut svc = as_user(&cluster.endpoints(), "svc", "svcpw").await.unwrap();
    let mut refused = svc.watch("other/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let r = refused.message().await.unwrap().unwrap();
    assert!(r.canceled(), "{r:?}");
    let mut watching = svc.watch("app/w", None).await.unwrap();
    let created = watching.message().await.unwrap().unwrap();
    assert!(created.created() && !created.canceled(), "{created:?}");
    svc.put("app/w", "1", None).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), watching.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(ev.events()[0].event_type(), EventType::Put);

    // Root may do everything, including turning auth off again.
    let mut root = as_user(&cluster.endpoints(), "root", "rootpw").await.unwrap();
    root.get("other/k", None).await.unwrap();
    root.defragment().await.unwrap();
    root.auth_disable().await.unwrap();
    open.get("other/k", None).await.unwrap();
}
