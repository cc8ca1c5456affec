//! A chaos campaign: a real cluster, clients recording a history, faults injected on a seeded
//! schedule, then the checkers. `rampart chaos` and the CI campaign both run this.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster::{Cluster, ClusterSpec};
use crate::history::{History, WatchSession};
use crate::workload::{client_loop, final_reads, watch_loop, Recorder, WorkloadConfig};

/// The faults a campaign can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the leader, restart it after the hold.
    KillLeader,
    /// SIGKILL a follower, restart it after the hold.
    KillFollower,
    /// SIGKILL every member, restart all after the hold.
    KillAll,
    /// SIGSTOP the leader for longer than the election timeout, then SIGCONT.
    PauseLeader,
    /// SIGSTOP a follower, then SIGCONT.
    PauseFollower,
    /// Cut the leader off from every other member, both directions.
    PartitionLeader,
    /// Majority/minority split with the leader in the minority.
    SplitMinorityLeader,
    /// The leader's outgoing packets to the others are dropped; it still hears them.
    OneWayLeaderOut,
    /// SIGTERM the leader (a clean stop, as in a rolling restart), start it again.
    RestartLeader,
    /// Fill the disk under a follower's data dir; free it and restart the member after the hold.
    DiskFullFollower,
    /// Remove a follower from the cluster, wipe it, add it back as a new member (member remove,
    /// member add, join with --initial-cluster-state existing) while clients keep writing.
    ReplaceFollower,
}

