//! Byte-exact encoding checks. The expected bytes are worked out by hand from
//! etcd's field numbers and protobuf wire types (tag = number << 3 | type;
//! type 0 = varint, 2 = length-delimited), so a wrong number or type in our
//! .proto files shows up here.

use prost::Message;
use rampart_proto::etcdserverpb::{
    compare, range_request, request_op, watch_request, Compare, Member, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use rampart_proto::mvccpb::{event, Event, KeyValue};
use rampart_proto::rampartpb::{command, Command};

#[test]
fn put_request_bytes() {
    let req = PutRequest {
        key: b"foo".to_vec(),
        value: b"bar".to_vec(),
        lease: 5,
        prev_kv: true,
        ..Default::default()
    };
    let expected: &[u8] = &[
        0x0a, 0x03, b'f', b'o', b'o', // 1: key, bytes
        0x12, 0x03, b'b', b'a', b'r', // 2: value, bytes
        0x18, 0x05, // 3: lease, varint 5
        0x20, 0x01, // 4: prev_kv, true
    ];
    assert_eq!(req.encode_to_vec(), expected);
    assert_eq!(PutRequest::decode(expected).unwrap(), req);

    // 5: ignore_value, 6: ignore_lease
    let req = PutRequest {
        ignore_value: true,
        ignore_lease: true,
        ..Default::default()
    };
    assert_eq!(req.encode_to_vec(), [0x28, 0x01, 0x30, 0x01]);
}

#[test]
fn range_request_bytes() {
    let req = RangeRequest {
        key: b"a".to_vec(),
        range_end: b"b".to_vec(),
        limit: 10,
        revision: 300,
        sort_order: range_request::SortOrder::Descend as i32,
        sort_target: range_request::SortTarget::Mod as i32,
        serializable: true,
        keys_only: true,
        count_only: true,
        min_mod_revision: 7,
        max_mod_revision: 8,
        min_create_revision: 9,
        max_create_revision: 11,
    };
    let expected: &[u8] = &[
        0x0a, 0x01, b'a', // 1: key
        0x12, 0x01, b'b', // 2: range_end
        0x18, 0x0a, // 3: limit 10
        0x20, 0xac, 0x02, // 4: revision 300 = 0b10_0101100
        0x28, 0x02, // 5: sort_order DESCEND
        0x30, 0x03, // 6: sort_target MOD
        0x38, 0x01, // 7: serializable
        0x40, 0x01, // 8: keys_only
        0x48, 0x01, // 9: count_only
        0x50, 0x07, // 10: min_mod_revision
        0x58, 0x08, // 11: max_mod_revision
        0x60, 0x09, // 12: min_create_revision
        0x68, 0x0b, // 13: max_create_revision
    ];
    assert_eq!(req.encode_to_vec(), expected);
    assert_eq!(RangeRequest::decode(expected).unwrap(), req);
}

#[test]
fn compare_bytes() {
    // Decoding hand-made bytes does not depend on the encoder's field order.
    let bytes: &[u8] = &[
        0x08, 0x03, // 1: result NOT_EQUAL
        0x10, 0x02, // 2: target MOD
        0x1a, 0x01, b'k', // 3: key
        0x30, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0x01, // 6: mod_revision -1
        0x82, 0x04, 0x01, b'z', // 64: range_end (tag 514 = varint 0x82 0x04)
    ];
    let cmp = Compare::decode(bytes).unwrap();
    assert_eq!(
        cmp,
        Compare {
            result: compare::CompareResult::NotEqual as i32,
            target: compare::CompareTarget::Mod as i32,
            key: b"k".to_vec(),
            range_end: b"z".to_vec(),
            target_union: Some(compare::TargetUnion::ModRevision(-1)),
        }
    );
    assert_eq!(cmp.encoded_len(), bytes.len());

    // Oneof members 4..8.
    for (tag, want) in [
        (0x20u8, compare::TargetUnion::Version(1)),
        (0x28, compare::TargetUnion::CreateRevision(1)),
        (0x30, compare::TargetUnion::ModRevision(1)),
        (0x40, compare::TargetUnion::Lease(1)),
    ] {
        let c = Compare::decode(&[tag, 0x01][..]).unwrap();
        assert_eq!(c.target_union, Some(want));
    }
    let c = Compare::decode(&[0x3a, 0x01, b'v'][..]).unwrap();
    assert_eq!(
        c.target_union,
        Some(compare::TargetUnion::Value(b"v".to_vec()))
    );
}

#[test]
fn txn_and_watch_bytes() {
    let txn = TxnRequest {
        compare: vec![],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })),
        }],
    };
    let expected: &[u8] = &[
        0x12, 0x05, // 2: success[0], 5 bytes
        0x12, 0x03, 0x0a, 0x01, b'k', // RequestOp 2: request_put { 1: key }
        0x1a, 0x05, // 3: failure[0]
        0x0a, 0x03, 0x0a, 0x01, b'k', // RequestOp 1: request_range { 1: key }
    ];
    assert_eq!(txn.encode_to_vec(), expected);

    let watch = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"k".to_vec(),
                filters: vec![1],
                watch_id: 3,
                fragment: true,
                ..Default::default()
            },
        )),
    };
    let expected: &[u8] = &[
        0x0a, 0x0a, // 1: create_request, 10 bytes
        0x0a, 0x01, b'k', // 1: key
        0x2a, 0x01, 0x01, // 5: filters, packed [NODELETE]
        0x38, 0x03, // 7: watch_id
        0x40, 0x01, // 8: fragment
    ];
    assert_eq!(watch.encode_to_vec(), expected);
}

#[test]
fn mvcc_and_member_bytes() {
    let ev = Event {
        r#type: event::EventType::Delete as i32,
        kv: Some(KeyValue {
            key: b"k".to_vec(),
            create_revision: 2,
            mod_revision: 3,
            version: 4,
            value: b"v".to_vec(),
            lease: 6,
        }),
        prev_kv: None,
    };
    let expected: &[u8] = &[
        0x08, 0x01, // 1: type DELETE
        0x12, 0x0e, // 2: kv, 14 bytes
        0x0a, 0x01, b'k', 0x10, 0x02, 0x18, 0x03, 0x20, 0x04, 0x2a, 0x01, b'v', 0x30, 0x06,
    ];
    assert_eq!(ev.encode_to_vec(), expected);

    let m = Member {
        id: 1,
        name: "n".into(),
        peer_ur_ls: vec!["p".into()],
        client_ur_ls: vec!["c".into()],
        is_learner: true,
    };
    let expected: &[u8] = &[
        0x08, 0x01, // 1: ID
        0x12, 0x01, b'n', // 2: name
        0x1a, 0x01, b'p', // 3: peerURLs
        0x22, 0x01, b'c', // 4: clientURLs
        0x28, 0x01, // 5: isLearner
    ];
    assert_eq!(m.encode_to_vec(), expected);
}

#[test]
fn internal_command_bytes() {
    let cmd = Command {
        request: Some(command::Request::Put(PutRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })),
    };
    assert_eq!(cmd.encode_to_vec(), [0x0a, 0x03, 0x0a, 0x01, b'k']);
    assert_eq!(
        Command::decode(&[0x0a, 0x03, 0x0a, 0x01, b'k'][..]).unwrap(),
        cmd
    );
}
