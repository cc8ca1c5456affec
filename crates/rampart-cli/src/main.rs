//! The `rampart` binary. The only place that reads flags, config files and the environment.
//!
//! - `rampart serve`: one member, configured like etcd (same flag names and meanings), from flags,
//!   `RAMPART_*` environment variables and a TOML file (`--config-file`), in that precedence.
//! - `rampart dev`: a local 3-member cluster as three child processes, for trying Rampart out.
//! - `rampart snapshot restore`: a new member data dir from a saved snapshot (offline).
//! - `rampart run-elected`: runs a program on one machine at a time, chosen by an election.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use rampart_server::Config;

/// mimalloc instead of glibc's malloc: allocation was ~14% of all CPU time at put-64 with glibc
/// (docs/performance.md, finding 27).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod chaos;
mod dev;
mod run_elected;
mod snapshot;

#[derive(Parser)]
#[command(name = "rampart", version, about = "A replicated key-value store that speaks the etcd v3 API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one member.
    Serve(ServeArgs),
    /// Run a local 3-member cluster (clients on :2379, :22379, :32379) until Ctrl-C.
    Dev(dev::DevArgs),
    /// Run a local cluster under injected faults and check what clients saw; exits non-zero on
    /// any anomaly. Ends with one line of JSON.
    Chaos(chaos::ChaosArgs),
    /// Load generator for the etcd v3 API (etcd or Rampart): put, range, txn, watch, lease. Ends
    /// with one JSON line.
    Bench(rampart_bench::BenchArgs),
    /// Leader SIGKILL rounds under write load: the write gap, for Rampart (and etcd with
    /// --with-etcd) in the same run.
    FailoverBench(chaos::FailoverArgs),
    /// Offline snapshot tools: `restore` builds a new member data dir from a saved snapshot.
    Snapshot(snapshot::SnapshotArgs),
    /// Active/passive HA for any program: instances campaign on --key; only the leader runs the
    /// command (fencing token in RAMPART_FENCING_TOKEN); it is stopped when leadership is lost.
    RunElected(run_elected::RunElectedArgs),
}

/// Flags of `rampart serve`. Every flag can also come from the environment (`RAMPART_NAME`, ...)
/// or from the TOML file given with `--config-file` (keys as in [`Config`], e.g. `name`,
/// `data_dir`, `listen_client_urls = ["http://..."]`, `heartbeat_interval_ms`).
#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// TOML file with settings; flags and environment variables override it.
    #[arg(long, env = "RAMPART_CONFIG_FILE")]
    config_file: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, env = "RAMPART_NAME")]
    name: Option<String>,
    /// Path to the data directory.
    #[arg(long, env = "RAMPART_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Comma-separated URLs to listen on for client traffic.
    #[arg(long, env = "RAMPART_LISTEN_CLIENT_URLS")]
    listen_client_urls: Option<String>,
    /// Comma-separated client URLs to advertise to the cluster.
    #[arg(long, env = "RAMPART_ADVERTISE_CLIENT_URLS")]
    advertise_client_urls: Option<String>,
    /// Comma-separated URLs to listen on for peer traffic.
    #[arg(long, env = "RAMPART_LISTEN_PEER_URLS")]
    listen_peer_urls: Option<String>,
    /// Comma-separated peer URLs of this member, as advertised to the others.
    #[arg(long, env = "RAMPART_INITIAL_ADVERTISE_PEER_URLS")]
    initial_advertise_peer_urls: Option<String>,
    /// Initial cluster configuration for bootstrapping: name=url,name=url,...
    #[arg(long, env = "RAMPART_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// Initial cluster state ("new" or "existing").
    #[arg(long, env = "RAMPART_INITIAL_CLUSTER_STATE")]
    initial_cluster_state: Option<String>,
    /// Initial cluster token, distinguishing clusters bootstrapped from the same member list.
    #[arg(long, env = "RAMPART_INITIAL_CLUSTER_TOKEN")]
    initial_cluster_token: Option<String>,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "RAMPART_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<u64>,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "RAMPART_ELECTION_TIMEOUT")]
    election_timeout: Option<u64>,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "RAMPART_MAX_REQUEST_BYTES")]
    max_request_bytes: Option<usize>,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "RAMPART_MAX_TXN_OPS")]
    max_txn_ops: Option<usize>,
    /// Number of committed entries between two snapshots (the log is purged behind a snapshot).
    #[arg(long, env = "RAMPART_SNAPSHOT_COUNT")]
    snapshot_count: Option<u64>,
    /// Entries kept in the log behind a snapshot, for slow followers to catch up from.
    #[arg(long = "experimental-snapshot-catchup-entries", env = "RAMPART_SNAPSHOT_CATCHUP_ENTRIES")]
    snapshot_catchup_entries: Option<u64>,
    /// Raise the NOSPACE alarm when the store grows past this many bytes (0: the 2 GiB default;
    /// negative: no quota).
    #[arg(long, env = "RAMPART_QUOTA_BACKEND_BYTES", allow_negative_numbers = true)]
    quota_backend_bytes: Option<i64>,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. "info" or "rampart_server=debug".
    #[arg(long, env = "RAMPART_LOG", default_value = "info")]
    log: String,
}

