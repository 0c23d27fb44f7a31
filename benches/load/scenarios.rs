//! The workloads and the order they run in: the empty-node figures first,
//! then the node is filled (to 500 for the ListVolumes comparison, then to
//! N) and the same figures are taken again; the floors are measured at the
//! start and again at the end, and the ratios use both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pmem_proto::admin;
use pmem_proto::csi;
use pmem_proto::csi::controller_client::ControllerClient;
use pmem_proto::csi::identity_client::IdentityClient;
use pmem_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, access_mode::Mode};
use tokio::task::JoinSet;

use crate::node::{self, Node, Spec};
use crate::report::{Bound, Row};
use crate::stats::{Lat, median};
use crate::strace;
use crate::{Plan, Scenario};

/// Page size of the ListVolumes figures (the external-provisioner's).
const PAGE: i32 = 500;

fn create_req(name: &str, bytes: u64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: i64::try_from(bytes).expect("volume size fits i64"),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }],
        ..Default::default()
    }
}

async fn create(
    c: &mut ControllerClient<tonic::transport::Channel>,
    name: &str,
    bytes: u64,
) -> Result<String> {
    let v = c
        .create_volume(create_req(name, bytes))
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .context("CreateVolume answered no volume")?;
    Ok(v.volume_id)
}

async fn delete(c: &mut ControllerClient<tonic::transport::Channel>, id: &str) -> Result<()> {
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.to_owned(),
        secrets: Default::default(),
    })
    .await
    .with_context(|| format!("DeleteVolume {id}"))?;
    Ok(())
}

/// Calls `f` back to back: `max` times, or fewer once `budget` is spent
/// and at least `min` were made.
async fn closed(
    max: u64,
    min: u64,
    budget: Duration,
    mut f: impl AsyncFnMut() -> Result<()>,
) -> Result<Lat> {
    let mut lat = Lat::default();
    let t0 = Instant::now();
    while lat.count() < max && (lat.count() < min || t0.elapsed() < budget) {
        let t = Instant::now();
        f().await?;
        lat.record(t.elapsed());
    }
    Ok(lat)
}

/// The gRPC round-trip floor: Identity.Probe, closed loop, one client.
async fn probe_floor(n: &Node, calls: u64) -> Result<Lat> {
    let c = IdentityClient::new(n.channel().await?);
    let call = async || {
        c.clone().probe(csi::ProbeRequest {}).await?;
        Ok(())
    };
    closed(200, 200, Duration::ZERO, call).await?;
    closed(calls, calls, Duration::ZERO, call).await
}

/// The durability floor: one-row inserts, each its own durable commit
/// (WAL, synchronous=FULL), in the ledger's directory.
async fn commit_floor(n: &Node, commits: u64, tag: &str) -> Result<Lat> {
    let path = n.state_dir().join(format!("floor-{tag}.db"));
    tokio::task::spawn_blocking(move || -> Result<Lat> {
        let db = rusqlite::Connection::open(&path).context("open floor db")?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v INTEGER)")?;
        let mut lat = Lat::default();
        for i in 0..commits {
            let t = Instant::now();
            db.execute("INSERT INTO t (v) VALUES (?1)", [i as i64])?;
            lat.record(t.elapsed());
        }
        drop(db);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        Ok(lat)
    })
    .await?
}

/// `to - from` creates by `workers` concurrent clients.
async fn fill(n: &Node, from: u64, to: u64, workers: usize, bytes: u64) -> Result<Duration> {
    let next = Arc::new(AtomicU64::new(from));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let mut c = ControllerClient::new(n.channel().await?);
        let next = next.clone();
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return Ok::<_, anyhow::Error>(());
                }
                create(&mut c, &format!("fill-{i}"), bytes).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(t0.elapsed())
}

/// `total` create+delete pairs by `clients` concurrent clients: the wall
/// time and each pair's latency.
async fn pairs(
    n: &Node,
    clients: usize,
    total: u64,
    bytes: u64,
    tag: &str,
) -> Result<(Duration, Lat)> {
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let mut c = ControllerClient::new(n.channel().await?);
        let next = next.clone();
        let tag = tag.to_owned();
        set.spawn(async move {
            let mut lat = Lat::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                let id = create(&mut c, &format!("{tag}-{i}"), bytes).await?;
                delete(&mut c, &id).await?;
                lat.record(t.elapsed());
            }
        });
    }
    let mut lat = Lat::default();
    while let Some(r) = set.join_next().await {
        lat.merge(&r??);
    }
    Ok((t0.elapsed(), lat))
}

