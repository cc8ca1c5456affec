//! The etcd v3 Auth service, and the checks every other service makes with it (etcd's
//! `auth/store.go` permission checks and `v3rpc` auth wrappers).
//!
//! What is stored (users, roles, permissions, enabled) is replicated: changes go through the log
//! as [`AuthOp`]s and land in `SmMeta` (`rampart_raft::auth`). Passwords are salted and hashed
//! here, before proposing, so no password enters the log.
//!
//! Tokens are stateless: `HEX(user).EXPIRY.MAC`, a MAC (HMAC-SHA256) under the store's
//! `token_key` that every member has, so a token from one member is good on all of them without
//! replicating a token table, and re-enabling auth (a new key) voids every older token. They last
//! [`TOKEN_TTL_S`] (etcd's `--auth-token-ttl` default); clients authenticate again on
//! "invalid auth token", as etcd's simple tokens also require.
//!
//! With auth enabled, a request without a token gets etcd's "user name is empty"; a bad or
//! expired token "invalid auth token"; a user without the permission "permission denied".

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rampart_core::EtcdError;
use rampart_proto::authpb::Permission;
use rampart_proto::etcdserverpb::auth_server::Auth;
use rampart_proto::etcdserverpb::request_op::Request as Op;
use rampart_proto::etcdserverpb::*;
use rampart_raft::auth::{AuthOp, AuthStore, PasswordHash, Perm, PermKind};
use rampart_raft::Request as RaftRequest;
use rand::RngCore;
use sha2::Sha256;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::api::status;
use crate::member::Member;

/// How long a token is good for, in seconds (etcd's `--auth-token-ttl` default).
pub const TOKEN_TTL_S: u64 = 300;
/// PBKDF2 rounds per password hash. etcd's bcrypt cost 10 takes ~60 ms; this is in the same
/// range in a release build and keeps debug-build tests quick.
const PASSWORD_HASH_ITERATIONS: u32 = 20_000;
const SALT_BYTES: usize = 16;
const TOKEN_KEY_BYTES: usize = 32;
/// Bytes of the MAC kept in a token.
const TOKEN_MAC_BYTES: usize = 16;
/// The gRPC metadata key etcd's clients send their token in (`rpctypes.TokenFieldNameGRPC`).
pub const TOKEN_METADATA: &str = "token";
/// The other key etcd accepts (`rpctypes.TokenFieldNameSwagger`): the JSON gateway's
/// `Authorization` header.
pub const TOKEN_METADATA_GATEWAY: &str = "authorization";

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Auth is off: everything is allowed.
    Anyone,
    /// Auth is on and the token named this user; `store` is the auth state that was checked.
    User { name: String, store: Arc<AuthStore> },
}

impl Caller {
    /// etcd's `IsAdminPermitted`.
    pub fn check_admin(&self) -> Result<(), EtcdError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::User { name, store } if store.is_admin(name) => Ok(()),
            Caller::User { .. } => Err(EtcdError::PermissionDenied),
        }
    }

    pub fn check_read(&self, key: &[u8], range_end: &[u8]) -> Result<(), EtcdError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::User { name, store } if store.can_read(name, key, range_end) => Ok(()),
            Caller::User { .. } => Err(EtcdError::PermissionDenied),
        }
    }

    pub fn check_write(&self, key: &[u8], range_end: &[u8]) -> Result<(), EtcdError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::User { name, store } if store.can_write(name, key, range_end) => Ok(()),
            Caller::User { .. } => Err(EtcdError::PermissionDenied),
        }
    }

    pub fn check_range(&self, r: &RangeRequest) -> Result<(), EtcdError> {
        self.check_read(&r.key, &r.range_end)
    }

    /// A put writes its key, and reads it too when it asks for the previous value.
    pub fn check_put(&self, r: &PutRequest) -> Result<(), EtcdError> {
        self.check_write(&r.key, b"")?;
        if r.prev_kv {
            self.check_read(&r.key, b"")?;
        }
        Ok(())
    }

    pub fn check_delete(&self, r: &DeleteRangeRequest) -> Result<(), EtcdError> {
        self.check_write(&r.key, &r.range_end)?;
        if r.prev_kv {
            self.check_read(&r.key, &r.range_end)?;
        }
        Ok(())
    }

    /// A txn reads what it compares, and needs the permissions of every op of both branches
    /// (etcd's `checkTxnAuth`): which branch runs is not known before it runs.
    pub fn check_txn(&self, t: &TxnRequest) -> Result<(), EtcdError> {
        if matches!(self, Caller::Anyone) {
            return Ok(());
        }
        for c in &t.compare {
            self.check_read(&c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Op::RequestRange(r)) => self.check_range(r)?,
                Some(Op::RequestPut(r)) => self.check_put(r)?,
                Some(Op::RequestDeleteRange(r)) => self.check_delete(r)?,
                Some(Op::RequestTxn(t)) => self.check_txn(t)?,
                None => {}
            }
        }
        Ok(())
    }

    fn name(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::User { name, .. } => Some(name),
        }
    }
}

