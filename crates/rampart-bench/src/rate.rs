//! The rate limit: a fixed schedule shared by all clients.
//!
//! Every operation takes a ticket (0, 1, 2, ...) from one shared counter; operation n may start
//! at `start + n / rate`. No lock, no refill task, and the long-run rate is exact. If the server
//! falls behind, the overdue operations start at once (a burst), as a real client backlog would.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct RateLimiter {
    start: Instant,
    /// Time between two tickets, in nanoseconds (fractional, so high rates stay exact).
    interval_ns: f64,
}

impl RateLimiter {
    /// `None` for an unlimited rate (0).
    pub fn new(ops_per_s: u64, start: Instant) -> Option<Self> {
        (ops_per_s > 0).then(|| RateLimiter { start, interval_ns: 1e9 / ops_per_s as f64 })
    }

    /// When ticket `n` may start.
    pub fn due(&self, n: u64) -> Instant {
        self.start + Duration::from_nanos((n as f64 * self.interval_ns) as u64)
    }

    /// Waits until ticket `n` may start.
    pub async fn wait(&self, n: u64) {
        tokio::time::sleep_until(self.due(n)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn schedule() {
        let start = Instant::now();
        assert!(RateLimiter::new(0, start).is_none());
        let r = RateLimiter::new(100, start).unwrap();
        assert_eq!(r.due(0), start);
        assert_eq!(r.due(1), start + Duration::from_millis(10));
        assert_eq!(r.due(100), start + Duration::from_secs(1));
        let r = RateLimiter::new(3, start).unwrap();
        assert_eq!(r.due(3), start + Duration::from_secs(1));
        let r = RateLimiter::new(1_000_000_000, start).unwrap();
        assert_eq!(r.due(1_000_000_000), start + Duration::from_secs(1));
    }

    /// Many clients sharing one limiter together run at the limit, not at the limit per client.
    #[tokio::test(start_paused = true)]
    async fn clients_share_the_rate() {
        let start = Instant::now();
        let limiter = RateLimiter::new(200, start).unwrap();
        let tickets = Arc::new(AtomicU64::new(0));
        let deadline = start + Duration::from_secs(5);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let tickets = tickets.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                loop {
                    let n = tickets.fetch_add(1, Ordering::Relaxed);
                    limiter.wait(n).await;
                    if Instant::now() >= deadline {
                        return done;
                    }
                    // A request that takes 3 ms: 8 clients could do ~2,600 op/s unlimited.
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    done += 1;
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        // 5 s at 200 op/s; one op of slack at each end.
        assert!((999..=1001).contains(&total), "{total} ops in 5 s at 200 op/s");
    }

    /// An overdue schedule is caught up at once rather than skipped.
    #[tokio::test(start_paused = true)]
    async fn overdue_tickets_do_not_wait() {
        let start = Instant::now();
        let limiter = RateLimiter::new(10, start).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let before = Instant::now();
        for n in 0..10 {
            limiter.wait(n).await;
        }
        assert_eq!(Instant::now(), before);
        limiter.wait(11).await;
        assert_eq!(Instant::now(), start + Duration::from_millis(1100));
    }
}
