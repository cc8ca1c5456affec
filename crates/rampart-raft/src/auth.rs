//! The replicated auth store (etcd's `auth/store.go`): users, roles, key-range permissions, the
//! enabled flag and the auth revision. Pure data and rules, no I/O: it lives in [`SmMeta`], so it
//! is stored in the same MVCC transaction as the data, travels in raft snapshots, and every member
//! applies the same [`AuthOp`]s in log order.
//!
//! Passwords arrive already hashed (the member that took the request salts and hashes before
//! proposing), so applying stays deterministic and a password never enters the log.
//!
//! [`SmMeta`]: crate::state_machine::SmMeta

use std::collections::{BTreeMap, BTreeSet};

use rampart_core::EtcdError;
use serde::{Deserialize, Serialize};

/// etcd's root user and role: the root role may do everything, and auth can only be enabled
/// while a root user with the root role exists.
pub const ROOT: &str = "root";

/// A salted password hash (PBKDF2-HMAC-SHA256; computed at the API edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub hash: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// None: `--no-password`; the user cannot authenticate with a password.
    pub password: Option<PasswordHash>,
    pub roles: BTreeSet<String>,
}

/// etcd's `authpb.Permission.Type`, as a number: READ 0, WRITE 1, READWRITE 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PermKind {
    Read,
    Write,
    ReadWrite,
}

impl PermKind {
    pub fn from_proto(n: i32) -> Option<PermKind> {
        match n {
            0 => Some(PermKind::Read),
            1 => Some(PermKind::Write),
            2 => Some(PermKind::ReadWrite),
            _ => None,
        }
    }

    pub fn to_proto(self) -> i32 {
        self as i32
    }

    fn reads(self) -> bool {
        matches!(self, PermKind::Read | PermKind::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, PermKind::Write | PermKind::ReadWrite)
    }
}

/// One key-range permission of a role, with etcd's range conventions: an empty `range_end` is the
/// single key, `[0]` is every key from `key` on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Perm {
    pub kind: PermKind,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub perms: Vec<Perm>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthStore {
    pub enabled: bool,
    /// Bumped by every change, as etcd's auth revision.
    pub revision: u64,
    /// Signs tokens (see `rampart-server::auth`); replaced at every enable, so disabling and
    /// re-enabling auth invalidates every token handed out before.
    pub token_key: Vec<u8>,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

/// One replicated change of the auth store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthOp {
    Enable { token_key: Vec<u8> },
    Disable,
    UserAdd { name: String, password: Option<PasswordHash> },
    UserDelete { name: String },
    UserChangePassword { name: String, password: PasswordHash },
    UserGrantRole { user: String, role: String },
    UserRevokeRole { name: String, role: String },
    RoleAdd { name: String },
    RoleDelete { name: String },
    RoleGrantPermission { name: String, perm: Perm },
    RoleRevokePermission { name: String, key: Vec<u8>, range_end: Vec<u8> },
}

impl AuthOp {
    /// The operation's name, for logs (never its secrets).
    pub fn name(&self) -> &'static str {
        match self {
            AuthOp::Enable { .. } => "enable",
            AuthOp::Disable => "disable",
            AuthOp::UserAdd { .. } => "user add",
            AuthOp::UserDelete { .. } => "user delete",
            AuthOp::UserChangePassword { .. } => "user passwd",
            AuthOp::UserGrantRole { .. } => "user grant-role",
            AuthOp::UserRevokeRole { .. } => "user revoke-role",
            AuthOp::RoleAdd { .. } => "role add",
            AuthOp::RoleDelete { .. } => "role delete",
            AuthOp::RoleGrantPermission { .. } => "role grant-permission",
            AuthOp::RoleRevokePermission { .. } => "role revoke-permission",
        }
    }
}

