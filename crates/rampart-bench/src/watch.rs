//! The watch fan-out workload: `--watchers` streams each watch the whole key space while the
//! clients put; every put's value starts with its send time, so each watcher measures the delay
//! from a put being sent to its event arriving.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use rampart_proto::etcdserverpb::watch_client::WatchClient;
use rampart_proto::etcdserverpb::watch_request::RequestUnion;
use rampart_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Streaming;

use crate::args::{BenchArgs, WATCH_STAMP_BYTES};
use crate::client::{connect, join_clients, Conn, open_clients, result, spawn_clients, spawn_progress, with_timeout, OpError, Shared};
use crate::stats::{rate_per_s, Latencies};
use crate::{progress_interval, BenchResult, WatchStats};

/// How long watchers may take, after the last put was acknowledged, to receive the last events.
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// Every bench key is decimal digits, so ["0", ":") (':' follows '9' in ASCII) holds them all.
const WATCH_FROM: &[u8] = b"0";
const WATCH_TO: &[u8] = b":";

/// Opens one watch stream and waits for the server to confirm the watcher.
async fn open_watcher(endpoint: String, channel: Channel, timeout: Duration) -> Result<Streaming<WatchResponse>, OpError> {
    let mut client = WatchClient::new(channel);
    let create = WatchCreateRequest { key: WATCH_FROM.to_vec(), range_end: WATCH_TO.to_vec(), ..Default::default() };
    let create = WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) };
    // The request side stays open: etcd ends a watch stream whose client closed its sending half.
    let requests = futures::stream::iter([create]).chain(futures::stream::pending());
    let mut stream = with_timeout(&endpoint, "Watch", timeout, client.watch(requests)).await?.into_inner();
    match with_timeout(&endpoint, "Watch", timeout, stream.message()).await? {
        Some(r) if r.created && !r.canceled => Ok(stream),
        Some(r) => Err(OpError { message: format!("{endpoint}: watch not created: {:?}", r.cancel_reason), fatal: true }),
        None => Err(OpError { message: format!("{endpoint}: watch stream ended before the watcher was created"), fatal: true }),
    }
}

/// Receives events until `expected` (known once the puts are done) have arrived or the drain
/// time has passed. Returns the delivery latencies.
async fn consume(
    mut stream: Streaming<WatchResponse>,
    epoch: Instant,
    mut expected: watch::Receiver<Option<u64>>,
) -> Result<Latencies, String> {
    let mut latencies = Latencies::new();
    let mut drain_until = None;
    loop {
        if let Some(expected) = *expected.borrow_and_update() {
            if latencies.count() >= expected {
                break;
            }
            drain_until.get_or_insert_with(|| Instant::now() + DRAIN_TIME);
        }
        let drained = async {
            match drain_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(response)) => {
                    if response.canceled {
                        return Err(format!("watch canceled by the server: {:?}", response.cancel_reason));
                    }
                    let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    for kv in response.events.iter().filter_map(|e| e.kv.as_ref()) {
                        let Some(stamp) = kv.value.get(..WATCH_STAMP_BYTES) else { continue };
                        let sent = u64::from_le_bytes(stamp.try_into().expect("8 bytes"));
                        // A value not written by this run (another writer) can carry any number.
                        if sent <= now {
                            latencies.record(Duration::from_nanos(now - sent));
                        }
                    }
                }
                Ok(None) => return Err("watch stream ended by the server".to_string()),
                Err(s) => return Err(format!("watch stream failed: {:?}: {}", s.code(), s.message())),
            },
            _ = expected.changed() => {}
            _ = drained => break,
        }
    }
    Ok(latencies)
}

pub(crate) async fn run(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    let urls = args.endpoint_urls();
    let channels = connect(&urls, args.connections).await?;
    let opens = (0..args.watchers).map(|w| {
        let (endpoint, channel) = channels[w % channels.len()].clone();
        open_watcher(endpoint, channel, args.timeout)
    });
    let streams = futures::future::try_join_all(opens).await.map_err(|e| anyhow!(e.message))?;
    let epoch = Instant::now();
    let conns: Vec<_> = channels.into_iter().map(|(endpoint, channel)| Conn::Grpc { endpoint, channel }).collect();
    let writers = open_clients(args, &conns, epoch).await?;

    let start = Instant::now();
    let shared = Arc::new(Shared::new(args, start));
    let (expected_tx, expected_rx) = watch::channel(None);
    let watchers: Vec<_> =
        streams.into_iter().map(|s| tokio::spawn(consume(s, epoch, expected_rx.clone()))).collect();
    let progress = spawn_progress("puts", shared.clone(), start, progress_interval(args));
    let put_latencies = join_clients(spawn_clients(writers, &shared)).await;
    let puts_elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    let puts = put_latencies?.count();
    expected_tx.send_replace(Some(puts));

    let mut events = Latencies::new();
    let mut failure = None;
    for w in watchers {
        match w.await.context("a watcher task panicked")? {
            Ok(l) => events.merge(&l),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    let elapsed = start.elapsed();
    if let Some(why) = shared.fatal() {
        bail!(why);
    }
    if let Some(why) = failure {
        bail!(why);
    }

    let events_expected = puts * args.watchers as u64;
    let mut r = result(args, &urls, &shared, &events, elapsed);
    r.watch = Some(WatchStats {
        watchers: args.watchers,
        puts,
        puts_per_s: rate_per_s(puts, puts_elapsed),
        events_expected,
        events_missing: events_expected.saturating_sub(events.count()),
    });
    Ok(r)
}