/// Waits until no deleted volume is still being erased, so the next figure
/// does not share the machine with the eraser.
async fn drain(n: &Node) -> Result<()> {
    let mut a = n.admin().await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut busy = 0;
        for state in ["deleting", "erasing"] {
            let r = a
                .list_volumes(admin::ListVolumesRequest {
                    state: state.into(),
                    persistency: String::new(),
                })
                .await;
            busy += match r {
                Ok(r) => r.into_inner().volumes.len(),
                // Through pmem-allocd, a volume erased between the listing
                // and its lookup fails the whole call (base 17f150c): ask again.
                Err(s) if s.code() == tonic::Code::NotFound => 1,
                Err(s) => return Err(s).context("admin ListVolumes"),
            };
        }
        if busy == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{busy} volumes still erasing after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sequential creates by one client: each CreateVolume's latency.
async fn creates(n: &Node, count: u64, tag: &str, bytes: u64) -> Result<Lat> {
    let mut c = ControllerClient::new(n.channel().await?);
    let mut i = 0;
    closed(count, count, Duration::ZERO, async || {
        i += 1;
        create(&mut c, &format!("{tag}-{i}"), bytes).await.map(drop)
    })
    .await
}

async fn capacity_closed(n: &Node, max: u64) -> Result<Lat> {
    let c = ControllerClient::new(n.channel().await?);
    let call = async || {
        c.clone()
            .get_capacity(csi::GetCapacityRequest::default())
            .await?;
        Ok(())
    };
    closed(20, 20, Duration::ZERO, call).await?;
    closed(max, 20, Duration::from_secs(5), call).await
}

/// Per-page latency of full walks with `max_entries` = PAGE until at least
/// `min_pages` pages were read; also the first walk's time and entry count.
async fn walk(n: &Node, min_pages: u64) -> Result<(Lat, Duration, u64)> {
    let mut c = ControllerClient::new(n.channel().await?);
    let mut pages = Lat::default();
    let mut first = None;
    while first.is_none() || pages.count() < min_pages {
        let t0 = Instant::now();
        let mut token = String::new();
        let mut entries = 0u64;
        loop {
            let t = Instant::now();
            let r = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: PAGE,
                    starting_token: token,
                })
                .await
                .context("ListVolumes")?
                .into_inner();
            pages.record(t.elapsed());
            entries += r.entries.len() as u64;
            token = r.next_token;
            if token.is_empty() {
                break;
            }
        }
        first.get_or_insert((t0.elapsed(), entries));
    }
    let (d, e) = first.expect("one walk");
    Ok((pages, d, e))
}

#[derive(Debug, Default)]
struct Open {
    lat: Lat,
    sent: u64,
    late: u64,
    missed: u64,
    failed: u64,
    lag_max: Duration,
    rss_max: u64,
    hwm: u64,
    rss_after: u64,
    hwm_after: u64,
    allocd_rss_max: u64,
    threads_after: u64,
    settle: Duration,
    settled: bool,
}