/// The caller of a request, from its `token` metadata.
pub fn caller(member: &Member, metadata: &MetadataMap) -> Result<Caller, EtcdError> {
    let store = member.sm.auth();
    if !store.enabled {
        return Ok(Caller::Anyone);
    }
    let token = metadata.get(TOKEN_METADATA).or_else(|| metadata.get(TOKEN_METADATA_GATEWAY)).ok_or(EtcdError::UserEmpty)?;
    let token = token.to_str().map_err(|_| EtcdError::InvalidAuthToken)?;
    let name = verify_token(&store, token, unix_now()).ok_or(EtcdError::InvalidAuthToken)?;
    Ok(Caller::User { name, store })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The MAC of a token's fields under the store's key, ready to finalize or verify.
fn token_mac(key: &[u8], user: &str, expiry: u64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(user.as_bytes());
    mac.update(&[0]);
    mac.update(&expiry.to_be_bytes());
    mac
}

fn mint_token(store: &AuthStore, user: &str, now: u64) -> String {
    let expiry = now + TOKEN_TTL_S;
    let mac = token_mac(&store.token_key, user, expiry).finalize().into_bytes();
    format!("{}.{expiry}.{}", hex(user.as_bytes()), hex(&mac[..TOKEN_MAC_BYTES]))
}

/// The user a token names, if it is genuine, unexpired and the user still exists.
fn verify_token(store: &AuthStore, token: &str, now: u64) -> Option<String> {
    let mut parts = token.split('.');
    let (user, expiry, mac) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let user = String::from_utf8(unhex(user)?).ok()?;
    let expiry: u64 = expiry.parse().ok()?;
    let mac = unhex(mac)?;
    // The full truncated length only: a shorter tag would be easy to guess.
    if mac.len() != TOKEN_MAC_BYTES {
        return None;
    }
    // Constant-time comparison of the truncated MAC.
    token_mac(&store.token_key, &user, expiry).verify_truncated_left(&mac).ok()?;
    (expiry > now && store.users.contains_key(&user)).then_some(user)
}

fn hash_password(password: &str) -> PasswordHash {
    let mut salt = vec![0u8; SALT_BYTES];
    rand::rng().fill_bytes(&mut salt);
    let hash = derive(password, &salt, PASSWORD_HASH_ITERATIONS);
    PasswordHash { salt, iterations: PASSWORD_HASH_ITERATIONS, hash }
}

fn derive(password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
    out
}

fn password_matches(hash: &PasswordHash, password: &str) -> bool {
    let got = derive(password, &hash.salt, hash.iterations);
    // Constant time: every byte is compared.
    got.len() == hash.hash.len() && got.iter().zip(&hash.hash).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Hashing is deliberately slow: off the runtime's worker threads.
async fn hash_off_thread(password: String) -> Result<PasswordHash, EtcdError> {
    tokio::task::spawn_blocking(move || hash_password(&password)).await.map_err(EtcdError::internal)
}

fn perm_from_proto(p: &Permission) -> Result<Perm, EtcdError> {
    let kind = PermKind::from_proto(p.perm_type)
        .ok_or_else(|| EtcdError::InvalidArgument(format!("etcdserver: unknown permission type {}", p.perm_type)))?;
    Ok(Perm { kind, key: p.key.clone(), range_end: p.range_end.clone() })
}

fn perm_to_proto(p: &Perm) -> Permission {
    Permission { perm_type: p.kind.to_proto(), key: p.key.clone(), range_end: p.range_end.clone() }
}

#[derive(Clone)]
pub struct AuthService {
    pub member: Arc<Member>,
}

impl AuthService {
    fn header(&self) -> Option<ResponseHeader> {
        Some(self.member.header(self.member.sm.mvcc.current_revision()))
    }

    /// Admin permission (when auth is on), then the change through the log.
    async fn change(&self, metadata: &MetadataMap, op: AuthOp) -> Result<Option<ResponseHeader>, Status> {
        caller(&self.member, metadata).and_then(|c| c.check_admin()).map_err(status)?;
        self.propose(op).await
    }

    async fn propose(&self, op: AuthOp) -> Result<Option<ResponseHeader>, Status> {
        self.member.propose(RaftRequest::Auth(op)).await.map_err(status)?;
        Ok(self.header())
    }

    /// The auth store after a read barrier, so a read sees every change acknowledged before it.
    async fn store(&self) -> Result<Arc<AuthStore>, Status> {
        self.member.read_barrier().await.map_err(status)?;
        Ok(self.member.sm.auth())
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, request: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        let mut key = vec![0u8; TOKEN_KEY_BYTES];
        rand::rng().fill_bytes(&mut key);
        let header = self.change(request.metadata(), AuthOp::Enable { token_key: key }).await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(&self, request: Request<AuthDisableRequest>) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self.change(request.metadata(), AuthOp::Disable).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(&self, _request: Request<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        let store = self.store().await?;
        Ok(Response::new(AuthStatusResponse { header: self.header(), enabled: store.enabled, auth_revision: store.revision }))
    }

    async fn authenticate(&self, request: Request<AuthenticateRequest>) -> Result<Response<AuthenticateResponse>, Status> {
        let r = request.into_inner();
        let store = self.store().await?;
        if !store.enabled {
            return Err(status(EtcdError::AuthNotEnabled));
        }
        let Some(hash) = store.users.get(&r.name).and_then(|u| u.password.clone()) else {
            return Err(status(EtcdError::AuthFailed));
        };
        let password = r.password;
        let ok = tokio::task::spawn_blocking(move || password_matches(&hash, &password))
            .await
            .map_err(|e| status(EtcdError::internal(e)))?;
        if !ok {
            return Err(status(EtcdError::AuthFailed));
        }
        let token = mint_token(&store, &r.name, unix_now());
        Ok(Response::new(AuthenticateResponse { header: self.header(), token }))
    }

    async fn user_add(&self, request: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        caller(&self.member, request.metadata()).and_then(|c| c.check_admin()).map_err(status)?;
        let r = request.into_inner();
        if r.name.is_empty() {
            return Err(status(EtcdError::UserEmpty));
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        let password = if no_password { None } else { Some(hash_off_thread(r.password).await.map_err(status)?) };
        let header = self.propose(AuthOp::UserAdd { name: r.name, password }).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(&self, request: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        let caller = caller(&self.member, request.metadata()).map_err(status)?;
        let name = request.into_inner().name;
        // A user may look at itself; anything else takes admin (etcd 3.4).
        if caller.name() != Some(name.as_str()) {
            caller.check_admin().map_err(status)?;
        }
        let store = self.store().await?;
        let user = store.users.get(&name).ok_or_else(|| status(EtcdError::UserNotFound))?;
        Ok(Response::new(AuthUserGetResponse { header: self.header(), roles: user.roles.iter().cloned().collect() }))
    }

    async fn user_list(&self, request: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        caller(&self.member, request.metadata()).and_then(|c| c.check_admin()).map_err(status)?;
        let store = self.store().await?;
        Ok(Response::new(AuthUserListResponse { header: self.header(), users: store.users.keys().cloned().collect() }))
    }

    async fn user_delete(&self, request: Request<AuthUserDeleteRequest>) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let md = request.metadata().clone();
        let header = self.change(&md, AuthOp::UserDelete { name: request.into_inner().name }).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        caller(&self.member, request.metadata()).and_then(|c| c.check_admin()).map_err(status)?;
        let r = request.into_inner();
        let password = hash_off_thread(r.password).await.map_err(status)?;
        let header = self.propose(AuthOp::UserChangePassword { name: r.name, password }).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(&self, request: Request<AuthUserGrantRoleRequest>) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let md = request.metadata().clone();
        let r = request.into_inner();
        let header = self.change(&md, AuthOp::UserGrantRole { user: r.user, role: r.role }).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(&self, request: Request<AuthUserRevokeRoleRequest>) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let md = request.metadata().clone();
        let r = request.into_inner();
        let header = self.change(&md, AuthOp::UserRevokeRole { name: r.name, role: r.role }).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, request: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        let md = request.metadata().clone();
        let header = self.change(&md, AuthOp::RoleAdd { name: request.into_inner().name }).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, request: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        let caller = caller(&self.member, request.metadata()).map_err(status)?;
        let role = request.into_inner().role;
        let store = self.store().await?;
        // A user may look at its own roles; anything else takes admin (etcd 3.4).
        let own = caller.name().and_then(|n| store.users.get(n)).is_some_and(|u| u.roles.contains(&role));
        if !own {
            caller.check_admin().map_err(status)?;
        }
        let r = store.roles.get(&role).ok_or_else(|| status(EtcdError::RoleNotFound))?;
        Ok(Response::new(AuthRoleGetResponse { header: self.header(), perm: r.perms.iter().map(perm_to_proto).collect() }))
    }

    async fn role_list(&self, request: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        caller(&self.member, request.metadata()).and_then(|c| c.check_admin()).map_err(status)?;
        let store = self.store().await?;
        Ok(Response::new(AuthRoleListResponse { header: self.header(), roles: store.roles.keys().cloned().collect() }))
    }

    async fn role_delete(&self, request: Request<AuthRoleDeleteRequest>) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let md = request.metadata().clone();
        let header = self.change(&md, AuthOp::RoleDelete { name: request.into_inner().role }).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let md = request.metadata().clone();
        let r = request.into_inner();
        let perm = perm_from_proto(r.perm.as_ref().ok_or_else(|| status(EtcdError::PermissionNotGiven))?).map_err(status)?;
        let header = self.change(&md, AuthOp::RoleGrantPermission { name: r.name, perm }).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let md = request.metadata().clone();
        let r = request.into_inner();
        let header = self.change(&md, AuthOp::RoleRevokePermission { name: r.role, key: r.key, range_end: r.range_end }).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(user: &str) -> AuthStore {
        let mut s = AuthStore { token_key: vec![7; 32], ..Default::default() };
        s.apply(&AuthOp::UserAdd { name: user.into(), password: None }).unwrap();
        s
    }

    #[test]
    fn tokens_name_their_user_until_they_expire_and_cannot_be_forged() {
        let s = store_with("alice");
        let t = mint_token(&s, "alice", 1000);
        assert_eq!(verify_token(&s, &t, 1000).as_deref(), Some("alice"));
        assert_eq!(verify_token(&s, &t, 1000 + TOKEN_TTL_S), None, "expired");
        // Another user's name, a later expiry, or another key: rejected.
        let forged = t.replacen(&hex(b"alice"), &hex(b"root"), 1);
        assert_eq!(verify_token(&s, &forged, 1000), None);
        let later = t.replacen(&(1000 + TOKEN_TTL_S).to_string(), &(5000 + TOKEN_TTL_S).to_string(), 1);
        assert_eq!(verify_token(&s, &later, 1000), None);
        let other_key = AuthStore { token_key: vec![8; 32], ..s.clone() };
        assert_eq!(verify_token(&other_key, &t, 1000), None);
        for junk in ["", "x", "a.b.c", "..", "zz.1.00", &format!("{t}.x")] {
            assert_eq!(verify_token(&s, junk, 1000), None, "{junk:?}");
        }
        // A deleted user's token is void.
        let mut gone = s.clone();
        gone.apply(&AuthOp::UserDelete { name: "alice".into() }).unwrap();
        assert_eq!(verify_token(&gone, &t, 1000), None);
    }

    #[test]
    fn passwords_are_salted_and_checked() {
        let a = hash_password("secret");
        let b = hash_password("secret");
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.hash, b.hash);
        assert!(password_matches(&a, "secret"));
        assert!(!password_matches(&a, "Secret"));
        assert!(!password_matches(&a, ""));
    }
}
