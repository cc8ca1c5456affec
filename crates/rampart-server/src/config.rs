//! A member's configuration. Only the binary reads flags, files and the environment; everything
//! below it receives a validated [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use rampart_core::limits;
use serde::{Deserialize, Serialize};

/// Every setting of `rampart serve`. Names and meanings follow etcd's flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Human-readable name of this member (`--name`).
    pub name: String,
    /// Where this member keeps its log, data and snapshots (`--data-dir`).
    pub data_dir: PathBuf,
    /// URLs to serve clients on (`--listen-client-urls`), e.g. `http://127.0.0.1:2379`.
    pub listen_client_urls: Vec<String>,
    /// Client URLs announced to the cluster and shown by MemberList (`--advertise-client-urls`).
    pub advertise_client_urls: Vec<String>,
    /// URLs to serve peers on (`--listen-peer-urls`).
    pub listen_peer_urls: Vec<String>,
    /// This member's peer URLs as the others reach them (`--initial-advertise-peer-urls`).
    pub initial_advertise_peer_urls: Vec<String>,
    /// The bootstrap cluster, `name=peer-url,...` (`--initial-cluster`).
    pub initial_cluster: String,
    /// `new` to bootstrap a cluster, `existing` to join one (`--initial-cluster-state`).
    pub initial_cluster_state: String,
    /// Distinguishes clusters bootstrapped from the same member list (`--initial-cluster-token`).
    pub initial_cluster_token: String,
    /// Leader heartbeat interval in ms (`--heartbeat-interval`).
    pub heartbeat_interval_ms: u64,
    /// Election timeout in ms (`--election-timeout`): a follower that hears nothing from a leader
    /// for a random time in [timeout, 1.2 × timeout) starts an election (after a pre-vote).
    pub election_timeout_ms: u64,
    /// Largest client request in bytes (`--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Most operations in one txn branch (`--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Committed entries between two snapshots; the raft log is purged behind a snapshot
    /// (`--snapshot-count`).
    pub snapshot_count: u64,
    /// Entries kept in the log behind a snapshot so a slightly lagging follower catches up from the
    /// log rather than a whole snapshot (`--experimental-snapshot-catchup-entries`).
    pub snapshot_catchup_entries: u64,
    /// Store size in bytes above which this member raises the NOSPACE alarm and the cluster
    /// refuses writes that would grow it (`--quota-backend-bytes`). As in etcd, 0 means the
    /// default (2 GiB) and a negative value disables the quota.
    pub quota_backend_bytes: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "default".into(),
            data_dir: PathBuf::from("default.rampart"),
            listen_client_urls: vec!["http://localhost:2379".into()],
            advertise_client_urls: vec!["http://localhost:2379".into()],
            listen_peer_urls: vec!["http://localhost:2380".into()],
            initial_advertise_peer_urls: vec!["http://localhost:2380".into()],
            initial_cluster: "default=http://localhost:2380".into(),
            initial_cluster_state: "new".into(),
            initial_cluster_token: "rampart-cluster".into(),
            heartbeat_interval_ms: limits::DEFAULT_HEARTBEAT_INTERVAL_MS,
            election_timeout_ms: limits::DEFAULT_ELECTION_TIMEOUT_MS,
            max_request_bytes: limits::DEFAULT_MAX_REQUEST_BYTES,
            max_txn_ops: limits::DEFAULT_MAX_TXN_OPS,
            snapshot_count: limits::SNAPSHOT_LOG_ENTRIES,
            snapshot_catchup_entries: limits::SNAPSHOT_KEEP_ENTRIES,
            quota_backend_bytes: limits::DEFAULT_QUOTA_BACKEND_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// `http://host:port` → a socket address to bind. Host names resolve (localhost is common).
pub fn url_to_addr(url: &str) -> Result<SocketAddr, ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad(format!("URL {url:?} must start with http:// (TLS is not supported yet)")))?;
    let hostport = rest.trim_end_matches('/');
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .map_err(|e| bad(format!("URL {url:?}: {e}")))?
        .next()
        .ok_or_else(|| bad(format!("URL {url:?} resolves to no address")))
}

