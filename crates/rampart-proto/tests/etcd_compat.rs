//! Compares our compiled descriptors against etcd's own .proto files.
//!
//! etcd's files import gogoproto and google.api annotations that we do not
//! have, so they are not compiled; a small tokenizer/parser pulls out what
//! matters on the wire (messages, fields, enums, RPCs) and every item is
//! looked up in our `FILE_DESCRIPTOR_SET`.
//!
//! Sources:
//! * etcd 3.4 as packaged under /usr/share/gocode (forward check, plus a
//!   reverse check that we add nothing beyond the known 3.5 additions);
//! * if present, the etcd-client crate's newer etcd protos in the cargo
//!   registry; they carry `etcd_version_*` annotations, and everything
//!   marked 3.5 or older must be in ours.
//!
//! When a source is absent the corresponding test prints a note and passes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorSet, ServiceDescriptorProto,
};

// ---------------------------------------------------------------------------
// A minimal .proto parser (enough for etcd's files)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Int(i64),
    Str(String),
    Punct(char),
}

fn tokenize(src: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    for line in src.lines() {
        // No etcd string literal contains "//", so cutting here is safe.
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut chars = line.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
            } else if c.is_ascii_alphabetic() || c == '_' || c == '.' {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(s));
            } else if c.is_ascii_digit() || c == '-' {
                let mut s = String::new();
                s.push(c);
                chars.next();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_digit() {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Int(s.parse().expect("integer literal")));
            } else if c == '"' {
                chars.next();
                let mut s = String::new();
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                    s.push(c);
                }
                out.push(Tok::Str(s));
            } else {
                out.push(Tok::Punct(c));
                chars.next();
            }
        }
    }
    out
}

#[derive(Debug, Default)]
struct RefField {
    name: String,
    number: i32,
    ty: String,
    repeated: bool,
    oneof: Option<String>,
    version: Option<String>,
}

#[derive(Debug, Default)]
struct RefMessage {
    fields: Vec<RefField>,
    version: Option<String>,
}

#[derive(Debug, Default)]
struct RefEnum {
    values: Vec<(String, i32, Option<String>)>,
    version: Option<String>,
}

#[derive(Debug)]
struct RefRpc {
    name: String,
    input: String,
    output: String,
    client_streaming: bool,
    server_streaming: bool,
}

/// Everything found in one reference file. Keys are fully qualified names
/// without the leading dot, e.g. `etcdserverpb.RangeRequest.SortOrder`.
#[derive(Debug, Default)]
struct RefFile {
    package: String,
    messages: BTreeMap<String, RefMessage>,
    enums: BTreeMap<String, RefEnum>,
    services: BTreeMap<String, Vec<RefRpc>>,
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Tok {
        let t = self
            .toks
            .get(self.pos)
            .cloned()
            .expect("unexpected end of file");
        self.pos += 1;
        t
    }

    fn ident(&mut self) -> String {
        match self.next() {
            Tok::Ident(s) => s,
            t => panic!("expected identifier, got {t:?}"),
        }
    }

    fn int(&mut self) -> i64 {
        match self.next() {
            Tok::Int(i) => i,
            t => panic!("expected integer, got {t:?}"),
        }
    }

    fn punct(&mut self, c: char) {
        match self.next() {
            Tok::Punct(p) if p == c => {}
            t => panic!("expected {c:?}, got {t:?}"),
        }
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }

    /// Skips one statement up to its `;` (or a closing balanced block).
    fn skip_statement(&mut self) {
        let mut depth = 0;
        loop {
            match self.next() {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth -= 1;
                    if depth == 0 && !self.is_punct(';') {
                        return;
                    }
                }
                Tok::Punct(';') if depth == 0 => return,
                _ => {}
            }
        }
    }

    /// Skips a `[ ... ]` option list if present; returns an `etcd_version_*`
    /// value found in it.
    fn field_options(&mut self) -> Option<String> {
        if !self.is_punct('[') {
            return None;
        }
        let mut version = None;
        let mut depth = 0;
        let mut last_ident = String::new();
        loop {
            match self.next() {
                Tok::Punct('[') => depth += 1,
                Tok::Punct(']') => {
                    depth -= 1;
                    if depth == 0 {
                        return version;
                    }
                }
                Tok::Ident(s) => last_ident = s,
                Tok::Str(s) if last_ident.contains("etcd_version") => version = Some(s),
                _ => {}
            }
        }
    }

    /// `option (...) = ...;` inside a message or enum; returns an
    /// `etcd_version_*` value if that is what it sets.
    fn option(&mut self) -> Option<String> {
        let start = self.pos;
        self.skip_statement();
        let toks = &self.toks[start..self.pos];
        let is_version = toks
            .iter()
            .any(|t| matches!(t, Tok::Ident(s) if s.contains("etcd_version")));
        if !is_version {
            return None;
        }
        toks.iter().find_map(|t| match t {
            Tok::Str(s) => Some(s.clone()),
            _ => None,
        })
    }

    fn file(mut self) -> RefFile {
        let mut f = RefFile::default();
        while let Some(t) = self.peek().cloned() {
            match t {
                Tok::Ident(kw) if kw == "package" => {
                    self.next();
                    f.package = self.ident();
                    self.punct(';');
                }
                Tok::Ident(kw) if kw == "message" => {
                    self.next();
                    let prefix = f.package.clone();
                    self.message(&prefix, &mut f);
                }
                Tok::Ident(kw) if kw == "enum" => {
                    self.next();
                    let prefix = f.package.clone();
                    self.enumeration(&prefix, &mut f);
                }
                Tok::Ident(kw) if kw == "service" => {
                    self.next();
                    self.service(&mut f);
                }
                Tok::Punct(';') => {
                    self.next();
                }
                _ => self.skip_statement(),
            }
        }
        f
    }

    fn message(&mut self, prefix: &str, f: &mut RefFile) {
        let name = format!("{prefix}.{}", self.ident());
        self.punct('{');
        let mut msg = RefMessage::default();
        self.message_body(&name, &mut msg, None, f);
        f.messages.insert(name, msg);
    }

    /// Parses fields up to and including the closing `}`.
    fn message_body(
        &mut self,
        name: &str,
        msg: &mut RefMessage,
        oneof: Option<&str>,
        f: &mut RefFile,
    ) {
        loop {
            match self.next() {
                Tok::Punct('}') => return,
                Tok::Punct(';') => {}
                Tok::Ident(kw) if kw == "message" => self.message(name, f),
                Tok::Ident(kw) if kw == "enum" => self.enumeration(name, f),
                Tok::Ident(kw) if kw == "oneof" => {
                    let oneof_name = self.ident();
                    self.punct('{');
                    self.message_body(name, msg, Some(&oneof_name), f);
                }
                Tok::Ident(kw) if kw == "option" => {
                    if let Some(v) = self.option() {
                        msg.version = Some(v);
                    }
                }
                Tok::Ident(kw) if kw == "reserved" || kw == "extensions" => self.skip_statement(),
                Tok::Ident(first) => {
                    let (repeated, ty) = if first == "repeated" {
                        (true, self.ident())
                    } else if first == "optional" {
                        (false, self.ident())
                    } else {
                        (false, first)
                    };
                    let field_name = self.ident();
                    self.punct('=');
                    let number = i32::try_from(self.int()).expect("field number");
                    let version = self.field_options();
                    self.punct(';');
                    msg.fields.push(RefField {
                        name: field_name,
                        number,
                        ty,
                        repeated,
                        oneof: oneof.map(str::to_owned),
                        version,
                    });
                }
                t => panic!("unexpected {t:?} in message {name}"),
            }
        }
    }

    fn enumeration(&mut self, prefix: &str, f: &mut RefFile) {
        let name = format!("{prefix}.{}", self.ident());
        self.punct('{');
        let mut e = RefEnum::default();
        loop {
            match self.next() {
                Tok::Punct('}') => break,
                Tok::Punct(';') => {}
                Tok::Ident(kw) if kw == "option" => {
                    if let Some(v) = self.option() {
                        e.version = Some(v);
                    }
                }
                Tok::Ident(value) => {
                    self.punct('=');
                    let number = i32::try_from(self.int()).expect("enum value");
                    let version = self.field_options();
                    self.punct(';');
                    e.values.push((value, number, version));
                }
                t => panic!("unexpected {t:?} in enum {name}"),
            }
        }
        f.enums.insert(name, e);
    }

    fn service(&mut self, f: &mut RefFile) {
        let name = format!("{}.{}", f.package, self.ident());
        self.punct('{');
        let mut rpcs = Vec::new();
        loop {
            match self.next() {
                Tok::Punct('}') => break,
                Tok::Punct(';') => {}
                Tok::Ident(kw) if kw == "option" => self.skip_statement(),
                Tok::Ident(kw) if kw == "rpc" => {
                    let rpc_name = self.ident();
                    let (client_streaming, input) = self.rpc_type();
                    assert_eq!(self.ident(), "returns");
                    let (server_streaming, output) = self.rpc_type();
                    if self.is_punct('{') {
                        // Body with options: skip the balanced block.
                        self.skip_statement();
                    } else {
                        self.punct(';');
                    }
                    rpcs.push(RefRpc {
                        name: rpc_name,
                        input,
                        output,
                        client_streaming,
                        server_streaming,
                    });
                }
                t => panic!("unexpected {t:?} in service {name}"),
            }
        }
        f.services.insert(name, rpcs);
    }

    fn rpc_type(&mut self) -> (bool, String) {
        self.punct('(');
        let mut ty = self.ident();
        let stream = ty == "stream";
        if stream {
            ty = self.ident();
        }
        self.punct(')');
        (stream, ty)
    }
}

