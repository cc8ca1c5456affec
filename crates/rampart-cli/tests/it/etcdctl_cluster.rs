//! etcdctl 3.4's cluster and maintenance commands, next to a 3-member etcd 3.4: member
//! list/add/promote/remove, endpoint status/health/hashkv, snapshot save, defrag, alarm
//! list/disarm, move-leader. Both clusters run from `rampart_testkit::cluster` with the same flags,
//! each member on its own loopback address and etcd's ports. What differs by nature is named
//! before comparing: member and cluster ids (by member name), the clusters' address prefixes,
//! versions, sizes, raft terms and indexes, hashes (by order of appearance), durations.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rampart_testkit::cluster::{Cluster, ClusterSpec, Flavor};

use crate::etcdctl::etcdctl;
use crate::harness::RAMPART;

struct System {
    cluster: Cluster,
    /// `127.a.b.`: the cluster's address prefix.
    net: String,
    /// id → placeholder (`<m0>`, `<cluster>`, `<new>`).
    ids: BTreeMap<u64, String>,
    hashes: Vec<String>,
}

fn start(flavor: Flavor, bin: PathBuf) -> System {
    let spec = ClusterSpec { flavor, bin, members: 3, extra_args: vec![], dir: None };
    let cluster = Cluster::start(spec).unwrap();
    let ip = cluster.members[0].ip.octets();
    System { net: format!("{}.{}.{}.", ip[0], ip[1], ip[2]), cluster, ids: BTreeMap::new(), hashes: Vec::new() }
}

impl System {
    fn endpoints(&self) -> String {
        self.cluster.members.iter().map(|m| m.client_url.replace("http://", "")).collect::<Vec<_>>().join(",")
    }

    fn run(&mut self, args: &[&str]) -> (i32, String, String) {
        let (code, out, err) = etcdctl(&self.endpoints(), args, None);
        // etcdctl writes some results (endpoint health) to stderr, next to its client logs.
        let err = err.lines().filter(|l| !l.starts_with("{\"level") && !l.starts_with("20")).collect::<Vec<_>>().join("\n");
        (code, out, err)
    }

