//! Latency recording (a bounded HDR histogram per client, merged at the end) and the summary.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded exactly; longer ones are recorded as this (1 minute, in µs).
pub const MAX_LATENCY_US: u64 = 60_000_000;
/// Significant decimal digits kept by the histogram: values are within 0.1% of the truth.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Latencies in microseconds, 1 µs to [`MAX_LATENCY_US`], in a fixed amount of memory.
#[derive(Clone, Debug)]
pub struct Latencies(Histogram<u64>);

impl Latencies {
    pub fn new() -> Self {
        Latencies(Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS).expect("static histogram bounds are valid"))
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail.
        self.0.add(&other.0).expect("histograms with equal bounds add");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency percentiles in microseconds (all 0 when nothing was recorded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// Operations per second; 0 for an empty interval.
pub fn rate_per_s(ops: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        ops as f64 / s
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within the histogram's precision (0.1%, plus one for rounding) of `want`.
    fn near(got: u64, want: u64) {
        let tolerance = want / 1000 + 1;
        assert!(got.abs_diff(want) <= tolerance, "got {got}, expected {want} ± {tolerance}");
    }

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut l = Latencies::new();
        for ms in 1..=1000 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        near(s.p50_us, 500_000);
        near(s.p90_us, 900_000);
        near(s.p99_us, 990_000);
        near(s.p999_us, 999_000);
        near(s.max_us, 1_000_000);
        assert!((s.mean_us - 500_500.0).abs() < 500.0, "mean {}", s.mean_us);
    }

    #[test]
    fn a_slow_tail_shows_only_in_the_high_percentiles() {
        let mut l = Latencies::new();
        for _ in 0..9_980 {
            l.record(Duration::from_micros(200));
        }
        for _ in 0..20 {
            l.record(Duration::from_millis(50));
        }
        let s = l.summary();
        near(s.p50_us, 200);
        near(s.p99_us, 200);
        near(s.p999_us, 50_000);
        near(s.max_us, 50_000);
    }

    #[test]
    fn merged_histograms_equal_one_histogram() {
        let (mut a, mut b, mut all) = (Latencies::new(), Latencies::new(), Latencies::new());
        for us in 1..=5_000u64 {
            let d = Duration::from_micros(us * 7);
            if us % 3 == 0 { a.record(d) } else { b.record(d) }
            all.record(d);
        }
        a.merge(&b);
        assert_eq!(a.count(), 5_000);
        assert_eq!(a.summary(), all.summary());
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut l = Latencies::new();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3600));
        assert_eq!(l.count(), 2);
        let s = l.summary();
        near(s.max_us, MAX_LATENCY_US);
        assert!(s.p50_us <= 1, "a zero latency is recorded as 1 µs, got {}", s.p50_us);
    }

    #[test]
    fn empty_summary_and_rates() {
        assert_eq!(Latencies::new().summary(), LatencySummary::default());
        assert_eq!(rate_per_s(10, Duration::ZERO), 0.0);
        assert_eq!(rate_per_s(500, Duration::from_millis(250)), 2000.0);
    }
}
