//! Real clusters of real processes, Rampart's or etcd's, started with the same flags (Rampart
//! takes etcd's flag names), with faults injected from outside: signals, network rules, full disks.
//!
//! Every member gets its own loopback address (`127.a.b.n`) and etcd's standard ports on it, so
//! traffic between two members is identifiable by address pair and nftables can cut any link, in
//! one direction or both, without network namespaces.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rampart_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use rampart_proto::etcdserverpb::StatusRequest;
use tonic::transport::{Channel, Endpoint};

/// Which server a cluster runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    Rampart,
    /// etcd 3.4 from Debian's `etcd-server`, for side-by-side runs.
    Etcd,
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub flavor: Flavor,
    /// The server binary (`rampart` or `etcd`).
    pub bin: PathBuf,
    pub members: usize,
    /// Extra flags for every member.
    pub extra_args: Vec<String>,
    /// Where data dirs and member logs go (a temp dir when None).
    pub dir: Option<PathBuf>,
}

pub struct Member {
    pub name: String,
    pub ip: Ipv4Addr,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub child: Option<Child>,
    pub paused: bool,
    /// `new` for bootstrap members, `existing` for members added later.
    pub cluster_state: &'static str,
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub members: Vec<Member>,
    pub token: String,
    _tmp: Option<tempfile::TempDir>,
    pub dir: PathBuf,
    nft_table: Option<String>,
}

/// Distinct `127.a.b.0/24` prefixes for clusters started by this process and others.
fn next_prefix() -> (u8, u8) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    // Avoid 127.0.x.x, where `rampart dev` and most local services live.
    let a = 1 + (pid % 250) as u8;
    let b = ((pid / 250 + n) % 256) as u8;
    (a, b)
}

