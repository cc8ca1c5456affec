//! `rampart snapshot restore`: the offline half of backups, as `etcdctl snapshot restore` (etcd
//! 3.4) or `etcdutl snapshot restore` (3.5): from a file saved with `etcdctl snapshot save` against
//! Rampart, a new member data dir that `rampart serve` starts as a member of a new cluster with
//! the same data. Same flags as etcd's; run it once per member, with that member's flags.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use rampart_server::Config;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Create a new member data dir from a snapshot file (saved with `etcdctl snapshot save`).
    Restore(RestoreArgs),
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The snapshot file.
    file: PathBuf,
    /// Data dir to create; must not exist. Default: `<name>.rampart`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// This member's name, as `rampart serve --name` will give it.
    #[arg(long, default_value = "default")]
    name: String,
    /// The new cluster: name=peer-url,... (as `rampart serve --initial-cluster`).
    #[arg(long, default_value = "default=http://localhost:2380")]
    initial_cluster: String,
    /// Token of the new cluster (as `rampart serve --initial-cluster-token`).
    #[arg(long, default_value = "rampart-cluster")]
    initial_cluster_token: String,
    /// This member's peer URLs, comma-separated (as `rampart serve --initial-advertise-peer-urls`).
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
}

pub fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    match args.command {
        SnapshotCommand::Restore(a) => restore(a),
    }
}

fn restore(a: RestoreArgs) -> anyhow::Result<()> {
    let peer_urls: Vec<String> =
        a.initial_advertise_peer_urls.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
    let cfg = Config {
        data_dir: a.data_dir.unwrap_or_else(|| PathBuf::from(format!("{}.rampart", a.name))),
        name: a.name,
        initial_cluster: a.initial_cluster,
        initial_cluster_token: a.initial_cluster_token,
        initial_advertise_peer_urls: peer_urls,
        ..Config::default()
    };
    let r = rampart_server::maintenance::restore_snapshot_file(&a.file, &cfg)
        .with_context(|| format!("restoring {}", a.file.display()))?;
    println!(
        "restored snapshot at revision {} into {} (member {:x} of new cluster {:x}); start it with \
         `rampart serve --name {} --data-dir {} --initial-cluster {} --initial-cluster-token {} \
         --initial-advertise-peer-urls {}` and its listen/advertise URLs",
        r.revision,
        r.data_dir.display(),
        r.member_id,
        r.cluster_id,
        cfg.name,
        r.data_dir.display(),
        cfg.initial_cluster,
        cfg.initial_cluster_token,
        cfg.initial_advertise_peer_urls.join(","),
    );
    Ok(())
}