fn parse_file(path: &Path) -> RefFile {
    let src =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Parser {
        toks: tokenize(&src),
        pos: 0,
    }
    .file()
}

// ---------------------------------------------------------------------------
// Our side: the compiled descriptor set, indexed by full name
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Ours {
    messages: BTreeMap<String, DescriptorProto>,
    enums: BTreeMap<String, EnumDescriptorProto>,
    services: BTreeMap<String, ServiceDescriptorProto>,
}

fn ours() -> Ours {
    fn walk_message(prefix: &str, m: &DescriptorProto, out: &mut Ours) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            walk_message(&name, nested, out);
        }
        for e in &m.enum_type {
            out.enums.insert(format!("{name}.{}", e.name()), e.clone());
        }
        out.messages.insert(name, m.clone());
    }

    let fds = FileDescriptorSet::decode(rampart_proto::FILE_DESCRIPTOR_SET)
        .expect("FILE_DESCRIPTOR_SET decodes");
    let mut out = Ours::default();
    for file in &fds.file {
        let pkg = file.package();
        for m in &file.message_type {
            walk_message(pkg, m, &mut out);
        }
        for e in &file.enum_type {
            out.enums.insert(format!("{pkg}.{}", e.name()), e.clone());
        }
        for s in &file.service {
            out.services
                .insert(format!("{pkg}.{}", s.name()), s.clone());
        }
    }
    out
}

fn scalar_type(name: &str) -> Option<Type> {
    Some(match name {
        "double" => Type::Double,
        "float" => Type::Float,
        "int64" => Type::Int64,
        "uint64" => Type::Uint64,
        "int32" => Type::Int32,
        "fixed64" => Type::Fixed64,
        "fixed32" => Type::Fixed32,
        "bool" => Type::Bool,
        "string" => Type::String,
        "bytes" => Type::Bytes,
        "uint32" => Type::Uint32,
        "sfixed32" => Type::Sfixed32,
        "sfixed64" => Type::Sfixed64,
        "sint32" => Type::Sint32,
        "sint64" => Type::Sint64,
        _ => return None,
    })
}

