//! Latency recording on HdrHistogram (nanosecond resolution, 3 significant
//! digits) and the few summaries the report prints.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies of one figure.
#[derive(Debug, Clone)]
pub struct Lat {
    h: Histogram<u64>,
}

/// Longest latency recorded exactly; anything longer saturates (an hour).
const MAX_NS: u64 = 3_600_000_000_000;

impl Default for Lat {
    fn default() -> Self {
        Lat {
            h: Histogram::new_with_bounds(1, MAX_NS, 3).expect("histogram bounds"),
        }
    }
}

impl Lat {
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos())
            .unwrap_or(MAX_NS)
            .clamp(1, MAX_NS);
        self.h.saturating_record(ns);
    }

    pub fn merge(&mut self, other: &Lat) {
        self.h.add(&other.h).expect("same bounds");
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The `q` quantile (0..=1) in milliseconds.
    pub fn q_ms(&self, q: f64) -> f64 {
        self.h.value_at_quantile(q) as f64 / 1e6
    }

    pub fn p50(&self) -> f64 {
        self.q_ms(0.5)
    }

    pub fn p99(&self) -> f64 {
        self.q_ms(0.99)
    }

    pub fn max(&self) -> f64 {
        self.h.max() as f64 / 1e6
    }
}

/// The median of a few samples (restart timings).
pub fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
