//! Device events for the direct backend: libnvdimm regions and namespaces
//! changed by someone else (an operator running ndctl) while we run.
//!
//! A udev monitor is read on its own std thread (libudev is blocking and not
//! meant to be shared between threads) that hands owned [`DeviceEvent`]s to
//! tokio. The consumer coalesces a burst (ndctl writes many attributes, each
//! one an event) into one refresh on the blocking pool: the allocator
//! re-reads the space held outside the ledger, so capacity follows an
//! operator's ndctl without a restart. Our own creates and
//! deletes produce the same events; refreshing on them is harmless, and the
//! refresh logs at info only when the set of foreign devices changed.
//!
//! Without udevd (containers; the QEMU rig unless a scenario starts it)
//! nothing is monitored: the backend already waits for block devices by
//! polling sysfs, and foreign changes are seen at the next start-up
//! reconciliation.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pmem_allocator::Allocator;
use pmem_allocator::backend::{InventoryItem, Owner};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::DeviceEventCounter;

/// Exists while udevd runs (systemd-udevd's control socket).
pub const UDEV_CONTROL: &str = "/run/udev/control";
/// How long the reader thread waits in poll(2) before looking at its stop flag.
const POLL_EVERY: Duration = Duration::from_millis(250);
const CHANNEL: usize = 256;
const NO_EVENTS: &str = "no device events: block devices are awaited through sysfs polling, namespaces changed by others are seen at the next start";

/// One uevent, owned (libudev's device handles stay on the reader thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    /// add, remove, change, bind, unbind.
    pub action: String,
    /// e.g. `namespace0.1`, `region0`, `pmem0s`.
    pub sysname: String,
    /// `nd` or `block`.
    pub subsystem: String,
    /// e.g. `nd_namespace_pmem`, `disk`.
    pub devtype: Option<String>,
}

impl DeviceEvent {
    /// Whether the event can change a region's free space or its foreign
    /// devices: libnvdimm regions, namespaces and their claims, and pmem
    /// block devices. Buses, DIMMs and other disks cannot.
    pub fn relevant(&self) -> bool {
        let action = matches!(
            self.action.as_str(),
            "add" | "remove" | "change" | "bind" | "unbind"
        );
        let device = match self.subsystem.as_str() {
            "nd" => ["region", "namespace", "pfn", "btt", "dax"]
                .iter()
                .any(|p| self.sysname.starts_with(p)),
            "block" => self.sysname.starts_with("pmem"),
            _ => false,
        };
        action && device
    }
}

/// A blocking source of device events (udev, or a fake in tests). It lives
/// on the reader thread: libudev handles must not cross threads.
pub trait EventSource {
    /// Waits up to `timeout` for the next event; `Ok(None)` when none came.
    fn next(&mut self, timeout: Duration) -> io::Result<Option<DeviceEvent>>;
}

/// The udev monitor, filtered to the `nd` and `block` subsystems.
pub struct UdevSource {
    socket: udev::MonitorSocket,
}

impl std::fmt::Debug for UdevSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdevSource").finish_non_exhaustive()
    }
}

/// Whether udevd runs: it owns `control`. Without it a udev monitor
/// would open but never hear anything.
pub fn udevd_running(control: &Path) -> Result<(), String> {
    if control.exists() {
        Ok(())
    } else {
        Err(format!("udevd is not running (no {})", control.display()))
    }
}

impl UdevSource {
    /// Opens the monitor (on the thread that will read it).
    pub fn open() -> Result<UdevSource, String> {
        let socket = udev::MonitorBuilder::new()
            .and_then(|b| b.match_subsystem("nd"))
            .and_then(|b| b.match_subsystem("block"))
            .and_then(|b| b.listen())
            .map_err(|e| format!("open a udev monitor for nd and block: {e}"))?;
        Ok(UdevSource { socket })
    }