    /// Learns the member and cluster ids from `member list -w json`.
    fn learn_ids(&mut self) {
        let (_, out, _) = self.run(&["member", "list", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        self.ids.insert(v["header"]["cluster_id"].as_u64().unwrap(), "<cluster>".into());
        for m in v["members"].as_array().unwrap() {
            let name = m["name"].as_str().unwrap_or_default();
            let label = if name.is_empty() { "<new>".to_string() } else { format!("<{name}>") };
            self.ids.insert(m["ID"].as_u64().unwrap_or_else(|| panic!("no ID in {out}")), label);
        }
    }

    fn id_of(&self, label: &str) -> u64 {
        *self.ids.iter().find(|(_, l)| *l == label).unwrap().0
    }

    /// Names what differs by nature; lines of list-like outputs are sorted (their order follows
    /// the ids).
    fn normalize(&mut self, out: &str, sort: bool) -> String {
        let mut s = out.replace(&self.net, "<net>.");
        for (id, label) in &self.ids {
            s = s.replace(&format!("{id:x}"), label).replace(&id.to_string(), label);
        }
        // etcdctl pads ids to 16 hex digits with spaces ("Member %16x added").
        while s.contains("  ") {
            s = s.replace("  ", " ");
        }
        let mut lines: Vec<String> = s.lines().map(|l| self.normalize_line(l)).collect();
        if sort {
            lines.sort();
        }
        lines.join("\n")
    }

    fn normalize_line(&mut self, line: &str) -> String {
        // member add: the order of ETCD_INITIAL_CLUSTER follows a Go map in etcd.
        if let Some(list) = line.strip_prefix("ETCD_INITIAL_CLUSTER=\"").and_then(|l| l.strip_suffix('"')) {
            let mut members: Vec<&str> = list.split(',').collect();
            members.sort();
            return format!("ETCD_INITIAL_CLUSTER=\"{}\"", members.join(","));
        }
        // endpoint health: "... successfully committed proposal: took = 1.2ms"
        if let Some((head, _)) = line.split_once("took = ") {
            return format!("{head}took = <d>");
        }
        let fields: Vec<&str> = line.split(", ").collect();
        // endpoint status: endpoint, id, version, db size, leader?, learner?, term, index,
        // applied index, errors.
        if fields.len() == 10 && fields[0].starts_with("<net>") {
            return format!("{}, {}, <version>, <size>, {}, {}, <term>, <index>, <index>, {}", fields[0], fields[1], fields[4], fields[5], fields[9]);
        }
        // endpoint hashkv: endpoint, hash.
        if fields.len() == 2 && fields[0].starts_with("<net>") && fields[1].chars().all(|c| c.is_ascii_digit()) {
            let n = self.hashes.iter().position(|h| h == fields[1]).unwrap_or_else(|| {
                self.hashes.push(fields[1].to_string());
                self.hashes.len() - 1
            });
            return format!("{}, <hash{n}>", fields[0]);
        }
        line.to_string()
    }
}

/// (args with `{m1}`-style member ids, sort the output lines).
const SCRIPT: &[(&str, bool)] = &[
    ("member list", true),
    ("endpoint status", true),
    ("endpoint health", true),
    ("put k v", false),
    ("endpoint hashkv", true),
    ("defrag", true),
    ("alarm list", false),
    ("alarm disarm", false),
    // etcd refuses membership changes until its peers have been connected for 5 s.
    ("sleep 5", false),
    ("member add m3 --peer-urls=http://{net}20:2380 --learner", false),
    ("member list", true),
    ("member promote {new}", false),
    ("member remove {new}", false),
    ("member remove {new}", false),
    ("member promote {m0}", false),
    ("member list", true),
    ("move-leader {follower}", false),
    ("endpoint status", true),
];

async fn run_script(sys: &mut System) -> Vec<String> {
    sys.cluster.wait_leader(Duration::from_secs(15)).await.unwrap();
    // Members publish their names shortly after start, on both systems.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        sys.ids.clear();
        sys.learn_ids();
        if (0..3).all(|i| sys.ids.values().any(|l| *l == format!("<m{i}>"))) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "members did not publish their names: {:?}", sys.ids);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut transcript = Vec::new();
    for (step, sort) in SCRIPT {
        // Which member leads differs by nature: move-leader goes from "<leader>" to "<target>".
        let leader = sys.cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
        let (leader_label, target_label) = (format!("<m{leader}>"), format!("<m{}>", (leader + 1) % 3));
        let target = sys.id_of(&target_label);
        let mut line = step.replace("{follower}", &format!("{target:x}")).replace("{net}", &sys.net);
        if line.contains("{new}") {
            line = line.replace("{new}", &format!("{:x}", sys.id_of("<new>")));
        }
        line = line.replace("{m0}", &format!("{:x}", sys.id_of("<m0>")));
        if let Some(secs) = line.strip_prefix("sleep ") {
            tokio::time::sleep(Duration::from_secs(secs.parse().unwrap())).await;
            continue;
        }
        let args: Vec<&str> = line.split_whitespace().collect();
        let (code, out, err) = sys.run(&args);
        if step.starts_with("member add") {
            sys.learn_ids();
        }
        if step.starts_with("move-leader") {
            // Let the new leader settle before the next step asks who leads.
            sys.cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
        }
        let mut out = sys.normalize(&out, *sort);
        let err = sys.normalize(&err, *sort);
        if step.starts_with("move-leader") {
            out = out.replace(&leader_label, "<leader>").replace(&target_label, "<target>");
        }
        if step.starts_with("endpoint status") {
            // Which member leads differs by nature; that exactly one does must not.
            let leaders = out.matches("<size>, true,").count();
            out = out.replace("<size>, true,", "<size>, <leader?>,").replace("<size>, false,", "<size>, <leader?>,");
            out.push_str(&format!("\n({leaders} leader)"));
        }
        eprintln!("$ etcdctl {line}\n[{code}] {out}\n{err}");
        transcript.push(format!("$ etcdctl {step}\n[{code}] {out}\n{err}"));
    }
    // snapshot save, against one endpoint as etcdctl requires.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.db");
    let one = sys.cluster.members[0].client_url.replace("http://", "");
    let (code, out, _) = etcdctl(&one, &["snapshot", "save", file.to_str().unwrap()], None);
    transcript.push(format!("$ etcdctl snapshot save\n[{code}] {}", out.replace(file.to_str().unwrap(), "<file>").trim()));
    transcript
}

#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_cluster_and_maintenance_commands_match_etcd() {
    let mut etcd = start(Flavor::Etcd, PathBuf::from("etcd"));
    let want = run_script(&mut etcd).await;
    drop(etcd);
    let mut rampart = start(Flavor::Rampart, PathBuf::from(RAMPART));
    let got = run_script(&mut rampart).await;
    let diff: Vec<String> = want.iter().zip(&got).filter(|(a, b)| a != b).map(|(a, b)| format!("etcd:\n{a}\nrampart:\n{b}\n")).collect();
    assert!(diff.is_empty(), "{} of {} steps differ:\n{}", diff.len(), want.len(), diff.join("\n"));
}