impl AuthStore {
    /// Applies one change with etcd's checks and errors; nothing changes on an error.
    pub fn apply(&mut self, op: &AuthOp) -> Result<(), EtcdError> {
        use EtcdError as E;
        match op {
            AuthOp::Enable { token_key } => {
                if !self.enabled {
                    let root = self.users.get(ROOT).ok_or(E::RootUserNotExist)?;
                    if !root.roles.contains(ROOT) {
                        return Err(E::RootRoleNotExist);
                    }
                    self.enabled = true;
                    self.token_key = token_key.clone();
                }
            }
            AuthOp::Disable => self.enabled = false,
            AuthOp::UserAdd { name, password } => {
                if name.is_empty() {
                    return Err(E::UserEmpty);
                }
                if self.users.contains_key(name) {
                    return Err(E::UserAlreadyExist);
                }
                self.users.insert(name.clone(), User { password: password.clone(), roles: BTreeSet::new() });
            }
            AuthOp::UserDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(E::InvalidAuthMgmt);
                }
                self.users.remove(name).ok_or(E::UserNotFound)?;
            }
            AuthOp::UserChangePassword { name, password } => {
                self.users.get_mut(name).ok_or(E::UserNotFound)?.password = Some(password.clone());
            }
            AuthOp::UserGrantRole { user, role } => {
                if !self.users.contains_key(user) {
                    return Err(E::UserNotFound);
                }
                if role != ROOT && !self.roles.contains_key(role) {
                    return Err(E::RoleNotFound);
                }
                self.users.get_mut(user).expect("checked above").roles.insert(role.clone());
            }
            AuthOp::UserRevokeRole { name, role } => {
                if self.enabled && name == ROOT && role == ROOT {
                    return Err(E::InvalidAuthMgmt);
                }
                let user = self.users.get_mut(name).ok_or(E::UserNotFound)?;
                if !user.roles.remove(role) {
                    return Err(E::RoleNotGranted);
                }
            }
            AuthOp::RoleAdd { name } => {
                if name.is_empty() {
                    return Err(E::RoleEmpty);
                }
                if self.roles.contains_key(name) {
                    return Err(E::RoleAlreadyExist);
                }
                self.roles.insert(name.clone(), Role::default());
            }
            AuthOp::RoleDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(E::InvalidAuthMgmt);
                }
                self.roles.remove(name).ok_or(E::RoleNotFound)?;
                // etcd also takes the role away from every user that had it.
                for user in self.users.values_mut() {
                    user.roles.remove(name);
                }
            }
            AuthOp::RoleGrantPermission { name, perm } => {
                let role = self.roles.get_mut(name).ok_or(E::RoleNotFound)?;
                // Granting the same range again replaces its kind, as etcd does.
                match role.perms.iter_mut().find(|p| p.key == perm.key && p.range_end == perm.range_end) {
                    Some(p) => p.kind = perm.kind,
                    None => role.perms.push(perm.clone()),
                }
                // Kept in key order, as etcd keeps them (`role get` lists them so).
                role.perms.sort_by(|a, b| (&a.key, &a.range_end).cmp(&(&b.key, &b.range_end)));
            }
            AuthOp::RoleRevokePermission { name, key, range_end } => {
                let role = self.roles.get_mut(name).ok_or(E::RoleNotFound)?;
                let before = role.perms.len();
                role.perms.retain(|p| !(p.key == *key && p.range_end == *range_end));
                if role.perms.len() == before {
                    return Err(E::PermissionNotGranted);
                }
            }
        }
        self.revision += 1;
        Ok(())
    }

    /// True if `user` has the root role (etcd's `IsAdminPermitted`).
    pub fn is_admin(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(ROOT))
    }

    /// True if `user` may read every key of `[key, range_end)` (etcd's range conventions).
    pub fn can_read(&self, user: &str, key: &[u8], range_end: &[u8]) -> bool {
        self.covered(user, key, range_end, PermKind::reads)
    }

    /// True if `user` may write every key of `[key, range_end)`.
    pub fn can_write(&self, user: &str, key: &[u8], range_end: &[u8]) -> bool {
        self.covered(user, key, range_end, PermKind::writes)
    }

    /// Whether the union of the user's permissions of a kind covers the asked range (etcd merges
    /// a user's permissions into an interval set and asks the same).
    fn covered(&self, user: &str, key: &[u8], range_end: &[u8], kind: fn(PermKind) -> bool) -> bool {
        let Some(u) = self.users.get(user) else { return false };
        if u.roles.contains(ROOT) {
            return true;
        }
        let mut intervals: Vec<(End, End)> = u
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.perms.iter())
            .filter(|p| kind(p.kind))
            .map(|p| (End::Key(p.key.clone()), End::of(&p.key, &p.range_end)))
            .collect();
        intervals.sort();
        let want_end = End::of(key, range_end);
        // [key, reach) is covered; sorted by start, the intervals extend it until a gap.
        let mut reach = End::Key(key.to_vec());
        for (start, end) in intervals {
            if reach >= want_end {
                break;
            }
            if start > reach {
                break;
            }
            reach = reach.max(end);
        }
        reach >= want_end
    }
}

/// The exclusive end of a range: a key, or past every key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Infinity,
}