fn urls(s: String) -> Vec<String> {
    s.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect()
}

impl ServeArgs {
    /// Defaults, then the config file, then environment and flags (clap merges those two).
    fn into_config(self) -> anyhow::Result<Config> {
        let mut cfg = match &self.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<Config>(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = self.name {
            cfg.name = v;
        }
        if let Some(v) = self.data_dir {
            cfg.data_dir = v;
        } else if self.config_file.is_none() {
            cfg.data_dir = PathBuf::from(format!("{}.rampart", cfg.name));
        }
        if let Some(v) = self.listen_client_urls {
            cfg.listen_client_urls = urls(v);
        }
        if let Some(v) = self.advertise_client_urls {
            cfg.advertise_client_urls = urls(v);
        }
        if let Some(v) = self.listen_peer_urls {
            cfg.listen_peer_urls = urls(v);
        }
        if let Some(v) = self.initial_advertise_peer_urls {
            cfg.initial_advertise_peer_urls = urls(v);
        }
        if let Some(v) = self.initial_cluster {
            cfg.initial_cluster = v;
        } else if self.config_file.is_none() {
            // etcd's default: this member alone, at its advertised peer URLs.
            cfg.initial_cluster =
                cfg.initial_advertise_peer_urls.iter().map(|u| format!("{}={u}", cfg.name)).collect::<Vec<_>>().join(",");
        }
        if let Some(v) = self.initial_cluster_state {
            cfg.initial_cluster_state = v;
        }
        if let Some(v) = self.initial_cluster_token {
            cfg.initial_cluster_token = v;
        }
        if let Some(v) = self.heartbeat_interval {
            cfg.heartbeat_interval_ms = v;
        }
        if let Some(v) = self.election_timeout {
            cfg.election_timeout_ms = v;
        }
        if let Some(v) = self.max_request_bytes {
            cfg.max_request_bytes = v;
        }
        if let Some(v) = self.max_txn_ops {
            cfg.max_txn_ops = v;
        }
        if let Some(v) = self.snapshot_count {
            cfg.snapshot_count = v;
        }
        if let Some(v) = self.snapshot_catchup_entries {
            cfg.snapshot_catchup_entries = v;
        }
        if let Some(v) = self.quota_backend_bytes {
            cfg.quota_backend_bytes = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let cfg = args.into_config()?;
    let running = rampart_server::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        why = running.fatal() => {
            tracing::error!(%why, "raft stopped; exiting so the member can be restarted once the cause is fixed");
            anyhow::bail!("raft stopped: {why}");
        }
    }
    tracing::info!("stopping");
    running.stop().await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A member runs one worker thread per core: more workers on the same cores only added
    // wake-ups and thread switches (member CPU per operation 5-12% lower with one per core,
    // docs/performance.md finding 16). Its long storage calls (durable MVCC commits, snapshot
    // installs) leave the worker first (`block_in_place` in rampart-raft's state machine), so
    // raft's heartbeat and election timers do not wait behind them. The other commands (the
    // load generator, the fault harness) keep twice as many workers as cores.
    // RAMPART_WORKER_THREADS overrides the count (for measurements; see docs/performance.md).
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2);
    let default_workers = if matches!(cli.command, Command::Serve(_)) { cores } else { cores * 2 };
    let workers = std::env::var("RAMPART_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default_workers);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rampart: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::RunElected(args) => {
                init_logging(&args.log);
                return run_elected::run(args).await;
            }
            Command::Serve(args) => serve(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Chaos(args) => chaos::run(args).await,
            Command::FailoverBench(args) => chaos::failover(args).await,
            Command::Bench(args) => rampart_bench::run_cli(args).await,
            Command::Snapshot(args) => snapshot::run(args),
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rampart: {e:#}");
            ExitCode::FAILURE
        }
    }
}

