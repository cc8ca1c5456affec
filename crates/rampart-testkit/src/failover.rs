//! The failover benchmark: rounds of leader SIGKILL under a steady write load, measuring how long
//! writes stop (the write-unavailability gap), for Rampart and etcd started the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_proto::etcdserverpb::kv_client::KvClient;
use rampart_proto::etcdserverpb::{PutRequest, RangeRequest};
use serde::Serialize;

use crate::cluster::{channel, Cluster, ClusterSpec};

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub system: String,
    pub rounds: usize,
    /// Write gap of each round, in ms: the longest time without a successful write, measured
    /// from the kill until writes have flowed again for a second.
    pub gaps_ms: Vec<u64>,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    pub acked_writes: usize,
    /// Acknowledged writes not readable afterwards. Must be 0.
    pub lost_acked_writes: usize,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Acks {
    /// (completion instant, key)
    done: Mutex<Vec<(Instant, String)>>,
}

async fn writer(endpoints: Vec<String>, prefix: String, start_ep: usize, stop: Arc<AtomicBool>, acks: Arc<Acks>) {
    let mut ep = start_ep % endpoints.len();
    let mut kv = KvClient::new(channel(&endpoints[ep]).unwrap());
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let key = format!("{prefix}/{seq:08}");
        let req = PutRequest { key: key.clone().into_bytes(), value: b"v".to_vec(), ..Default::default() };
        match tokio::time::timeout(Duration::from_secs(2), kv.put(req)).await {
            Ok(Ok(_)) => acks.done.lock().unwrap().push((Instant::now(), key)),
            _ => {
                ep = (ep + 1) % endpoints.len();
                kv = KvClient::new(channel(&endpoints[ep]).unwrap());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn gap_after(times: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut t: Vec<Instant> = times.iter().copied().filter(|x| *x >= from && *x <= to).collect();
    t.sort();
    let mut prev = from;
    let mut gap = Duration::ZERO;
    // The end counts too: no write at all after the kill is a gap as long as the window.
    for x in t.into_iter().chain(std::iter::once(to)) {
        gap = gap.max(x - prev);
        prev = x;
    }
    gap
}

/// Runs `rounds` rounds of leader SIGKILL against a fresh cluster built from `spec`.
pub async fn run(spec: ClusterSpec, rounds: usize, writers: usize) -> anyhow::Result<FailoverResult> {
    let system = format!("{:?}", spec.flavor).to_lowercase();
    let mut cluster = Cluster::start(spec)?;
    let acks = Arc::new(Acks { done: Mutex::new(Vec::new()) });
    let mut gaps = Vec::new();
    let mut round = 0;
    let mut attempts = 0;
    while round < rounds {
        attempts += 1;
        if attempts > rounds * 3 {
            anyhow::bail!("{system}: too many rounds where the killed member was not the leader");
        }
        let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
        // The term now; a real failover ends in a higher one.
        let term_before = cluster.status(leader).await.map(|(_, _, t)| t).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                tokio::spawn(writer(cluster.endpoints(), format!("fo/{attempts}/{w}"), w, stop.clone(), acks.clone()))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed_at = Instant::now();
        cluster.kill(leader);
        // Wait until writes flow again: at least a second after the kill, with acknowledgements
        // in the last 200 ms. A write that was already in flight and completes just after the
        // kill does not count as "flowing". At most 15 s.
        let deadline = killed_at + Duration::from_secs(15);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = Instant::now();
            let recent = acks.done.lock().unwrap().iter().filter(|(t, _)| *t > killed_at && now - *t < Duration::from_millis(200)).count();
            if now > killed_at + Duration::from_secs(1) && recent >= 3 {
                break;
            }
            if now > deadline {
                break;
            }
        }
        let end = Instant::now();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let times: Vec<Instant> = acks.done.lock().unwrap().iter().map(|(t, _)| *t).collect();
        let gap = gap_after(&times, killed_at, end);
        let new_leader = cluster.wait_leader(Duration::from_secs(30)).await?;
        let term_after = cluster.status(new_leader).await.map(|(_, _, t)| t).unwrap_or(0);
        cluster.spawn(leader)?;
        if term_after <= term_before {
            // Leadership had moved between our status query and the kill: not a leader kill.
            eprintln!("{system}: member {leader} was no longer leader when killed (term {term_before}); round repeated");
            continue;
        }
        eprintln!("{system} round {round}: killed leader {leader} (term {term_before} -> {term_after}), write gap {} ms", gap.as_millis());
        gaps.push(gap.as_millis() as u64);
        round += 1;
    }
    cluster.wait_leader(Duration::from_secs(30)).await?;

    // Every acknowledged write must be readable (linearizable read) once the cluster is whole.
    let acked: Vec<String> = acks.done.lock().unwrap().iter().map(|(_, k)| k.clone()).collect();
    let mut present = std::collections::HashSet::new();
    let mut kv = KvClient::new(channel(&cluster.endpoints()[0])?);
    for attempt in 1..=attempts {
        let prefix = format!("fo/{attempt}/");
        let mut end = prefix.clone().into_bytes();
        *end.last_mut().unwrap() += 1;
        let mut tries = 0;
        let r = loop {
            let req = RangeRequest { key: prefix.clone().into_bytes(), range_end: end.clone(), keys_only: true, ..Default::default() };
            match kv.range(req).await {
                Ok(r) => break r.into_inner(),
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    let eps = cluster.endpoints();
                    kv = KvClient::new(channel(&eps[tries % eps.len()])?);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => anyhow::bail!("final read failed: {e}"),
            }
        };
        present.extend(r.kvs.into_iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()));
    }
    let lost = acked.iter().filter(|k| !present.contains(*k)).count();

    let mut sorted = gaps.clone();
    sorted.sort();
    Ok(FailoverResult {
        system,
        rounds,
        p50_ms: percentile(&sorted, 50.0),
        p99_ms: percentile(&sorted, 99.0),
        max_ms: *sorted.last().unwrap_or(&0),
        gaps_ms: gaps,
        acked_writes: acked.len(),
        lost_acked_writes: lost,
    })
}

#[cfg(test)]
mod tests {
    use super::{gap_after, percentile};
    use std::time::{Duration, Instant};

    #[test]
    fn gap_counts_the_silence_before_the_first_and_after_the_last_write() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(gap_after(&[ms(10), ms(500), ms(520)], t0, ms(600)), Duration::from_millis(490));
        assert_eq!(gap_after(&[], t0, ms(700)), Duration::from_millis(700));
        assert_eq!(gap_after(&[ms(5)], t0, ms(900)), Duration::from_millis(895));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 100);
        assert_eq!(percentile(&v, 0.0), 10);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }
}
