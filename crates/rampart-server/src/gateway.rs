//! etcd's JSON gateway (grpc-gateway, etcd 3.4's `/v3/...` paths), `/version` and `/health`,
//! served on the client port beside gRPC.
//!
//! Each path calls the same service method gRPC does (the structs in `api`, `lease`, `watch`,
//! `maintenance`, `concurrency`), so both speak with one behaviour. Messages are converted by
//! reflection over our descriptor set (`prost-reflect`), with grpc-gateway's proto3 JSON as etcd
//! 3.4 configures it: field names as in the `.proto` (`OrigName`), 64-bit integers as strings,
//! bytes as base64, enums by name, default values left out; on input, names or numbers for enums
//! and strings or numbers for integers, unknown fields ignored.
//!
//! Unary calls answer the response message; streams (Watch, LeaseKeepAlive, Snapshot, Observe)
//! answer one `{"result":...}` per line, and an error ends them with `{"error":{...}}`. The body
//! of a client-streaming call is a sequence of request objects, fed to the service as they
//! arrive; its end is the end of the client's stream (a watch stays open after it, as in etcd).
//!
//! This module is, with `api`, the only one that builds wire errors: every `tonic::Status` from a
//! service becomes grpc-gateway's error JSON in [`error_response`] and [`error_line`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, Request as HttpRequest, StatusCode};
use axum::response::Response as HttpResponse;
use futures::{Stream, StreamExt};
use openraft::type_config::async_runtime::WatchReceiver;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};
use rampart_core::limits;
use rampart_proto::etcdserverpb::auth_server::Auth;
use rampart_proto::etcdserverpb::cluster_server::Cluster;
use rampart_proto::etcdserverpb::kv_server::Kv;
use rampart_proto::wire;
use rampart_proto::etcdserverpb::lease_server::Lease;
use rampart_proto::etcdserverpb::maintenance_server::Maintenance;
use rampart_proto::etcdserverpb::watch_server::Watch;
use rampart_proto::v3electionpb::election_server::Election;
use rampart_proto::v3lockpb::lock_server::Lock;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status, Streaming};

use crate::api::{ClusterService, KvService, ETCD_VERSION};
use crate::auth::AuthService;
use crate::concurrency::{ElectionService, LockService};
use crate::lease::LeaseService;
use crate::maintenance::MaintenanceService;
use crate::member::{Member, StartError};
use crate::watch::WatchService;

