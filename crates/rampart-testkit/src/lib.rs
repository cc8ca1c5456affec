//! Fault testing for Rampart (and, for comparison, etcd).
//!
//! - [`history`]: what clients did and saw: invocation and completion times, outcome (ok, failed,
//!   or unknown after a timeout).
//! - [`checker`]: linearizability (WGL search over a per-key model of etcd's KV), lost
//!   acknowledged writes, per-client revision monotonicity, append-only sets, watch guarantees.
//!
//! - [`cluster`]: real clusters of real processes (Rampart or etcd, same flags), each member on its
//!   own loopback address; faults from outside: SIGKILL, SIGSTOP, SIGTERM, nftables link drops,
//!   full disks.
//! - [`workload`]: gRPC clients that record histories (registers, CAS, append-only sets).
//! - [`chaos`]: a seeded fault campaign over a cluster and a workload, judged by the checkers.
//! - [`failover`]: the failover benchmark (leader SIGKILL rounds, write gap), for both systems.
//!
//! Nothing in `history` or `checker` does I/O: they are tested on hand-written histories.

pub mod chaos;
pub mod checker;
pub mod cluster;
pub mod failover;
pub mod history;
pub mod workload;