    fn take(&self) -> Option<DeviceEvent> {
        let ev = self.socket.iter().next()?;
        let text = |s: Option<&std::ffi::OsStr>| s.map(|s| s.to_string_lossy().into_owned());
        Some(DeviceEvent {
            action: ev.event_type().to_string(),
            sysname: ev.sysname().to_string_lossy().into_owned(),
            subsystem: text(ev.subsystem()).unwrap_or_default(),
            devtype: text(ev.devtype()),
        })
    }
}

impl EventSource for UdevSource {
    fn next(&mut self, timeout: Duration) -> io::Result<Option<DeviceEvent>> {
        // The socket is non-blocking: drain what is queued before waiting.
        if let Some(ev) = self.take() {
            return Ok(Some(ev));
        }
        let wait = nix::poll::PollTimeout::try_from(timeout)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut fds = [nix::poll::PollFd::new(
            self.socket.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, wait) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(None),
            Ok(_) => Ok(self.take()),
            Err(e) => Err(io::Error::other(format!("poll the udev monitor: {e}"))),
        }
    }
}

/// Reads `source` until `stop` is set, the consumer is gone, or the source
/// fails; every event goes to `tx`.
pub fn pump(mut source: impl EventSource, tx: &mpsc::Sender<DeviceEvent>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
        match source.next(POLL_EVERY) {
            Ok(Some(ev)) => {
                if tx.blocking_send(ev).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "device events stopped; block devices are still awaited through sysfs");
                return;
            }
        }
    }
}

/// How events are coalesced.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    /// A burst ends after this long without a relevant event.
    pub quiet: Duration,
    /// A refresh is never put off longer than this after a burst's first event.
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Debounce {
        Debounce {
            quiet: Duration::from_millis(200),
            max: Duration::from_secs(2),
        }
    }
}

pub type Refresh = Arc<dyn Fn() + Send + Sync>;

fn note(ev: &DeviceEvent, counter: Option<&DeviceEventCounter>) -> bool {
    let relevant = ev.relevant();
    tracing::debug!(
        action = %ev.action,
        device = %ev.sysname,
        subsystem = %ev.subsystem,
        devtype = ev.devtype.as_deref().unwrap_or(""),
        relevant,
        "device event"
    );
    if relevant && let Some(c) = counter {
        c.inc(&ev.subsystem, &ev.action);
    }
    relevant
}

/// Calls `refresh` (on the blocking pool) once per burst of relevant events,
/// until the channel closes; a burst still pending then is refreshed too.
pub async fn consume(
    mut rx: mpsc::Receiver<DeviceEvent>,
    debounce: Debounce,
    refresh: Refresh,
    counter: Option<DeviceEventCounter>,
) {
    loop {
        loop {
            match rx.recv().await {
                None => return,
                Some(ev) if note(&ev, counter.as_ref()) => break,
                Some(_) => {}
            }
        }
        let first = Instant::now();
        let mut last = first;
        let mut events = 1u32;
        let mut closed = false;
        loop {
            let until = (last + debounce.quiet).min(first + debounce.max);
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(ev)) => {
                    if note(&ev, counter.as_ref()) {
                        events += 1;
                        last = Instant::now();
                    }
                }
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        tracing::debug!(events, "refreshing after device events");
        let r = Arc::clone(&refresh);
        if let Err(e) = tokio::task::spawn_blocking(move || r()).await {
            tracing::error!(error = %e, "device event refresh panicked");
        }
        if closed {
            return;
        }
    }
}

/// Stops the reader thread when dropped (within [`POLL_EVERY`]); the
/// consumer task ends when the thread has.
#[derive(Debug)]
pub struct DeviceEvents {
    stop: Arc<AtomicBool>,
}