/// Every gateway path and the gRPC method (`package.Service/Method`) it calls: etcd's
/// `google.api.http` annotations (3.4, plus 3.5's `hashkv`), with etcd's `/v3/kv/lease/...`
/// aliases. A path added here needs its arm in [`Gateway::dispatch`].
const ROUTES: &[(&str, &str)] = &[
    ("/v3/kv/range", "etcdserverpb.KV/Range"),
    ("/v3/kv/put", "etcdserverpb.KV/Put"),
    ("/v3/kv/deleterange", "etcdserverpb.KV/DeleteRange"),
    ("/v3/kv/txn", "etcdserverpb.KV/Txn"),
    ("/v3/kv/compaction", "etcdserverpb.KV/Compact"),
    ("/v3/watch", "etcdserverpb.Watch/Watch"),
    ("/v3/lease/grant", "etcdserverpb.Lease/LeaseGrant"),
    ("/v3/lease/revoke", "etcdserverpb.Lease/LeaseRevoke"),
    ("/v3/kv/lease/revoke", "etcdserverpb.Lease/LeaseRevoke"),
    ("/v3/lease/keepalive", "etcdserverpb.Lease/LeaseKeepAlive"),
    ("/v3/lease/timetolive", "etcdserverpb.Lease/LeaseTimeToLive"),
    ("/v3/kv/lease/timetolive", "etcdserverpb.Lease/LeaseTimeToLive"),
    ("/v3/lease/leases", "etcdserverpb.Lease/LeaseLeases"),
    ("/v3/kv/lease/leases", "etcdserverpb.Lease/LeaseLeases"),
    ("/v3/cluster/member/add", "etcdserverpb.Cluster/MemberAdd"),
    ("/v3/cluster/member/remove", "etcdserverpb.Cluster/MemberRemove"),
    ("/v3/cluster/member/update", "etcdserverpb.Cluster/MemberUpdate"),
    ("/v3/cluster/member/list", "etcdserverpb.Cluster/MemberList"),
    ("/v3/cluster/member/promote", "etcdserverpb.Cluster/MemberPromote"),
    ("/v3/maintenance/alarm", "etcdserverpb.Maintenance/Alarm"),
    ("/v3/maintenance/status", "etcdserverpb.Maintenance/Status"),
    ("/v3/maintenance/defragment", "etcdserverpb.Maintenance/Defragment"),
    ("/v3/maintenance/hash", "etcdserverpb.Maintenance/Hash"),
    ("/v3/maintenance/hashkv", "etcdserverpb.Maintenance/HashKV"),
    ("/v3/maintenance/snapshot", "etcdserverpb.Maintenance/Snapshot"),
    ("/v3/maintenance/transfer-leadership", "etcdserverpb.Maintenance/MoveLeader"),
    ("/v3/lock/lock", "v3lockpb.Lock/Lock"),
    ("/v3/lock/unlock", "v3lockpb.Lock/Unlock"),
    ("/v3/election/campaign", "v3electionpb.Election/Campaign"),
    ("/v3/election/proclaim", "v3electionpb.Election/Proclaim"),
    ("/v3/election/leader", "v3electionpb.Election/Leader"),
    ("/v3/election/observe", "v3electionpb.Election/Observe"),
    ("/v3/election/resign", "v3electionpb.Election/Resign"),
    ("/v3/auth/enable", "etcdserverpb.Auth/AuthEnable"),
    ("/v3/auth/disable", "etcdserverpb.Auth/AuthDisable"),
    ("/v3/auth/status", "etcdserverpb.Auth/AuthStatus"),
    ("/v3/auth/authenticate", "etcdserverpb.Auth/Authenticate"),
    ("/v3/auth/user/add", "etcdserverpb.Auth/UserAdd"),
    ("/v3/auth/user/get", "etcdserverpb.Auth/UserGet"),
    ("/v3/auth/user/list", "etcdserverpb.Auth/UserList"),
    ("/v3/auth/user/delete", "etcdserverpb.Auth/UserDelete"),
    ("/v3/auth/user/changepw", "etcdserverpb.Auth/UserChangePassword"),
    ("/v3/auth/user/grant", "etcdserverpb.Auth/UserGrantRole"),
    ("/v3/auth/user/revoke", "etcdserverpb.Auth/UserRevokeRole"),
    ("/v3/auth/role/add", "etcdserverpb.Auth/RoleAdd"),
    ("/v3/auth/role/get", "etcdserverpb.Auth/RoleGet"),
    ("/v3/auth/role/list", "etcdserverpb.Auth/RoleList"),
    ("/v3/auth/role/delete", "etcdserverpb.Auth/RoleDelete"),
    ("/v3/auth/role/grant", "etcdserverpb.Auth/RoleGrantPermission"),
    ("/v3/auth/role/revoke", "etcdserverpb.Auth/RoleRevokePermission"),
];

/// The gRPC metadata a gateway request carries: its `Authorization` header (the auth token, as
/// etcd's gateway passes it on; see `auth::TOKEN_METADATA_GATEWAY`).
fn metadata(headers: &header::HeaderMap) -> MetadataMap {
    let mut md = MetadataMap::new();
    if let Some(token) = headers.get(header::AUTHORIZATION).and_then(|v| MetadataValue::try_from(v.as_bytes()).ok()) {
        md.insert(crate::auth::TOKEN_METADATA_GATEWAY, token);
    }
    md
}

fn request<T>(message: T, md: &MetadataMap) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    *r.metadata_mut() = md.clone();
    r
}

/// grpc-gateway's proto3 JSON as etcd 3.4 sets it up (`JSONPb{OrigName: true}`).
const JSON_OUT: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .stringify_64_bit_integers(true)
    .skip_default_fields(true)
    .use_enum_numbers(false);

/// Unknown fields are dropped before decoding (see [`drop_unknown_fields`]), so what this refuses
/// is an unknown enum name, as grpc-gateway does.
const JSON_IN: DeserializeOptions = DeserializeOptions::new().deny_unknown_fields(true);

/// CORS headers as etcd sends them with its default `--cors=*`, so browser clients work alike.
const CORS: &[(&str, &str)] = &[
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "POST, GET, OPTIONS, PUT, DELETE"),
    ("access-control-allow-headers", "accept, content-type, authorization"),
];

/// The request and response types of one gRPC method, from our descriptor set.
struct Rpc {
    method: &'static str,
    input: MessageDescriptor,
    output: MessageDescriptor,
}

/// Resolves [`ROUTES`] against the descriptor set: path → method.
fn resolve_routes(pool: &DescriptorPool) -> Result<HashMap<&'static str, Arc<Rpc>>, String> {
    let mut routes = HashMap::new();
    for (path, method) in ROUTES {
        let (service, name) = method.split_once('/').ok_or_else(|| format!("gateway route {path}: bad method {method}"))?;
        let m = pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == name))
            .ok_or_else(|| format!("gateway route {path}: no method {method} in the descriptor set"))?;
        routes.insert(*path, Arc::new(Rpc { method, input: m.input(), output: m.output() }));
    }
    Ok(routes)
}

