//! `rampart dev`: three `rampart serve` children on etcd's local-cluster ports.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::process::{Child, Command};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the members keep their data (one subdirectory each).
    #[arg(long, default_value = "rampart-data")]
    data_dir: PathBuf,
    /// Log filter passed to the members.
    #[arg(long, default_value = "warn")]
    log: String,
}

/// (name, client port, peer port), etcd's Procfile convention.
const MEMBERS: [(&str, u16, u16); 3] = [("infra1", 2379, 12380), ("infra2", 22379, 22380), ("infra3", 32379, 32380)];

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the rampart binary")?;
    let cluster =
        MEMBERS.iter().map(|(n, _, p)| format!("{n}=http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let mut children: Vec<(&str, Child)> = Vec::new();
    for (name, client, peer) in MEMBERS {
        let dir = args.data_dir.join(name);
        let child = Command::new(&exe)
            .arg("serve")
            .args(["--name", name])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-token", "rampart-dev"])
            .args(["--initial-cluster-state", "new"])
            .args(["--log", &args.log])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting member {name}"))?;
        children.push((name, child));
    }
    let endpoints = MEMBERS.iter().map(|(_, c, _)| format!("127.0.0.1:{c}")).collect::<Vec<_>>().join(",");
    println!("rampart dev: 3 members running, data under {}", args.data_dir.display());
    for (name, client, peer) in MEMBERS {
        println!("  {name}: clients http://127.0.0.1:{client}  peers http://127.0.0.1:{peer}");
    }
    println!("try:");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints} put greeting hello");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints} get greeting");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints} -w table endpoint status");
    println!("Ctrl-C stops all members.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let early_exit = async {
        loop {
            for (name, c) in children.iter_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return (name.to_string(), status);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        (name, status) = early_exit => Some((name, status)),
    };
    for (_, c) in children.iter_mut() {
        if let Some(pid) = c.id() {
            // SIGTERM: each member stops cleanly (raft shutdown, listeners closed).
            send_sigterm(pid);
        }
    }
    for (name, c) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("member {name} did not stop in 10s; killing it");
                let _ = c.kill().await;
            }
        }
    }
    match failed {
        Some((name, status)) => anyhow::bail!("member {name} exited early ({status}); see its log above"),
        None => {
            println!("rampart dev: all members stopped");
            Ok(())
        }
    }
}

/// Sends SIGTERM without a libc dependency: `kill` is on every Debian machine.
fn send_sigterm(pid: u32) {
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}