impl End {
    fn of(key: &[u8], range_end: &[u8]) -> End {
        match range_end {
            [] => {
                // The single key `key` is [key, key + "\0").
                let mut k = key.to_vec();
                k.push(0);
                End::Key(k)
            }
            [0] => End::Infinity,
            end => End::Key(end.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> AuthStore {
        let mut s = AuthStore::default();
        let ops = [
            AuthOp::UserAdd { name: "root".into(), password: None },
            AuthOp::UserAdd { name: "u".into(), password: None },
            AuthOp::RoleAdd { name: "r".into() },
            AuthOp::RoleAdd { name: "w".into() },
            AuthOp::RoleGrantPermission { name: "r".into(), perm: Perm { kind: PermKind::Read, key: b"a".to_vec(), range_end: b"c".to_vec() } },
            AuthOp::RoleGrantPermission { name: "r".into(), perm: Perm { kind: PermKind::ReadWrite, key: b"c".to_vec(), range_end: b"e".to_vec() } },
            AuthOp::RoleGrantPermission { name: "w".into(), perm: Perm { kind: PermKind::Write, key: b"k".to_vec(), range_end: vec![] } },
            AuthOp::UserGrantRole { user: "u".into(), role: "r".into() },
            AuthOp::UserGrantRole { user: "u".into(), role: "w".into() },
        ];
        for op in &ops {
            s.apply(op).unwrap();
        }
        s
    }

    #[test]
    fn permissions_cover_ranges_as_etcds_interval_sets_do() {
        let s = store();
        // Adjacent grants of two roles merge: [a, e) is readable, [c, e) writable.
        assert!(s.can_read("u", b"a", b"e"));
        assert!(s.can_read("u", b"b", b""));
        assert!(s.can_read("u", b"d", b"d\x01"));
        assert!(!s.can_read("u", b"a", b"f"));
        assert!(!s.can_read("u", b"0", b"b"));
        assert!(!s.can_read("u", b"a", b"\0"));
        assert!(s.can_write("u", b"c", b"e"));
        assert!(!s.can_write("u", b"b", b""));
        // A single-key grant covers that key only.
        assert!(s.can_write("u", b"k", b""));
        assert!(!s.can_write("u", b"k", b"l"));
        assert!(!s.can_read("u", b"k", b""));
        // Root may do everything; an unknown user nothing.
        // A user named root is not an admin without the root role.
        assert!(!s.is_admin("root") && !s.can_read("root", b"a", b""));
        assert!(!s.can_read("nobody", b"a", b""));
    }

    #[test]
    fn enabling_needs_root_with_the_root_role_and_protects_it() {
        let mut s = store();
        assert_eq!(s.apply(&AuthOp::Enable { token_key: vec![1] }), Err(EtcdError::RootRoleNotExist));
        s.apply(&AuthOp::UserGrantRole { user: "root".into(), role: "root".into() }).unwrap();
        assert!(s.is_admin("root") && s.can_write("root", b"", b"\0"));
        let rev = s.revision;
        s.apply(&AuthOp::Enable { token_key: vec![1] }).unwrap();
        assert!(s.enabled && s.revision == rev + 1);
        assert_eq!(s.apply(&AuthOp::UserDelete { name: "root".into() }), Err(EtcdError::InvalidAuthMgmt));
        assert_eq!(s.apply(&AuthOp::UserRevokeRole { name: "root".into(), role: "root".into() }), Err(EtcdError::InvalidAuthMgmt));
        assert_eq!(s.apply(&AuthOp::UserAdd { name: "u".into(), password: None }), Err(EtcdError::UserAlreadyExist));
        assert_eq!(s.apply(&AuthOp::UserGrantRole { user: "u".into(), role: "x".into() }), Err(EtcdError::RoleNotFound));
        assert_eq!(s.apply(&AuthOp::UserRevokeRole { name: "u".into(), role: "x".into() }), Err(EtcdError::RoleNotGranted));
        assert_eq!(
            s.apply(&AuthOp::RoleRevokePermission { name: "w".into(), key: b"zz".to_vec(), range_end: vec![] }),
            Err(EtcdError::PermissionNotGranted)
        );
        // A failed change changes nothing, not even the revision.
        assert_eq!(s.revision, rev + 1);
        // Deleting a role takes it from its users.
        s.apply(&AuthOp::RoleDelete { name: "w".into() }).unwrap();
        assert!(!s.can_write("u", b"k", b""));
        s.apply(&AuthOp::Disable).unwrap();
        s.apply(&AuthOp::UserDelete { name: "root".into() }).unwrap();
        assert_eq!(s.apply(&AuthOp::Enable { token_key: vec![2] }), Err(EtcdError::RootUserNotExist));
    }
}