/// The services the gateway calls: the same ones the gRPC server serves.
pub struct Services {
    pub kv: KvService,
    pub lease: LeaseService,
    pub cluster: ClusterService,
    pub maintenance: MaintenanceService,
    pub watch: WatchService,
    pub lock: LockService,
    pub election: ElectionService,
    pub auth: AuthService,
}

/// The gateway's paths resolved against our descriptor set: loaded once, before the member
/// opens, so a broken table stops the start before any state is touched.
#[derive(Clone)]
pub struct Routes(Arc<HashMap<&'static str, Arc<Rpc>>>);

impl Routes {
    pub fn load() -> Result<Routes, StartError> {
        let pool = DescriptorPool::decode(rampart_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| StartError::Unsupported(format!("gateway: descriptor set: {e}")))?;
        Ok(Routes(Arc::new(resolve_routes(&pool).map_err(StartError::Unsupported)?)))
    }
}

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    member: Arc<Member>,
    svc: Services,
    routes: Routes,
    /// The gRPC receive limit: no request the gRPC port would refuse for size gets through here.
    max_message: usize,
    /// The largest JSON body (one request object of a stream) read.
    max_body: usize,
}

impl Gateway {
    pub fn new(member: Arc<Member>, svc: Services, routes: Routes) -> Gateway {
        let max_message = member.cfg.max_request_bytes + limits::GRPC_OVERHEAD_BYTES;
        let max_body = max_message.div_ceil(3) * 4 + limits::GATEWAY_JSON_OVERHEAD_BYTES;
        Gateway { inner: Arc::new(Inner { member, svc, routes, max_message, max_body }) }
    }

    /// `grpc` (tonic's router of the gRPC services) with the gateway's paths added. Requests for
    /// other paths go to gRPC's "unimplemented" if they are gRPC, else get a plain 404.
    pub fn add_to(self, grpc: tonic::service::Routes) -> tonic::service::Routes {
        let gw = self.clone();
        let version = |req: HttpRequest<Body>| async move { version(req.method()) };
        let health = self.clone();
        let router = grpc
            .into_axum_router()
            .route("/v3/{*path}", axum::routing::any(move |req| async move { gw.handle(req).await }))
            .route("/version", axum::routing::any(version))
            .route("/health", axum::routing::any(move |req: HttpRequest<Body>| async move { health.health(req.method()).await }))
            .fallback(fallback);
        tonic::service::Routes::from(router)
    }

    async fn handle(&self, req: HttpRequest<Body>) -> HttpResponse {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        // As grpc-gateway: a path is looked up first (404), then the method (405).
        let Some(rpc) = self.inner.routes.0.get(path.as_str()).cloned() else {
            return plain(StatusCode::NOT_FOUND, "Not Found\n");
        };
        match method {
            Method::POST => {
                let md = metadata(req.headers());
                self.dispatch(&rpc, &md, req.into_body()).await
            }
            Method::OPTIONS => preflight(),
            _ => plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n"),
        }
    }

