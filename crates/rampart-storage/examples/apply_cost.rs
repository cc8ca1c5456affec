//! How long one `Mvcc::apply` batch takes, by batch size: the MVCC part of a write's cost,
//! measured without raft or gRPC. `cargo run --release -p rampart-storage --example apply_cost`
//! (keys 8 B over 10,000, values 256 B, as `scripts/bench-vs-etcd.sh` writes them).

use std::time::Instant;

use rampart_proto::etcdserverpb::PutRequest;
use rampart_proto::rampartpb::{command, Command};
use rampart_storage::mvcc::Mvcc;

fn put(i: u64) -> Command {
    Command {
        request: Some(command::Request::Put(PutRequest {
            key: format!("{:08}", i % 10_000).into_bytes(),
            value: vec![b'v'; 256],
            ..Default::default()
        })),
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mvcc = Mvcc::open(&dir.path().join("kv.redb")).unwrap();
    let meta = vec![0u8; 200];
    // Every key written once, as the side-by-side bench does before its runs.
    for chunk in (0..10_000u64).collect::<Vec<_>>().chunks(500) {
        let cmds: Vec<Command> = chunk.iter().map(|&i| put(i)).collect();
        let batch: Vec<Option<&Command>> = cmds.iter().map(Some).collect();
        mvcc.apply(&batch, &meta, false).unwrap();
    }
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for batch_len in [1usize, 4, 16, 64, 256, 1024] {
        let total = 20_000;
        let start = Instant::now();
        let mut n = 0;
        while n < total {
            let cmds: Vec<Command> = (0..batch_len).map(|_| put(next())).collect();
            let batch: Vec<Option<&Command>> = cmds.iter().map(Some).collect();
            mvcc.apply(&batch, &meta, false).unwrap();
            n += batch_len;
        }
        let per_put = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("batch {batch_len:>3}: {per_put:7.1} us per put ({:.1} us per batch)", per_put * batch_len as f64);
    }
    let start = Instant::now();
    mvcc.apply(&[], &meta, true).unwrap();
    println!("durable commit after the runs: {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
}
