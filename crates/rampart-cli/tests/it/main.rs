//! Integration tests: real `rampart serve` processes on loopback, driven by real etcd clients
//! (the `etcd-client` crate and Debian's etcdctl 3.4). One test binary, one module per feature.

mod harness;

mod auth;
mod chaos;
mod concurrency;
mod config;
mod data_dir;
mod dev;
mod etcdctl;
mod etcdctl_cluster;
mod failover;
mod gateway;
mod kv;
mod lease;
mod maintenance;
mod membership;
mod run_elected;
mod snapshot;
mod watch;