    /// Calls the service method of `rpc` with the request in `body`.
    async fn dispatch(&self, rpc: &Rpc, md: &MetadataMap, body: Body) -> HttpResponse {
        let s = &self.inner.svc;
        match rpc.method {
            "etcdserverpb.KV/Range" => self.unary(rpc, md, body, |r| s.kv.range(r)).await,
            "etcdserverpb.KV/Put" => self.unary(rpc, md, body, |r| s.kv.put(r)).await,
            "etcdserverpb.KV/DeleteRange" => self.unary(rpc, md, body, |r| s.kv.delete_range(r)).await,
            "etcdserverpb.KV/Txn" => self.unary(rpc, md, body, |r| s.kv.txn(r)).await,
            "etcdserverpb.KV/Compact" => self.unary(rpc, md, body, |r| s.kv.compact(r)).await,
            "etcdserverpb.Watch/Watch" => self.bidi(rpc, md, body, |r| s.watch.watch(r)).await,
            "etcdserverpb.Lease/LeaseGrant" => self.unary(rpc, md, body, |r| s.lease.lease_grant(r)).await,
            "etcdserverpb.Lease/LeaseRevoke" => self.unary(rpc, md, body, |r| s.lease.lease_revoke(r)).await,
            "etcdserverpb.Lease/LeaseKeepAlive" => self.bidi(rpc, md, body, |r| s.lease.lease_keep_alive(r)).await,
            "etcdserverpb.Lease/LeaseTimeToLive" => self.unary(rpc, md, body, |r| s.lease.lease_time_to_live(r)).await,
            "etcdserverpb.Lease/LeaseLeases" => self.unary(rpc, md, body, |r| s.lease.lease_leases(r)).await,
            "etcdserverpb.Cluster/MemberAdd" => self.unary(rpc, md, body, |r| s.cluster.member_add(r)).await,
            "etcdserverpb.Cluster/MemberRemove" => self.unary(rpc, md, body, |r| s.cluster.member_remove(r)).await,
            "etcdserverpb.Cluster/MemberUpdate" => self.unary(rpc, md, body, |r| s.cluster.member_update(r)).await,
            "etcdserverpb.Cluster/MemberList" => self.unary(rpc, md, body, |r| s.cluster.member_list(r)).await,
            "etcdserverpb.Cluster/MemberPromote" => self.unary(rpc, md, body, |r| s.cluster.member_promote(r)).await,
            "etcdserverpb.Maintenance/Alarm" => self.unary(rpc, md, body, |r| s.maintenance.alarm(r)).await,
            "etcdserverpb.Maintenance/Status" => self.unary(rpc, md, body, |r| s.maintenance.status(r)).await,
            "etcdserverpb.Maintenance/Defragment" => self.unary(rpc, md, body, |r| s.maintenance.defragment(r)).await,
            "etcdserverpb.Maintenance/Hash" => self.unary(rpc, md, body, |r| s.maintenance.hash(r)).await,
            "etcdserverpb.Maintenance/HashKV" => self.unary(rpc, md, body, |r| s.maintenance.hash_kv(r)).await,
            "etcdserverpb.Maintenance/Snapshot" => self.server_stream(rpc, md, body, |r| s.maintenance.snapshot(r)).await,
            "etcdserverpb.Maintenance/MoveLeader" => self.unary(rpc, md, body, |r| s.maintenance.move_leader(r)).await,
            "v3lockpb.Lock/Lock" => self.unary(rpc, md, body, |r| s.lock.lock(r)).await,
            "v3lockpb.Lock/Unlock" => self.unary(rpc, md, body, |r| s.lock.unlock(r)).await,
            "v3electionpb.Election/Campaign" => self.unary(rpc, md, body, |r| s.election.campaign(r)).await,
            "v3electionpb.Election/Proclaim" => self.unary(rpc, md, body, |r| s.election.proclaim(r)).await,
            "v3electionpb.Election/Leader" => self.unary(rpc, md, body, |r| s.election.leader(r)).await,
            "v3electionpb.Election/Observe" => self.server_stream(rpc, md, body, |r| s.election.observe(r)).await,
            "v3electionpb.Election/Resign" => self.unary(rpc, md, body, |r| s.election.resign(r)).await,
            "etcdserverpb.Auth/AuthEnable" => self.unary(rpc, md, body, |r| s.auth.auth_enable(r)).await,
            "etcdserverpb.Auth/AuthDisable" => self.unary(rpc, md, body, |r| s.auth.auth_disable(r)).await,
            "etcdserverpb.Auth/AuthStatus" => self.unary(rpc, md, body, |r| s.auth.auth_status(r)).await,
            "etcdserverpb.Auth/Authenticate" => self.unary(rpc, md, body, |r| s.auth.authenticate(r)).await,
            "etcdserverpb.Auth/UserAdd" => self.unary(rpc, md, body, |r| s.auth.user_add(r)).await,
            "etcdserverpb.Auth/UserGet" => self.unary(rpc, md, body, |r| s.auth.user_get(r)).await,
            "etcdserverpb.Auth/UserList" => self.unary(rpc, md, body, |r| s.auth.user_list(r)).await,
            "etcdserverpb.Auth/UserDelete" => self.unary(rpc, md, body, |r| s.auth.user_delete(r)).await,
            "etcdserverpb.Auth/UserChangePassword" => self.unary(rpc, md, body, |r| s.auth.user_change_password(r)).await,
            "etcdserverpb.Auth/UserGrantRole" => self.unary(rpc, md, body, |r| s.auth.user_grant_role(r)).await,
            "etcdserverpb.Auth/UserRevokeRole" => self.unary(rpc, md, body, |r| s.auth.user_revoke_role(r)).await,
            "etcdserverpb.Auth/RoleAdd" => self.unary(rpc, md, body, |r| s.auth.role_add(r)).await,
            "etcdserverpb.Auth/RoleGet" => self.unary(rpc, md, body, |r| s.auth.role_get(r)).await,
            "etcdserverpb.Auth/RoleList" => self.unary(rpc, md, body, |r| s.auth.role_list(r)).await,
            "etcdserverpb.Auth/RoleDelete" => self.unary(rpc, md, body, |r| s.auth.role_delete(r)).await,
            "etcdserverpb.Auth/RoleGrantPermission" => self.unary(rpc, md, body, |r| s.auth.role_grant_permission(r)).await,
            "etcdserverpb.Auth/RoleRevokePermission" => self.unary(rpc, md, body, |r| s.auth.role_revoke_permission(r)).await,
            other => error_response(&Status::internal(format!("gateway: no handler for {other}"))),
        }
    }

