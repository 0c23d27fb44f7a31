//! In-process counters for CSI calls. A Prometheus exporter can read them;
//! for now they feed logs and tests.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::Code;

/// (method, gRPC code) -> (count, total time).
type CallTable = BTreeMap<(&'static str, i32), (u64, Duration)>;

#[derive(Debug, Default)]
pub struct Metrics {
    calls: Mutex<CallTable>,
}

impl Metrics {
    pub fn observe_call(&self, method: &'static str, code: Code, took: Duration) {
        let mut m = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry((method, code as i32)).or_default();
        e.0 += 1;
        e.1 += took;
    }

    /// (method, code, count, total time) for every method and code seen.
    pub fn calls(&self) -> Vec<(&'static str, Code, u64, Duration)> {
        let m = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(&(meth, code), &(n, d))| (meth, Code::from_i32(code), n, d))
            .collect()
    }
}