impl FaultKind {
    pub const ALL: [FaultKind; 11] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::KillAll,
        FaultKind::PauseLeader,
        FaultKind::PauseFollower,
        FaultKind::PartitionLeader,
        FaultKind::SplitMinorityLeader,
        FaultKind::OneWayLeaderOut,
        FaultKind::RestartLeader,
        FaultKind::DiskFullFollower,
        FaultKind::ReplaceFollower,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillFollower => "kill-follower",
            FaultKind::KillAll => "kill-all",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PauseFollower => "pause-follower",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::SplitMinorityLeader => "split-minority-leader",
            FaultKind::OneWayLeaderOut => "one-way-leader-out",
            FaultKind::RestartLeader => "restart-leader",
            FaultKind::DiskFullFollower => "disk-full-follower",
            FaultKind::ReplaceFollower => "replace-follower",
        }
    }

    /// Parses a comma-separated list. Group names select several: `kill` (all kills), `pause`,
    /// `partition` (all network faults), `restart`, `disk`, `all`.
    pub fn parse_list(s: &str) -> Result<Vec<FaultKind>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let group: Vec<FaultKind> = match part {
                "all" => FaultKind::ALL.to_vec(),
                "kill" => vec![FaultKind::KillLeader, FaultKind::KillFollower, FaultKind::KillAll],
                "pause" => vec![FaultKind::PauseLeader, FaultKind::PauseFollower],
                "partition" => vec![FaultKind::PartitionLeader, FaultKind::SplitMinorityLeader, FaultKind::OneWayLeaderOut],
                "restart" => vec![FaultKind::RestartLeader],
                "disk" => vec![FaultKind::DiskFullFollower],
                "membership" => vec![FaultKind::ReplaceFollower],
                name => match FaultKind::ALL.iter().find(|f| f.name() == name) {
                    Some(f) => vec![*f],
                    None => {
                        let known: Vec<&str> = FaultKind::ALL.iter().map(|f| f.name()).collect();
                        return Err(format!(
                            "unknown fault {name:?}; known: all, kill, pause, partition, restart, disk, membership, {}",
                            known.join(", ")
                        ));
                    }
                },
            };
            for f in group {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        if out.is_empty() {
            return Err("no faults given".into());
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct ChaosConfig {
    pub cluster: ClusterSpec,
    pub duration: Duration,
    pub faults: Vec<FaultKind>,
    pub seed: u64,
    pub workload: WorkloadConfig,
    /// Size of the tmpfs each member's data dir is mounted on when disk faults are enabled.
    pub tmpfs_mb: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub at_ms: u64,
    pub kind: FaultKind,
    pub target: Option<usize>,
    pub hold_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub duration_s: u64,
    pub operations: usize,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    pub faults: usize,
    pub fault_log: Vec<FaultRecord>,
    pub anomalies: usize,
    pub anomaly_messages: Vec<String>,
    pub lost_acked_writes: usize,
    pub max_unavailable_ms: u64,
    pub inconclusive: bool,
    /// Watch streams opened (one more each time a watcher resumed elsewhere) and events received.
    pub watch_sessions: usize,
    pub watch_events: usize,
}

/// Everything the checkers concluded about one history.
pub struct Verdict {
    pub anomalies: Vec<String>,
    pub lost_acked_writes: usize,
    pub inconclusive: bool,
}

/// Runs a campaign. `check` judges the recorded history (it is the checker module's
/// `check_all`, passed in so this module stays about orchestration).
pub async fn run(cfg: ChaosConfig, check: impl Fn(&History, &[WatchSession]) -> Verdict) -> anyhow::Result<ChaosReport> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let disk = cfg.faults.contains(&FaultKind::DiskFullFollower);
    let dir = tempfile::tempdir()?;
    let mut spec = cfg.cluster.clone();
    spec.dir = Some(dir.path().to_path_buf());
    let mut mounts = Vec::new();
    if disk {
        for i in 0..spec.members {
            let d = dir.path().join(format!("m{i}"));
            crate::cluster::mount_small_tmpfs(&d, cfg.tmpfs_mb)?;
            mounts.push(d);
        }
    }
    let result = campaign(&cfg, spec, &mut rng, check).await;
    for m in &mounts {
        crate::cluster::unmount(m);
    }
    result
}

async fn campaign(
    cfg: &ChaosConfig,
    spec: ClusterSpec,
    rng: &mut StdRng,
    check: impl Fn(&History, &[WatchSession]) -> Verdict,
) -> anyhow::Result<ChaosReport> {
    let mut cluster = Cluster::start(spec)?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let recorder = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..cfg.workload.clients as u32)
        .map(|c| tokio::spawn(client_loop(c, cluster.endpoints(), cfg.workload.clone(), recorder.clone(), stop.clone(), cfg.seed)))
        .collect();
    // Two watchers (registers and sets), resuming on another member whenever a stream breaks.
    let watchers: Vec<_> = ["reg/", "set/"]
        .iter()
        .enumerate()
        .map(|(w, prefix)| {
            tokio::spawn(watch_loop(w as u32, cluster.endpoints(), prefix.to_string(), recorder.clone(), stop.clone()))
        })
        .collect();

    let started = Instant::now();
    let start_ns = recorder.now_ns();
    let mut fault_log = Vec::new();
    let mut unexpected_exits = Vec::new();
    // Every fault once in a shuffled order, then random ones.
    let mut schedule: Vec<FaultKind> = cfg.faults.clone();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.random_range(0..=i));
    }
    let mut n = 0;
    while started.elapsed() < cfg.duration {
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2000))).await;
        let kind = if n < schedule.len() { schedule[n] } else { cfg.faults[rng.random_range(0..cfg.faults.len())] };
        n += 1;
        let hold = Duration::from_millis(rng.random_range(1000..3000));
        let at_ms = started.elapsed().as_millis() as u64;
        let target = inject(&mut cluster, kind, hold, rng).await?;
        fault_log.push(FaultRecord { at_ms, kind, target, hold_ms: hold.as_millis() as u64 });
        eprintln!("chaos: {:>6} ms {} {:?} for {} ms", at_ms, kind.name(), target, hold.as_millis());
        // A member that exited without being told to is a crash. (A member that stopped on
        // ENOSPC was reaped and restarted by the disk fault itself, so it does not count here;
        // its restart must succeed like any other.)
        for (i, status) in cluster.exited() {
            unexpected_exits.push(format!(
                "member {i} exited by itself ({status}) after {}\n{}",
                kind.name(),
                cluster.diagnose(i)
            ));
            cluster.spawn(i)?;
        }
        // A member brought back after its disk filled up must serve again: it must neither
        // refuse to start nor hang while starting.
        if let (FaultKind::DiskFullFollower, Some(t)) = (kind, target) {
            if !cluster.answers_within(t, Duration::from_secs(20)).await {
                unexpected_exits.push(format!(
                    "member {t} does not answer Status 20 s after its disk was freed\n{}",
                    cluster.diagnose(t)
                ));
                cluster.kill(t);
                cluster.spawn(t)?;
            }
        }
        // Let the cluster settle before the next fault, so each is judged on its own.
        let _ = cluster.wait_leader(Duration::from_secs(20)).await;
    }
    let end_ns = recorder.now_ns();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let mut sessions = Vec::new();
    for w in watchers {
        sessions.extend(w.await.unwrap_or_default());
    }
    cluster.heal()?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    final_reads(&cluster.endpoints(), &cfg.workload, &recorder, Duration::from_secs(60)).await?;

    let history = recorder.history();
    let verdict = check(&history, &sessions);
    let watch_events: usize = sessions.iter().flat_map(|s| &s.deliveries).map(|d| d.events.len()).sum();
    let mut anomaly_messages = unexpected_exits;
    anomaly_messages.extend(verdict.anomalies);
    let count = |f: fn(&crate::history::Outcome) -> bool| history.ops.iter().filter(|o| f(&o.outcome)).count();
    Ok(ChaosReport {
        seed: cfg.seed,
        duration_s: cfg.duration.as_secs(),
        operations: history.ops.len(),
        ok: count(|o| matches!(o, crate::history::Outcome::Ok(_))),
        failed: count(|o| matches!(o, crate::history::Outcome::Fail(_))),
        unknown: count(|o| matches!(o, crate::history::Outcome::Unknown(_))),
        faults: fault_log.len(),
        fault_log,
        anomalies: anomaly_messages.len(),
        anomaly_messages,
        lost_acked_writes: verdict.lost_acked_writes,
        max_unavailable_ms: recorder.max_unavailable_ms(start_ns, end_ns),
        inconclusive: verdict.inconclusive,
        watch_sessions: sessions.len(),
        watch_events,
    })
}