    /// The first request object of `body` (an empty body is the default request, as in
    /// grpc-gateway; anything after the first object is ignored, as Go's decoder does).
    async fn read_request<Req: Message + Default>(&self, rpc: &Rpc, body: Body) -> Result<Req, Status> {
        let body = read_body(body, self.inner.max_body).await?;
        let mut values = serde_json::Deserializer::from_slice(&body).into_iter::<Value>();
        match values.next() {
            Some(Ok(v)) => decode(&rpc.input, self.inner.max_message, v),
            Some(Err(e)) => Err(malformed(e)),
            None => Ok(Req::default()),
        }
    }

    async fn unary<Req, Resp, F, Fut>(&self, rpc: &Rpc, md: &MetadataMap, body: Body, call: F) -> HttpResponse
    where
        Req: Message + Default,
        Resp: Message,
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let answer = async {
            let req = self.read_request::<Req>(rpc, body).await?;
            let resp = call(request(req, md)).await?.into_inner();
            proto_to_json(&rpc.output, &resp)
        };
        match answer.await {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(s) => error_response(&s),
        }
    }

    async fn server_stream<Req, Resp, S, F, Fut>(&self, rpc: &Rpc, md: &MetadataMap, body: Body, call: F) -> HttpResponse
    where
        Req: Message + Default,
        Resp: Message + 'static,
        S: Stream<Item = Result<Resp, Status>> + Send + 'static,
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<S>, Status>>,
    {
        let req = match self.read_request::<Req>(rpc, body).await {
            Ok(r) => r,
            Err(s) => return error_response(&s),
        };
        match call(request(req, md)).await {
            Ok(resp) => stream_response(rpc.output.clone(), resp.into_inner()),
            // grpc-gateway sees a failed call on its first receive: the stream's error line.
            Err(s) => stream_response(rpc.output.clone(), futures::stream::once(async move { Err::<Resp, _>(s) })),
        }
    }

    /// A client-streaming call: the body's request objects become the gRPC request stream.
    async fn bidi<Req, Resp, S, F, Fut>(&self, rpc: &Rpc, md: &MetadataMap, body: Body, call: F) -> HttpResponse
    where
        Req: Message + Default + Send + 'static,
        Resp: Message + 'static,
        S: Stream<Item = Result<Resp, Status>> + Send + 'static,
        F: FnOnce(tonic::Request<Streaming<Req>>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<S>, Status>>,
    {
        let mut reader = JsonReader::new(body, self.inner.max_body);
        // The first request is decoded before the call, as grpc-gateway does: a malformed one
        // is answered as an error of the call, not as a stream.
        let first = match reader.next().await {
            Ok(Some(v)) => match decode::<Req>(&rpc.input, self.inner.max_message, v) {
                Ok(r) => Some(r),
                Err(s) => return error_response(&s),
            },
            Ok(None) => None,
            Err(s) => return error_response(&s),
        };
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(limits::GATEWAY_STREAM_BUFFER_REQUESTS);
        if let Some(r) = first {
            // Cannot fail: the channel is new and its receiver alive.
            let _ = tx.send(Ok(wire::grpc_frame(&r))).await;
            let input = rpc.input.clone();
            let max_message = self.inner.max_message;
            let method = rpc.method;
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        v = reader.next() => v,
                        // The call ended (its stream is gone): stop reading the body.
                        _ = tx.closed() => return,
                    };
                    // A malformed later request ends the client's side of the stream, as in
                    // grpc-gateway; what the service still sends reaches the client.
                    let req = match next.and_then(|v| v.map(|v| decode::<Req>(&input, max_message, v)).transpose()) {
                        Ok(Some(r)) => r,
                        Ok(None) => return,
                        Err(s) => {
                            tracing::debug!(method, error = %s.message(), "gateway stream: bad request ends the client's stream");
                            return;
                        }
                    };
                    if tx.send(Ok(wire::grpc_frame(&req))).await.is_err() {
                        return;
                    }
                }
            });
        }
        // With no first request `tx` is dropped here: the client's stream is empty and closed.
        let requests = Streaming::new_request(
            tonic_prost::ProstDecoder::<Req>::default(),
            Body::from_stream(ReceiverStream::new(rx)),
            None,
            Some(self.inner.max_message),
        );
        match call(request(requests, md)).await {
            Ok(resp) => stream_response(rpc.output.clone(), resp.into_inner()),
            Err(s) => stream_response(rpc.output.clone(), futures::stream::once(async move { Err::<Resp, _>(s) })),
        }
    }

    /// etcd 3.4's `/health`: true when there is no alarm, there is a leader, and a linearizable
    /// read succeeds in time.
    async fn health(&self, method: &Method) -> HttpResponse {
        if method != Method::GET {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
        }
        let m = &self.inner.member;
        let has_leader = m.raft.metrics().borrow_watched().current_leader.is_some();
        let healthy = m.sm.cluster_meta().alarms.is_empty()
            && has_leader
            && matches!(
                tokio::time::timeout(Duration::from_millis(limits::GATEWAY_HEALTH_TIMEOUT_MS), m.read_barrier()).await,
                Ok(Ok(()))
            );
        let (code, body) = if healthy {
            (StatusCode::OK, r#"{"health":"true"}"#)
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#)
        };
        json_response(code, body.as_bytes().to_vec())
    }
}

