//! Compile-time check of the public paths other crates rely on. If codegen
//! naming changes, this fails to build.

#![allow(unused_imports, dead_code)]

use rampart_proto::etcdserverpb::{
    auth_client::AuthClient,
    auth_server::{Auth, AuthServer},
    cluster_client::ClusterClient,
    cluster_server::{Cluster, ClusterServer},
    kv_client::KvClient,
    kv_server::{Kv, KvServer},
    lease_client::LeaseClient,
    lease_server::{Lease, LeaseServer},
    maintenance_client::MaintenanceClient,
    maintenance_server::{Maintenance, MaintenanceServer},
    watch_client::WatchClient,
    watch_server::{Watch, WatchServer},
};
use rampart_proto::rampartpb::{
    peer_client::PeerClient,
    peer_server::{Peer, PeerServer},
};
use rampart_proto::v3electionpb::{
    election_client::ElectionClient,
    election_server::{Election, ElectionServer},
};
use rampart_proto::v3lockpb::{
    lock_client::LockClient,
    lock_server::{Lock, LockServer},
};

#[test]
fn oneof_and_enum_paths() {
    use rampart_proto::etcdserverpb as pb;
    use rampart_proto::rampartpb as rp;

    let _ = rp::Command {
        request: Some(rp::command::Request::Put(pb::PutRequest::default())),
    };
    let _ = rp::ForwardReply {
        response: Some(rp::forward_reply::Response::Put(pb::PutResponse::default())),
    };
    let _ = pb::RequestOp {
        request: Some(pb::request_op::Request::RequestTxn(
            pb::TxnRequest::default(),
        )),
    };
    let _ = pb::ResponseOp {
        response: Some(pb::response_op::Response::ResponseRange(
            pb::RangeResponse::default(),
        )),
    };
    let _ = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    };
    let _ = pb::compare::TargetUnion::Value(vec![]);
    let _ = pb::AlarmType::Nospace;
    let _ = pb::alarm_request::AlarmAction::Activate;
    let _ = pb::watch_create_request::FilterType::Nodelete;
    let _ = pb::downgrade_request::DowngradeAction::Enable;
    let _ = rampart_proto::mvccpb::event::EventType::Put;
    let _ = rampart_proto::authpb::permission::Type::Readwrite;
    assert_eq!(pb::compare::CompareResult::NotEqual as i32, 3);
}
