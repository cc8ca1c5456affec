//! `rampart chaos` and `rampart failover-bench`: fault campaigns and the failover benchmark
//! against local clusters started from this very binary (and etcd, for comparison).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rampart_testkit::chaos::{self, ChaosConfig, FaultKind, Verdict};
use rampart_testkit::checker::{AnomalyKind, Conclusion};
use rampart_testkit::cluster::{ClusterSpec, Flavor};
use rampart_testkit::workload::WorkloadConfig;

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// How long to inject faults, in seconds (final checks come after).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Faults to inject, comma-separated: kill, pause, partition, restart, disk, membership, all,
    /// or single names (kill-leader, kill-follower, kill-all, pause-leader, pause-follower,
    /// partition-leader, split-minority-leader, one-way-leader-out, restart-leader,
    /// disk-full-follower, replace-follower). Network and disk faults need root (nftables, tmpfs).
    #[arg(long, default_value = "kill,pause,partition,restart,membership")]
    faults: String,
    /// Seed of the fault schedule and the workload; the same seed replays the same schedule.
    #[arg(long)]
    seed: Option<u64>,
    /// Members in the cluster.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Write the recorded history (JSON) here, to replay the checkers on it.
    #[arg(long)]
    history_out: Option<PathBuf>,
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let faults = FaultKind::parse_list(&args.faults).map_err(anyhow::Error::msg)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let bin = std::env::current_exe().context("locating the rampart binary")?;
    let cfg = ChaosConfig {
        cluster: ClusterSpec { flavor: Flavor::Rampart, bin, members: args.members, extra_args: vec!["--log".into(), "warn".into()], dir: None },
        duration: Duration::from_secs(args.duration),
        faults,
        seed,
        workload: WorkloadConfig { clients: args.clients, ..WorkloadConfig::default() },
        tmpfs_mb: 64,
    };
    eprintln!("chaos: seed {seed}, {} s, faults {}", args.duration, args.faults);
    let history_out = args.history_out.clone();
    let report = chaos::run(cfg, move |h, watches| {
        if let Some(p) = &history_out {
            if let Err(e) = std::fs::write(p, serde_json::to_vec(h).unwrap_or_default()) {
                eprintln!("chaos: cannot write history to {}: {e}", p.display());
            }
        }
        let r = rampart_testkit::checker::check_all(h, watches, &rampart_testkit::checker::Limits::default());
        Verdict {
            anomalies: r.anomalies.iter().filter(|a| a.kind != AnomalyKind::Inconclusive).map(|a| a.to_string()).collect(),
            lost_acked_writes: r.lost_acked_writes(),
            inconclusive: r.conclusion() == Conclusion::Inconclusive,
        }
    })
    .await?;
    println!("operations: {} (ok {}, failed {}, unknown {})", report.operations, report.ok, report.failed, report.unknown);
    println!("faults: {}", report.faults);
    for f in &report.fault_log {
        println!("  {:>7} ms  {:<22} target {:?}  held {} ms", f.at_ms, f.kind.name(), f.target, f.hold_ms);
    }
    println!("watch: {} events over {} streams", report.watch_events, report.watch_sessions);
    println!("max unavailable: {} ms", report.max_unavailable_ms);
    println!("anomalies: {}", report.anomalies);
    for a in &report.anomaly_messages {
        println!("  {a}");
    }
    if report.inconclusive {
        println!("note: the linearizability search hit its bound on some key; that part is inconclusive");
    }
    let line = serde_json::json!({
        "seed": report.seed,
        "duration_s": report.duration_s,
        "operations": report.operations,
        "faults": report.faults,
        "anomalies": report.anomalies,
        "lost_acked_writes": report.lost_acked_writes,
        "max_unavailable_ms": report.max_unavailable_ms,
        "inconclusive": report.inconclusive,
        "watch_events": report.watch_events,
        "watch_sessions": report.watch_sessions,
    });
    println!("{line}");
    if report.anomalies > 0 || report.lost_acked_writes > 0 {
        anyhow::bail!("{} anomalies found (seed {seed})", report.anomalies);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Rounds of leader SIGKILL per system.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Also run a 3-member etcd 3.4 with its default timings, in the same run.
    #[arg(long)]
    with_etcd: bool,
    /// The etcd binary (Debian's etcd-server package).
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// Append a results table (markdown) to this file.
    #[arg(long)]
    markdown_out: Option<PathBuf>,
}

pub async fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?;
    let mut results = Vec::new();
    let rampart = ClusterSpec { flavor: Flavor::Rampart, bin, members: 3, extra_args: vec!["--log".into(), "warn".into()], dir: None };
    results.push(rampart_testkit::failover::run(rampart, args.rounds, args.writers).await?);
    if args.with_etcd {
        let etcd = ClusterSpec { flavor: Flavor::Etcd, bin: args.etcd_bin.clone(), members: 3, extra_args: vec![], dir: None };
        results.push(rampart_testkit::failover::run(etcd, args.rounds, args.writers).await?);
    }
    println!("| system | rounds | p50 write gap | p99 write gap | max | acked writes | lost |");
    println!("|---|---|---|---|---|---|---|");
    let mut table = String::new();
    for r in &results {
        let row = format!(
            "| {} | {} | {} ms | {} ms | {} ms | {} | {} |",
            r.system, r.rounds, r.p50_ms, r.p99_ms, r.max_ms, r.acked_writes, r.lost_acked_writes
        );
        println!("{row}");
        table.push_str(&row);
        table.push('\n');
    }
    if let Some(path) = &args.markdown_out {
        let mut text = std::fs::read_to_string(path).unwrap_or_default();
        text.push_str(&table);
        std::fs::write(path, text)?;
    }
    println!("{}", serde_json::to_string(&results)?);
    if results.iter().any(|r| r.lost_acked_writes > 0) {
        anyhow::bail!("acknowledged writes were lost");
    }
    Ok(())
}