fn version(method: &Method) -> HttpResponse {
    if method != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    }
    // etcd's `version.Versions`, in its field order.
    #[derive(Serialize)]
    struct Versions {
        etcdserver: &'static str,
        etcdcluster: &'static str,
    }
    let body = Versions { etcdserver: ETCD_VERSION, etcdcluster: ETCD_VERSION };
    json_response(StatusCode::OK, serde_json::to_vec(&body).unwrap_or_default())
}

/// Neither a gateway path nor a gRPC service: gRPC's "unimplemented" for gRPC clients (what
/// tonic's router answers), Go's 404 page for anything else (what etcd's HTTP mux answers).
async fn fallback(req: HttpRequest<Body>) -> HttpResponse {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        let (parts, ()) = Status::unimplemented("").into_http::<()>().into_parts();
        return HttpResponse::from_parts(parts, Body::empty());
    }
    plain(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// The answer to a CORS preflight.
fn preflight() -> HttpResponse {
    with_cors(HttpResponse::new(Body::empty()))
}

fn with_cors(mut resp: HttpResponse) -> HttpResponse {
    for (name, value) in CORS {
        resp.headers_mut().insert(*name, HeaderValue::from_static(value));
    }
    resp
}

fn plain(code: StatusCode, text: &'static str) -> HttpResponse {
    let mut resp = HttpResponse::new(Body::from(text));
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    with_cors(resp)
}

fn json_response(code: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = HttpResponse::new(Body::from(body));
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    with_cors(resp)
}

/// A stream of responses as grpc-gateway sends one: a `{"result":...}` line per message; an
/// error is the last line.
fn stream_response<Resp, S>(output: MessageDescriptor, stream: S) -> HttpResponse
where
    Resp: Message + 'static,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
{
    let lines = stream.scan(false, move |ended, item| {
        if *ended {
            return futures::future::ready(None);
        }
        let line = match item.and_then(|msg| proto_to_json(&output, &msg)) {
            Ok(json) => {
                let mut line = Vec::with_capacity(json.len() + 12);
                line.extend_from_slice(b"{\"result\":");
                line.extend_from_slice(&json);
                line.extend_from_slice(b"}\n");
                line
            }
            Err(s) => {
                *ended = true;
                error_line(&s)
            }
        };
        futures::future::ready(Some(Ok::<_, Infallible>(Bytes::from(line))))
    });
    json_response_body(Body::from_stream(lines))
}

fn json_response_body(body: Body) -> HttpResponse {
    let mut resp = HttpResponse::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    with_cors(resp)
}

/// The HTTP status grpc-gateway v1 (etcd 3.4's) gives a gRPC code (`runtime.HTTPStatusFromCode`).
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // etcd 3.4's grpc-gateway (v1.9) still maps this to 412; later v1 releases chose 400.
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// grpc-gateway's error body of a unary call (field order as it writes them).
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    code: i32,
}

/// grpc-gateway's error line of a stream: `{"error":{...}}`.
#[derive(Serialize)]
struct StreamErrorLine<'a> {
    error: StreamError<'a>,
}

#[derive(Serialize)]
struct StreamError<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

fn error_response(s: &Status) -> HttpResponse {
    let body = ErrorBody { error: s.message(), message: s.message(), code: s.code() as i32 };
    // Serializing a struct of strings and numbers cannot fail.
    json_response(http_status(s.code()), serde_json::to_vec(&body).unwrap_or_default())
}

fn error_line(s: &Status) -> Vec<u8> {
    let http = http_status(s.code());
    let error = StreamError {
        grpc_code: s.code() as i32,
        http_code: http.as_u16(),
        message: s.message(),
        http_status: http.canonical_reason().unwrap_or(""),
    };
    let mut line = serde_json::to_vec(&StreamErrorLine { error }).unwrap_or_default();
    line.push(b'\n');
    line
}

