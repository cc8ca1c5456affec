//! The flags of `rampart bench` and their validation.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

/// Most concurrent requests one bench process keeps in flight (`--clients`).
pub const MAX_CLIENTS: usize = 10_000;
/// Most watch streams one bench process opens (`--watchers`).
pub const MAX_WATCHERS: usize = 10_000;
/// Largest key space (`--key-space`): keys are decimal numbers, so 10^12 keys fit in 12 bytes.
pub const MAX_KEY_SPACE: u64 = 1_000_000_000_000;
/// Ops used when neither `--total` nor `--duration` is given (etcd's benchmark default).
pub const DEFAULT_TOTAL_OPS: u64 = 10_000;
/// Bytes at the start of a watch workload's value that carry the put's send time.
pub const WATCH_STAMP_BYTES: usize = 8;

/// What each client does in a loop.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Put a random key of the key space.
    Put,
    /// Linearizable Range of one random key (read barrier, then local read).
    Range,
    /// Serializable Range of one random key (served locally by the member asked).
    RangeSerializable,
    /// Txn: if version(key) > -1 (always true) then put key, else range key. Measures the txn path
    /// (compare evaluation + write) rather than contention.
    Txn,
    /// Watch fan-out: `--watchers` streams watch the whole key space while the clients put; the
    /// latency is from a put being sent to its event arriving at each watcher.
    Watch,
    /// Lease keep-alive: each client grants a lease and refreshes it over a keep-alive stream;
    /// the latency is one keep-alive round trip.
    Lease,
}

impl Workload {
    /// The name used on the command line and in the JSON result.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Range => "range",
            Workload::RangeSerializable => "range-serializable",
            Workload::Txn => "txn",
            Workload::Watch => "watch",
            Workload::Lease => "lease",
        }
    }
}

/// Flags of `rampart bench`: a load generator for any etcd v3 API server (etcd or Rampart).
///
/// Each of `--clients` tasks keeps one request in flight at a time; the clients share
/// `--connections` gRPC channels, which are spread round-robin over `--endpoints`. The run stops
/// after `--total` operations or after `--duration`. Prints a summary on stderr and one JSON
/// object on stdout.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Comma-separated client URLs (http://host:port; a bare host:port means http).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// What to run.
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Concurrent requests in flight (one per client task).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// gRPC connections shared by the clients (client i uses connection i mod N; connection j goes
    /// to endpoint j mod the number of endpoints).
    #[arg(long, visible_alias = "conns", default_value_t = 1)]
    pub connections: usize,
    /// Stop after this many operations (default 10000 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    pub total: Option<u64>,
    /// Stop issuing operations after this long, e.g. 10s, 500ms, 2m.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Key length in bytes. Keys are the key's number in decimal, zero-padded to this length.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value length in bytes.
    #[arg(long, visible_alias = "val-size", default_value_t = 8)]
    pub value_size: usize,
    /// Number of distinct keys; each operation picks one uniformly at random.
    #[arg(long, visible_alias = "key-space-size", default_value_t = 10_000)]
    pub key_space: u64,
    /// Most operations per second over all clients; 0 means unlimited. Operation n is not sent
    /// before start + n / rate; latency is measured from the actual send.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Before measuring, put every key of the key space once (for range and txn workloads).
    #[arg(long)]
    pub prefill: bool,
    /// Per-request deadline.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Watch workload: number of watch streams, each watching the whole key space.
    #[arg(long, default_value_t = 16)]
    pub watchers: usize,
    /// Lease workload: TTL in seconds of each client's lease.
    #[arg(long, default_value_t = 60)]
    pub lease_ttl: i64,
    /// Print a progress line on stderr this often; 0 disables it.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub progress_interval: Duration,
    /// Free text copied into the JSON result (e.g. "etcd" or "rampart").
    #[arg(long, default_value = "")]
    pub label: String,
}

impl BenchArgs {
    /// Checks every flag and its combinations; the error names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.endpoints.is_empty() {
            bail!("--endpoints: at least one endpoint is needed");
        }
        for e in &self.endpoints {
            let url = normalize_endpoint(e);
            url.parse::<tonic::transport::Uri>().with_context(|| format!("--endpoints: {e:?} is not a URL"))?;
        }
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            bail!("--clients must be between 1 and {MAX_CLIENTS}, got {}", self.clients);
        }
        if self.connections == 0 || self.connections > self.clients {
            bail!("--connections must be between 1 and --clients ({}), got {}", self.clients, self.connections);
        }
        if self.total == Some(0) {
            bail!("--total must be at least 1");
        }
        if self.duration == Some(Duration::ZERO) {
            bail!("--duration must be longer than 0");
        }
        if self.timeout.is_zero() {
            bail!("--timeout must be longer than 0");
        }
        if self.key_space == 0 || self.key_space > MAX_KEY_SPACE {
            bail!("--key-space must be between 1 and {MAX_KEY_SPACE}, got {}", self.key_space);
        }
        let digits = decimal_digits(self.key_space - 1);
        if self.key_size < digits {
            bail!("--key-size {} is too small for --key-space {}: keys need {digits} bytes", self.key_size, self.key_space);
        }
        // The server refuses a request over its limit; leave 1 KiB for the rest of the message.
        let max = rampart_core::limits::DEFAULT_MAX_REQUEST_BYTES - 1024;
        if self.key_size + self.value_size > max {
            bail!("--key-size + --value-size must be at most {max} bytes (etcd's request limit), got {}", self.key_size + self.value_size);
        }
        match self.workload {
            Workload::Watch => {
                if self.watchers == 0 || self.watchers > MAX_WATCHERS {
                    bail!("--watchers must be between 1 and {MAX_WATCHERS}, got {}", self.watchers);
                }
                if self.value_size < WATCH_STAMP_BYTES {
                    bail!("--workload watch needs --value-size of at least {WATCH_STAMP_BYTES} (the value carries the send time)");
                }
            }
            Workload::Lease if self.lease_ttl < 1 => {
                bail!("--lease-ttl must be at least 1 second, got {}", self.lease_ttl);
            }
            _ => {}
        }
        Ok(())
    }

    /// The stop condition: a fixed op count, or a duration.
    pub fn stop(&self) -> Stop {
        match (self.total, self.duration) {
            (_, Some(d)) => Stop::After(d),
            (Some(n), None) => Stop::Ops(n),
            (None, None) => Stop::Ops(DEFAULT_TOTAL_OPS),
        }
    }

    /// The endpoints as URLs tonic accepts.
    pub fn endpoint_urls(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| normalize_endpoint(e)).collect()
    }
}

