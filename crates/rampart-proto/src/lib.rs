//! Rampart's wire types: etcd v3-compatible protobuf messages and gRPC
//! services, plus Rampart's own internal messages.
//!
//! The `.proto` sources live in `proto/` of this crate and are Rampart's own
//! files. Every etcd-facing message, field name, field number, enum value and
//! RPC matches etcd 3.5, so unmodified etcd clients can talk to a Rampart
//! server. They are compiled at build time by `protox` (no system `protoc`
//! needed) and turned into Rust by `prost` / `tonic`.
//!
//! Modules, one per protobuf package (flat, so that generated paths such as
//! `super::mvccpb::KeyValue` resolve):
//!
//! * [`mvccpb`] – `KeyValue`, `Event`.
//! * [`authpb`] – `User`, `Role`, `Permission`, `UserAddOptions`.
//! * [`etcdserverpb`] – the KV, Watch, Lease, Cluster, Maintenance and Auth
//!   services and their messages.
//! * [`v3electionpb`] – the Election service.
//! * [`v3lockpb`] – the Lock service.
//! * [`rampartpb`] – Rampart-internal messages (raft log `Command`) and the
//!   member-to-member `Peer` service.
//!
//! And one module that is not generated: [`wire`], the TCP stream wrapper that
//! makes h2 batch small frames into one write, used by a member's client
//! listeners and by the load generator.
//!
//! For each service `Foo` there is a `foo_server` module (trait `Foo`, tower
//! service `FooServer`) and a `foo_client` module (`FooClient`).

pub mod wire;

macro_rules! proto_module {
    ($(#[$doc:meta])* $name:ident, $package:literal) => {
        $(#[$doc])*
        #[allow(
            missing_docs,
            clippy::all,
            clippy::pedantic,
            clippy::nursery,
            rustdoc::all
        )]
        pub mod $name {
            tonic::include_proto!($package);
        }
    };
}

proto_module!(
    /// etcd package `mvccpb`: stored key-value pairs and watch events.
    mvccpb,
    "mvccpb"
);
proto_module!(
    /// etcd package `authpb`: users, roles and permissions.
    authpb,
    "authpb"
);
proto_module!(
    /// etcd package `etcdserverpb`: the etcd v3 client API.
    etcdserverpb,
    "etcdserverpb"
);
proto_module!(
    /// etcd package `v3electionpb`: the Election service.
    v3electionpb,
    "v3electionpb"
);
proto_module!(
    /// etcd package `v3lockpb`: the Lock service.
    v3lockpb,
    "v3lockpb"
);
proto_module!(
    /// Package `rampartpb`: Rampart-internal messages and the `Peer` service.
    rampartpb,
    "rampartpb"
);

/// Encoded `google.protobuf.FileDescriptorSet` of every `.proto` file in this
/// crate (with imports and source info), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rampart_descriptor.bin"));