/// `"3.5"` -> `(3, 5)`.
fn version(v: &str) -> (u32, u32) {
    let mut it = v
        .split('.')
        .map(|p| p.parse::<u32>().expect("version number"));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn newer_than_3_5(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|v| version(v) > (3, 5))
}

/// Checks that everything in `reference` (up to etcd 3.5) exists in `ours`
/// with the same wire shape. `skip_messages` lists post-3.5 messages that
/// carry no version annotation. Returns the list of problems.
fn forward_check(reference: &RefFile, ours: &Ours, skip_messages: &[&str]) -> Vec<String> {
    let mut errs = Vec::new();
    let skipped = |full: &str, m: Option<&RefMessage>| {
        skip_messages
            .iter()
            .any(|s| full.ends_with(&format!(".{s}")))
            || m.is_some_and(|m| newer_than_3_5(&m.version))
    };

    for (name, msg) in &reference.messages {
        if skipped(name, Some(msg)) {
            continue;
        }
        let Some(our) = ours.messages.get(name) else {
            errs.push(format!("missing message {name}"));
            continue;
        };
        for rf in &msg.fields {
            if newer_than_3_5(&rf.version) {
                continue;
            }
            let what = format!("{name}.{} = {}", rf.name, rf.number);
            let Some(of) = our.field.iter().find(|f| f.name() == rf.name) else {
                errs.push(format!("{what}: no field with that name"));
                continue;
            };
            if of.number() != rf.number {
                errs.push(format!("{what}: ours has number {}", of.number()));
            }
            let our_repeated = of.label() == Label::Repeated;
            if our_repeated != rf.repeated {
                errs.push(format!("{what}: repeated mismatch (ours {our_repeated})"));
            }
            match scalar_type(&rf.ty) {
                Some(t) => {
                    if of.r#type() != t {
                        errs.push(format!(
                            "{what}: type {} but ours is {:?}",
                            rf.ty,
                            of.r#type()
                        ));
                    }
                }
                None => {
                    let tn = of.type_name();
                    if !matches!(of.r#type(), Type::Message | Type::Enum)
                        || !tn.ends_with(&format!(".{}", rf.ty))
                    {
                        errs.push(format!("{what}: type {} but ours is {tn:?}", rf.ty));
                    }
                }
            }
            let our_oneof = of
                .oneof_index
                .and_then(|i| our.oneof_decl.get(usize::try_from(i).ok()?))
                .map(|o| o.name().to_owned());
            // proto3 `optional` would show up as a synthetic oneof; etcd uses none.
            if our_oneof != rf.oneof {
                errs.push(format!(
                    "{what}: oneof {:?} but ours is {our_oneof:?}",
                    rf.oneof
                ));
            }
        }
    }

    for (name, e) in &reference.enums {
        if newer_than_3_5(&e.version) {
            continue;
        }
        let Some(our) = ours.enums.get(name) else {
            errs.push(format!("missing enum {name}"));
            continue;
        };
        for (value, number, v) in &e.values {
            if newer_than_3_5(v) {
                continue;
            }
            match our.value.iter().find(|ev| ev.name() == value) {
                None => errs.push(format!("enum {name}: missing value {value}")),
                Some(ev) if ev.number() != *number => errs.push(format!(
                    "enum {name}: {value} = {number} but ours is {}",
                    ev.number()
                )),
                Some(_) => {}
            }
        }
    }

    for (name, rpcs) in &reference.services {
        let Some(our) = ours.services.get(name) else {
            errs.push(format!("missing service {name}"));
            continue;
        };
        for rpc in rpcs {
            let resolve = |ty: &str| {
                if ty.contains('.') {
                    ty.to_owned()
                } else {
                    format!("{}.{ty}", reference.package)
                }
            };
            let (input, output) = (resolve(&rpc.input), resolve(&rpc.output));
            let newer = |full: &String| skipped(full, reference.messages.get(full));
            if newer(&input) || newer(&output) {
                continue;
            }
            let what = format!("{name}.{}", rpc.name);
            let Some(m) = our.method.iter().find(|m| m.name() == rpc.name) else {
                errs.push(format!("missing rpc {what}"));
                continue;
            };
            if m.input_type() != format!(".{input}") || m.output_type() != format!(".{output}") {
                errs.push(format!(
                    "{what}: ({input}) -> ({output}) but ours is ({}) -> ({})",
                    m.input_type(),
                    m.output_type()
                ));
            }
            if m.client_streaming() != rpc.client_streaming
                || m.server_streaming() != rpc.server_streaming
            {
                errs.push(format!("{what}: streaming flags differ"));
            }
        }
    }
    errs
}