/// When a run stops issuing operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// After this many operations have been issued.
    Ops(u64),
    /// After this long.
    After(Duration),
}

/// Adds `http://` to a bare `host:port`, as etcdctl does.
fn normalize_endpoint(e: &str) -> String {
    let e = e.trim();
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

/// Number of decimal digits of `n` (1 for 0).
pub(crate) fn decimal_digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// Key number `index`, zero-padded to `key_size` bytes.
pub(crate) fn key(index: u64, key_size: usize) -> Vec<u8> {
    format!("{index:0key_size$}").into_bytes()
}

/// Parses `10s`, `500ms`, `2m`, `1h`, `1.5s`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    /// Parses and validates `flags`; `Ok(())` or the error text.
    fn check(flags: &[&str], expected: Result<(), &str>) {
        let parsed = Cli::try_parse_from(std::iter::once("bench").chain(flags.iter().copied()));
        let got = match parsed {
            Ok(cli) => cli.args.validate().map_err(|e| format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        };
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(got), Err(want)) => assert!(got.contains(want), "{flags:?}: error {got:?} does not contain {want:?}"),
            (got, want) => panic!("{flags:?}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn valid_combinations() {
        check(&[], Ok(()));
        check(&["--workload", "range-serializable", "--clients", "64", "--conns", "8", "--duration", "10s"], Ok(()));
        check(&["--endpoints", "127.0.0.1:2379,http://127.0.0.1:22379", "--total", "5"], Ok(()));
        check(&["--workload", "watch", "--watchers", "100"], Ok(()));
        check(&["--key-space", "100000", "--key-size", "5"], Ok(()));
        check(&["--key-space", "1", "--key-size", "1"], Ok(()));
    }

    #[test]
    fn invalid_combinations_name_the_flag() {
        check(&["--clients", "0"], Err("--clients must be between 1"));
        check(&["--clients", "10001"], Err("--clients must be between 1"));
        check(&["--clients", "4", "--connections", "5"], Err("--connections must be between 1 and --clients (4)"));
        check(&["--connections", "0"], Err("--connections"));
        check(&["--total", "0"], Err("--total must be at least 1"));
        check(&["--duration", "0s"], Err("--duration must be longer than 0"));
        check(&["--total", "5", "--duration", "1s"], Err("cannot be used with"));
        check(&["--key-space", "100001", "--key-size", "5"], Err("--key-size 5 is too small for --key-space 100001: keys need 6 bytes"));
        check(&["--key-space", "0"], Err("--key-space must be between 1"));
        check(&["--value-size", "2000000"], Err("etcd's request limit"));
        check(&["--workload", "watch", "--value-size", "4"], Err("--value-size of at least 8"));
        check(&["--workload", "watch", "--watchers", "0"], Err("--watchers must be between 1"));
        check(&["--workload", "lease", "--lease-ttl", "0"], Err("--lease-ttl must be at least 1"));
        check(&["--workload", "scan"], Err("invalid value 'scan'"));
        check(&["--endpoints", "http://[::1"], Err("is not a URL"));
        check(&["--timeout", "0ms"], Err("--timeout must be longer than 0"));
    }

    #[test]
    fn stop_condition() {
        let args = |flags: &[&str]| Cli::try_parse_from(std::iter::once("bench").chain(flags.iter().copied())).unwrap().args;
        assert_eq!(args(&[]).stop(), Stop::Ops(DEFAULT_TOTAL_OPS));
        assert_eq!(args(&["--total", "7"]).stop(), Stop::Ops(7));
        assert_eq!(args(&["--duration", "2m"]).stop(), Stop::After(Duration::from_secs(120)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn keys_are_zero_padded_decimal() {
        assert_eq!(key(42, 8), b"00000042");
        assert_eq!(key(0, 1), b"0");
        assert_eq!(decimal_digits(0), 1);
        assert_eq!(decimal_digits(9), 1);
        assert_eq!(decimal_digits(10), 2);
        assert_eq!(decimal_digits(99_999), 5);
        assert_eq!(decimal_digits(u64::MAX), 20);
    }
}
