//! Every limit in one place. Units are last in the names.

/// etcd's `--max-request-bytes` default: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// etcd's `--max-txn-ops` default.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// gRPC receive limit: the request limit plus etcd's 512 KiB of framing slack, so an oversized
/// request reaches our handler and gets etcd's "request is too large" instead of a transport error.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// Slack of the JSON gateway's body limit over the base64 size of the largest gRPC request: field
/// names, quoting and whitespace. The limit itself is 4/3 of the gRPC receive limit (bytes travel
/// as base64 in JSON), so every request gRPC accepts is accepted as JSON too.
pub const GATEWAY_JSON_OVERHEAD_BYTES: usize = 64 * 1024;
/// Requests of a gateway stream (Watch, LeaseKeepAlive) decoded ahead of the service reading them.
pub const GATEWAY_STREAM_BUFFER_REQUESTS: usize = 16;
/// Longest the gateway's `/health` waits for a linearizable read (etcd 3.4 waits up to a second).
pub const GATEWAY_HEALTH_TIMEOUT_MS: u64 = 1_000;
/// gRPC send limit for responses (etcd uses math.MaxInt32).
pub const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;
/// Largest number of entries the raft log keeps before a snapshot lets it be purged.
pub const SNAPSHOT_LOG_ENTRIES: u64 = 10_000;
/// Entries kept in the log behind a snapshot, so a briefly lagging follower catches up from the
/// log instead of needing the whole snapshot.
pub const SNAPSHOT_KEEP_ENTRIES: u64 = 5_000;
/// Largest raft log segment file before a new one is started.
pub const LOG_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Zeros the raft log keeps written ahead of its records, by a thread of its own, so an
/// append's `fdatasync` writes only the records: ~150 µs here, against ~200 into `fallocate`d
/// space and ~260 at the end of the file (docs/performance.md, findings 31 and 33). Small, so a
/// nearly full disk is not eaten by it.
pub const LOG_ZERO_AHEAD_BYTES: u64 = 4 * 1024 * 1024;
/// The raft log writes no new zeros ahead while its syncs average more record bytes than this:
/// the zeros cost as much disk bandwidth as the records, and a big sync gains little from them.
/// With 8 KiB values from 256 clients (syncs of hundreds of KiB) they added a third to the disk's
/// writes and took 10% off throughput (finding 33); syncs at put-64 carry 3-8 KiB.
pub const LOG_ZERO_AHEAD_MAX_SYNC_BYTES: u64 = 64 * 1024;
/// A raft log sync (the write of its buffered records and their `fdatasync`) that takes longer is
/// logged as a warning. etcd warns at 1 s; this is below the default election timeout, so a
/// member's log says when its disk was slow enough to matter for elections (bug 14 in
/// docs/robustness.md).
pub const SLOW_LOG_SYNC_MS: u64 = 100;
/// An apply batch with more command bytes than this runs off the member's runtime workers
/// (`block_in_place`), like a durable commit: writing it takes long enough to hold up raft's
/// heartbeats and timers on that worker (bug 14 in docs/robustness.md). Smaller batches, the
/// common case, run inline, which costs no thread hand-off.
pub const APPLY_INLINE_MAX_BYTES: usize = 256 * 1024;
/// A member warns when a task of its runtime waited this long for a worker: raft's heartbeats
/// and election timers waited as long (bug 14 in docs/robustness.md).
pub const RUNTIME_STALL_WARN_MS: u64 = 100;
/// Longest a client request waits for its proposal to be committed and applied.
pub const REQUEST_TIMEOUT_MS: u64 = 7_000;
/// Most writes a follower forwards to the leader in one call (see rampart-server's `forward`).
pub const FORWARD_BATCH_REQUESTS: usize = 256;
/// Most request bytes in one forwarded batch (a single larger write still goes, alone).
pub const FORWARD_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Forwarded batches in flight at once towards one leader; while all are out, writes queue up
/// and leave together in the next batch. Two rather than four: bigger batches, fewer appends and
/// fsyncs on the leader, 4% less member CPU per put at 64 clients and the same throughput
/// (docs/performance.md, finding 26); one measured the same as two but serializes a follower's
/// writes behind any one slow batch.
pub const FORWARD_BATCHES_IN_FLIGHT: usize = 2;
/// Writes waiting for a forwarded batch; a full queue makes new writes wait (backpressure).
pub const FORWARD_QUEUE_REQUESTS: usize = 4_096;
/// Default heartbeat interval (etcd's default is 100 ms). See ARCHITECTURE.md for the choice.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 50;
/// Default election timeout (etcd's default is 1000 ms): a follower campaigns after hearing no
/// leader for [E, 1.2 E). Ours is shorter to make the failover gap small; pre-vote and the leader
/// lease keep it stable. See ARCHITECTURE.md.
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 250;
/// Accepted peer connections told apart (pipe or gRPC) and waiting for the gRPC server.
pub const PEER_ACCEPT_QUEUE: usize = 64;
/// Most entries sent in one AppendEntries RPC.
pub const MAX_APPEND_ENTRIES: u64 = 256;
/// Apply commands the raft core may queue for the state machine worker before it waits for room
/// (openraft's `state_machine_channel_size`, 1,024 by default). A waiting core answers no
/// AppendEntries and sends no heartbeats, so a state machine that falls a few seconds behind (a
/// durable MVCC commit of large values on a busy disk) must not make it wait: with 1,024, such a
/// lag ended in an election (bug 14 in docs/robustness.md). Each command names a range of log
/// entries (the worker reads them from the log), so a full queue is a few MiB.
pub const STATE_MACHINE_QUEUE_COMMANDS: u64 = 65_536;
/// Most watches one Watch stream may hold (etcd has no limit); a create beyond it is answered
/// with a canceled create response naming the limit.
pub const MAX_WATCHES_PER_STREAM: usize = 4_096;
/// Watch responses queued for one Watch stream before its task waits for the client to read.
/// A watcher that falls further behind than the change feed's buffer replays from MVCC history.
pub const WATCH_STREAM_BUFFER_RESPONSES: usize = 64;
/// Most events read from MVCC history in one step while a watch catches up.
pub const WATCH_REPLAY_CHUNK_EVENTS: usize = 256;
/// Interval of the progress notifications sent to idle watches that asked for them (etcd's
/// default `--experimental-watch-progress-notify-interval`, 10 minutes), plus up to 10% jitter.
pub const WATCH_PROGRESS_INTERVAL_MS: u64 = 10 * 60 * 1000;
/// How often a watch stream checks that its synced watches have not missed changes the change
/// feed never carried (a raft snapshot installed on a lagging follower).
pub const WATCH_RESYNC_CHECK_MS: u64 = 1_000;
/// etcd's `--quota-backend-bytes` default: 2 GiB. Above it a member raises the NOSPACE alarm.
pub const DEFAULT_QUOTA_BACKEND_BYTES: i64 = 2 * 1024 * 1024 * 1024;
/// How often a member compares its store's size with the quota, besides after every applied write.
pub const QUOTA_CHECK_INTERVAL_MS: u64 = 1_000;
/// Page cache of a member's MVCC store (redb's default is 1 GiB). Recently used pages beyond it
/// are read from the file again (the kernel's page cache usually still holds them), so a member
/// holding a million keys does not keep its whole store twice in memory.
pub const MVCC_CACHE_BYTES: usize = 128 * 1024 * 1024;
/// Size of the chunks of a client snapshot stream (etcd's `snapshotSendBufferSize`).
pub const SNAPSHOT_SEND_CHUNK_BYTES: usize = 32 * 1024;
/// Longest a defragmentation waits for running reads (a snapshot being sent) to finish.
pub const DEFRAG_WAIT_MS: u64 = 10_000;
/// Longest MoveLeader waits for the target to take over.
pub const MOVE_LEADER_TIMEOUT_MS: u64 = 5_000;
/// Longest a leader that is asked to stop (SIGTERM) waits for a follower to take over first.
pub const STOP_LEADER_TRANSFER_MS: u64 = 2_000;
/// etcd's `MaxLeaseTTL`: a LeaseGrant asking for more seconds is refused ("too large lease TTL").
pub const MAX_LEASE_TTL_S: i64 = 9_000_000_000;
/// Most expired leases the leader revokes per second (etcd's `leaseRevokeRate`), so a pile of
/// leases expiring together does not flood the log.
pub const LEASE_REVOKE_PER_S: usize = 1_000;
/// How often the leader looks for expired leases (etcd checks every 500 ms).
pub const LEASE_EXPIRY_TICK_MS: u64 = 250;
/// How long the leader waits for the revoke of an expired lease before proposing it again
/// (etcd's `expiredLeaseRetryInterval`).
pub const LEASE_REVOKE_RETRY_MS: u64 = 3_000;
