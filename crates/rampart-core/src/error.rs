//! Client-visible errors, with etcd's exact gRPC codes and messages.
//!
//! Every layer returns these for failures a client caused or must see; the API edge converts them
//! to the wire in one place (`rampart-server::api::status`). The strings are etcd's
//! (`api/v3rpc/rpctypes/error.go`): etcdctl, Patroni and client libraries match on them.

/// The gRPC status code an error travels with. Mirrors `tonic::Code` without depending on tonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Unauthenticated,
    PermissionDenied,
    DataLoss,
    Internal,
    Unimplemented,
    /// What a Go error that is not a gRPC status travels as (etcd's election errors).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum EtcdError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: request timed out, possibly due to previous leader failure")]
    TimeoutDueToLeaderFail,
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: member ID already exist")]
    MemberExist,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExist,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStarted,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// Not an etcd value: an unknown enum number or similar malformed field. etcd answers these
    /// with InvalidArgument too.
    #[error("{0}")]
    InvalidArgument(String),
    /// A feature this build does not have yet. Says so plainly rather than pretending.
    #[error("rampart: not implemented: {0}")]
    Unimplemented(String),
    /// A bug or a storage failure on this member. The text goes to the client and to the log.
    #[error("{0}")]
    Internal(String),
    // New values go last: the enum travels between members postcard-encoded, by variant index.
    /// etcd has no gRPC code of its own for this one (it travels as Unknown); Unavailable says
    /// "try again", which is what the client should do.
    #[error("etcdserver: request timed out, leader transfer took too long")]
    TimeoutLeaderTransfer,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// v3election: the leader key given is no longer the election's leader (etcd's
    /// `concurrency.ErrElectionNotLeader`, sent as a plain Go error: gRPC Unknown).
    #[error("election: not leader")]
    ElectionNotLeader,
    /// v3election: nobody leads the election (`concurrency.ErrElectionNoLeader`).
    #[error("election: no leader")]
    ElectionNoLeader,
    /// v3election: Proclaim or Resign without a leader key (`v3election.ErrMissingLeaderKey`).
    #[error("\"leader\" field must be provided")]
    MissingLeaderKey,
    // Auth (etcd's rpctypes), in etcd's order.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
}

impl EtcdError {
    pub fn code(&self) -> Code {
        use EtcdError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge | MemberBadUrls | InvalidArgument(_) => Code::InvalidArgument,
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            NoSpace => Code::ResourceExhausted,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            NotLeader | BadLeaderTransferee | LeaseExist | MemberExist | PeerUrlExist | MemberNotLearner | LearnerNotReady
            | NotEnoughStarted => Code::FailedPrecondition,
            NoLeader | LeaderChanged | Stopped | Timeout | TimeoutDueToLeaderFail | TimeoutLeaderTransfer => {
                Code::Unavailable
            }
            Corrupt => Code::DataLoss,
            Unimplemented(_) => Code::Unimplemented,
            Internal(_) => Code::Internal,
            ElectionNotLeader | ElectionNoLeader | MissingLeaderKey => Code::Unknown,
            UserEmpty | RoleEmpty | AuthFailed | InvalidAuthMgmt | PermissionNotGiven => Code::InvalidArgument,
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound | RoleAlreadyExist | RoleNotFound
            | RoleNotGranted | PermissionNotGranted | AuthNotEnabled => Code::FailedPrecondition,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        EtcdError::Internal(e.to_string())
    }
}