impl Drop for DeviceEvents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Opens a source with `open` on a std thread and reads it there, and runs
/// [`consume`] on the runtime. `refresh` runs once first, before any event,
/// to take its baseline. When `open` fails, its reason is logged at info and
/// the consumer ends.
pub fn start_with<S: EventSource>(
    open: impl FnOnce() -> Result<S, String> + Send + 'static,
    debounce: Debounce,
    refresh: Refresh,
    counter: Option<DeviceEventCounter>,
) -> io::Result<DeviceEvents> {
    let (tx, rx) = mpsc::channel(CHANNEL);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("device-events".into())
        .spawn(move || match open() {
            Ok(source) => pump(source, &tx, &flag),
            Err(why) => tracing::info!(reason = %why, "{NO_EVENTS}"),
        })?;
    tokio::spawn(async move {
        let r = Arc::clone(&refresh);
        if let Err(e) = tokio::task::spawn_blocking(move || r()).await {
            tracing::error!(error = %e, "device inventory baseline panicked");
        }
        consume(rx, debounce, refresh, counter).await;
    });
    Ok(DeviceEvents { stop })
}

/// Watches udev for changes to the direct backend's regions and refreshes
/// `alloc`'s view of them. `None` (after one info line) when udev is not
/// available.
pub fn start(alloc: &Arc<Allocator>, counter: Option<DeviceEventCounter>) -> Option<DeviceEvents> {
    if let Err(why) = udevd_running(Path::new(UDEV_CONTROL)) {
        tracing::info!(reason = %why, "{NO_EVENTS}");
        return None;
    }
    // Weak: the task must not keep the ledger open past shutdown.
    let weak: Weak<Allocator> = Arc::downgrade(alloc);
    let watch = ForeignWatch::default();
    let refresh: Refresh = Arc::new(move || {
        if let Some(a) = weak.upgrade() {
            refresh_capacity(&a, &watch);
        }
    });
    match start_with(UdevSource::open, Debounce::default(), refresh, counter) {
        Ok(h) => {
            tracing::info!("watching udev for nd and block device events");
            Some(h)
        }
        Err(e) => {
            tracing::warn!(error = %e, "start the device event thread; continuing without device events");
            None
        }
    }
}

/// After devices changed: brings the allocator's view of the backend up to
/// date and reports foreign devices that appeared or went away.
pub fn refresh_capacity(alloc: &Allocator, watch: &ForeignWatch) -> ForeignChange {
    // Space an operator took is no longer offered as free, and space they
    // gave back is, before the next create asks.
    match alloc.refresh_reserved() {
        Ok(reserved) => tracing::debug!(reserved = reserved.0, "reserved space re-read"),
        Err(e) => tracing::warn!(error = %e, "re-read the space others hold after device events"),
    }
    match alloc.backend().inventory() {
        Ok(items) => watch.update(&items),
        Err(e) => {
            tracing::warn!(error = %e, "read the device inventory after device events");
            ForeignChange::default()
        }
    }
}

/// The foreign devices seen at the last refresh, by path.
#[derive(Debug, Default)]
pub struct ForeignWatch {
    seen: Mutex<Option<BTreeMap<String, ForeignDevice>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignDevice {
    pub region: String,
    pub what: String,
    pub offset: u64,
    pub size: u64,
}

/// What changed between two refreshes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ForeignChange {
    pub appeared: Vec<(String, ForeignDevice)>,
    pub gone: Vec<(String, ForeignDevice)>,
}