impl Config {
    /// Parses `--initial-cluster` into name → peer URLs (a name may appear several times).
    pub fn initial_members(&self) -> Result<BTreeMap<String, Vec<String>>, ConfigError> {
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for part in self.initial_cluster.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, url) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("--initial-cluster entry {part:?} is not name=url")))?;
            url_to_addr(url)?;
            members.entry(name.to_string()).or_default().push(url.to_string());
        }
        if members.is_empty() {
            return Err(bad("--initial-cluster is empty"));
        }
        Ok(members)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(bad("--name must not be empty"));
        }
        for (flag, urls) in [
            ("--listen-client-urls", &self.listen_client_urls),
            ("--advertise-client-urls", &self.advertise_client_urls),
            ("--listen-peer-urls", &self.listen_peer_urls),
            ("--initial-advertise-peer-urls", &self.initial_advertise_peer_urls),
        ] {
            if urls.is_empty() {
                return Err(bad(format!("{flag} must name at least one URL")));
            }
            for u in urls {
                url_to_addr(u)?;
            }
        }
        let members = self.initial_members()?;
        match members.get(&self.name) {
            None => {
                return Err(bad(format!(
                    "--initial-cluster has no entry for this member's --name {:?}",
                    self.name
                )))
            }
            Some(urls) => {
                let mut a = urls.clone();
                let mut b = self.initial_advertise_peer_urls.clone();
                a.sort();
                b.sort();
                if a != b {
                    return Err(bad(format!(
                        "--initial-cluster has {}={:?} but --initial-advertise-peer-urls is {:?}",
                        self.name, urls, self.initial_advertise_peer_urls
                    )));
                }
            }
        }
        if self.initial_cluster_state != "new" && self.initial_cluster_state != "existing" {
            return Err(bad(format!(
                "--initial-cluster-state must be \"new\" or \"existing\", not {:?}",
                self.initial_cluster_state
            )));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(bad("--heartbeat-interval must be > 0"));
        }
        // etcd's own rule: the election timeout must be at least 5 heartbeats.
        if self.election_timeout_ms < 5 * self.heartbeat_interval_ms {
            return Err(bad(format!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout_ms, self.heartbeat_interval_ms
            )));
        }
        if self.max_request_bytes == 0 || self.max_txn_ops == 0 {
            return Err(bad("--max-request-bytes and --max-txn-ops must be > 0"));
        }
        if self.snapshot_count == 0 {
            return Err(bad("--snapshot-count must be > 0"));
        }
        Ok(())
    }

    /// The effective quota in bytes, `None` if disabled (etcd's `NewBackendQuota`).
    pub fn quota_bytes(&self) -> Option<u64> {
        match self.quota_backend_bytes {
            q if q < 0 => None,
            0 => Some(limits::DEFAULT_QUOTA_BACKEND_BYTES as u64),
            q => Some(q as u64),
        }
    }
}

/// A stable non-zero 64-bit hash (FNV-1a). Member and cluster ids are derived from the bootstrap
/// configuration with it, so every member computes the same ids without talking.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    if h == 0 {
        1
    } else {
        h
    }
}

/// A member's id, as etcd derives it: from its sorted peer URLs and the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let joined = urls.join("");
    stable_hash(&[joined.as_bytes(), token.as_bytes()])
}

/// The cluster id: from the sorted member ids and the token.
pub fn cluster_id(member_ids: &[u64], token: &str) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort();
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_be_bytes()).collect();
    stable_hash(&[&bytes, token.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Config {
        Config {
            name: "m1".into(),
            initial_cluster: "m1=http://127.0.0.1:2380,m2=http://127.0.0.1:22380,m3=http://127.0.0.1:32380".into(),
            initial_advertise_peer_urls: vec!["http://127.0.0.1:2380".into()],
            ..Config::default()
        }
    }

    #[test]
    fn validates_like_etcd() {
        assert_eq!(three().validate(), Ok(()));
        let cases: Vec<(Config, &str)> = vec![
            (Config { name: "m9".into(), ..three() }, "no entry for this member"),
            (Config { initial_cluster: "m1".into(), ..three() }, "is not name=url"),
            (Config { initial_cluster_state: "old".into(), ..three() }, "must be \"new\" or \"existing\""),
            (Config { election_timeout_ms: 100, ..three() }, "at least as 5 times"),
            (Config { listen_client_urls: vec!["https://x:1".into()], ..three() }, "must start with http://"),
            (Config { initial_advertise_peer_urls: vec!["http://127.0.0.1:9".into()], ..three() }, "but --initial-advertise-peer-urls"),
        ];
        for (cfg, want) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn quota_follows_etcd() {
        let q = |quota_backend_bytes| Config { quota_backend_bytes, ..three() }.quota_bytes();
        assert_eq!(q(0), Some(2 << 30));
        assert_eq!(q(1_000_000), Some(1_000_000));
        assert_eq!(q(-1), None);
        assert_eq!(Config::default().quota_bytes(), Some(2 << 30));
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = member_id(&["http://127.0.0.1:2380".into()], "t");
        assert_eq!(a, member_id(&["http://127.0.0.1:2380".into()], "t"));
        assert_ne!(a, member_id(&["http://127.0.0.1:2380".into()], "u"));
        assert_ne!(a, member_id(&["http://127.0.0.1:22380".into()], "t"));
        assert_eq!(cluster_id(&[1, 2], "t"), cluster_id(&[2, 1], "t"));
    }
}
