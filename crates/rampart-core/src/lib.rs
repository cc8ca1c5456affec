//! Plain types shared by every Rampart crate.
//!
//! Nothing here does I/O. Two things live here because every layer needs them and they must
//! mean the same thing everywhere: the client-visible error values ([`EtcdError`]), whose
//! messages are etcd's own so that real clients keep matching on them, and the named limits
//! ([`limits`]).

pub mod error;
pub mod limits;

pub use error::{Code, EtcdError};

/// A cluster-wide MVCC revision, as in etcd: bumped once per write request or write txn.
pub type Revision = i64;

/// A member's id as etcd shows it (a random non-zero u64, printed in hex by etcdctl).
pub type MemberId = u64;