impl ForeignWatch {
    /// Compares `items` with the last inventory and logs the difference (at
    /// info; nothing at info when only our own devices changed). The first
    /// call only takes the baseline: start-up reconciliation reported it.
    pub fn update(&self, items: &[InventoryItem]) -> ForeignChange {
        let now: BTreeMap<String, ForeignDevice> = items
            .iter()
            .filter_map(|i| match &i.owner {
                Owner::Foreign(what) => Some((
                    i.path.clone(),
                    ForeignDevice {
                        region: i.region.clone(),
                        what: what.clone(),
                        offset: i.offset.0,
                        size: i.size.0,
                    },
                )),
                Owner::Ours(_) => None,
            })
            .collect();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(before) = seen.replace(now.clone()) else {
            tracing::debug!(foreign = now.len(), "device inventory baseline");
            return ForeignChange::default();
        };
        let change = ForeignChange {
            appeared: now
                .iter()
                .filter(|(p, d)| before.get(*p) != Some(d))
                .map(|(p, d)| (p.clone(), d.clone()))
                .collect(),
            gone: before
                .iter()
                .filter(|(p, d)| now.get(*p) != Some(d))
                .map(|(p, d)| (p.clone(), d.clone()))
                .collect(),
        };
        for (path, d) in &change.appeared {
            tracing::info!(device = %path, region = %d.region, offset = d.offset, size = d.size, what = %d.what, "foreign device appeared; it is never touched");
        }
        for (path, d) in &change.gone {
            tracing::info!(device = %path, region = %d.region, offset = d.offset, size = d.size, "foreign device went away");
        }
        if change.appeared.is_empty() && change.gone.is_empty() {
            tracing::debug!(
                foreign = now.len(),
                "devices changed; foreign devices unchanged"
            );
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;

    use pmem_allocator::Bytes;

    use super::*;

    fn ev(action: &str, subsystem: &str, sysname: &str) -> DeviceEvent {
        DeviceEvent {
            action: action.into(),
            sysname: sysname.into(),
            subsystem: subsystem.into(),
            devtype: None,
        }
    }

    fn counting() -> (Refresh, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = Arc::clone(&n);
        let r: Refresh = Arc::new(move || {
            m.fetch_add(1, Ordering::SeqCst);
        });
        (r, n)
    }

    fn quick() -> Debounce {
        Debounce {
            quiet: Duration::from_millis(200),
            max: Duration::from_secs(1),
        }
    }

    #[test]
    fn only_nvdimm_devices_are_relevant() {
        assert!(ev("add", "nd", "namespace0.1").relevant());
        assert!(ev("change", "nd", "region1").relevant());
        assert!(ev("unbind", "nd", "pfn0.0").relevant());
        assert!(ev("bind", "nd", "btt1.0").relevant());
        assert!(ev("remove", "block", "pmem0s").relevant());
        assert!(!ev("add", "block", "sda").relevant());
        assert!(!ev("add", "nd", "ndbus0").relevant());
        assert!(!ev("add", "nd", "nmem0").relevant());
        assert!(!ev("online", "nd", "namespace0.0").relevant());
        assert!(!ev("add", "net", "namespace0.0").relevant());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_refresh() {
        let (tx, rx) = mpsc::channel(16);
        let (refresh, n) = counting();
        let task = tokio::spawn(consume(rx, quick(), refresh, None));
        // ndctl create-namespace: a string of events 10 ms apart.
        for name in [
            "namespace0.1",
            "namespace0.2",
            "pfn0.1",
            "pfn0.1",
            "pmem0.1",
        ] {
            let sub = if name.starts_with("pmem") {
                "block"
            } else {
                "nd"
            };
            tx.send(ev("add", sub, name)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(n.load(Ordering::SeqCst), 1);
        // A second, later burst is a second refresh.
        tx.send(ev("unbind", "nd", "namespace0.1")).await.unwrap();
        tx.send(ev("remove", "block", "pmem0.1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(n.load(Ordering::SeqCst), 2);
        drop(tx);
        task.await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn irrelevant_events_neither_refresh_nor_prolong_a_burst() {
        let (tx, rx) = mpsc::channel(64);
        let (refresh, n) = counting();
        let task = tokio::spawn(consume(rx, quick(), refresh, None));
        tx.send(ev("add", "block", "sda")).await.unwrap();
        tx.send(ev("add", "nd", "nmem0")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(n.load(Ordering::SeqCst), 0);
        let t0 = Instant::now();
        tx.send(ev("add", "nd", "namespace1.0")).await.unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(ev("change", "block", "loop0")).await.unwrap();
        }
        // 200 ms after the relevant event, not after the last irrelevant one.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(n.load(Ordering::SeqCst), 1, "{:?}", t0.elapsed());
        drop(tx);
        task.await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_still_refreshes_every_max() {
        let (tx, rx) = mpsc::channel(64);
        let (refresh, n) = counting();
        let task = tokio::spawn(consume(rx, quick(), refresh, None));
        // 3 s of events every 100 ms: never quiet for 200 ms.
        for _ in 0..30 {
            tx.send(ev("change", "nd", "region0")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let during = n.load(Ordering::SeqCst);
        assert!((2..=3).contains(&during), "{during} refreshes in 3 s");
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn relevant_events_are_counted_in_the_metrics() {
        let metrics = crate::metrics::Metrics::default();
        let (tx, rx) = mpsc::channel(8);
        let (refresh, _) = counting();
        tx.send(ev("add", "nd", "namespace0.1")).await.unwrap();
        tx.send(ev("add", "nd", "namespace0.2")).await.unwrap();
        tx.send(ev("remove", "block", "pmem0")).await.unwrap();
        tx.send(ev("add", "block", "sda")).await.unwrap();
        drop(tx);
        consume(rx, quick(), refresh, Some(metrics.device_events())).await;
        let text = metrics.encode();
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(
            has(r#"pmem_agent_device_events_total{subsystem="nd",action="add"} 2"#),
            "{text}"
        );
        assert!(
            has(r#"pmem_agent_device_events_total{subsystem="block",action="remove"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains("sda") && !text.contains(r#"action="add"} 1"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_burst_is_refreshed_when_the_source_ends() {
        let (tx, rx) = mpsc::channel(4);
        let (refresh, n) = counting();
        tx.send(ev("add", "nd", "namespace0.3")).await.unwrap();
        drop(tx);
        consume(rx, quick(), refresh, None).await;
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    /// Hands out its events, then reports timeouts (like a quiet monitor).
    struct Fake {
        events: VecDeque<DeviceEvent>,
        polls: Arc<AtomicUsize>,
    }

    impl EventSource for Fake {
        fn next(&mut self, timeout: Duration) -> io::Result<Option<DeviceEvent>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            match self.events.pop_front() {
                Some(e) => Ok(Some(e)),
                None => {
                    std::thread::sleep(timeout.min(Duration::from_millis(5)));
                    Ok(None)
                }
            }
        }
    }

    #[tokio::test]
    async fn the_reader_thread_hands_events_over_and_stops() {
        let polls = Arc::new(AtomicUsize::new(0));
        let events: VecDeque<_> = (0..3)
            .map(|i| ev("add", "nd", &format!("namespace0.{i}")))
            .collect();
        let (tx, mut rx) = mpsc::channel(2);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let source = Fake {
            events,
            polls: Arc::clone(&polls),
        };
        let thread = std::thread::spawn(move || pump(source, &tx, &flag));
        for i in 0..3 {
            let got = rx.recv().await.unwrap();
            assert_eq!(got.sysname, format!("namespace0.{i}"));
        }
        stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        // The sender went with the thread.
        assert!(rx.recv().await.is_none());
        assert!(polls.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn start_with_takes_a_baseline_then_refreshes_on_events() {
        let (refresh, n) = counting();
        let source = Fake {
            events: [ev("add", "nd", "namespace1.1")].into(),
            polls: Arc::new(AtomicUsize::new(0)),
        };
        let debounce = Debounce {
            quiet: Duration::from_millis(20),
            max: Duration::from_millis(100),
        };
        let handle = start_with(move || Ok(source), debounce, refresh, None).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while n.load(Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline, "no refresh");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(handle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn no_udevd_means_no_monitor() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control");
        let e = udevd_running(&control).unwrap_err();
        assert!(e.contains("udevd is not running"), "{e}");
        std::fs::write(&control, "").unwrap();
        assert!(udevd_running(&control).is_ok());
    }

    #[test]
    fn the_udev_monitor_reads_with_a_timeout() {
        // Netlink works without udevd (CI runs it as root).
        let mut m = UdevSource::open().expect("udev monitor socket");
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_millis(30) {
            // Without udevd nothing arrives; with it, whatever does is owned data.
            if let Some(ev) = m.next(Duration::from_millis(10)).unwrap() {
                assert!(!ev.sysname.is_empty());
            }
        }
    }

    #[tokio::test]
    async fn a_source_that_cannot_open_ends_the_consumer() {
        let (refresh, n) = counting();
        let open = || -> Result<Fake, String> { Err("no udev here".into()) };
        let _h = start_with(open, quick(), refresh, None).unwrap();
        // Only the baseline refresh; nothing else, and nothing hangs.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while n.load(Ordering::SeqCst) < 1 {
            assert!(std::time::Instant::now() < deadline, "no baseline");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    fn item(path: &str, owner: Owner) -> InventoryItem {
        InventoryItem {
            region: "region0".into(),
            path: path.into(),
            offset: Bytes(0),
            size: Bytes::gib(1),
            owner,
        }
    }

    #[test]
    fn refresh_reports_a_namespace_an_operator_made() {
        use pmem_allocator::direct::model::Model;
        use pmem_allocator::direct::{DirectBackend, DirectConfig};
        let m = Arc::new(Model::new());
        m.labeled_region(1 << 30);
        let b = DirectBackend::with(m.clone(), m.clone(), DirectConfig::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::open(&dir.path().join("ledger.db"), Arc::new(b)).unwrap();
        let w = ForeignWatch::default();
        assert_eq!(refresh_capacity(&a, &w), ForeignChange::default());
        // Our own volume: nothing foreign changed.
        a.create_volume(&pmem_allocator::CreateRequest {
            erase_after: false,
            ..pmem_allocator::CreateRequest::new("ours", Bytes(64 << 20))
        })
        .unwrap();
        assert_eq!(refresh_capacity(&a, &w), ForeignChange::default());
        let free =
            |a: &Allocator| a.capacity(pmem_allocator::Usage::AppDirect).unwrap()[0].available;
        let before = free(&a);
        let ns = m.ndctl_create(0, 32 << 20, "operator", None).unwrap();
        let c = refresh_capacity(&a, &w);
        assert_eq!(c.appeared.len(), 1, "{c:?}");
        assert!(c.appeared[0].0.contains(&ns), "{c:?}");
        assert_eq!(c.appeared[0].1.size, 32 << 20);
        assert!(c.gone.is_empty(), "{c:?}");
        // The operator's space is no longer offered.
        assert_eq!(before.0 - free(&a).0, 32 << 20);
    }

    #[test]
    fn foreign_changes_are_told_apart_from_ours() {
        let w = ForeignWatch::default();
        let op = item("namespace0.0", Owner::Foreign("fsdax, name \"op\"".into()));
        let ours = item("namespace0.1", Owner::Ours("vol-1".into()));
        // Baseline: nothing to report.
        assert_eq!(
            w.update(std::slice::from_ref(&op)),
            ForeignChange::default()
        );
        // Our own volume appears: still nothing.
        assert_eq!(
            w.update(&[op.clone(), ours.clone()]),
            ForeignChange::default()
        );
        // An operator adds one and removes the other.
        let op2 = item("namespace0.2", Owner::Foreign("devdax".into()));
        let c = w.update(&[ours, op2]);
        assert_eq!(c.appeared.len(), 1);
        assert_eq!(c.appeared[0].0, "namespace0.2");
        assert_eq!(c.gone.len(), 1);
        assert_eq!(c.gone[0].0, "namespace0.0");
        assert_eq!(c.gone[0].1.what, "fsdax, name \"op\"");
    }
}