fn follower(cluster: &Cluster, leader: usize, rng: &mut StdRng) -> usize {
    let others: Vec<usize> = (0..cluster.members.len()).filter(|i| *i != leader).collect();
    others[rng.random_range(0..others.len())]
}

/// Applies one fault, holds it, heals it. Returns the member it targeted.
async fn inject(cluster: &mut Cluster, kind: FaultKind, hold: Duration, rng: &mut StdRng) -> anyhow::Result<Option<usize>> {
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    let n = cluster.members.len();
    let target = match kind {
        FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::PartitionLeader | FaultKind::OneWayLeaderOut
        | FaultKind::RestartLeader | FaultKind::SplitMinorityLeader => Some(leader),
        FaultKind::KillFollower | FaultKind::PauseFollower | FaultKind::DiskFullFollower | FaultKind::ReplaceFollower => {
            Some(follower(cluster, leader, rng))
        }
        FaultKind::KillAll => None,
    };
    match kind {
        FaultKind::KillLeader | FaultKind::KillFollower => {
            let t = target.unwrap();
            cluster.kill(t);
            tokio::time::sleep(hold).await;
            cluster.spawn(t)?;
        }
        FaultKind::KillAll => {
            for i in 0..n {
                cluster.kill(i);
            }
            tokio::time::sleep(hold).await;
            for i in 0..n {
                cluster.spawn(i)?;
            }
        }
        FaultKind::PauseLeader | FaultKind::PauseFollower => {
            let t = target.unwrap();
            cluster.pause(t);
            tokio::time::sleep(hold).await;
            cluster.resume(t);
        }
        FaultKind::PartitionLeader => {
            cluster.isolate(leader)?;
            tokio::time::sleep(hold).await;
            cluster.heal()?;
        }
        FaultKind::SplitMinorityLeader => {
            // With 3 members the minority is the leader alone; with 5, the leader and one other.
            let mut minority = vec![leader];
            let mut rest: Vec<usize> = (0..n).filter(|i| *i != leader).collect();
            while minority.len() < (n - 1) / 2 {
                minority.push(rest.remove(0));
            }
            cluster.partition(&[minority, rest])?;
            tokio::time::sleep(hold).await;
            cluster.heal()?;
        }
        FaultKind::OneWayLeaderOut => {
            let others: Vec<usize> = (0..n).filter(|i| *i != leader).collect();
            cluster.one_way(leader, &others)?;
            tokio::time::sleep(hold).await;
            cluster.heal()?;
        }
        FaultKind::RestartLeader => {
            cluster.stop(leader, Duration::from_secs(10));
            tokio::time::sleep(hold / 4).await;
            cluster.spawn(leader)?;
        }
        FaultKind::ReplaceFollower => {
            cluster.replace(target.unwrap()).await?;
            tokio::time::sleep(hold).await;
        }
        FaultKind::DiskFullFollower => {
            let t = target.unwrap();
            let ballast = cluster.fill_disk(t)?;
            tokio::time::sleep(hold).await;
            std::fs::remove_file(&ballast)?;
            // The member may have stopped on the write error; bring it back either way.
            let exited = cluster.exited();
            if exited.iter().any(|(i, _)| *i == t) || !cluster.is_running(t) {
                cluster.spawn(t)?;
            }
        }
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::FaultKind;

    #[test]
    fn fault_lists_parse_with_groups_and_names() {
        assert_eq!(FaultKind::parse_list("all").unwrap().len(), FaultKind::ALL.len());
        assert_eq!(
            FaultKind::parse_list("kill,pause-leader").unwrap(),
            vec![FaultKind::KillLeader, FaultKind::KillFollower, FaultKind::KillAll, FaultKind::PauseLeader]
        );
        assert!(FaultKind::parse_list("kill,meteor").unwrap_err().contains("unknown fault \"meteor\""));
        assert!(FaultKind::parse_list("").is_err());
    }
}
