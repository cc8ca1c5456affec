//! `rampart bench` as a standalone binary, for use before (or without) the `rampart` CLI:
//! `cargo run --release -p rampart-bench --example bench -- --endpoints ... --workload put`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "bench", about = "Load generator for the etcd v3 API (etcd or Rampart)")]
struct Cli {
    #[command(flatten)]
    args: rampart_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    match rampart_bench::run_cli(Cli::parse().args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
