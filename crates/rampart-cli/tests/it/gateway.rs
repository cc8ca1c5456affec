//! The JSON gateway (`/v3/...`, `/version`, `/health`) over real HTTP/1.1 (curl), compared with
//! etcd 3.4's gateway: the same requests go to a real etcd member and to a 3-member Rampart
//! cluster (spread over its members), and the answers must be the same, status and body, once
//! the fields that differ by nature (cluster_id, member_id, raft_term) are dropped.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::etcdctl::{normalize, start_etcd, wait_ready};
use crate::harness::Cluster;

/// Base64 (standard, padded), as the gateway wants bytes.
fn b(s: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, byte)| n | (*byte as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One HTTP request with curl: (status, body).
fn http(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    http_as(method, url, body, None)
}

/// One HTTP request with curl, with an auth token in the `Authorization` header.
fn http_as(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-S", "-g", "--max-time", "15", "-X", method, "-w", "\n%{http_code}", url]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: {t}")]);
    }
    if body.is_some() {
        // From stdin: a body starting with '@' would otherwise name a file.
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", "@-"]);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("curl must be installed");
    if let Some(b) = body {
        child.stdin.take().unwrap().write_all(b.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl {url}: {text:?} {}", String::from_utf8_lossy(&out.stderr)));
    (code.trim().parse().unwrap_or_else(|_| panic!("curl {url}: status {code:?}")), body.to_string())
}

/// The CORS headers of a response.
fn cors(method: &str, url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-g", "--max-time", "15", "-X", method, "-o", "/dev/null", url])
        .args(["-w", "%header{access-control-allow-origin}|%header{access-control-allow-methods}|%header{access-control-allow-headers}"])
        .output()
        .expect("curl must be installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn post(url: &str, body: &str) -> (u16, String) {
    http("POST", url, Some(body))
}

/// A streaming response read line by line (`curl -N`); the request stays open until dropped.
struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn open(url: &str, body: &str) -> Lines {
        Self::open_as(url, body, None)
    }

    fn open_as(url: &str, body: &str, token: Option<&str>) -> Lines {
        let auth = token.map(|t| format!("Authorization: {t}")).unwrap_or_else(|| "X-No-Auth: 1".into());
        let mut child = Command::new("curl")
            .args(["-s", "-g", "-N", "--max-time", "60", "-X", "POST", "-H", &auth, "--data-binary", "@-", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl must be installed");
        child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { child, rx }
    }

    fn next(&self) -> String {
        self.rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|e| panic!("no stream line within 10 s: {e}"))
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// The field names of an object (at `pointer`), sorted.
fn keys(body: &str, pointer: &str) -> Vec<String> {
    let v = json(body);
    let mut k: Vec<String> = v.pointer(pointer).and_then(Value::as_object).map(|m| m.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

/// How two answers are compared.
#[derive(Clone, Copy)]
enum Cmp {
    /// Status and body (normalized).
    Same,
    /// Status and body, with the remaining TTL (which may tick over between the two) dropped.
    SameButTtl,
    /// Status and gRPC code: the message is the decoder's own words.
    Code,
}

fn compare(what: &str, cmp: Cmp, want: (u16, String), got: (u16, String)) -> Option<String> {
    let shape = |(status, body): &(u16, String)| -> String {
        match cmp {
            Cmp::Same => format!("{status} {}", normalize(body)),
            Cmp::SameButTtl => {
                let mut v = json(body);
                if let Some(m) = v.as_object_mut() {
                    m.remove("TTL");
                }
                format!("{status} {}", normalize(&v.to_string()))
            }
            Cmp::Code => format!("{status} code {}", json(body)["code"]),
        }
    };
    let (w, g) = (shape(&want), shape(&got));
    (w != g).then(|| format!("{what}\n  etcd:    {w}\n  rampart: {g}"))
}

/// The unary requests, in order: (path, body, comparison).
fn script() -> Vec<(&'static str, String, Cmp)> {
    use Cmp::*;
    let foo_b64 = b("foo");
    vec![
        ("/v3/kv/put", format!(r#"{{"key":"{foo_b64}","value":"{}"}}"#, b("bar")), Same),
        ("/v3/kv/put", format!(r#"{{"key":"{foo_b64}","value":"{}","prev_kv":true}}"#, b("baz")), Same),
        ("/v3/kv/range", format!(r#"{{"key":"{foo_b64}"}}"#), Same),
        ("/v3/kv/put", format!(r#"{{"key":"{}","value":"{}"}}"#, b("foo/a"), b("1")), Same),
        ("/v3/kv/put", format!(r#"{{"key":"{}","value":"{}"}}"#, b("foo/b"), b("2")), Same),
        // Enums by name and by number, int64 as a string and as a number, camelCase accepted.
        (
            "/v3/kv/range",
            format!(r#"{{"key":"{}","range_end":"{}","sort_order":"DESCEND","sort_target":2,"limit":"2"}}"#, b("foo/"), b("foo0")),
            Same,
        ),
        ("/v3/kv/range", format!(r#"{{"key":"{foo_b64}","rangeEnd":"{}","countOnly":true}}"#, b("foo0")), Same),
        ("/v3/kv/range", format!(r#"{{"key":"{foo_b64}","keys_only":true,"revision":2}}"#), Same),
        // Unknown fields are ignored, as grpc-gateway does.
        ("/v3/kv/range", format!(r#"{{"key":"{foo_b64}","no_such_field":{{"x":1}}}}"#), Same),
        (
            "/v3/kv/txn",
            format!(
                r#"{{"compare":[{{"key":"{foo_b64}","target":"VALUE","result":"EQUAL","value":"{}"}}],
                    "success":[{{"request_put":{{"key":"{}","value":"{}"}}}},{{"request_range":{{"key":"{foo_b64}"}}}}],
                    "failure":[{{"request_delete_range":{{"key":"{foo_b64}"}}}}]}}"#,
                b("baz"),
                b("foo/c"),
                b("3")
            ),
            Same,
        ),
        (
            "/v3/kv/txn",
            format!(
                r#"{{"compare":[{{"key":"{foo_b64}","target":"MOD","result":"LESS","mod_revision":"2"}}],
                    "failure":[{{"request_range":{{"key":"{}","range_end":"{}","count_only":true}}}}]}}"#,
                b("foo/"),
                b("foo0")
            ),
            Same,
        ),
        ("/v3/kv/deleterange", format!(r#"{{"key":"{}","range_end":"{}","prev_kv":true}}"#, b("foo/"), b("foo0")), Same),
        ("/v3/kv/deleterange", format!(r#"{{"key":"{}"}}"#, b("nothing")), Same),
        ("/v3/kv/compaction", r#"{"revision":"4"}"#.into(), Same),
        ("/v3/kv/range", format!(r#"{{"key":"{foo_b64}","revision":"3"}}"#), Same),
        ("/v3/kv/range", format!(r#"{{"key":"{foo_b64}","revision":"99"}}"#), Same),
        ("/v3/kv/compaction", r#"{"revision":3}"#.into(), Same),
        ("/v3/kv/put", format!(r#"{{"key":"","value":"{}"}}"#, b("x")), Same),
        // Above the request limit (1.5 MiB) but within gRPC's receive limit: etcd's own error.
        ("/v3/kv/put", format!(r#"{{"key":"{foo_b64}","value":"{}"}}"#, "A".repeat(4 * (1600 * 1024 / 3 + 1))), Same),
        // An empty body is the empty request.
        ("/v3/kv/range", String::new(), Same),
        ("/v3/kv/put", r#"{"key":"#.into(), Code),
        ("/v3/kv/put", "not json".into(), Code),
        ("/v3/kv/range", r#"{"key":"Zm9v","serializable":"yes"}"#.into(), Code),
        ("/v3/kv/range", r#"{"key":"!!!"}"#.into(), Code),
        ("/v3/kv/txn", r#"{"compare":[{"key":"Zm9v","target":"BOGUS"}]}"#.into(), Code),
        // Leases, by both of etcd's paths.
        ("/v3/lease/grant", r#"{"TTL":60,"ID":1234}"#.into(), Same),
        ("/v3/lease/grant", r#"{"TTL":"60","ID":"1234"}"#.into(), Same),
        ("/v3/kv/put", format!(r#"{{"key":"{}","value":"{}","lease":"1234"}}"#, b("leased"), b("v")), Same),
        ("/v3/lease/timetolive", r#"{"ID":1234,"keys":true}"#.into(), SameButTtl),
        ("/v3/kv/lease/timetolive", r#"{"ID":"1234"}"#.into(), SameButTtl),
        ("/v3/lease/leases", "{}".into(), Same),
        ("/v3/kv/lease/leases", "{}".into(), Same),
        ("/v3/lease/revoke", r#"{"ID":1234}"#.into(), Same),
        ("/v3/kv/lease/revoke", r#"{"ID":1234}"#.into(), Same),
        ("/v3/lease/timetolive", r#"{"ID":1234}"#.into(), Same),
        ("/v3/kv/range", format!(r#"{{"key":"{}"}}"#, b("leased")), Same),
    ]
}

#[test]
fn gateway_answers_like_etcd() {
    let etcd = start_etcd();
    let mut cluster = Cluster::start(3);
    wait_ready(&etcd.endpoint);
    wait_ready(&cluster.endpoints().join(","));
    let e = etcd.endpoint.clone();
    let eps = cluster.endpoints();
    // Requests go to each member in turn: followers forward writes and serve linearizable reads.
    let mut turn = 0;
    let mut r = || {
        turn += 1;
        eps[turn % eps.len()].clone()
    };
    let mut mismatches = Vec::new();

    for (path, body, cmp) in script() {
        let want = post(&format!("{e}{path}"), &body);
        let got = post(&format!("{}{path}", r()), &body);
        let shown: String = body.chars().take(200).collect();
        mismatches.extend(compare(&format!("POST {path} {shown}"), cmp, want, got));
    }

    // Keepalive: one request, one result, and the response ends.
    let lease = r#"{"TTL":60,"ID":77}"#;
    mismatches.extend(compare("grant 77", Cmp::Same, post(&format!("{e}/v3/lease/grant"), lease), post(&format!("{}/v3/lease/grant", r()), lease)));
    for id in ["77", "1234"] {
        let body = format!(r#"{{"ID":{id}}}"#);
        let want = post(&format!("{e}/v3/lease/keepalive"), &body);
        let got = post(&format!("{}/v3/lease/keepalive", r()), &body);
        mismatches.extend(compare(&format!("keepalive {id}"), Cmp::Same, want, got));
    }

    // A watch: the created response, then a put's event, each a {"result":...} line.
    let watch = format!(r#"{{"create_request":{{"key":"{}"}}}}"#, b("w"));
    let (we, wr) = (Lines::open(&format!("{e}/v3/watch"), &watch), Lines::open(&format!("{}/v3/watch", r()), &watch));
    mismatches.extend(compare("watch created", Cmp::Same, (200, we.next()), (200, wr.next())));
    let put = format!(r#"{{"key":"{}","value":"{}"}}"#, b("w"), b("1"));
    mismatches.extend(compare("put w", Cmp::Same, post(&format!("{e}/v3/kv/put"), &put), post(&format!("{}/v3/kv/put", r()), &put)));
    let event = wr.next();
    assert!(event.contains(r#""events":[{"kv":{"key":"dw==""#), "{event}");
    mismatches.extend(compare("watch event", Cmp::Same, (200, we.next()), (200, event)));
    drop((we, wr));
    // Two creates in one body, the first from a compacted revision: created and canceled, and
    // the second created. etcd sends the cancel from its background sync, so either may come
    // before the second create's answer: compared as sets.
    let watch = format!(r#"{{"create_request":{{"key":"{}","start_revision":"2"}}}} {{"create_request":{{"key":"{}"}}}}"#, b("w"), b("x"));
    let (we, wr) = (Lines::open(&format!("{e}/v3/watch"), &watch), Lines::open(&format!("{}/v3/watch", r()), &watch));
    let mut want: Vec<String> = (0..3).map(|_| normalize(&we.next())).collect();
    let mut got: Vec<String> = (0..3).map(|_| normalize(&wr.next())).collect();
    want.sort();
    got.sort();
    if want != got {
        mismatches.push(format!("watch from a compacted revision\n  etcd:    {want:?}\n  rampart: {got:?}"));
    }
    drop((we, wr));

    // MoveLeader to a member that does not exist, asked of the leader (a follower answers "not
    // leader", as etcd's does).
    let leader_ep = eps
        .iter()
        .find(|ep| {
            let s = json(&post(&format!("{ep}/v3/maintenance/status"), "{}").1);
            s["leader"] == s["header"]["member_id"]
        })
        .expect("a member that leads");
    let bad = r#"{"targetID":"1"}"#;
    mismatches.extend(compare(
        "transfer-leadership to nobody",
        Cmp::Same,
        post(&format!("{e}/v3/maintenance/transfer-leadership"), bad),
        post(&format!("{leader_ep}/v3/maintenance/transfer-leadership"), bad),
    ));

    // Lock and election, with lease 77: the same keys and revisions as etcd's.
    let lock = format!(r#"{{"name":"{}","lease":77}}"#, b("l"));
    let (want, got) = (post(&format!("{e}/v3/lock/lock"), &lock), post(&format!("{}/v3/lock/lock", r()), &lock));
    let key = json(&got.1)["key"].as_str().unwrap_or_default().to_string();
    mismatches.extend(compare("lock", Cmp::Same, want, got));
    let unlock = format!(r#"{{"key":"{key}"}}"#);
    mismatches.extend(compare("unlock", Cmp::Same, post(&format!("{e}/v3/lock/unlock"), &unlock), post(&format!("{}/v3/lock/unlock", r()), &unlock)));
    let el = b("el");
    let no_leader = format!(r#"{{"name":"{el}"}}"#);
    mismatches.extend(compare(
        "election leader, none",
        Cmp::Same,
        post(&format!("{e}/v3/election/leader"), &no_leader),
        post(&format!("{}/v3/election/leader", r()), &no_leader),
    ));
    let campaign = format!(r#"{{"name":"{el}","lease":"77","value":"{}"}}"#, b("v1"));
    let (want, got) = (post(&format!("{e}/v3/election/campaign"), &campaign), post(&format!("{}/v3/election/campaign", r()), &campaign));
    let leader = json(&got.1)["leader"].to_string();
    mismatches.extend(compare("campaign", Cmp::Same, want, got));
    let (oe, or) = (Lines::open(&format!("{e}/v3/election/observe"), &no_leader), Lines::open(&format!("{}/v3/election/observe", r()), &no_leader));
    mismatches.extend(compare("observe, current leader", Cmp::Same, (200, oe.next()), (200, or.next())));
    let proclaim = format!(r#"{{"leader":{leader},"value":"{}"}}"#, b("v2"));
    mismatches.extend(compare("proclaim", Cmp::Same, post(&format!("{e}/v3/election/proclaim"), &proclaim), post(&format!("{}/v3/election/proclaim", r()), &proclaim)));
    mismatches.extend(compare("observe, proclaimed", Cmp::Same, (200, oe.next()), (200, or.next())));
    mismatches.extend(compare("leader", Cmp::Same, post(&format!("{e}/v3/election/leader"), &no_leader), post(&format!("{}/v3/election/leader", r()), &no_leader)));
    let resign = format!(r#"{{"leader":{leader}}}"#);
    mismatches.extend(compare("resign", Cmp::Same, post(&format!("{e}/v3/election/resign"), &resign), post(&format!("{}/v3/election/resign", r()), &resign)));
    drop((oe, or));

    // Membership: a learner that never starts is added, fails promotion, moves, and goes.
    let mut learner = Vec::new();
    for ep in [e.clone(), leader_ep.clone()] {
        let url = format!("http://127.0.0.1:{}", crate::harness::free_port());
        let (code, body) = post(&format!("{ep}/v3/cluster/member/add"), &format!(r#"{{"peerURLs":["{url}"],"isLearner":true}}"#));
        let id = json(&body)["member"]["ID"].as_str().unwrap_or_default().to_string();
        learner.push((code, keys(&body, ""), keys(&body, "/member"), json(&body)["member"]["isLearner"].clone()));
        let promote = post(&format!("{ep}/v3/cluster/member/promote"), &format!(r#"{{"ID":"{id}"}}"#));
        learner.push((promote.0, keys(&promote.1, ""), vec![normalize(&promote.1)], Value::Null));
        let moved = format!("http://127.0.0.1:{}", crate::harness::free_port());
        let (code, body) = post(&format!("{ep}/v3/cluster/member/update"), &format!(r#"{{"ID":"{id}","peerURLs":["{moved}"]}}"#));
        learner.push((code, keys(&body, ""), vec![], Value::Null));
        let (code, body) = post(&format!("{ep}/v3/cluster/member/remove"), &format!(r#"{{"ID":"{id}"}}"#));
        learner.push((code, keys(&body, ""), vec![], json(&body)["members"].as_array().map(|m| m.len().into()).unwrap_or_default()));
    }
    let (want, got) = learner.split_at(learner.len() / 2);
    // etcd has one member left, Rampart three.
    let got: Vec<_> = got.iter().map(|(c, k, m, v)| (*c, k.clone(), m.clone(), if *v == 3 { Value::from(1) } else { v.clone() })).collect();
    if want != got.as_slice() {
        mismatches.push(format!("membership\n  etcd:    {want:?}\n  rampart: {got:?}"));
    }

    // HTTP-level answers: unknown path, wrong method, CORS preflight.
    for (method, path) in [("POST", "/v3/kv/nothing"), ("GET", "/v3/kv/range"), ("OPTIONS", "/v3/kv/range")] {
        let want = (http(method, &format!("{e}{path}"), None), cors(method, &format!("{e}{path}")));
        let ep = r();
        let got = (http(method, &format!("{ep}{path}"), None), cors(method, &format!("{ep}{path}")));
        if want != got {
            mismatches.push(format!("{method} {path}\n  etcd:    {want:?}\n  rampart: {got:?}"));
        }
    }

    // Answers whose values differ by nature: same fields.
    for (path, pointer) in [
        ("/v3/maintenance/status", ""),
        ("/v3/maintenance/hash", ""),
        ("/v3/cluster/member/list", ""),
        ("/v3/cluster/member/list", "/header"),
        ("/v3/cluster/member/list", "/members/0"),
    ] {
        let (want, got) = (post(&format!("{e}{path}"), "{}"), post(&format!("{}{path}", r()), "{}"));
        let (want, got) = ((want.0, keys(&want.1, pointer)), (got.0, keys(&got.1, pointer)));
        if want != got {
            mismatches.push(format!("fields of {path} {pointer}\n  etcd:    {want:?}\n  rampart: {got:?}"));
        }
    }
    for path in ["/version", "/health"] {
        let (want, got) = (http("GET", &format!("{e}{path}"), None), http("GET", &format!("{}{path}", r()), None));
        let (want, got) = ((want.0, keys(&want.1, "")), (got.0, keys(&got.1, "")));
        if want != got {
            mismatches.push(format!("fields of {path}\n  etcd:    {want:?}\n  rampart: {got:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{} answers differ from etcd's:\n{}", mismatches.len(), mismatches.join("\n"));

    // Rampart alone: values etcd 3.4 does not have or that are ours.
    let m0 = &eps[0];
    assert_eq!(http("GET", &format!("{m0}/version"), None), (200, r#"{"etcdserver":"3.5.0","etcdcluster":"3.5.0"}"#.into()));
    assert_eq!(http("GET", &format!("{m0}/health"), None), (200, r#"{"health":"true"}"#.into()));
    let members = json(&post(&format!("{m0}/v3/cluster/member/list"), "{}").1);
    let mut names: Vec<&str> = members["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["m0", "m1", "m2"], "{members}");
    let (code, body) = post(&format!("{m0}/v3/maintenance/hashkv"), "{}");
    assert_eq!((code, keys(&body, "")), (200, vec!["compact_revision".into(), "hash".into(), "hash_revision".into(), "header".into()]), "{body}");
    let (code, body) = post(&format!("{m0}/v3/maintenance/alarm"), r#"{"action":"GET"}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&format!("{m0}/v3/maintenance/defragment"), "{}");
    assert_eq!(code, 200, "{body}");
    let snapshot = Lines::open(&format!("{m0}/v3/maintenance/snapshot"), "{}");
    let first = json(&snapshot.next());
    assert!(first["result"]["blob"].as_str().is_some_and(|b| !b.is_empty()), "{first}");
    drop(snapshot);
    // A body above the gateway's limit (the base64 of gRPC's receive limit, 2 MiB): what gRPC
    // answers a message above its limit.
    let (code, body) = post(&format!("{m0}/v3/kv/put"), &format!(r#"{{"key":"{}","value":"{}"}}"#, b("big"), "A".repeat(3 << 20)));
    assert_eq!((code, json(&body)["code"].clone()), (429, Value::from(8)), "{body}");
    // A malformed later request of a stream ends the client's side; the watch stays open.
    let watch = format!(r#"{{"create_request":{{"key":"{}"}}}} {{"create_request":"#, b("y"));
    let w = Lines::open(&format!("{m0}/v3/watch"), &watch);
    assert!(w.next().contains(r#""created":true"#));
    post(&format!("{m0}/v3/kv/put"), &format!(r#"{{"key":"{}","value":"{}"}}"#, b("y"), b("1")));
    assert!(w.next().contains(r#""events":[{"kv":{"key":"eQ==""#));
    drop(w);
    // gRPC on the same port is untouched.
    let (code, out, err) = crate::etcdctl::etcdctl(&eps[1].replace("http://", ""), &["get", "foo", "--print-value-only"], None);
    assert_eq!((code, out.trim()), (0, "baz"), "{err}");

    // Without a quorum, a member is unhealthy once no linearizable read can be served (a leader
    // may serve them for the rest of its lease).
    cluster.kill(1);
    cluster.kill(2);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let health = http("GET", &format!("{m0}/health"), None);
        if health.0 != 200 {
            assert_eq!(health, (503, r#"{"health":"false"}"#.into()));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still healthy without a quorum: {health:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Auth over the gateway, next to etcd's: users and roles, enable, authenticate, the token in the
/// `Authorization` header on unary calls and on a watch stream, and etcd's errors without a
/// token, with a bad one and without the permission.
#[test]
fn gateway_auth_like_etcd() {
    let etcd = start_etcd();
    let cluster = Cluster::start(3);
    wait_ready(&etcd.endpoint);
    wait_ready(&cluster.endpoints().join(","));
    let eps = [etcd.endpoint.clone(), cluster.endpoints()[1].clone()];
    let mut mismatches = Vec::new();
    // (path, body, token: none / alice's / root's / a forged one)
    let app = b("app/");
    let app_end = b("app0");
    let steps: Vec<(&str, String, &str)> = vec![
        ("/v3/auth/user/add", r#"{"name":"root","password":"rootpw"}"#.into(), ""),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#.into(), ""),
        ("/v3/auth/role/add", r#"{"name":"app"}"#.into(), ""),
        ("/v3/auth/role/grant", format!(r#"{{"name":"app","perm":{{"permType":"READWRITE","key":"{app}","range_end":"{app_end}"}}}}"#), ""),
        ("/v3/auth/user/add", r#"{"name":"alice","password":"alicepw"}"#.into(), ""),
        ("/v3/auth/user/grant", r#"{"user":"alice","role":"app"}"#.into(), ""),
        ("/v3/auth/user/grant", r#"{"user":"alice","role":"nosuch"}"#.into(), ""),
        ("/v3/auth/user/get", r#"{"name":"alice"}"#.into(), ""),
        ("/v3/auth/role/get", r#"{"role":"app"}"#.into(), ""),
        ("/v3/auth/user/list", "{}".into(), ""),
        ("/v3/auth/enable", "{}".into(), ""),
        ("/v3/kv/put", format!(r#"{{"key":"{}","value":"{}"}}"#, b("app/x"), b("1")), ""),
        ("/v3/kv/put", format!(r#"{{"key":"{}","value":"{}"}}"#, b("app/x"), b("1")), "alice"),
        ("/v3/kv/range", format!(r#"{{"key":"{}"}}"#, b("app/x")), "alice"),
        ("/v3/kv/put", format!(r#"{{"key":"{}","value":"{}"}}"#, b("other"), b("1")), "alice"),
        ("/v3/kv/range", format!(r#"{{"key":"{}"}}"#, b("app/x")), "forged"),
        ("/v3/auth/user/list", "{}".into(), "alice"),
        ("/v3/auth/user/list", "{}".into(), "root"),
        ("/v3/auth/user/delete", r#"{"name":"root"}"#.into(), "root"),
        ("/v3/kv/put", format!(r#"{{"key":"{}","value":"{}"}}"#, b("other"), b("2")), "root"),
    ];
    let mut transcripts = Vec::new();
    for ep in &eps {
        let token_of = |user: &str, pw: &str| -> String {
            let (code, body) = post(&format!("{ep}/v3/auth/authenticate"), &format!(r#"{{"name":"{user}","password":"{pw}"}}"#));
            assert_eq!(code, 200, "{ep}: {body}");
            json(&body)["token"].as_str().unwrap().to_string()
        };
        let mut t = Vec::new();
        let mut tokens = std::collections::HashMap::new();
        for (path, body, who) in &steps {
            if *path == "/v3/kv/put" && who.is_empty() && tokens.is_empty() {
                // Auth is on from here: authenticate (a wrong password first).
                let (code, bad) = post(&format!("{ep}/v3/auth/authenticate"), r#"{"name":"alice","password":"nope"}"#);
                t.push(format!("authenticate with a wrong password: {code} {}", normalize(&bad)));
                tokens.insert("alice", token_of("alice", "alicepw"));
                tokens.insert("root", token_of("root", "rootpw"));
                tokens.insert("forged", "forged.1.abc".to_string());
            }
            let token = tokens.get(who).map(String::as_str);
            let (code, out) = http_as("POST", &format!("{ep}{path}"), Some(body), token);
            t.push(format!("{path} {body} as {who:?}: {code} {}", normalize(&out)));
        }
        // A watch with alice's token: created, then her put's event.
        let watch = format!(r#"{{"create_request":{{"key":"{}"}}}}"#, b("app/w"));
        let lines = Lines::open_as(&format!("{ep}/v3/watch"), &watch, tokens.get("alice").map(String::as_str));
        t.push(format!("watch: {}", normalize(&lines.next())));
        http_as("POST", &format!("{ep}/v3/kv/put"), Some(&format!(r#"{{"key":"{}","value":"{}"}}"#, b("app/w"), b("v"))), tokens.get("alice").map(String::as_str));
        t.push(format!("watch event: {}", normalize(&lines.next())));
        drop(lines);
        let (code, out) = http_as("POST", &format!("{ep}/v3/auth/disable"), Some("{}"), tokens.get("root").map(String::as_str));
        t.push(format!("disable: {code} {}", normalize(&out)));
        let (code, out) = post(&format!("{ep}/v3/kv/range"), &format!(r#"{{"key":"{}"}}"#, b("other")));
        t.push(format!("range without a token after disable: {code} {}", normalize(&out)));
        transcripts.push(t);
    }
    for (want, got) in transcripts[0].iter().zip(&transcripts[1]) {
        if want != got {
            mismatches.push(format!("  etcd:    {want}\n  rampart: {got}"));
        }
    }
    assert_eq!(transcripts[0].len(), transcripts[1].len());
    assert!(mismatches.is_empty(), "{} steps differ:\n{}", mismatches.len(), mismatches.join("\n"));
}