/// GetCapacity at a fixed rate, each call scheduled at its intended start
/// and timed from it (so queueing in the agent shows as latency instead of
/// slowing the offered load); RSS sampled every 100 ms.
async fn open_loop(n: &Node, plan: &Plan, late_ms: f64, settled_ms: f64) -> Result<Open> {
    let c = ControllerClient::new(n.channel().await?);
    let pid = n.agent_pid().context("agent not running")?;
    let allocd = n.allocd_pid();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut m, mut a) = ((0, 0), 0);
            while !stop.load(Ordering::Relaxed) {
                if let Some((r, h)) = node::rss(pid) {
                    m = (m.0.max(r), m.1.max(h));
                }
                if let Some((r, _)) = allocd.and_then(node::rss) {
                    a = a.max(r);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (m, a)
        })
    };
    let total = plan.rate * plan.duration;
    let deadline = Duration::from_secs(plan.deadline);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut set = JoinSet::new();
    let mut o = Open::default();
    for i in 0..total {
        let intended = t0 + Duration::from_nanos(i * 1_000_000_000 / plan.rate);
        tokio::time::sleep_until(intended).await;
        o.lag_max = o.lag_max.max(intended.elapsed());
        let mut c = c.clone();
        set.spawn(async move {
            let r = tokio::time::timeout_at(
                intended + deadline,
                c.get_capacity(csi::GetCapacityRequest::default()),
            )
            .await;
            (intended.elapsed(), r)
        });
        o.sent += 1;
    }
    while let Some(r) = set.join_next().await {
        match r? {
            (d, Ok(Ok(_))) => {
                o.lat.record(d);
                if d.as_secs_f64() * 1e3 > late_ms {
                    o.late += 1;
                }
            }
            (d, Ok(Err(_))) => {
                o.failed += 1;
                o.lat.record(d);
            }
            // A missed call counts at its deadline: a lower bound.
            (_, Err(_)) => {
                o.missed += 1;
                o.lat.record(deadline);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    ((o.rss_max, o.hwm), o.allocd_rss_max) = sampler.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    (o.rss_after, o.hwm_after) = node::rss(pid).context("agent gone")?;
    o.threads_after = node::threads(pid).unwrap_or(0);
    // The agent may still work off calls the client gave up on: wait (each
    // probe call bounded) until GetCapacity answers normally again.
    let t = Instant::now();
    let mut c = c.clone();
    while t.elapsed() < SETTLE {
        let s = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            c.get_capacity(csi::GetCapacityRequest::default()),
        )
        .await;
        if matches!(r, Ok(Ok(_))) && s.elapsed().as_secs_f64() * 1e3 <= settled_ms {
            o.settled = true;
            break;
        }
    }
    o.settle = t.elapsed();
    Ok(o)
}

/// How long the agent gets to recover from the open loop before it is
/// killed and started again (so the later figures see an idle agent).
const SETTLE: Duration = Duration::from_secs(20);

async fn restarts(n: &mut Node, count: usize) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..count {
        v.push(n.restart().await?.as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

const MIB: f64 = 1048576.0;

/// Runs the selected scenarios on one node setup; the figures as rows.
pub async fn run(plan: &Plan, spec: &Spec) -> Result<Vec<Row>> {
    let mut n = Node::new(spec)?;
    let r = run_on(&mut n, plan).await;
    if r.is_err() {
        eprintln!("daemon log tail:\n{}", n.log_tail());
    }
    let mut rows = r?;
    drop(n);
    if plan.has(Scenario::Fsync) {
        // A failed strace run loses only its own figure.
        match fsync(plan, spec).await {
            Ok(r) => rows.extend(r),
            Err(e) => eprintln!("fsync scenario failed: {e:#}"),
        }
    }
    Ok(rows)
}

async fn run_on(n: &mut Node, plan: &Plan) -> Result<Vec<Row>> {
    let first = n.start().await?;
    eprintln!(
        "node up in {:.0} ms at {}",
        first.as_secs_f64() * 1e3,
        n.dir().display()
    );
    let mut probe = probe_floor(n, plan.probe_calls).await?;
    let mut commit = commit_floor(n, plan.commits, "start").await?;
    let (probe0, commit0) = (probe.p50(), commit.p50());
    let mut later: Vec<Row> = Vec::new();
    // Deferred: rows need the floors, which are final only at the end.
    let mut figs: Vec<Box<dyn FnOnce(&Floors) -> Vec<Row>>> = Vec::new();
    let big = plan.volumes;
    let vb = plan.volume_bytes;

    if plan.has(Scenario::Capacity) {
        let l = capacity_closed(n, 2000).await?;
        eprintln!("GetCapacity at 0: p50 {:.3} ms", l.p50());
        figs.push(Box::new(move |f| {
            vec![
                Row::new("GetCapacity p50, 0 volumes", l.p50(), "ms").vs(
                    "Probe p50",
                    f.probe_p50,
                    "ms",
                ),
                Row::new("GetCapacity p99, 0 volumes", l.p99(), "ms").vs(
                    "Probe p99",
                    f.probe_p99,
                    "ms",
                ),
            ]
        }));
    }
    let mut restart0 = None;
    if plan.has(Scenario::Restart) {
        let m = restarts(n, plan.restarts).await?;
        eprintln!("restart at 0: {m:.1} ms");
        restart0 = Some(m);
    }
    if plan.has(Scenario::Pairs) {
        let (w1, l1) = pairs(n, 1, plan.pairs, vb, "pair1").await?;
        drain(n).await?;
        let (wk, lk) = pairs(n, plan.clients, plan.pairs, vb, "pairk").await?;
        drain(n).await?;
        let (rate1, ratek) = (
            plan.pairs as f64 / w1.as_secs_f64(),
            plan.pairs as f64 / wk.as_secs_f64(),
        );
        eprintln!(
            "pairs/s: 1 client {rate1:.0}, {} clients {ratek:.0}",
            plan.clients
        );
        let k = plan.clients;
        figs.push(Box::new(move |f| {
            let floor = f.probe_p50 + 2.0 * f.commit_p50;
            vec![
                Row::new(
                    "Create+Delete pairs/s, empty node, 1 client",
                    rate1,
                    "pairs/s",
                ),
                Row::new(
                    format!("Create+Delete pairs/s, empty node, {k} clients"),
                    ratek,
                    "pairs/s",
                )
                .vs("1 client", rate1, "pairs/s")
                .target("≥ 1.5× 1 client", Bound::AtLeast(1.5)),
                Row::new("Create+Delete pair p50, 1 client", l1.p50(), "ms")
                    .vs("Probe p50 + 2 commits p50", floor, "ms")
                    .target("≤ 2× (Probe + 2 commits)", Bound::AtMost(2.0)),
                Row::new("Create+Delete pair p99, 1 client", l1.p99(), "ms").vs(
                    "Probe p50 + 2 commits p50",
                    floor,
                    "ms",
                ),
                Row::new(
                    format!("Create+Delete pair p50, {k} clients"),
                    lk.p50(),
                    "ms",
                )
                .vs("Probe p50 + 2 commits p50", floor, "ms"),
            ]
        }));
    }
    let mut have = 0u64;
    let mut create0 = None;
    if plan.has(Scenario::Create) {
        let l = creates(n, plan.creates, "seq0", vb).await?;
        have += plan.creates;
        create0 = Some(l);
    }
    let needs_fill = [
        Scenario::Capacity,
        Scenario::Open,
        Scenario::List,
        Scenario::Create,
        Scenario::Restart,
    ]
    .iter()
    .any(|s| plan.has(*s));
    let small = u64::try_from(PAGE).expect("page");
    let mut page_small = None;
    // Volumes the fillers made and the time they took.
    let mut filled = (0u64, Duration::ZERO);
    if plan.has(Scenario::List) && big > small {
        if have < small {
            filled.1 += fill(n, have, small, plan.fillers, vb).await?;
            filled.0 += small - have;
            have = small;
        }
        let (pages, _, _) = walk(n, 20).await?;
        page_small = Some((have, pages));
    }
    if needs_fill && have < big {
        filled.1 += fill(n, have, big, plan.fillers, vb).await?;
        filled.0 += big - have;
        let rate = filled.0 as f64 / filled.1.as_secs_f64();
        eprintln!("filled to {big} at {rate:.0} volumes/s");
        let fillers = plan.fillers;
        figs.push(Box::new(move |_| {
            vec![Row::new(
                format!("CreateVolume rate filling to {big} volumes, {fillers} clients"),
                rate,
                "vol/s",
            )]
        }));
        have = big;
    }
    let mut cap_big_p99 = None;
    if plan.has(Scenario::Capacity) {
        let l = capacity_closed(n, 2000).await?;
        eprintln!("GetCapacity at {big}: p50 {:.3} ms", l.p50());
        cap_big_p99 = Some(l.p99());
        figs.push(Box::new(move |f| {
            vec![
                Row::new(format!("GetCapacity p50, {big} volumes"), l.p50(), "ms")
                    .vs("Probe p50", f.probe_p50, "ms")
                    .target("≤ 2× Probe p50", Bound::AtMost(2.0)),
                Row::new(format!("GetCapacity p99, {big} volumes"), l.p99(), "ms").vs(
                    "Probe p99",
                    f.probe_p99,
                    "ms",
                ),
            ]
        }));
    }
    if plan.has(Scenario::Open) {
        let late = 5.0 * probe.p99();
        let settled = cap_big_p99.map_or(10.0 * probe.p99(), |p| (3.0 * p).max(10.0 * probe.p99()));
        let o = open_loop(n, plan, late, settled).await?;
        if !o.settled {
            eprintln!(
                "agent still busy {} s after the open loop: killing and starting it again",
                SETTLE.as_secs()
            );
            n.kill();
            n.start().await?;
        }
        eprintln!(
            "open loop {}/s: p99 {:.1} ms, max {:.0} ms, missed {}",
            plan.rate,
            o.lat.p99(),
            o.lat.max(),
            o.missed
        );
        let (rate, secs, dl) = (plan.rate, plan.duration, plan.deadline);
        let remote = n.spec.remote;
        figs.push(Box::new(move |f| {
            let at = format!("{rate}/s for {secs} s, {big} volumes");
            let mut v = vec![
                Row::new(
                    format!("GetCapacity open loop p50, {at}"),
                    o.lat.p50(),
                    "ms",
                )
                .vs("Probe p50", f.probe_p50, "ms"),
                Row::new(
                    format!("GetCapacity open loop p99, {at}"),
                    o.lat.p99(),
                    "ms",
                )
                .vs("Probe p99", f.probe_p99, "ms")
                .target("≤ 5× Probe p99", Bound::AtMost(5.0)),
                Row::new(
                    format!("GetCapacity open loop max, {at}"),
                    o.lat.max(),
                    "ms",
                )
                .vs("Probe p99", f.probe_p99, "ms"),
                Row::new(
                    format!("  calls late (> 5× Probe p99) of {}", o.sent),
                    o.late as f64,
                    "calls",
                )
                .target_value("0 (no queueing)", Bound::AtMost(0.0)),
                Row::new(
                    format!("  calls missed (no answer in {dl} s) or failed"),
                    (o.missed + o.failed) as f64,
                    "calls",
                )
                .target_value("0", Bound::AtMost(0.0)),
                Row::new(
                    "  client dispatch lag max (harness health)",
                    o.lag_max.as_secs_f64() * 1e3,
                    "ms",
                ),
                Row::new("  agent VmRSS max during", o.rss_max as f64 / MIB, "MiB")
                    .target_value("< 40 MiB", Bound::AtMost(40.0)),
                Row::new("  agent VmHWM during", o.hwm as f64 / MIB, "MiB")
                    .target_value("< 40 MiB", Bound::AtMost(40.0)),
                Row::new("  agent VmRSS 2 s after", o.rss_after as f64 / MIB, "MiB")
                    .target_value("< 40 MiB", Bound::AtMost(40.0)),
                Row::new("  agent VmHWM after", o.hwm_after as f64 / MIB, "MiB"),
                Row::new(
                    "  agent threads 2 s after",
                    o.threads_after as f64,
                    "threads",
                ),
                Row::new(
                    if o.settled {
                        "  time until GetCapacity answers normally again".to_owned()
                    } else {
                        format!(
                            "  agent still busy {} s after (killed and restarted)",
                            SETTLE.as_secs()
                        )
                    },
                    o.settle.as_secs_f64() * 1e3,
                    "ms",
                ),
            ];
            if remote {
                v.push(Row::new(
                    "  pmem-allocd VmRSS max during",
                    o.allocd_rss_max as f64 / MIB,
                    "MiB",
                ));
            }
            v
        }));
    }
    if plan.has(Scenario::List) {
        let (pages, d, entries) = walk(n, 20).await?;
        if entries != have {
            bail!("ListVolumes walk saw {entries} volumes, the node has {have}");
        }
        let npages = pages.count();
        figs.push(Box::new(move |f| {
            let mut v = vec![
                Row::new(
                    format!("ListVolumes full walk, {big} volumes, max_entries {PAGE}"),
                    d.as_secs_f64() * 1e3,
                    "ms",
                )
                .vs("Probe p50", f.probe_p50, "ms"),
            ];
            let row = Row::new(
                format!("ListVolumes page p50, {big} volumes ({npages} pages)"),
                pages.p50(),
                "ms",
            );
            v.push(match &page_small {
                Some((s, l)) => row
                    .vs(&format!("page p50 at {s} volumes"), l.p50(), "ms")
                    .target("≤ 1.5× the page at 500", Bound::AtMost(1.5)),
                None => row.vs("Probe p50", f.probe_p50, "ms"),
            });
            if let Some((s, l)) = &page_small {
                v.push(
                    Row::new(format!("ListVolumes page p50, {s} volumes"), l.p50(), "ms").vs(
                        "Probe p50",
                        f.probe_p50,
                        "ms",
                    ),
                );
            }
            v
        }));
    }
    if plan.has(Scenario::Restart) {
        let m = restarts(n, plan.restarts).await?;
        eprintln!("restart at {big}: {m:.1} ms");
        let m0 = restart0.expect("measured at 0");
        let loop_mode = n.spec.loop_mode;
        let remote = n.spec.remote;
        let count = plan.restarts;
        figs.push(Box::new(move |_| {
            let mode = if loop_mode { "loop" } else { "file-only" };
            let r = Row::new(
                format!("restart to Probe-ready, {big} volumes, {mode} (median of {count})"),
                m,
                "ms",
            )
            .vs("0 volumes", m0, "ms");
            let r = if loop_mode || remote {
                r
            } else {
                r.target_value("< 100 ms", Bound::AtMost(100.0))
            };
            vec![
                Row::new(
                    format!("restart to Probe-ready, 0 volumes, {mode} (median of {count})"),
                    m0,
                    "ms",
                ),
                r,
            ]
        }));
    }
    if plan.has(Scenario::Create) {
        let l = creates(n, plan.creates, "seqn", vb).await?;
        let l0 = create0.expect("measured at 0");
        figs.push(Box::new(move |f| {
            vec![
                Row::new("CreateVolume p50, 0 volumes", l0.p50(), "ms").vs(
                    "bare commit p50",
                    f.commit_p50,
                    "ms",
                ),
                Row::new(format!("CreateVolume p50, {big} volumes"), l.p50(), "ms")
                    .vs("p50 at 0 volumes", l0.p50(), "ms")
                    .target("≤ 1.5× empty node", Bound::AtMost(1.5)),
            ]
        }));
    }
    // The floors again: the run's noise shows as their drift.
    probe.merge(&probe_floor(n, plan.probe_calls).await?);
    commit.merge(&commit_floor(n, plan.commits, "end").await?);
    let f = Floors {
        probe_p50: probe.p50(),
        probe_p99: probe.p99(),
        commit_p50: commit.p50(),
    };
    later.push(
        Row::new("floor: Identity.Probe round trip p50", f.probe_p50, "ms")
            .vs("at start", probe0, "ms"),
    );
    later.push(Row::new(
        "floor: Identity.Probe round trip p99",
        f.probe_p99,
        "ms",
    ));
    later.push(
        Row::new("floor: bare durable sqlite commit p50", f.commit_p50, "ms")
            .vs("at start", commit0, "ms"),
    );
    later.push(Row::new(
        "floor: bare durable sqlite commit p99",
        commit.p99(),
        "ms",
    ));
    n.stop()?;
    for fig in figs {
        later.extend(fig(&f));
    }
    Ok(later)
}

/// The floors the ratios divide by (both measurements merged).
#[derive(Debug, Clone, Copy)]
pub struct Floors {
    pub probe_p50: f64,
    pub probe_p99: f64,
    pub commit_p50: f64,
}

/// One fresh node under strace: start, `count` pairs by `clients`, drain
/// the eraser, SIGTERM. The fsync-family calls of the whole run.
async fn traced(
    spec: &Spec,
    plan: &Plan,
    count: u64,
    clients: usize,
) -> Result<(u64, BTreeMap<String, u64>)> {
    let mut n = Node::new(spec)?;
    n.trace();
    n.start().await?;
    if count > 0 {
        pairs(&n, clients, count, plan.volume_bytes, "traced").await?;
    }
    drain(&n).await?;
    n.stop()?;
    let mut all = BTreeMap::new();
    for p in n.strace_outputs() {
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        for (k, v) in strace::parse_summary(&text).map_err(anyhow::Error::msg)? {
            *all.entry(k).or_insert(0) += v;
        }
    }
    Ok((strace::sync_calls(&all), all))
}

async fn fsync(plan: &Plan, spec: &Spec) -> Result<Vec<Row>> {
    let (base, _) = traced(spec, plan, 0, 1).await?;
    let mut rows = vec![Row::new(
        "fsync-family calls of a start+stop alone (subtracted below)",
        base as f64,
        "calls",
    )];
    for clients in [1, plan.clients] {
        let (total, by) = traced(spec, plan, plan.pairs, clients).await?;
        let per = (total as f64 - base as f64) / plan.pairs as f64;
        let detail: Vec<String> = strace::SYNC_CALLS
            .iter()
            .filter_map(|s| by.get(*s).map(|c| format!("{s} {c}")))
            .collect();
        eprintln!(
            "fsync per pair, {clients} clients: {per:.2} ({})",
            detail.join(", ")
        );
        rows.push(
            Row::new(
                format!(
                    "fsync-family calls per create+delete pair, {clients} client(s), {} pairs",
                    plan.pairs
                ),
                per,
                "calls",
            )
            .target_value("≤ 2", Bound::AtMost(2.0)),
        );
    }
    Ok(rows)
}