/// A JSON request object → request message `Req` (of descriptor `desc`), refused above the gRPC
/// receive limit `max_message` as the gRPC port refuses it.
fn decode<Req: Message + Default>(desc: &MessageDescriptor, max_message: usize, v: Value) -> Result<Req, Status> {
    let bytes = json_to_proto(desc, v)?;
    if bytes.len() > max_message {
        // grpc-go's answer to a message above its receive limit, which etcd's gateway relays.
        return Err(Status::resource_exhausted(format!(
            "grpc: received message larger than max ({} vs. {max_message})",
            bytes.len()
        )));
    }
    Req::decode(bytes.as_slice()).map_err(|e| Status::internal(format!("gateway: {} re-decode: {e}", desc.full_name())))
}

fn malformed(e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("gateway: malformed JSON: {e}"))
}

/// A whole request body, refused above `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, Status> {
    let mut data = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| Status::cancelled(format!("gateway: reading the request: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large(buf.len() + chunk.len(), limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn too_large(len: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!("gateway: request body larger than max (at least {len} vs. {limit} bytes)"))
}

/// A JSON request object → the protobuf encoding of message `desc`.
fn json_to_proto(desc: &MessageDescriptor, mut v: Value) -> Result<Vec<u8>, Status> {
    // `null` is the empty message for jsonpb.
    if v.is_null() {
        return Ok(Vec::new());
    }
    if !v.is_object() {
        return Err(Status::invalid_argument(format!("gateway: the request must be a JSON object, got {}", kind_of(&v))));
    }
    drop_unknown_fields(desc, &mut v);
    let msg = DynamicMessage::deserialize_with_options(desc.clone(), v, &JSON_IN)
        .map_err(|e| Status::invalid_argument(format!("gateway: {}: {e}", desc.full_name())))?;
    Ok(msg.encode_to_vec())
}

/// A protobuf message → its JSON as grpc-gateway writes it.
fn proto_to_json<M: Message>(desc: &MessageDescriptor, m: &M) -> Result<Vec<u8>, Status> {
    let msg = DynamicMessage::decode(desc.clone(), m.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("gateway: {} does not decode as its descriptor: {e}", desc.full_name())))?;
    let mut out = serde_json::Serializer::new(Vec::new());
    msg.serialize_with_options(&mut out, &JSON_OUT)
        .map_err(|e| Status::internal(format!("gateway: {} to JSON: {e}", desc.full_name())))?;
    Ok(out.into_inner())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Removes the fields message `desc` does not have, at every level: grpc-gateway (v1) ignores
/// them, and `prost-reflect` can ignore them only together with unknown enum names, which
/// grpc-gateway refuses and which would otherwise silently become the default value.
fn drop_unknown_fields(desc: &MessageDescriptor, v: &mut Value) {
    let Value::Object(map) = v else { return };
    map.retain(|k, _| desc.get_field_by_json_name(k).or_else(|| desc.get_field_by_name(k)).is_some());
    for (k, val) in map.iter_mut() {
        let Some(field) = desc.get_field_by_json_name(k).or_else(|| desc.get_field_by_name(k)) else { continue };
        // etcd's API has no map fields; their values would be left as they are.
        let Kind::Message(inner) = field.kind() else { continue };
        if field.is_map() {
            continue;
        }
        match val {
            Value::Array(items) => items.iter_mut().for_each(|item| drop_unknown_fields(&inner, item)),
            other => drop_unknown_fields(&inner, other),
        }
    }
}

/// Reads successive JSON values from the body of a streaming call as its bytes arrive, holding
/// at most `limit` bytes of the value being read.
struct JsonReader {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    limit: usize,
    ended: bool,
    /// The buffer may hold a complete value: something arrived that can end one.
    try_parse: bool,
}

impl JsonReader {
    fn new(body: Body, limit: usize) -> JsonReader {
        JsonReader { body: body.into_data_stream(), buf: Vec::new(), limit, ended: false, try_parse: false }
    }

    /// The next value; `None` once the body has ended with nothing but whitespace left.
    async fn next(&mut self) -> Result<Option<Value>, Status> {
        loop {
            let start = self.buf.iter().position(|b| !b.is_ascii_whitespace());
            match start {
                None if self.ended => return Ok(None),
                None => self.buf.clear(),
                Some(_) if self.try_parse || self.ended => {
                    let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                    match values.next() {
                        Some(Ok(v)) => {
                            let used = values.byte_offset();
                            self.buf.drain(..used);
                            return Ok(Some(v));
                        }
                        // Incomplete: wait for more of the body, if there is more.
                        Some(Err(e)) if e.is_eof() && !self.ended => self.try_parse = false,
                        Some(Err(e)) => return Err(malformed(e)),
                        None => return Ok(None),
                    }
                }
                Some(_) => {}
            }
            if self.buf.len() > self.limit {
                return Err(too_large(self.buf.len(), self.limit));
            }
            match self.body.next().await {
                Some(Ok(data)) => {
                    // A request is an object, complete only at a `}`: parsing again before one
                    // arrives would rescan a large request once per chunk. A value that is not
                    // an object fails the parse at once.
                    let first = self.buf.iter().chain(data.iter()).find(|b| !b.is_ascii_whitespace());
                    self.try_parse = data.contains(&b'}') || first.is_none_or(|b| *b != b'{');
                    self.buf.extend_from_slice(&data);
                }
                Some(Err(e)) => return Err(Status::cancelled(format!("gateway: reading the request: {e}"))),
                None => self.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(rampart_proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn every_route_names_a_method_of_ours() {
        let routes = resolve_routes(&pool()).unwrap();
        assert_eq!(routes.len(), ROUTES.len(), "a path is listed twice");
    }

    #[test]
    fn json_round_trip_like_grpc_gateway() {
        use rampart_proto::etcdserverpb::*;
        let pool = pool();
        let req = pool.get_message_by_name("etcdserverpb.TxnRequest").unwrap();
        let v: Value = serde_json::from_str(
            r#"{"compare":[{"key":"Zm9v","target":"VALUE","result":1,"value":"YmFy","bogus":{"x":1}}],
                "success":[{"request_put":{"key":"YQ==","value":"MQ==","lease":"7"}}],
                "failure":[{"requestRange":{"key":"YQ==","limit":2}}], "unknown": [1,2]}"#,
        )
        .unwrap();
        let t = TxnRequest::decode(json_to_proto(&req, v).unwrap().as_slice()).unwrap();
        assert_eq!(t.compare[0].key, b"foo");
        assert_eq!(t.compare[0].target, compare::CompareTarget::Value as i32);
        assert_eq!(t.compare[0].result, compare::CompareResult::Greater as i32);
        let Some(request_op::Request::RequestPut(p)) = &t.success[0].request else { panic!("{t:?}") };
        assert_eq!((p.key.as_slice(), p.lease), (&b"a"[..], 7));
        let Some(request_op::Request::RequestRange(r)) = &t.failure[0].request else { panic!("{t:?}") };
        assert_eq!(r.limit, 2);

        let bad: Value = serde_json::from_str(r#"{"compare":[{"target":"VALU"}]}"#).unwrap();
        assert_eq!(json_to_proto(&req, bad).unwrap_err().code(), Code::InvalidArgument);

        let resp = pool.get_message_by_name("etcdserverpb.RangeResponse").unwrap();
        let r = RangeResponse {
            header: Some(ResponseHeader { cluster_id: u64::MAX, member_id: 1, revision: 5, raft_term: 0 }),
            kvs: vec![rampart_proto::mvccpb::KeyValue { key: b"foo".to_vec(), create_revision: 2, ..Default::default() }],
            more: false,
            count: 1,
        };
        let json = String::from_utf8(proto_to_json(&resp, &r).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"header":{"cluster_id":"18446744073709551615","member_id":"1","revision":"5"},"kvs":[{"key":"Zm9v","create_revision":"2"}],"count":"1"}"#
        );
    }

    #[test]
    fn errors_like_grpc_gateway() {
        assert_eq!(http_status(Code::OutOfRange), StatusCode::BAD_REQUEST);
        let line = String::from_utf8(error_line(&Status::unavailable("etcdserver: no leader"))).unwrap();
        assert_eq!(
            line,
            "{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"etcdserver: no leader\",\"http_status\":\"Service Unavailable\"}}\n"
        );
    }

    #[tokio::test]
    async fn json_reader_splits_values_across_chunks() {
        let chunks: Vec<Result<Bytes, Infallible>> =
            vec![Ok(Bytes::from_static(b" {\"a\":")), Ok(Bytes::from_static(b"1}{\"b\"")), Ok(Bytes::from_static(b":2}\n"))];
        let mut r = JsonReader::new(Body::from_stream(futures::stream::iter(chunks)), 1024);
        assert_eq!(r.next().await.unwrap(), Some(serde_json::json!({"a": 1})));
        assert_eq!(r.next().await.unwrap(), Some(serde_json::json!({"b": 2})));
        assert_eq!(r.next().await.unwrap(), None);

        let mut r = JsonReader::new(Body::from("{\"a\":"), 1024);
        assert_eq!(r.next().await.unwrap_err().code(), Code::InvalidArgument);
        let mut r = JsonReader::new(Body::from(vec![b' '; 10].into_iter().chain(*b"{\"a\":\"xxxxxxxxxxxxxxxx").collect::<Vec<u8>>()), 8);
        assert_eq!(r.next().await.unwrap_err().code(), Code::ResourceExhausted);
    }
}
