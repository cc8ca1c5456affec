//! Assembles a Rampart member from a [`config::Config`]: storage, raft, the peer transport and the
//! etcd-compatible gRPC API.
//!
//! - [`auth`]: the Auth service; tokens; the permission checks every service makes.
//! - [`concurrency`]: the Lock and Election services, etcd's client recipes run on the member.
//! - [`config`]: every setting, validated; ids derived from the bootstrap configuration.
//! - [`forward`]: writes a follower forwards to the leader, batched into shared peer calls.
//! - [`member`]: one running member and its two request paths, `propose` (writes) and
//!   `read_barrier` (linearizable reads).
//! - [`api`]: the KV and Cluster services; the one place errors become gRPC statuses.
//! - [`gateway`]: etcd's JSON gateway (`/v3/...`), `/version` and `/health` on the client port;
//!   with `api`, the only place errors become wire errors.
//! - [`lease`]: the Lease service, and the leader's lease clocks that decide expiry.
//! - [`maintenance`]: the Maintenance service; the space quota and its alarm; leadership transfer
//!   (MoveLeader, and on stop); the client snapshot file and its offline restore.
//! - [`peer`]: the server half of the peer transport.
//! - [`serve`]: binds listeners and runs a member until it is stopped.
//! - [`watch`]: the Watch service: history replay, then the change feed, per stream.

pub mod api;
pub mod auth;
pub mod coalesce;
pub mod concurrency;
pub mod config;
pub mod forward;
pub mod gateway;
pub mod inline;
pub mod lease;
pub mod maintenance;
pub mod member;
pub mod peer;
pub mod serve;
pub mod unary;
pub mod watch;

pub use config::Config;
pub use serve::{start, Running};
