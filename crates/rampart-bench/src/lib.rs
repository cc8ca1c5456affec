//! `rampart bench`: a load generator for the etcd v3 gRPC API.
//!
//! It speaks only the public API (the generated clients of `rampart-proto`), so the same binary
//! measures etcd and Rampart side by side. Workloads: put, linearizable and serializable range,
//! txn, and (etcd only until Rampart has them) watch fan-out and lease keep-alive.
//!
//! Everything is bounded: requests in flight = `--clients`, watch streams = `--watchers`, one
//! fixed-size latency histogram per client, at most [`MAX_ERROR_SAMPLES`] error messages kept.
//!
//! Entry points: [`BenchArgs`] (the flags, `clap::Args`), [`run`] (returns a [`BenchResult`]) and
//! [`run_cli`] (runs and prints: a summary on stderr, one JSON line on stdout).

mod args;
mod client;
mod rate;
mod stats;
mod unary;
mod watch;

use std::time::Duration;

use serde::Serialize;

pub use args::{parse_duration, BenchArgs, Stop, Workload};
pub use stats::{rate_per_s, LatencySummary};

/// Most distinct error messages kept for the report.
pub const MAX_ERROR_SAMPLES: usize = 5;

/// The outcome of one run. Serialized as the JSON line printed by [`run_cli`].
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// `--label`, e.g. "etcd" or "rampart".
    pub label: String,
    pub workload: Workload,
    pub endpoints: Vec<String>,
    pub clients: usize,
    pub connections: usize,
    pub key_size: usize,
    pub value_size: usize,
    pub key_space: u64,
    /// `--rate` (0: unlimited).
    pub rate_limit: u64,
    /// Operations that succeeded (watch: events delivered to watchers).
    pub ops: u64,
    /// Operations that failed.
    pub errors: u64,
    /// From the first operation to the last answer, in seconds.
    pub elapsed_s: f64,
    /// `ops / elapsed_s`.
    pub ops_per_s: f64,
    /// Latency of the successful operations (watch: from the put's send to the event's arrival).
    pub latency: LatencySummary,
    /// The first few distinct error messages.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
    /// Watch workload only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchStats>,
}

/// What the watch workload adds to a [`BenchResult`].
#[derive(Clone, Debug, Serialize)]
pub struct WatchStats {
    pub watchers: usize,
    /// Puts acknowledged.
    pub puts: u64,
    pub puts_per_s: f64,
    /// puts × watchers.
    pub events_expected: u64,
    /// Events not delivered within the drain time after the last put (0 on a healthy server).
    pub events_missing: u64,
}

/// Runs one benchmark as `args` describe.
///
/// Fails if the flags are invalid, an endpoint cannot be reached, the server does not implement
/// the workload's service (Watch and Lease on Rampart, today), or every operation failed.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchResult> {
    args.validate()?;
    let result = match args.workload {
        Workload::Watch => watch::run(&args).await?,
        _ => client::run(&args).await?,
    };
    if result.ops == 0 && result.errors > 0 {
        let first = result.error_samples.first().map_or("", String::as_str);
        anyhow::bail!("all {} operations failed; first error: {first}", result.errors);
    }
    Ok(result)
}

/// Runs [`run`] and prints the result: a summary on stderr, then one JSON object on one line on
/// stdout (so `rampart bench ... | tail -n1` is machine-readable).
pub async fn run_cli(args: BenchArgs) -> anyhow::Result<()> {
    let result = run(args).await?;
    eprintln!("{}", summary(&result));
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// The human-readable report.
pub fn summary(r: &BenchResult) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let l = &r.latency;
    let what = if r.watch.is_some() { "events" } else { "ops" };
    let mut s = format!(
        "{}{}: {} {what} in {:.2} s = {:.0} {what}/s, {} errors ({} clients, {} connections, {} endpoints)\n\
         latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
        if r.label.is_empty() { String::new() } else { format!("[{}] ", r.label) },
        r.workload.name(),
        r.ops,
        r.elapsed_s,
        r.ops_per_s,
        r.errors,
        r.clients,
        r.connections,
        r.endpoints.len(),
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.p999_us),
        ms(l.max_us),
        l.mean_us / 1000.0,
    );
    if let Some(w) = &r.watch {
        s += &format!(
            "\nwatch: {} watchers, {} puts ({:.0} put/s), {} of {} events delivered, {} missing",
            w.watchers, w.puts, w.puts_per_s, r.ops, w.events_expected, w.events_missing
        );
    }
    for e in &r.error_samples {
        s += &format!("\nerror: {e}");
    }
    s
}

/// How long a progress line waits between two prints, and whether there is one.
fn progress_interval(args: &BenchArgs) -> Option<Duration> {
    (!args.progress_interval.is_zero()).then_some(args.progress_interval)
}
