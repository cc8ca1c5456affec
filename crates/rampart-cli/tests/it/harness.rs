//! Real clusters of real `rampart serve` processes on loopback, for the integration tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

pub const RAMPART: &str = env!("CARGO_BIN_EXE_rampart");

/// A port for a member to listen on. Taken below the kernel's ephemeral range (32768 and up),
/// where outgoing connections get their source ports: a port the OS hands out as "free" can be
/// taken by a client connection before the member binds it (seen in CI as "Address already in
/// use"). Ports are handed out once per test process and checked bindable.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(0, 20_000 + (std::process::id() % 100) as u16 * 100, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(p < 32_000, "out of test ports");
        // 22379/22380 belong to `rampart dev` (etcd's local-cluster ports), tested on its own.
        if p != 22_379 && p != 22_380 && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
    extra_args: Vec<String>,
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// Starts `n` members with `extra` flags each and waits until they serve with a leader.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",");
        let mut c = Cluster {
            dir,
            members,
            initial_cluster,
            token: format!("test-{}", std::process::id()),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    /// Adds a member entry (not started) for a member that will join with
    /// `--initial-cluster-state existing`; `initial_cluster` then lists every member including it.
    pub fn prepare_joining(&mut self, name: &str) -> usize {
        self.members.push(Member {
            name: name.to_string(),
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            data_dir: self.dir.path().join(name),
            child: None,
        });
        self.initial_cluster = self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",");
        self.members.len() - 1
    }

    pub fn spawn_joining(&mut self, i: usize) {
        self.extra_args.extend(["--initial-cluster-state".to_string(), "existing".to_string()]);
        self.spawn(i);
        self.extra_args.truncate(self.extra_args.len() - 2);
    }

    pub fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        assert!(m.child.is_none(), "member {i} already running");
        std::fs::create_dir_all(self.dir.path()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let mut token = vec!["--initial-cluster-token".to_string(), self.token.clone()];
        if self.extra_args.iter().any(|a| a == "--initial-cluster-token") {
            token.clear();
        }
        let child = Command::new(RAMPART)
            .arg("serve")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(&token)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rampart serve");
        self.members[i].child = Some(child);
    }

    /// Starts member `i` and expects it to refuse to start: returns its exit status and log.
    pub fn spawn_expecting_failure(&mut self, i: usize) -> (std::process::ExitStatus, String) {
        self.spawn(i);
        let mut child = self.members[i].child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, self.log(i));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("member {i} kept running; log:\n{}", self.log(i));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no warning: what a crash or an OOM kill does.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.members.len()).filter(|i| self.members[*i].child.is_some()).collect()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.members[i].name))).unwrap_or_default()
    }

    pub async fn client(&self, which: &[usize]) -> Client {
        let eps: Vec<String> = which.iter().map(|i| self.members[*i].client_url.clone()).collect();
        connect(&eps).await
    }

    /// Waits until member `i` answers Status with a known leader.
    pub async fn wait_serving(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut c = connect(&[self.members[i].client_url.clone()]).await;
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), c.status()).await {
                if s.leader() != 0 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "member {i} did not serve within {timeout:?}:\n{}", self.log(i));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running member reports the same leader, and returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            let mut ids = Vec::new();
            for i in self.running() {
                let mut c = connect(&[self.members[i].client_url.clone()]).await;
                match tokio::time::timeout(Duration::from_millis(500), c.status()).await {
                    Ok(Ok(s)) => {
                        leaders.push(s.leader());
                        ids.push((i, s.header().map(|h| h.member_id()).unwrap_or(0)));
                    }
                    _ => leaders.push(0),
                }
            }
            if let Some(&l) = leaders.first() {
                if l != 0 && leaders.iter().all(|x| *x == l) {
                    if let Some((i, _)) = ids.iter().find(|(_, id)| *id == l) {
                        return *i;
                    }
                }
            }
            if Instant::now() > deadline {
                let logs: String = self.running().iter().map(|i| format!("--- {i}\n{}", self.log(*i))).collect();
                panic!("no agreed leader within {timeout:?}: {leaders:?}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() || std::env::var_os("RAMPART_KEEP_TEST_DIRS").is_some() {
            let kept = self.dir.path().to_path_buf();
            eprintln!("keeping test dir {}", kept.display());
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()));
        }
    }
}

pub async fn connect(endpoints: &[String]) -> Client {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(10));
    Client::connect(endpoints, Some(opts)).await.expect("etcd client connects lazily")
}