impl Cluster {
    pub fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let (tmp, dir) = match &spec.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let (a, b) = next_prefix();
        let members: Vec<Member> = (0..spec.members)
            .map(|i| {
                let ip = Ipv4Addr::new(127, a, b, 10 + i as u8);
                Member {
                    name: format!("m{i}"),
                    ip,
                    client_url: format!("http://{ip}:2379"),
                    peer_url: format!("http://{ip}:2380"),
                    data_dir: dir.join(format!("m{i}")),
                    log_path: dir.join(format!("m{i}.log")),
                    child: None,
                    paused: false,
                    cluster_state: "new",
                }
            })
            .collect();
        let mut c = Cluster {
            token: format!("chaos-{a}-{b}"),
            spec,
            members,
            _tmp: tmp,
            dir,
            nft_table: None,
        };
        for i in 0..c.members.len() {
            c.spawn(i)?;
        }
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",")
    }

    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial = self.initial_cluster();
        let m = &mut self.members[i];
        if m.child.is_some() {
            bail!("member {i} is already running");
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log_path)?;
        let mut cmd = Command::new(&self.spec.bin);
        if self.spec.flavor == Flavor::Rampart {
            cmd.arg("serve");
        }
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url, "--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url, "--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &initial, "--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", m.cluster_state])
            .args(&self.spec.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        m.child = Some(cmd.spawn().with_context(|| format!("starting {}", self.spec.bin.display()))?);
        m.paused = false;
        Ok(())
    }

    /// SIGKILL: what a crash, an OOM kill or a power cut does to the process.
    pub fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut c) = m.child.take() {
            if m.paused {
                signal(c.id(), "CONT");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        m.paused = false;
    }

    /// SIGTERM and wait: a clean stop (rolling restart).
    pub fn stop(&mut self, i: usize, timeout: Duration) {
        let m = &mut self.members[i];
        if let Some(mut c) = m.child.take() {
            if m.paused {
                signal(c.id(), "CONT");
            }
            signal(c.id(), "TERM");
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    m.paused = false;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        m.paused = false;
    }

    /// SIGSTOP: a process that stops making progress without dying (GC pause, swap, VM stall).
    pub fn pause(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(c) = &m.child {
            signal(c.id(), "STOP");
            m.paused = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(c) = &m.child {
            signal(c.id(), "CONT");
        }
        m.paused = false;
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Members whose process has exited by itself (not killed by us), with their exit status.
    pub fn exited(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, m) in self.members.iter_mut().enumerate() {
            if let Some(c) = &mut m.child {
                if let Ok(Some(status)) = c.try_wait() {
                    out.push((i, status.to_string()));
                    m.child = None;
                }
            }
        }
        out
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log_path).unwrap_or_default()
    }

    /// Status of member `i`: (its member id, the leader it knows, raft term), or None.
    pub async fn status(&self, i: usize) -> Option<(u64, u64, u64)> {
        let ch = channel(&self.members[i].client_url).ok()?;
        let mut c = MaintenanceClient::new(ch);
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_millis(500));
        let s = tokio::time::timeout(Duration::from_millis(700), c.status(req)).await.ok()?.ok()?.into_inner();
        Some((s.header.map(|h| h.member_id).unwrap_or(0), s.leader, s.raft_term))
    }

    /// Whether member `i` answers Status within `timeout` (with or without a leader).
    pub async fn answers_within(&self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.status(i).await.is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// The member every reachable running member agrees is leader.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for i in 0..self.members.len() {
            if !self.is_running(i) || self.members[i].paused {
                continue;
            }
            if let Some((id, leader, _)) = self.status(i).await {
                ids.push((i, id));
                leaders.push(leader);
            }
        }
        let l = *leaders.first()?;
        if l == 0 || leaders.iter().any(|x| *x != l) {
            return None;
        }
        ids.iter().find(|(_, id)| *id == l).map(|(i, _)| *i)
    }

    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces member `i` with a fresh one while the cluster runs, as an operator replaces a
    /// failed machine: member remove, wipe its data, member add with a new peer URL, start it
    /// with `--initial-cluster-state existing`. Leaves the member running.
    pub async fn replace(&mut self, i: usize) -> anyhow::Result<()> {
        use rampart_proto::etcdserverpb::cluster_client::ClusterClient;
        use rampart_proto::etcdserverpb::{MemberAddRequest, MemberRemoveRequest};
        // The member may have been restarted a moment ago by the previous fault: give it time,
        // and restart it once if it does not answer (as an operator would before replacing it).
        let mut deadline = Instant::now() + Duration::from_secs(10);
        let mut restarted = false;
        let old_id = loop {
            if let Some((id, _, _)) = self.status(i).await {
                break id;
            }
            if Instant::now() > deadline {
                if restarted {
                    bail!(
                        "status of the member to replace: no answer, even after a restart\n{}",
                        self.diagnose(i)
                    );
                }
                eprintln!("chaos: member {i} does not answer Status; restarting it before replacing it");
                self.kill(i);
                self.spawn(i)?;
                restarted = true;
                deadline = Instant::now() + Duration::from_secs(15);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let helper = (0..self.members.len()).find(|j| *j != i && self.is_running(*j)).context("no other member")?;
        let mut admin = ClusterClient::new(channel(&self.members[helper].client_url)?);
        admin.member_remove(MemberRemoveRequest { id: old_id }).await.context("member remove")?;
        self.kill(i);
        std::fs::remove_dir_all(&self.members[i].data_dir).ok();
        // A new peer port gives the replacement a new member id, as a new machine would have.
        let m = &mut self.members[i];
        let port: u16 = if m.peer_url.ends_with(":2380") { 2480 } else { 2380 };
        m.peer_url = format!("http://{}:{port}", m.ip);
        m.cluster_state = "existing";
        let url = m.peer_url.clone();
        admin.member_add(MemberAddRequest { peer_ur_ls: vec![url], is_learner: false }).await.context("member add")?;
        self.spawn(i)
    }

    // ---- network faults (nftables on loopback) ----

    fn nft(&self, script: &str) -> anyhow::Result<()> {
        let mut child = Command::new("nft").arg("-f").arg("-").stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()
            .context("running nft (Debian package nftables; the test command installs it)")?;
        use std::io::Write;
        child.stdin.take().unwrap().write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft failed: {}\n{script}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Replaces every link rule with drops for the given (from, to) member pairs.
    pub fn drop_links(&mut self, pairs: &[(usize, usize)]) -> anyhow::Result<()> {
        let table = self.nft_table.clone().unwrap_or_else(|| format!("rampart_{}", self.token.replace('-', "_")));
        let mut script = String::new();
        if self.nft_table.is_some() {
            script.push_str(&format!("delete table inet {table}\n"));
        }
        script.push_str(&format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n"
        ));
        for (from, to) in pairs {
            script.push_str(&format!(
                "    ip saddr {} ip daddr {} drop\n",
                self.members[*from].ip, self.members[*to].ip
            ));
        }
        script.push_str("  }\n}\n");
        self.nft(&script)?;
        self.nft_table = Some(table);
        Ok(())
    }

    /// Cuts all links between the groups, both ways. Members in no group keep all their links.
    pub fn partition(&mut self, groups: &[Vec<usize>]) -> anyhow::Result<()> {
        let mut pairs = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            for (hi, h) in groups.iter().enumerate() {
                if gi != hi {
                    for a in g {
                        for b in h {
                            pairs.push((*a, *b));
                        }
                    }
                }
            }
        }
        self.drop_links(&pairs)
    }

    /// Cuts member `i` off from every other member.
    pub fn isolate(&mut self, i: usize) -> anyhow::Result<()> {
        let others: Vec<usize> = (0..self.members.len()).filter(|j| *j != i).collect();
        self.partition(&[vec![i], others])
    }

    /// Drops packets from `from` to `to` only; the other direction keeps working.
    pub fn one_way(&mut self, from: usize, to: &[usize]) -> anyhow::Result<()> {
        let pairs: Vec<(usize, usize)> = to.iter().map(|t| (from, *t)).collect();
        self.drop_links(&pairs)
    }

    pub fn heal(&mut self) -> anyhow::Result<()> {
        if let Some(t) = self.nft_table.take() {
            self.nft(&format!("delete table inet {t}\n"))?;
        }
        Ok(())
    }

    // ---- disk faults ----

    /// Fills the file system holding member `i`'s data dir until it is full (a ballast file) and
    /// returns the ballast's path; remove it to heal.
    /// What an operator would look at when member `i` misbehaves: the files in its data dir with
    /// their sizes, and the end of its log.
    pub fn diagnose(&self, i: usize) -> String {
        let mut out = format!("member {i} data dir {}:\n", self.members[i].data_dir.display());
        fn walk(dir: &Path, out: &mut String, depth: usize) {
            let Ok(rd) = std::fs::read_dir(dir) else { return };
            for e in rd.flatten() {
                let meta = e.metadata().ok();
                let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
                out.push_str(&format!("  {:>12} {}\n", len, e.path().display()));
                if depth < 3 && meta.map(|m| m.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out, depth + 1);
                }
            }
        }
        walk(&self.members[i].data_dir, &mut out, 0);
        let log = self.log(i);
        let lines: Vec<&str> = log.lines().collect();
        out.push_str(&format!("member {i} log, last lines:\n"));
        for l in &lines[lines.len().saturating_sub(40)..] {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    pub fn fill_disk(&self, i: usize) -> anyhow::Result<PathBuf> {
        let ballast = self.members[i].data_dir.join("BALLAST");
        let mut f = std::fs::File::create(&ballast)?;
        use std::io::Write;
        let chunk = vec![0u8; 1 << 20];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
        let _ = f.sync_all();
        Ok(ballast)
    }
}

/// Mounts a small tmpfs at `dir` (as root), so a member's disk can be filled quickly.
pub fn mount_small_tmpfs(dir: &Path, size_mb: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
        .arg(dir)
        .status()?;
    if !st.success() {
        bail!("mount tmpfs on {} failed (needs root)", dir.display());
    }
    Ok(())
}

pub fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg("-l").arg(dir).status();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.heal();
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// A lazily connected gRPC channel to a client URL.
pub fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(300))
        .tcp_nodelay(true)
        .connect_lazy())
}
