//! The etcd v3 Watch service.
//!
//! One task per gRPC stream ([`StreamTask`]) owns the stream's watches, one subscription to the
//! change feed and the sending half of a bounded channel to the client. The subscription is taken
//! when the stream opens, before any of its watches reads the current revision, so every change
//! after that revision reaches the task. A watch is in one of three states:
//!
//! - *catching up*: it reads MVCC history in bounded chunks (`Mvcc::events_since`) from the last
//!   revision it has covered, until it has covered the revision that was current when it read;
//! - *synced*: it takes each change from the feed, in revision order. A change more than one
//!   revision ahead of it (the feed never carried the revisions between: a raft snapshot was
//!   installed on this member) sends it back to catching up;
//! - *done*: canceled because its history was compacted; its id stays taken until the client
//!   cancels it, as in etcd.
//!
//! Every watch keeps `rev`: all its matching events up to that revision have been queued to the
//! client. History and feed may overlap, but an event is sent only if its revision is above `rev`,
//! and `rev` passes a revision only once that revision's events are queued. That is what makes the
//! hand-over race-free and gives etcd's guarantees: ordered, unique, atomic (a revision is never
//! split, except by `fragment`), reliable (no gap from the start revision on) and resumable.
//!
//! Memory stays bounded with slow clients: the outgoing channel is bounded, and while the task
//! waits on it the feed subscription lags instead of buffering. A lagged subscription sends every
//! synced watch back to catching up from history.
//!
//! Progress notifications never claim more than is true: a notification at revision R is sent
//! only when every event up to R has been queued and none above R has been. A `ProgressRequest`
//! is answered (watch id -1) once every watch of the stream is synced, as etcd 3.5 does.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rampart_core::{limits, EtcdError};
use rampart_proto::etcdserverpb::watch_create_request::FilterType;
use rampart_proto::etcdserverpb::watch_request::RequestUnion;
use rampart_proto::etcdserverpb::watch_server::Watch;
use rampart_proto::etcdserverpb::{RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use rampart_proto::mvccpb::event::EventType;
use rampart_proto::mvccpb::{Event, KeyValue};
use rampart_raft::state_machine::Change;
use rampart_storage::mvcc::Mvcc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::status;
use crate::auth;
use crate::member::Member;

/// etcd's `minWatchProgressInterval`.
const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Field number of `WatchResponse.events`, for sizing responses without encoding them.
const EVENTS_FIELD: u32 = 11;
/// etcd's `clientv3.InvalidWatchID`: the id of refused creates and of stream-wide progress.
const INVALID_WATCH_ID: i64 = -1;

static PROGRESS_INTERVAL_MS: AtomicU64 = AtomicU64::new(limits::WATCH_PROGRESS_INTERVAL_MS);

/// Sets the interval of progress notifications for streams opened from now on (etcd's
/// `--experimental-watch-progress-notify-interval` and `SetProgressReportInterval`). Values below
/// etcd's minimum of 100 ms are raised to it.
pub fn set_progress_interval(interval: Duration) {
    let ms = interval.max(MIN_PROGRESS_INTERVAL).as_millis();
    PROGRESS_INTERVAL_MS.store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// The progress interval plus up to 10% of jitter, so that watchers created together (a client
/// restarting) are not all notified at the same moment. etcd does the same.
fn progress_interval() -> Duration {
    let ms = PROGRESS_INTERVAL_MS.load(Ordering::Relaxed);
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Duration::from_millis(ms + random % (ms / 10).max(1))
}

type Out = mpsc::Sender<Result<WatchResponse, Status>>;

/// The client is gone (or the stream failed): the stream's task ends.
struct Gone;

async fn send(out: &Out, resp: WatchResponse) -> Result<(), Gone> {
    out.send(Ok(resp)).await.map_err(|_| Gone)
}

pub struct WatchService {
    pub member: Arc<Member>,
    /// Becomes true when the member stops: open streams end with "server stopped" (clients
    /// resume elsewhere) instead of holding up the listener's graceful shutdown.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let (out, rx) = mpsc::channel(limits::WATCH_STREAM_BUFFER_RESPONSES);
        let task = StreamTask {
            metadata: request.metadata().clone(),
            feed: self.member.sm.feed.subscribe(),
            member: self.member.clone(),
            stop: self.stop.clone(),
            out,
            watches: BTreeMap::new(),
            next_id: 0,
            feed_rev: 0,
            progress_requested: false,
            catch_up_after: i64::MIN,
            fragment_bytes: self.member.cfg.max_request_bytes + limits::GRPC_OVERHEAD_BYTES,
            batch_bytes: self.member.cfg.max_request_bytes,
        };
        tokio::spawn(task.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    CatchingUp,
    Synced,
    Done,
}

struct Watcher {
    key: Vec<u8>,
    /// None: the single key; Some(empty): every key from `key` on; Some(end): [key, end).
    range_end: Option<Vec<u8>>,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    state: State,
    /// Every matching event up to this revision has been queued to the client.
    rev: i64,
    /// The header revision of the last response queued for this watch.
    last_header_rev: i64,
    /// Events were sent since the last progress tick; etcd skips the next notification then.
    sent_since_tick: bool,
}

fn event_rev(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        let Some(kv) = &e.kv else { return false };
        let is_put = e.r#type == EventType::Put as i32;
        if (is_put && self.no_put) || (!is_put && self.no_delete) {
            return false;
        }
        match &self.range_end {
            None => kv.key == self.key,
            Some(end) => kv.key >= self.key && (end.is_empty() || kv.key < *end),
        }
    }

    /// The events this watch wants, as it wants them. History fills every `prev_kv`; the feed
    /// fills it for deletes only, so a put's is read here, at the revision before the put, when
    /// the watch asks for it (as etcd's watch server reads it). If that revision has been
    /// compacted meanwhile the event goes without it, as in etcd.
    fn select(&self, events: impl IntoIterator<Item = Event>, mvcc: &Mvcc) -> Vec<Event> {
        events
            .into_iter()
            .filter(|e| self.wants(e))
            .map(|mut e| {
                if !self.prev_kv {
                    e.prev_kv = None;
                } else if e.prev_kv.is_none() && e.r#type == EventType::Put as i32 {
                    e.prev_kv = e.kv.as_ref().filter(|kv| kv.version > 1).and_then(|kv| previous(mvcc, kv));
                }
                e
            })
            .collect()
    }
}

/// `kv`'s key as of the revision before `kv` was written; None if it did not exist or that
/// revision is compacted.
fn previous(mvcc: &Mvcc, kv: &KeyValue) -> Option<KeyValue> {
    let req = RangeRequest { key: kv.key.clone(), revision: kv.mod_revision - 1, ..Default::default() };
    mvcc.range(&req).ok()?.kvs.pop()
}

/// Queues one response of `events` for watch `id`, in fragments if it asked for them.
async fn send_events(
    out: &Out,
    member: &Member,
    id: i64,
    w: &mut Watcher,
    events: Vec<Event>,
    header_rev: i64,
    fragment_bytes: usize,
) -> Result<(), Gone> {
    let resp = WatchResponse { header: Some(member.header(header_rev)), watch_id: id, events, ..Default::default() };
    if w.fragment {
        for part in fragments(resp, fragment_bytes) {
            send(out, part).await?;
        }
    } else {
        send(out, resp).await?;
    }
    w.last_header_rev = header_rev;
    w.sent_since_tick = true;
    Ok(())
}

/// etcd's `sendFragments`: a response of at least `limit` bytes with two or more events becomes
/// several, each under `limit` unless one event alone is larger, with `fragment` set on all but
/// the last.
fn fragments(resp: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() < limit || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut base = resp;
    let events = std::mem::take(&mut base.events);
    base.fragment = true;
    let base_len = base.encoded_len();
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut part_len = base_len;
    for e in events {
        let len = prost::encoding::message::encoded_len(EVENTS_FIELD, &e);
        if !part.is_empty() && part_len + len >= limit {
            parts.push(WatchResponse { events: std::mem::take(&mut part), ..base.clone() });
            part_len = base_len;
        }
        part_len += len;
        part.push(e);
    }
    parts.push(WatchResponse { events: part, fragment: false, ..base });
    parts
}

/// Groups events (whole revisions, in revision order) into responses of at most about `budget`
/// bytes. A revision never spans two responses; one larger than the budget goes alone.
fn batches(events: Vec<Event>, budget: usize) -> Vec<Vec<Event>> {
    let mut revisions: Vec<(Vec<Event>, usize)> = Vec::new();
    for e in events {
        let len = prost::encoding::message::encoded_len(EVENTS_FIELD, &e);
        match revisions.last_mut() {
            Some((r, bytes)) if event_rev(&r[0]) == event_rev(&e) => {
                r.push(e);
                *bytes += len;
            }
            _ => revisions.push((vec![e], len)),
        }
    }
    let mut out: Vec<Vec<Event>> = Vec::new();
    let mut out_bytes = 0;
    for (r, bytes) in revisions {
        match out.last_mut() {
            Some(batch) if out_bytes + bytes <= budget => {
                batch.extend(r);
                out_bytes += bytes;
            }
            _ => {
                out.push(r);
                out_bytes = bytes;
            }
        }
    }
    out
}

/// What woke the stream's task.
enum Input {
    Gone,
    Stopping,
    Request(Option<WatchRequest>),
    Change(Result<Arc<Change>, RecvError>),
    ProgressTick,
    ResyncTick,
    CatchUp,
}

/// One Watch stream: its watches, its feed subscription, its bounded channel to the client.
struct StreamTask {
    member: Arc<Member>,
    /// The stream's gRPC metadata: its auth token, checked at every create.
    metadata: tonic::metadata::MetadataMap,
    out: Out,
    feed: broadcast::Receiver<Arc<Change>>,
    stop: tokio::sync::watch::Receiver<bool>,
    watches: BTreeMap<i64, Watcher>,
    /// etcd assigns ids from 0 up, skipping ids the client chose.
    next_id: i64,
    /// The highest revision taken from the feed; every later change is still to come from it.
    feed_rev: i64,
    /// A ProgressRequest waits for an answer.
    progress_requested: bool,
    /// Catching-up watches take turns; this one went last.
    catch_up_after: i64,
    /// Responses at least this large are fragmented for watches that allow it (etcd: the request
    /// limit plus gRPC overhead).
    fragment_bytes: usize,
    /// Size of the responses a replay from history is grouped into.
    batch_bytes: usize,
}

impl StreamTask {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>) {
        let interval = progress_interval();
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(Duration::from_millis(limits::WATCH_RESYNC_CHECK_MS));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inbound_open = true;
        loop {
            let catching_up = self.watches.values().any(|w| w.state == State::CatchingUp);
            // Unbiased: history catch-up and the feed take turns, so neither starves the other
            // under a heavy write load.
            let input = tokio::select! {
                _ = self.out.closed() => Input::Gone,
                _ = self.stop.wait_for(|stop| *stop) => Input::Stopping,
                req = inbound.message(), if inbound_open => match req {
                    Ok(req) => Input::Request(req),
                    Err(_) => Input::Gone,
                },
                change = self.feed.recv() => Input::Change(change),
                _ = progress.tick() => Input::ProgressTick,
                _ = resync.tick() => Input::ResyncTick,
                _ = std::future::ready(()), if catching_up => Input::CatchUp,
            };
            let step = match input {
                Input::Gone => return,
                Input::Stopping => {
                    let _ = self.out.send(Err(status(EtcdError::Stopped))).await;
                    return;
                }
                // A client that closes its sending side still gets its events, as in etcd.
                Input::Request(None) => {
                    inbound_open = false;
                    Ok(())
                }
                Input::Request(Some(req)) => self.on_request(req).await,
                Input::Change(change) => self.on_change(change).await,
                Input::ProgressTick => self.on_progress_tick().await,
                Input::ResyncTick => {
                    self.check_resync();
                    Ok(())
                }
                Input::CatchUp => self.catch_up_one().await,
            };
            if step.is_err() {
                return;
            }
            if self.progress_requested && self.answer_progress().await.is_err() {
                return;
            }
        }
    }

    fn current_revision(&self) -> i64 {
        self.member.sm.mvcc.current_revision()
    }

    async fn on_request(&mut self, req: WatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // etcd answers nothing for an unknown id.
                if self.watches.remove(&c.watch_id).is_some() {
                    let header = Some(self.member.header(self.current_revision()));
                    let resp = WatchResponse { header, watch_id: c.watch_id, canceled: true, ..Default::default() };
                    send(&self.out, resp).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.progress_requested = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, req: WatchCreateRequest) -> Result<(), Gone> {
        let current = self.current_revision();
        // etcd's isWatchPermitted: read permission on the watched range, checked per create with
        // the stream's token (which may have expired since the stream opened).
        let permitted = auth::caller(&self.member, &self.metadata).and_then(|c| c.check_read(&req.key, &req.range_end));
        if permitted.is_err() {
            let resp = WatchResponse {
                header: Some(self.member.header(current)),
                watch_id: req.watch_id,
                created: true,
                canceled: true,
                cancel_reason: EtcdError::PermissionDenied.to_string(),
                ..Default::default()
            };
            return send(&self.out, resp).await;
        }
        // etcd's v3rpc: an empty key is "\0", the smallest key; a range end of "\0" means every
        // key from `key` on.
        let key = if req.key.is_empty() { vec![0] } else { req.key };
        let range_end = match req.range_end.as_slice() {
            [] => None,
            [0] => Some(Vec::new()),
            _ => Some(req.range_end),
        };
        let refused = if matches!(&range_end, Some(end) if !end.is_empty() && key >= *end) {
            Some("mvcc: watcher range is empty".to_string())
        } else if req.watch_id != 0 && self.watches.contains_key(&req.watch_id) {
            Some("mvcc: duplicate watch ID provided on the WatchStream".to_string())
        } else if self.watches.len() >= limits::MAX_WATCHES_PER_STREAM {
            Some(format!("rampart: too many watches on one stream (at most {})", limits::MAX_WATCHES_PER_STREAM))
        } else {
            None
        };
        if let Some(reason) = refused {
            let resp = WatchResponse {
                header: Some(self.member.header(current)),
                watch_id: INVALID_WATCH_ID,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            };
            return send(&self.out, resp).await;
        }

        let id = if req.watch_id == 0 {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else {
            req.watch_id
        };
        let start = if req.start_revision == 0 { current + 1 } else { req.start_revision };
        let rev = start.saturating_sub(1);
        // A watch from now (or from the future) needs no history: every change after `current`
        // comes through the feed, which this stream subscribed to before reading `current`.
        let state = if rev >= current && rev >= self.feed_rev { State::Synced } else { State::CatchingUp };
        let filters = |f: FilterType| req.filters.contains(&(f as i32));
        let w = Watcher {
            key,
            range_end,
            no_put: filters(FilterType::Noput),
            no_delete: filters(FilterType::Nodelete),
            prev_kv: req.prev_kv,
            fragment: req.fragment,
            progress_notify: req.progress_notify,
            state,
            rev,
            last_header_rev: current,
            sent_since_tick: false,
        };
        let resp = WatchResponse { header: Some(self.member.header(current)), watch_id: id, created: true, ..Default::default() };
        send(&self.out, resp).await?;
        self.watches.insert(id, w);
        Ok(())
    }

    async fn on_change(&mut self, change: Result<Arc<Change>, RecvError>) -> Result<(), Gone> {
        let change = match change {
            Ok(c) => c,
            Err(RecvError::Lagged(skipped)) => {
                // The client reads slower than the cluster writes. Rather than buffer, its synced
                // watches read history again from where each of them is.
                tracing::debug!(skipped, "watch stream lagged behind the change feed; replaying from history");
                for w in self.watches.values_mut().filter(|w| w.state == State::Synced) {
                    w.state = State::CatchingUp;
                }
                return Ok(());
            }
            Err(RecvError::Closed) => {
                let _ = self.out.send(Err(status(EtcdError::Stopped))).await;
                return Err(Gone);
            }
        };
        self.feed_rev = self.feed_rev.max(change.revision);
        for (id, w) in self.watches.iter_mut() {
            if w.state != State::Synced || w.rev >= change.revision {
                continue;
            }
            if w.rev < change.revision - 1 {
                // Revisions the feed never carried (a snapshot was installed): read them.
                w.state = State::CatchingUp;
                continue;
            }
            w.rev = change.revision;
            let events = w.select(change.events.iter().cloned(), &self.member.sm.mvcc);
            if !events.is_empty() {
                send_events(&self.out, &self.member, *id, w, events, change.revision, self.fragment_bytes).await?;
            }
        }
        Ok(())
    }

    /// Reads one chunk of history for the next catching-up watch.
    async fn catch_up_one(&mut self) -> Result<(), Gone> {
        let after = (Bound::Excluded(self.catch_up_after), Bound::Unbounded);
        let next = self
            .watches
            .range(after)
            .chain(self.watches.range(..=self.catch_up_after))
            .find(|(_, w)| w.state == State::CatchingUp)
            .map(|(id, _)| *id);
        let Some(id) = next else { return Ok(()) };
        self.catch_up_after = id;
        let mvcc = &self.member.sm.mvcc;
        let w = self.watches.get_mut(&id).expect("chosen above");
        // Read before the history: everything up to `current` is in what events_since sees.
        let current = mvcc.current_revision();
        let events = match mvcc.events_since(w.rev, limits::WATCH_REPLAY_CHUNK_EVENTS) {
            Ok(events) => events,
            Err(EtcdError::Compacted) => {
                w.state = State::Done;
                // As etcd (watcher_group.go chooseAll): canceled with the compaction revision,
                // and no header revision.
                let resp = WatchResponse {
                    header: Some(self.member.header(0)),
                    watch_id: id,
                    canceled: true,
                    compact_revision: mvcc.compact_revision(),
                    ..Default::default()
                };
                return send(&self.out, resp).await;
            }
            Err(e) => {
                tracing::error!(%e, "watch cannot read history");
                let _ = self.out.send(Err(status(e))).await;
                return Err(Gone);
            }
        };
        let more = events.len() >= limits::WATCH_REPLAY_CHUNK_EVENTS;
        let last = events.last().map(event_rev);
        for batch in batches(w.select(events, mvcc), self.batch_bytes) {
            // As etcd's syncWatchers: a replayed response carries the current revision.
            let header_rev = current.max(batch.last().map_or(0, event_rev));
            send_events(&self.out, &self.member, id, w, batch, header_rev, self.fragment_bytes).await?;
        }
        w.rev = match last {
            // events_since never splits a revision: everything up to `last` was read.
            Some(last) if more => last,
            _ => w.rev.max(current).max(last.unwrap_or(0)),
        };
        if !more && w.rev >= self.feed_rev {
            w.state = State::Synced;
        }
        Ok(())
    }

    /// Answers a pending ProgressRequest if the stream can say truthfully how far it is.
    async fn answer_progress(&mut self) -> Result<(), Gone> {
        let mut rev = self.current_revision();
        for w in self.watches.values() {
            match w.state {
                // Answered once every watch has caught up, as etcd 3.5 defers it.
                State::CatchingUp => return Ok(()),
                State::Synced => rev = rev.min(w.rev),
                State::Done => {}
            }
        }
        // A watch already past `rev` (it caught up from history faster than the feed is read)
        // would see progress go backwards: wait until the others have caught up with it.
        if self.watches.values().any(|w| w.state == State::Synced && w.last_header_rev > rev) {
            return Ok(());
        }
        self.progress_requested = false;
        let resp = WatchResponse { header: Some(self.member.header(rev)), watch_id: INVALID_WATCH_ID, ..Default::default() };
        send(&self.out, resp).await
    }

    /// etcd's periodic progress notification: a synced watch that asked for it and got no events
    /// since the last tick is told how far it is.
    async fn on_progress_tick(&mut self) -> Result<(), Gone> {
        let current = self.current_revision();
        for (id, w) in self.watches.iter_mut().filter(|(_, w)| w.progress_notify) {
            let rev = w.rev.min(current);
            if !w.sent_since_tick && w.state == State::Synced && rev >= w.last_header_rev {
                let resp = WatchResponse { header: Some(self.member.header(rev)), watch_id: *id, ..Default::default() };
                send(&self.out, resp).await?;
                w.last_header_rev = rev;
            }
            w.sent_since_tick = false;
        }
        Ok(())
    }

    /// A synced watch behind the current revision with nothing left in the feed missed changes
    /// the feed never carried (a snapshot was installed and nothing was written since): it reads
    /// them from history. Harmless if a change was merely between its commit and its publication.
    fn check_resync(&mut self) {
        if !self.feed.is_empty() {
            return;
        }
        let current = self.current_revision();
        for w in self.watches.values_mut().filter(|w| w.state == State::Synced && w.rev < current) {
            w.state = State::CatchingUp;
        }
    }
}

#[cfg(test)]
mod tests {
    use rampart_proto::mvccpb::KeyValue;

    use super::*;

    fn put(key: &str, rev: i64, value_len: usize) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue { key: key.into(), mod_revision: rev, value: vec![b'x'; value_len], ..Default::default() }),
            prev_kv: None,
        }
    }

    fn show(parts: &[Vec<Event>]) -> String {
        let part = |p: &Vec<Event>| p.iter().map(|e| e.kv.as_ref().unwrap().mod_revision.to_string()).collect::<Vec<_>>().join(",");
        parts.iter().map(part).collect::<Vec<_>>().join(" | ")
    }

    #[test]
    fn batches_keep_revisions_whole() {
        let events = vec![put("a", 2, 40), put("b", 2, 40), put("a", 3, 40), put("a", 4, 200), put("a", 5, 10)];
        assert_eq!(show(&batches(events.clone(), 1_000)), "2,2,3,4,5");
        assert_eq!(show(&batches(events.clone(), 100)), "2,2 | 3 | 4 | 5");
        assert_eq!(show(&batches(events, 160)), "2,2,3 | 4 | 5");
        assert_eq!(show(&batches(Vec::new(), 100)), "");
    }

    #[test]
    fn fragments_like_etcd() {
        let resp = |events| WatchResponse { watch_id: 7, events, ..Default::default() };
        let show = |parts: Vec<WatchResponse>| {
            parts
                .iter()
                .map(|p| format!("{}{}", p.events.len(), if p.fragment { "+" } else { "" }))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let events: Vec<Event> = (0..5).map(|i| put("k", 9, 100 + i)).collect();
        // Small enough: one response, not marked.
        assert_eq!(show(fragments(resp(events.clone()), 10_000)), "5");
        // Each part stays under the limit; all but the last are marked.
        assert_eq!(show(fragments(resp(events.clone()), 300)), "2+ 2+ 1");
        // An event larger than the limit goes alone.
        assert_eq!(show(fragments(resp(events.clone()), 50)), "1+ 1+ 1+ 1+ 1");
        // One event is never fragmented.
        assert_eq!(show(fragments(resp(events[..1].to_vec()), 50)), "1");
        for part in fragments(resp(events), 300) {
            assert!(part.encoded_len() < 300 || part.events.len() == 1);
            assert_eq!(part.watch_id, 7);
        }
    }
}
