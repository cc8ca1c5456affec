//! openraft glue: what a Rampart member needs to run consensus.
//!
//! - [`TypeConfig`]: the openraft type configuration (u64 member ids, [`PeerNode`] addresses,
//!   [`Request`] log payloads, [`Reply`] apply results).
//! - [`log_store::LogStore`]: `RaftLogStorage` over `rampart_storage::log` with group commit.
//! - [`state_machine::StateMachine`]: `RaftStateMachine` over `rampart_storage::mvcc`, which also
//!   publishes every committed change, in revision order, on a [`state_machine::ChangeFeed`].
//! - [`network::PeerNetwork`]: the client half of the peer transport (one gRPC unary RPC carrying
//!   postcard-encoded openraft messages). The server half lives in rampart-server, which owns the
//!   `Raft` handle.
//! - [`pipe`]: AppendEntries, the hot path, on a plain TCP connection beside the gRPC service
//!   (both halves).
//!
//! This crate is the only one that knows openraft's types in detail; the server sees `Raft`,
//! `Request` and `Reply`.

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod auth;
pub mod codec;
pub mod log_store;
pub mod network;
pub mod pipe;
pub mod state_machine;

pub use rampart_core::MemberId;

openraft::declare_raft_types!(
    /// Rampart's openraft type configuration.
    pub TypeConfig:
        D = Request,
        R = Reply,
        NodeId = MemberId,
        Node = PeerNode,
);

pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Membership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;

/// A member as the raft layer knows it: how peers reach it, and the name it was started with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub name: String,
    pub peer_urls: Vec<String>,
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.peer_urls.join(","))
    }
}

/// One replicated write, the payload of a normal raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// An etcd write: `rampartpb::Command` encoded with prost (put, delete, txn, compaction).
    /// Kept encoded so the log holds exactly the bytes a client sent, and so the hot path does not
    /// decode and re-encode. Serialized as one byte string (`codec::byte_string`), which in
    /// postcard is the same bytes as the element-by-element form it replaced.
    Kv(#[serde(with = "codec::byte_string")] Vec<u8>),
    /// A member announces its client URLs, as etcd members publish their attributes after start;
    /// `MemberList` shows them.
    PublishMember { id: MemberId, name: String, client_urls: Vec<String> },
    /// etcd's Alarm ACTIVATE (`activate`) or DEACTIVATE of `alarm` (an `etcdserverpb::AlarmType`
    /// number) for `member_id`. Replicated, so every member refuses the same writes.
    Alarm { activate: bool, member_id: MemberId, alarm: i32 },
    /// A change of the auth store (users, roles, permissions, enable/disable).
    Auth(auth::AuthOp),
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Kv(b) => write!(f, "Kv({} bytes)", b.len()),
            Request::PublishMember { id, name, .. } => write!(f, "PublishMember({id:x}, {name})"),
            Request::Alarm { activate, member_id, alarm } => write!(f, "Alarm({member_id:x}, {alarm}, activate={activate})"),
            Request::Auth(op) => write!(f, "Auth({})", op.name()),
        }
    }
}

/// A membership change, executed by the leader (followers forward it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    AddMember { peer_urls: Vec<String>, is_learner: bool },
    RemoveMember { id: MemberId },
    PromoteMember { id: MemberId },
    UpdateMember { id: MemberId, peer_urls: Vec<String> },
}

/// A member as a membership change reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: MemberId,
    pub peer_urls: Vec<String>,
    pub is_learner: bool,
}

/// What applying one [`Request`] produced: a prost-encoded `rampartpb::ForwardReply`, or the
/// client-visible error. Encoded because the same bytes travel back to a follower that forwarded
/// the write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(pub Result<Vec<u8>, rampart_core::EtcdError>);