fn report(errs: &[String], source: &Path) {
    assert!(
        errs.is_empty(),
        "{} mismatch(es) against {}:\n  {}",
        errs.len(),
        source.display(),
        errs.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

const GOCODE_ETCD: &str = "/usr/share/gocode/src/go.etcd.io/etcd";

/// etcd 3.4 files under /usr/share/gocode, relative to GOCODE_ETCD.
const ETCD_34_FILES: &[&str] = &[
    "mvcc/mvccpb/kv.proto",
    "auth/authpb/auth.proto",
    "etcdserver/etcdserverpb/rpc.proto",
    "etcdserver/api/v3election/v3electionpb/v3election.proto",
    "etcdserver/api/v3lock/v3lockpb/v3lock.proto",
];

#[test]
fn matches_etcd_3_4_originals() {
    let root = Path::new(GOCODE_ETCD);
    if !root.is_dir() {
        eprintln!("note: {GOCODE_ETCD} not found; skipping comparison with etcd 3.4 sources");
        return;
    }
    let ours = ours();
    for rel in ETCD_34_FILES {
        let path = root.join(rel);
        let reference = parse_file(&path);
        assert!(
            !reference.messages.is_empty(),
            "parsed no messages from {}",
            path.display()
        );
        if reference.package == "etcdserverpb" {
            // Sanity check of the parser itself on the big file.
            assert!(
                reference.messages.len() >= 90,
                "{}",
                reference.messages.len()
            );
            assert_eq!(reference.services.len(), 6);
            let rpcs: usize = reference.services.values().map(Vec::len).sum();
            assert_eq!(rpcs, 39, "etcd 3.4 has 39 RPCs");
        }
        report(&forward_check(&reference, &ours, &[]), &path);
    }
}

/// What 3.5 added on top of 3.4; anything else we have must exist in 3.4.
const ADDED_IN_3_5_MESSAGES: &[&str] = &[
    "etcdserverpb.DowngradeRequest",
    "etcdserverpb.DowngradeResponse",
    "etcdserverpb.AuthStatusRequest",
    "etcdserverpb.AuthStatusResponse",
];
const ADDED_IN_3_5_FIELDS: &[&str] = &[
    "etcdserverpb.MemberListRequest.linearizable",
    "etcdserverpb.AuthUserAddRequest.hashedPassword",
    "etcdserverpb.AuthUserChangePasswordRequest.hashedPassword",
    // Late 3.5 / 3.6.
    "etcdserverpb.HashKVResponse.hash_revision",
];
const ADDED_IN_3_5_RPCS: &[&str] = &[
    "etcdserverpb.Maintenance.Downgrade",
    "etcdserverpb.Auth.AuthStatus",
];
const ADDED_IN_3_5_ENUMS: &[&str] = &["etcdserverpb.DowngradeRequest.DowngradeAction"];

#[test]
fn nothing_beyond_etcd_3_4_plus_known_3_5_additions() {
    let root = Path::new(GOCODE_ETCD);
    if !root.is_dir() {
        eprintln!("note: {GOCODE_ETCD} not found; skipping comparison with etcd 3.4 sources");
        return;
    }
    let mut reference = RefFile::default();
    for rel in ETCD_34_FILES {
        let f = parse_file(&root.join(rel));
        reference.messages.extend(f.messages);
        reference.enums.extend(f.enums);
        reference.services.extend(f.services);
    }
    let ours = ours();
    let mut errs = Vec::new();
    for (name, m) in ours
        .messages
        .iter()
        .filter(|(n, _)| !n.starts_with("rampartpb."))
    {
        if ADDED_IN_3_5_MESSAGES.contains(&name.as_str()) {
            continue;
        }
        let Some(r) = reference.messages.get(name) else {
            errs.push(format!("extra message {name}"));
            continue;
        };
        for f in &m.field {
            let full = format!("{name}.{}", f.name());
            if !ADDED_IN_3_5_FIELDS.contains(&full.as_str())
                && !r.fields.iter().any(|rf| rf.name == f.name())
            {
                errs.push(format!("extra field {full} = {}", f.number()));
            }
        }
    }
    for (name, e) in ours
        .enums
        .iter()
        .filter(|(n, _)| !n.starts_with("rampartpb."))
    {
        if ADDED_IN_3_5_ENUMS.contains(&name.as_str()) {
            continue;
        }
        let Some(r) = reference.enums.get(name) else {
            errs.push(format!("extra enum {name}"));
            continue;
        };
        for v in &e.value {
            if !r.values.iter().any(|(n, _, _)| n == v.name()) {
                errs.push(format!("extra enum value {name}.{}", v.name()));
            }
        }
    }
    for (name, s) in ours
        .services
        .iter()
        .filter(|(n, _)| !n.starts_with("rampartpb."))
    {
        let Some(r) = reference.services.get(name) else {
            errs.push(format!("extra service {name}"));
            continue;
        };
        for m in &s.method {
            let full = format!("{name}.{}", m.name());
            if !ADDED_IN_3_5_RPCS.contains(&full.as_str())
                && !r.iter().any(|rpc| rpc.name == m.name())
            {
                errs.push(format!("extra rpc {full}"));
            }
        }
    }
    report(&errs, root);
}

/// The etcd-client crate ships newer etcd protos whose items are annotated
/// with the etcd version that introduced them.
fn etcd_client_protos() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let src = cargo_home.join("registry").join("src");
    std::fs::read_dir(src).ok()?.flatten().find_map(|index| {
        let p = index
            .path()
            .join("etcd-client-0.21.1")
            .join("proto")
            .join("etcd");
        p.is_dir().then_some(p)
    })
}

#[test]
fn matches_etcd_3_5_annotated_protos() {
    let Some(root) = etcd_client_protos() else {
        eprintln!("note: etcd-client-0.21.1 sources not in the cargo registry; skipping 3.5 check");
        return;
    };
    let ours = ours();
    for rel in [
        "api/mvccpb/kv.proto",
        "api/authpb/auth.proto",
        "api/etcdserverpb/rpc.proto",
        "server/etcdserver/api/v3election/v3electionpb/v3election.proto",
        "server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
    ] {
        let path = root.join(rel);
        let reference = parse_file(&path);
        assert!(
            !reference.messages.is_empty(),
            "parsed no messages from {}",
            path.display()
        );
        // DowngradeInfo (3.6) has no version annotation of its own.
        report(&forward_check(&reference, &ours, &["DowngradeInfo"]), &path);
    }
}

/// The parser and checker must notice a wrong number; guard against a
/// checker that silently accepts everything.
#[test]
fn checker_detects_a_wrong_field_number() {
    let src = r#"
        syntax = "proto3";
        package etcdserverpb;
        message PutRequest {
          bytes key = 1;
          bytes value = 3; // wrong on purpose: etcd has 2
          bool prev_kv = 4 [(gogoproto.nullable) = false];
        }
        service KV {
          rpc Put(PutRequest) returns (PutResponse) {
            option (google.api.http) = { post: "/v3/kv/put" body: "*" };
          }
          rpc Range(stream RangeRequest) returns (RangeResponse) {}
        }
    "#;
    let reference = Parser {
        toks: tokenize(src),
        pos: 0,
    }
    .file();
    let errs = forward_check(&reference, &ours(), &[]);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].contains("PutRequest.value = 3"), "{errs:#?}");
    assert!(errs[1].contains("KV.Range: streaming"), "{errs:#?}");
}
