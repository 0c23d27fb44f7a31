//! The sqlite allocation ledger: regions, volumes, intents and publications.
//!
//! Durability: WAL journal with `synchronous=NORMAL`; a commit is written
//! to the WAL but made durable only by a barrier ([`WalSync::barrier`],
//! group commit, see `durability.rs`), which the allocator calls outside its
//! state lock after the commits recovery needs (intents). Every device
//! change is preceded by a durable intent (see `allocator.rs`). One process
//! at a time: an exclusive `flock` on `<ledger>.lock` is held for the
//! ledger's lifetime.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::durability::WalSync;
use crate::error::{Error, Result};
use crate::region::RegionSpec;
use crate::units::Bytes;
use crate::volume::{Persistency, Publication, PublicationKind, Usage, Volume, VolumeState};

/// Forward migrations; entry `i` takes the schema from version `i` to `i+1`.
/// All pending ones run in one transaction at open.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE regions (
    id         TEXT PRIMARY KEY,
    backend    TEXT NOT NULL,
    size       INTEGER NOT NULL CHECK (size >= 0),
    align      INTEGER NOT NULL CHECK (align > 0),
    ns_slots   INTEGER NOT NULL CHECK (ns_slots >= 0),
    numa_node  INTEGER NOT NULL,
    location   TEXT NOT NULL
) STRICT;

CREATE TABLE volumes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL UNIQUE,
    region       TEXT NOT NULL REFERENCES regions(id),
    offset       INTEGER NOT NULL CHECK (offset >= 0),
    size         INTEGER NOT NULL CHECK (size > 0),
    requested    INTEGER NOT NULL CHECK (requested >= 0),
    usage        TEXT NOT NULL CHECK (usage IN ('AppDirect', 'FileIO')),
    erase_after  INTEGER NOT NULL CHECK (erase_after IN (0, 1)),
    parameters   TEXT NOT NULL,
    persistency  TEXT NOT NULL CHECK (persistency IN ('persistent', 'ephemeral')),
    context      TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting', 'erasing')),
    device       TEXT,
    created_at   INTEGER NOT NULL DEFAULT (unixepoch()),
    updated_at   INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;

CREATE TABLE intents (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    volume_id  TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    op         TEXT NOT NULL CHECK (op IN ('create', 'delete', 'erase', 'expand')),
    detail     TEXT NOT NULL,
    started_at INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;

CREATE TABLE publications (
    volume_id  TEXT NOT NULL REFERENCES volumes(id),
    kind       TEXT NOT NULL CHECK (kind IN ('stage', 'publish')),
    path       TEXT NOT NULL,
    readonly   INTEGER NOT NULL CHECK (readonly IN (0, 1)),
    capability TEXT NOT NULL,
    PRIMARY KEY (volume_id, kind, path)
) STRICT;
"#,
    // Identity (see identity.rs): the ledger's UUID (made at the first
    // open) and the regions this ledger has stamped with it.
    r#"
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) STRICT;
CREATE TABLE region_stamps (
    region     TEXT PRIMARY KEY,
    ledger_id  TEXT NOT NULL,
    stamped_at INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;
"#,
    // The device a stage/publish mounted, so the node unmounts only that.
    r#"
ALTER TABLE publications ADD COLUMN device INTEGER;
"#,
    // Scale: the eraser's backlog and an intent's volume by index, and the
    // volume counts by state and persistency kept by triggers in the same
    // transaction as every write, so metrics never count the rows.
    r#"
CREATE INDEX volumes_by_state ON volumes(state, persistency);
CREATE INDEX intents_by_volume ON intents(volume_id);
CREATE TABLE volume_counts (
    state        TEXT NOT NULL,
    persistency  TEXT NOT NULL,
    n            INTEGER NOT NULL CHECK (n >= 0),
    PRIMARY KEY (state, persistency)
) STRICT;
INSERT INTO volume_counts (state, persistency, n)
    SELECT s.state, p.persistency,
           (SELECT COUNT(*) FROM volumes v WHERE v.state = s.state AND v.persistency = p.persistency)
    FROM (SELECT 'creating' AS state UNION ALL SELECT 'ready' UNION ALL SELECT 'deleting'
          UNION ALL SELECT 'erasing') s,
         (SELECT 'persistent' AS persistency UNION ALL SELECT 'ephemeral') p;
CREATE TRIGGER volume_counts_insert AFTER INSERT ON volumes BEGIN
    UPDATE volume_counts SET n = n + 1
        WHERE state = NEW.state AND persistency = NEW.persistency;
END;
CREATE TRIGGER volume_counts_delete AFTER DELETE ON volumes BEGIN
    UPDATE volume_counts SET n = n - 1
        WHERE state = OLD.state AND persistency = OLD.persistency;
END;
CREATE TRIGGER volume_counts_update AFTER UPDATE OF state, persistency ON volumes
    WHEN OLD.state IS NOT NEW.state OR OLD.persistency IS NOT NEW.persistency BEGIN
    UPDATE volume_counts SET n = n - 1
        WHERE state = OLD.state AND persistency = OLD.persistency;
    UPDATE volume_counts SET n = n + 1
        WHERE state = NEW.state AND persistency = NEW.persistency;
END;
"#,
];

/// The states ListVolumes shows the CO: an `erasing` (deleted) or
/// `deleting` volume is gone for it.
const LIVE_STATES: &str = "'creating', 'ready'";

/// A pending device operation, durable before the device is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub seq: i64,
    pub volume_id: String,
    pub op: IntentOp,
    /// JSON with what recovery needs beyond the volume row (e.g. old size).
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentOp {
    Create,
    Delete,
    Erase,
    Expand,
}

impl IntentOp {
    fn as_str(self) -> &'static str {
        match self {
            IntentOp::Create => "create",
            IntentOp::Delete => "delete",
            IntentOp::Erase => "erase",
            IntentOp::Expand => "expand",
        }
    }

    fn parse(s: &str) -> Option<IntentOp> {
        Some(match s {
            "create" => IntentOp::Create,
            "delete" => IntentOp::Delete,
            "erase" => IntentOp::Erase,
            "expand" => IntentOp::Expand,
            _ => return None,
        })
    }

    /// The intent that accompanies a volume in `state`.
    fn for_state(state: VolumeState) -> Option<IntentOp> {
        match state {
            VolumeState::Creating => Some(IntentOp::Create),
            VolumeState::Deleting => Some(IntentOp::Delete),
            VolumeState::Erasing => Some(IntentOp::Erase),
            VolumeState::Ready => None,
        }
    }
}

/// The columns of a volume row that its device depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDevice {
    pub id: String,
    pub name: String,
    pub region: String,
    pub offset: Bytes,
    pub size: Bytes,
    pub usage: Usage,
    pub state: VolumeState,
    pub device: Option<String>,
}

/// Called with how long each durability barrier waited (metrics): once per
/// durable commit (an intent), redoable commits are not observed.
#[derive(Clone)]
pub struct CommitObserver(pub std::sync::Arc<dyn Fn(Duration) + Send + Sync>);

impl std::fmt::Debug for CommitObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitObserver")
    }
}

#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    sync: Arc<WalSync>,
    _lock: Flock<File>,
}

/// Commits (to the WAL, not yet durable) and numbers the commit.
pub(crate) fn commit(tx: rusqlite::Transaction<'_>, path: &Path, sync: &WalSync) -> Result<()> {
    tx.commit().map_err(|e| sql_err(path, e))?;
    sync.wrote();
    Ok(())
}

const VOLUME_COLUMNS: &str = "seq, id, name, region, offset, size, requested, usage, erase_after, \
     parameters, persistency, context, state, device";

impl Ledger {
    /// Opens (creating with mode 0600) and migrates the ledger at `path`.
    /// Refuses with `LedgerLocked` when another process holds it.
    pub fn open(path: &Path) -> Result<Ledger> {
        let lock_path = lock_path(path);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| symlink_refused(&lock_path, e))
            .map_err(|e| Error::io(format!("open ledger lock {}", lock_path.display()), e))?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    Error::LedgerLocked {
                        path: path.to_owned(),
                    }
                } else {
                    Error::io(
                        format!("lock ledger {}", lock_path.display()),
                        std::io::Error::from(errno),
                    )
                }
            })?;
        // Create the file ourselves so it is 0600 from the start; sqlite gives
        // the -wal and -shm files the same mode.
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| symlink_refused(path, e))
            .map_err(|e| Error::io(format!("create ledger {}", path.display()), e))?;
        // sqlite makes the -wal and -shm files itself; refuse symlinks there
        // too (it would follow them), and let it refuse a swapped main file.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = PathBuf::from(side);
            if std::fs::symlink_metadata(&side).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(Error::io(
                    format!("open ledger {}", path.display()),
                    std::io::Error::other(format!(
                        "{} is a symbolic link; refusing to follow it (remove it)",
                        side.display()
                    )),
                ));
            }
        }
        let open = || {
            Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | rusqlite::OpenFlags::SQLITE_OPEN_URI
                    | rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
            )
            .map_err(|e| sql_err(path, e))
        };
        let conn = open()?;
        configure(&conn, path)?;
        // A read opens the -wal file (sqlite keeps it open from then on), so
        // the barrier can open the same file.
        conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(|e| sql_err(path, e))?;
        let checkpointer = open()?;
        configure(&checkpointer, path)?;
        let sync = Arc::new(WalSync::open(path, checkpointer)?);
        let mut ledger = Ledger {
            conn,
            path: path.to_owned(),
            sync,
            _lock: lock,
        };
        ledger.migrate()?;
        ledger.sync.barrier_all()?;
        Ok(ledger)
    }

    /// The durability barrier of this ledger's commits.
    pub fn wal(&self) -> &Arc<WalSync> {
        &self.sync
    }

    /// The number of the last commit written (pass it to
    /// [`WalSync::barrier`] once the state lock is released).
    pub fn written(&self) -> u64 {
        self.sync.written()
    }

    /// Numbers an autocommit write just made.
    pub(crate) fn wrote(&self) {
        self.sync.wrote();
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for the identity module's tables (identity.rs).
    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn set_observer(&mut self, observer: CommitObserver) {
        self.sync.set_observer(observer);
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        sql_err(&self.path, e)
    }

    /// The schema version this binary writes.
    pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

    fn migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        let current: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| sql_err(&path, e))?;
        let current = usize::try_from(current).unwrap_or(usize::MAX);
        if current > MIGRATIONS.len() {
            return Err(Error::LedgerCorrupt {
                path,
                message: format!(
                    "schema version {current} is newer than this binary supports ({}); upgrade pmem-agent",
                    MIGRATIONS.len()
                ),
            });
        }
        if current == MIGRATIONS.len() {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(|e| sql_err(&path, e))?;
        for m in &MIGRATIONS[current..] {
            tx.execute_batch(m).map_err(|e| sql_err(&path, e))?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", MIGRATIONS.len()))
            .map_err(|e| sql_err(&path, e))?;
        commit(tx, &path, &self.sync)?;
        tracing::info!(ledger = %path.display(), from = current, to = MIGRATIONS.len(), "ledger schema migrated");
        Ok(())
    }

    /// Records the backend's regions. New regions are added; a known region
    /// may grow; a region that shrank below its volumes, or that has
    /// volumes but vanished, is an error the operator must look at.
    pub fn sync_regions(&mut self, backend: &str, specs: &[RegionSpec]) -> Result<()> {
        let path = self.path.clone();
        let known = self.regions()?;
        let tx = self.conn.transaction().map_err(|e| sql_err(&path, e))?;
        // Each region's end of volumes in one pass over the table, not one
        // scan per region.
        let ends: BTreeMap<String, i64> = {
            let mut st = tx
                .prepare("SELECT region, MAX(offset + size) FROM volumes GROUP BY region")
                .map_err(|e| sql_err(&path, e))?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| sql_err(&path, e))?
                .collect::<rusqlite::Result<_>>()
                .map_err(|e| sql_err(&path, e))?
        };
        for s in specs {
            let old = known.iter().find(|k| k.id == s.id);
            if let Some(old) = old
                && old.align != s.align
            {
                // A new alignment (the direct backend lowers the kernel's
                // default) is fine while every volume's extent is a whole
                // number of its units; the extents stay where they are.
                let misaligned: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM volumes WHERE region = ?1 AND (offset % ?2 != 0 OR size % ?2 != 0)",
                        params![s.id, to_i64(s.align)],
                        |r| r.get(0),
                    )
                    .map_err(|e| sql_err(&path, e))?;
                if misaligned > 0 {
                    return Err(Error::LedgerCorrupt {
                        path,
                        message: format!(
                            "region {} alignment changed from {} to {}, and {misaligned} of its volumes are not aligned to it",
                            s.id, old.align, s.align
                        ),
                    });
                }
                tracing::info!(region = %s.id, from = %old.align, to = %s.align, "region alignment changed");
            }
            let max_end = ends.get(&s.id).copied().unwrap_or(0);
            if u64::try_from(max_end).unwrap_or(0) > s.size.0 {
                return Err(Error::LedgerCorrupt {
                    path,
                    message: format!(
                        "region {} is now {} but volumes reach {max_end} bytes into it",
                        s.id, s.size
                    ),
                });
            }
            tx.execute(
                "INSERT INTO regions (id, backend, size, align, ns_slots, numa_node, location)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(id) DO UPDATE SET backend = excluded.backend, size = excluded.size,
                   align = excluded.align, ns_slots = excluded.ns_slots, numa_node = excluded.numa_node,
                   location = excluded.location",
                params![
                    s.id,
                    backend,
                    to_i64(s.size),
                    to_i64(s.align),
                    s.ns_slots,
                    s.numa_node,
                    s.location
                ],
            )
            .map_err(|e| sql_err(&path, e))?;
        }
        for k in &known {
            if specs.iter().any(|s| s.id == k.id) {
                continue;
            }
            let n: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM volumes WHERE region = ?1",
                    [&k.id],
                    |r| r.get(0),
                )
                .map_err(|e| sql_err(&path, e))?;
            if n > 0 {
                return Err(Error::LedgerCorrupt {
                    path,
                    message: format!(
                        "region {} holds {n} volumes in the ledger but the {backend} backend no longer reports it",
                        k.id
                    ),
                });
            }
            tx.execute("DELETE FROM regions WHERE id = ?1", [&k.id])
                .map_err(|e| sql_err(&path, e))?;
        }
        commit(tx, &path, &self.sync)
    }

    pub fn regions(&self) -> Result<Vec<RegionSpec>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, size, align, ns_slots, numa_node, location FROM regions ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(RegionSpec {
                    id: r.get(0)?,
                    size: Bytes(from_i64(r.get(1)?)),
                    align: Bytes(from_i64(r.get(2)?)),
                    ns_slots: r.get(3)?,
                    numa_node: r.get(4)?,
                    location: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// All volumes in insertion order.
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY seq"
            ))
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], volume_from_row).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Up to `limit` (all with `None`) volumes the CO sees (creating or
    /// ready) with `seq` above `after`, in `seq` order: a range search on
    /// the rowid, so a page costs its own rows (plus rows in other states
    /// inside the range), never the whole table. The state filter must not
    /// use `volumes_by_state` (that would read every live row and sort).
    pub fn live_volumes_after(&self, after: i64, limit: Option<usize>) -> Result<Vec<Volume>> {
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut st = self
            .conn
            .prepare_cached(&live_page_sql())
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![after, limit], volume_from_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// What the extent maps need of every volume, without the rest of the
    /// row (no JSON to parse): id, region, offset, size.
    pub fn volume_extents(&self) -> Result<Vec<(String, String, Bytes, Bytes)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, region, offset, size FROM volumes ORDER BY seq")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    Bytes(from_i64(r.get(2)?)),
                    Bytes(from_i64(r.get(3)?)),
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Every volume's device-facing columns (no JSON parsed), in `seq`
    /// order: what reconciliation needs to check a device.
    pub fn volume_devices(&self) -> Result<Vec<VolumeDevice>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, name, region, offset, size, usage, state, device FROM volumes ORDER BY seq",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                let usage: String = r.get(5)?;
                let state: String = r.get(6)?;
                Ok(VolumeDevice {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    region: r.get(2)?,
                    offset: Bytes(from_i64(r.get(3)?)),
                    size: Bytes(from_i64(r.get(4)?)),
                    usage: usage.parse::<Usage>().map_err(|m| conv_err(5, m))?,
                    state: state.parse::<VolumeState>().map_err(|m| conv_err(6, m))?,
                    device: r.get(7)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Volumes by state and persistency, from the trigger-kept counts (a
    /// read of at most eight rows, whatever the number of volumes).
    pub fn volume_counts(&self) -> Result<Vec<(VolumeState, Persistency, u64)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT state, persistency, n FROM volume_counts ORDER BY state, persistency",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                let state: String = r.get(0)?;
                let persistency: String = r.get(1)?;
                Ok((
                    state.parse::<VolumeState>().map_err(|m| conv_err(0, m))?,
                    persistency
                        .parse::<Persistency>()
                        .map_err(|m| conv_err(1, m))?,
                    from_i64(r.get(2)?),
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// The volumes in `state` (any with `None`) of `persistency` (any with
    /// `None`), in insertion order; by `volumes_by_state` when the state is
    /// given (the ephemeral collector: ready and ephemeral).
    pub fn volumes_where(
        &self,
        state: Option<VolumeState>,
        persistency: Option<Persistency>,
    ) -> Result<Vec<Volume>> {
        let Some(state) = state else {
            let all = self.volumes()?;
            return Ok(match persistency {
                Some(p) => all.into_iter().filter(|v| v.persistency == p).collect(),
                None => all,
            });
        };
        let Some(p) = persistency else {
            return self.volumes_in(state);
        };
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE state = ?1 AND persistency = ?2
                 ORDER BY seq"
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([state.as_str(), p.as_str()], volume_from_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// The volumes in one state, in insertion order.
    pub fn volumes_in(&self, state: VolumeState) -> Result<Vec<Volume>> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE state = ?1 ORDER BY seq"
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([state.as_str()], volume_from_row)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    pub fn volume(&self, id: &str) -> Result<Option<Volume>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1"
            ))
            .and_then(|mut st| st.query_row([id], volume_from_row).optional())
            .map_err(|e| self.err(e))
    }

    pub fn volume_by_name(&self, name: &str) -> Result<Option<Volume>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?1"
            ))
            .and_then(|mut st| st.query_row([name], volume_from_row).optional())
            .map_err(|e| self.err(e))
    }

    /// Inserts a volume in state `creating` together with its create intent,
    /// atomically: after this commit the extent is ours.
    pub fn insert_creating(&mut self, v: &Volume, detail: &str) -> Result<i64> {
        debug_assert_eq!(v.state, VolumeState::Creating);
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql_err(&path, e))?;
        tx.execute(
            "INSERT INTO volumes (id, name, region, offset, size, requested, usage, erase_after,
               parameters, persistency, context, state, device)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                v.id,
                v.name,
                v.region,
                to_i64(v.offset),
                to_i64(v.size),
                to_i64(v.requested),
                v.usage.as_str(),
                v.erase_after,
                json_map(&v.parameters),
                v.persistency.as_str(),
                json_map(&v.context),
                v.state.as_str(),
                v.device
            ],
        )
        .map_err(|e| sql_err(&path, e))?;
        let seq = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO intents (volume_id, op, detail) VALUES (?1, 'create', ?2)",
            params![v.id, detail],
        )
        .map_err(|e| sql_err(&path, e))?;
        commit(tx, &path, &self.sync)?;
        Ok(seq)
    }

    /// Moves a volume along the state machine, replacing its intent in the
    /// same transaction. Refuses edges the state machine does not have.
    pub fn transition(
        &mut self,
        id: &str,
        to: VolumeState,
        device: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        self.transition_renamed(id, to, device, detail, None)
    }

    /// [`Ledger::transition`], renaming the volume in the same transaction
    /// (a deleted volume gives its CSI name back as it becomes `erasing`).
    pub fn transition_renamed(
        &mut self,
        id: &str,
        to: VolumeState,
        device: Option<&str>,
        detail: &str,
        name: Option<&str>,
    ) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql_err(&path, e))?;
        let from: Option<String> = tx
            .query_row("SELECT state FROM volumes WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| sql_err(&path, e))?;
        let from = from.ok_or_else(|| Error::NotFound(format!("volume {id} not in ledger")))?;
        let from: VolumeState = from.parse().map_err(|m| Error::LedgerCorrupt {
            path: path.clone(),
            message: m,
        })?;
        if from != to {
            if !from.can_become(to) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} cannot go from {from} to {to}"
                )));
            }
            tx.execute(
                "DELETE FROM intents WHERE volume_id = ?1 AND op != 'expand'",
                [id],
            )
            .map_err(|e| sql_err(&path, e))?;
            if let Some(op) = IntentOp::for_state(to) {
                tx.execute(
                    "INSERT INTO intents (volume_id, op, detail) VALUES (?1, ?2, ?3)",
                    params![id, op.as_str(), detail],
                )
                .map_err(|e| sql_err(&path, e))?;
            }
        }
        tx.execute(
            "UPDATE volumes SET state = ?2, device = COALESCE(?3, device), updated_at = unixepoch()
             WHERE id = ?1",
            params![id, to.as_str(), device],
        )
        .map_err(|e| sql_err(&path, e))?;
        if let Some(name) = name {
            tx.execute(
                "UPDATE volumes SET name = ?2 WHERE id = ?1",
                params![id, name],
            )
            .map_err(|e| sql_err(&path, e))?;
        }
        commit(tx, &path, &self.sync)
    }

    /// Records the device path of a ready volume (after re-attachment).
    pub fn set_device(&mut self, id: &str, device: Option<&str>) -> Result<()> {
        self.conn
            .execute(
                "UPDATE volumes SET device = ?2, updated_at = unixepoch() WHERE id = ?1",
                params![id, device],
            )
            .map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    /// Renames a volume: a deleted one gives its CSI name back while its
    /// extent is erased.
    pub fn rename(&mut self, id: &str, name: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE volumes SET name = ?2, updated_at = unixepoch() WHERE id = ?1",
                params![id, name],
            )
            .map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    /// Removes a volume row, its intents and its publications: the extent is free.
    pub fn remove_volume(&mut self, id: &str) -> Result<()> {
        self.remove_volumes(&[id])
    }

    /// Removes several volume rows (with intents and publications) in one
    /// transaction: the eraser's batch.
    pub fn remove_volumes(&mut self, ids: &[&str]) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql_err(&path, e))?;
        for id in ids {
            tx.execute("DELETE FROM publications WHERE volume_id = ?1", [id])
                .map_err(|e| sql_err(&path, e))?;
            tx.execute("DELETE FROM volumes WHERE id = ?1", [id])
                .map_err(|e| sql_err(&path, e))?;
        }
        commit(tx, &path, &self.sync)
    }

    /// Grows the recorded extent and records an expand intent carrying the
    /// old size, in one transaction.
    pub fn begin_expand(&mut self, id: &str, old: Bytes, new: Bytes) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql_err(&path, e))?;
        let n = tx
            .execute(
                "UPDATE volumes SET size = ?3, updated_at = unixepoch() WHERE id = ?1 AND size = ?2",
                params![id, to_i64(old), to_i64(new)],
            )
            .map_err(|e| sql_err(&path, e))?;
        if n != 1 {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is no longer {old}; another expansion raced"
            )));
        }
        tx.execute(
            "INSERT INTO intents (volume_id, op, detail) VALUES (?1, 'expand', ?2)",
            params![
                id,
                format!("{{\"old_size\":{},\"new_size\":{}}}", old.0, new.0)
            ],
        )
        .map_err(|e| sql_err(&path, e))?;
        commit(tx, &path, &self.sync)
    }

    pub fn finish_expand(&mut self, id: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM intents WHERE volume_id = ?1 AND op = 'expand'",
                [id],
            )
            .map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    pub fn intents(&self) -> Result<Vec<Intent>> {
        let mut st = self
            .conn
            .prepare("SELECT seq, volume_id, op, detail FROM intents ORDER BY seq")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                let op: String = r.get(2)?;
                Ok(Intent {
                    seq: r.get(0)?,
                    volume_id: r.get(1)?,
                    op: IntentOp::parse(&op).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            format!("unknown intent op {op:?}").into(),
                        )
                    })?,
                    detail: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Records (or replaces) a stage/publish of a volume at a path.
    pub fn put_publication(&mut self, p: &Publication) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO publications (volume_id, kind, path, readonly, capability, device)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(volume_id, kind, path) DO UPDATE SET readonly = excluded.readonly,
                   capability = excluded.capability, device = excluded.device",
                params![
                    p.volume_id,
                    p.kind.as_str(),
                    p.path,
                    p.readonly,
                    p.capability,
                    // Device numbers fit in 63 bits; stored bit for bit.
                    p.device.map(|d| d.cast_signed())
                ],
            )
            .map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    pub fn delete_publication(
        &mut self,
        volume_id: &str,
        kind: PublicationKind,
        path: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM publications WHERE volume_id = ?1 AND kind = ?2 AND path = ?3",
                params![volume_id, kind.as_str(), path],
            )
            .map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    /// Publications of one volume, or of all volumes with `None`. Two
    /// statements: `?1 IS NULL OR volume_id = ?1` would scan the table for
    /// one volume instead of searching its primary key.
    pub fn publications(&self, volume_id: Option<&str>) -> Result<Vec<Publication>> {
        let sql = match volume_id {
            Some(_) => {
                "SELECT volume_id, kind, path, readonly, capability, device FROM publications
                 WHERE volume_id = ?1 ORDER BY volume_id, kind, path"
            }
            None => {
                "SELECT volume_id, kind, path, readonly, capability, device FROM publications
                 WHERE ?1 IS NULL ORDER BY volume_id, kind, path"
            }
        };
        let mut st = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map([volume_id], |r| {
                let kind: String = r.get(1)?;
                Ok(Publication {
                    volume_id: r.get(0)?,
                    kind: kind.parse().map_err(|m: String| {
                        rusqlite::Error::FromSqlConversionFailure(
                            1,
                            rusqlite::types::Type::Text,
                            m.into(),
                        )
                    })?,
                    path: r.get(2)?,
                    readonly: r.get(3)?,
                    capability: r.get(4)?,
                    device: r.get::<_, Option<i64>>(5)?.map(i64::cast_unsigned),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }
}

/// The ListVolumes page query: the rowid range and `LIMIT`, the state
/// filter kept off `volumes_by_state` (`+state`), see `live_volumes_after`.
fn live_page_sql() -> String {
    format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE seq > ?1 AND +state IN ({LIVE_STATES})
         ORDER BY seq LIMIT ?2"
    )
}

/// WAL, `synchronous=NORMAL` (commits are made durable by the barrier),
/// no automatic checkpoint (it would run inside a commit, under the state
/// lock; `durability.rs` checkpoints outside it), foreign keys.
fn configure(conn: &Connection, path: &Path) -> Result<()> {
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| sql_err(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::LedgerCorrupt {
            path: path.to_owned(),
            message: format!("journal mode is {mode}, wanted wal"),
        });
    }
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0; PRAGMA foreign_keys=ON;",
    )
    .map_err(|e| sql_err(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| sql_err(path, e))?;
    Ok(())
}

/// ELOOP from O_NOFOLLOW means the name is a symlink: say so.
fn symlink_refused(path: &Path, e: std::io::Error) -> std::io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        std::io::Error::other(format!(
            "{} is a symbolic link; the ledger is never opened through one (remove the link; if its target is the real ledger, move that file here)",
            path.display()
        ))
    } else {
        e
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

pub(crate) fn sql_err(path: &Path, source: rusqlite::Error) -> Error {
    Error::Ledger {
        path: path.to_owned(),
        source,
    }
}

/// sqlite integers are signed; sizes never reach 2^63.
fn to_i64(b: Bytes) -> i64 {
    i64::try_from(b.0).unwrap_or(i64::MAX)
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn json_map(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".to_owned())
}

fn conv_err(col: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, msg.into())
}

fn volume_from_row(r: &Row<'_>) -> rusqlite::Result<Volume> {
    let usage: String = r.get(7)?;
    let params: String = r.get(9)?;
    let persistency: String = r.get(10)?;
    let context: String = r.get(11)?;
    let state: String = r.get(12)?;
    Ok(Volume {
        seq: r.get(0)?,
        id: r.get(1)?,
        name: r.get(2)?,
        region: r.get(3)?,
        offset: Bytes(from_i64(r.get(4)?)),
        size: Bytes(from_i64(r.get(5)?)),
        requested: Bytes(from_i64(r.get(6)?)),
        usage: usage.parse::<Usage>().map_err(|m| conv_err(7, m))?,
        erase_after: r.get(8)?,
        parameters: serde_json::from_str(&params).map_err(|e| conv_err(9, e.to_string()))?,
        persistency: persistency
            .parse::<Persistency>()
            .map_err(|m| conv_err(10, m))?,
        context: serde_json::from_str(&context).map_err(|e| conv_err(11, e.to_string()))?,
        state: state.parse::<VolumeState>().map_err(|m| conv_err(12, m))?,
        device: r.get(13)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(id: &str) -> RegionSpec {
        RegionSpec {
            id: id.into(),
            size: Bytes::gib(1),
            align: Bytes::mib(16),
            ns_slots: 10,
            numa_node: 0,
            location: "/x".into(),
        }
    }

    fn vol(id: &str, name: &str) -> Volume {
        Volume {
            id: id.into(),
            name: name.into(),
            region: "region0".into(),
            offset: Bytes(0),
            size: Bytes::mib(16),
            requested: Bytes::mib(10),
            usage: Usage::AppDirect,
            erase_after: true,
            parameters: BTreeMap::new(),
            persistency: Persistency::Persistent,
            context: BTreeMap::new(),
            state: VolumeState::Creating,
            device: None,
            seq: 0,
        }
    }

    #[test]
    fn open_creates_0600_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.db");
        let l = Ledger::open(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(Ledger::open(&p), Err(Error::LedgerLocked { .. })));
        drop(l);
        Ledger::open(&p).unwrap();
    }

    #[test]
    fn never_opens_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.db");
        let target = dir.path().join("elsewhere.db");
        for side in [
            "ledger.db",
            "ledger.db.lock",
            "ledger.db-wal",
            "ledger.db-shm",
        ] {
            let link = dir.path().join(side);
            // The lock file exists after the first open attempt.
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let e = Ledger::open(&p).unwrap_err().to_string();
            assert!(e.contains("is a symbolic link"), "{side}: {e}");
            assert!(!target.exists(), "{side}: the symlink was followed");
            std::fs::remove_file(&link).unwrap();
        }
        Ledger::open(&p).unwrap();
    }

    #[test]
    fn an_older_ledger_migrates_and_gets_an_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute_batch("PRAGMA user_version = 1").unwrap();
        }
        {
            // Files made by Connection::open are not 0600; ours would be.
            let mut l = Ledger::open(&p).unwrap();
            l.sync_regions("sim", &[spec("region0")]).unwrap();
            l.insert_creating(&vol("v1", "n1"), "{}").unwrap();
        }
        let mut l = Ledger::open(&p).unwrap();
        assert_eq!(Ledger::SCHEMA_VERSION, 4);
        let id = l.ledger_id().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(l.region_stamps().unwrap().is_empty());
        assert_eq!(l.volumes().unwrap().len(), 1);
        l.record_stamp("region0", &id).unwrap();
        drop(l);
        let mut l = Ledger::open(&p).unwrap();
        assert_eq!(l.ledger_id().unwrap(), id, "the identity is made once");
        assert_eq!(l.region_stamps().unwrap()["region0"], id);
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.db");
        drop(Ledger::open(&p).unwrap());
        let c = Connection::open(&p).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        let e = Ledger::open(&p).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn publications_keep_their_device_across_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.db");
        // A ledger at the schema before publications had a device.
        let c = Connection::open(&p).unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO regions VALUES ('region0', 'sim', 1073741824, 16777216, 10, 0, '/x');
             INSERT INTO volumes (id, name, region, offset, size, requested, usage, erase_after,
               parameters, persistency, context, state, device)
             VALUES ('v1', 'n1', 'region0', 0, 16777216, 16777216, 'AppDirect', 0, '{}',
               'persistent', '{}', 'ready', '/dev/loop9');
             INSERT INTO publications VALUES ('v1', 'stage', '/k/s', 0, 'mount');",
        )
        .unwrap();
        drop(c);
        let mut l = Ledger::open(&p).unwrap();
        let old = l.publications(Some("v1")).unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].device, None, "unknown for old rows");
        let mut new = old[0].clone();
        new.kind = PublicationKind::Publish;
        new.path = "/k/t".into();
        // makedev(259, 3)
        new.device = Some((259 << 8) | 3);
        l.put_publication(&new).unwrap();
        drop(l);
        let l = Ledger::open(&p).unwrap();
        let got = l.publications(Some("v1")).unwrap();
        assert_eq!(
            got.iter().find(|p| p.path == "/k/t").unwrap().device,
            new.device
        );
    }

    #[test]
    fn state_machine_is_enforced_with_intents() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.db")).unwrap();
        l.sync_regions("sim", &[spec("region0")]).unwrap();
        l.insert_creating(&vol("v1", "n1"), "{}").unwrap();
        assert_eq!(l.intents().unwrap()[0].op, IntentOp::Create);
        assert!(
            l.transition("v1", VolumeState::Erasing, None, "{}")
                .is_err()
        );
        l.transition("v1", VolumeState::Ready, Some("/dev/loop9"), "{}")
            .unwrap();
        assert!(l.intents().unwrap().is_empty());
        l.transition("v1", VolumeState::Deleting, None, "{}")
            .unwrap();
        l.transition("v1", VolumeState::Erasing, None, "{}")
            .unwrap();
        let i = l.intents().unwrap();
        assert_eq!(i.len(), 1);
        assert_eq!(i[0].op, IntentOp::Erase);
        assert_eq!(
            l.volume("v1").unwrap().unwrap().device.as_deref(),
            Some("/dev/loop9")
        );
        l.remove_volume("v1").unwrap();
        assert!(l.intents().unwrap().is_empty());
        assert!(l.volume("v1").unwrap().is_none());
    }

    /// The plan sqlite chooses for `sql`, one detail line per step.
    fn plan(l: &Ledger, sql: &str, params: impl rusqlite::Params) -> String {
        let mut st = l
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        st.query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("; ")
    }

    #[test]
    fn per_call_queries_search_an_index_never_scan_the_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.db")).unwrap();
        l.sync_regions("sim", &[spec("region0")]).unwrap();
        for i in 0..50 {
            let mut v = vol(&format!("v{i}"), &format!("n{i}"));
            v.offset = Bytes::mib(16 * i);
            l.insert_creating(&v, "{}").unwrap();
        }
        // The statistics a long-running ledger would have must not change it.
        l.conn.execute_batch("ANALYZE").unwrap();
        let page = plan(&l, &live_page_sql(), params![10, 3]);
        assert!(
            page.contains("SEARCH volumes USING INTEGER PRIMARY KEY (rowid>?)"),
            "{page}"
        );
        assert!(!page.contains("TEMP B-TREE"), "sorts: {page}");
        for (what, sql) in [
            (
                "by name",
                format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?1"),
            ),
            (
                "by id",
                format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1"),
            ),
        ] {
            let p = plan(&l, &sql, ["x"]);
            assert!(p.contains("SEARCH volumes USING INDEX"), "{what}: {p}");
        }
        let p = plan(
            &l,
            &format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE state = ?1 ORDER BY seq"),
            ["erasing"],
        );
        // (It sorts what it found, the backlog, not the table.)
        assert!(
            p.contains("SEARCH volumes USING INDEX volumes_by_state (state=?)"),
            "{p}"
        );
        let p = plan(
            &l,
            &format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE state = ?1 AND persistency = ?2 ORDER BY seq"
            ),
            ["ready", "ephemeral"],
        );
        assert!(
            p.contains("USING INDEX volumes_by_state (state=? AND persistency=?)"),
            "{p}"
        );
        let p = plan(
            &l,
            "SELECT volume_id, kind, path, readonly, capability, device FROM publications
             WHERE volume_id = ?1 ORDER BY volume_id, kind, path",
            ["v1"],
        );
        assert!(p.contains("SEARCH publications USING INDEX"), "{p}");
        let p = plan(&l, "SELECT seq FROM intents WHERE volume_id = ?1", ["v1"]);
        assert!(
            p.contains("USING INDEX intents_by_volume")
                || p.contains("USING COVERING INDEX intents_by_volume"),
            "{p}"
        );
    }

    #[test]
    fn live_pages_follow_seq_and_skip_gone_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.db")).unwrap();
        l.sync_regions("sim", &[spec("region0")]).unwrap();
        let seqs: Vec<i64> = (0..5)
            .map(|i| {
                let mut v = vol(&format!("v{i}"), &format!("n{i}"));
                v.offset = Bytes::mib(16 * i);
                l.insert_creating(&v, "{}").unwrap()
            })
            .collect();
        let ids = |vs: Vec<Volume>| vs.into_iter().map(|v| v.id).collect::<Vec<_>>();
        assert_eq!(ids(l.live_volumes_after(0, Some(2)).unwrap()), ["v0", "v1"]);
        assert_eq!(
            ids(l.live_volumes_after(seqs[1], Some(2)).unwrap()),
            ["v2", "v3"]
        );
        // v2 deleted (erasing) and v3 removed: the page after v1 goes on at v4.
        l.transition("v2", VolumeState::Deleting, None, "{}")
            .unwrap();
        l.transition("v2", VolumeState::Erasing, None, "{}")
            .unwrap();
        l.remove_volume("v3").unwrap();
        assert_eq!(ids(l.live_volumes_after(seqs[1], Some(2)).unwrap()), ["v4"]);
        // A page after a removed volume's seq continues from the next key.
        assert_eq!(ids(l.live_volumes_after(seqs[3], None).unwrap()), ["v4"]);
        assert_eq!(
            ids(l.live_volumes_after(0, None).unwrap()),
            ["v0", "v1", "v4"]
        );
    }

    #[test]
    fn volume_counts_follow_every_write_and_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.db");
        // A ledger at schema 3 with rows, as a release before the counts.
        {
            let c = Connection::open(&p).unwrap();
            for m in &MIGRATIONS[..3] {
                c.execute_batch(m).unwrap();
            }
            c.execute_batch(
                "PRAGMA user_version = 3;
                 INSERT INTO regions VALUES ('region0', 'sim', 1073741824, 16777216, 10, 0, '/x');
                 INSERT INTO volumes (id, name, region, offset, size, requested, usage, erase_after,
                   parameters, persistency, context, state, device)
                 VALUES ('old1', 'o1', 'region0', 0, 16777216, 0, 'AppDirect', 0, '{}',
                   'persistent', '{}', 'ready', NULL),
                        ('old2', 'o2', 'region0', 16777216, 16777216, 0, 'AppDirect', 0, '{}',
                   'ephemeral', '{}', 'erasing', NULL);",
            )
            .unwrap();
        }
        let mut l = Ledger::open(&p).unwrap();
        let count = |l: &Ledger, s: VolumeState, p: Persistency| {
            l.volume_counts()
                .unwrap()
                .into_iter()
                .find(|(vs, vp, _)| *vs == s && *vp == p)
                .map(|(_, _, n)| n)
                .unwrap()
        };
        assert_eq!(l.volume_counts().unwrap().len(), 8);
        assert_eq!(count(&l, VolumeState::Ready, Persistency::Persistent), 1);
        assert_eq!(count(&l, VolumeState::Erasing, Persistency::Ephemeral), 1);
        let mut v = vol("v1", "n1");
        v.offset = Bytes::mib(512);
        l.insert_creating(&v, "{}").unwrap();
        assert_eq!(count(&l, VolumeState::Creating, Persistency::Persistent), 1);
        l.transition("v1", VolumeState::Ready, None, "{}").unwrap();
        assert_eq!(count(&l, VolumeState::Creating, Persistency::Persistent), 0);
        assert_eq!(count(&l, VolumeState::Ready, Persistency::Persistent), 2);
        l.remove_volume("old2").unwrap();
        l.remove_volume("v1").unwrap();
        assert_eq!(count(&l, VolumeState::Erasing, Persistency::Ephemeral), 0);
        assert_eq!(count(&l, VolumeState::Ready, Persistency::Persistent), 1);
        // The counts are the rows, whatever wrote them.
        let rows: i64 = l
            .conn
            .query_row("SELECT COUNT(*) FROM volumes", [], |r| r.get(0))
            .unwrap();
        let kept: u64 = l.volume_counts().unwrap().iter().map(|c| c.2).sum();
        assert_eq!(kept, u64::try_from(rows).unwrap());
    }

    #[test]
    fn names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.db")).unwrap();
        l.sync_regions("sim", &[spec("region0")]).unwrap();
        l.insert_creating(&vol("v1", "n1"), "{}").unwrap();
        assert!(l.insert_creating(&vol("v2", "n1"), "{}").is_err());
    }

    #[test]
    fn region_with_volumes_cannot_vanish_or_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.db")).unwrap();
        l.sync_regions("sim", &[spec("region0")]).unwrap();
        let mut v = vol("v1", "n1");
        v.offset = Bytes::mib(512);
        l.insert_creating(&v, "{}").unwrap();
        assert!(l.sync_regions("sim", &[]).is_err());
        let mut small = spec("region0");
        small.size = Bytes::mib(256);
        assert!(l.sync_regions("sim", &[small]).is_err());
        let mut big = spec("region0");
        big.size = Bytes::gib(2);
        l.sync_regions("sim", &[big]).unwrap();
    }

    #[test]
    fn region_alignment_may_change_while_the_volumes_are_aligned_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.db")).unwrap();
        l.sync_regions("sim", &[spec("region0")]).unwrap();
        let mut v = vol("v1", "n1");
        v.offset = Bytes::mib(16);
        v.size = Bytes::mib(16);
        l.insert_creating(&v, "{}").unwrap();
        // Lowered (16 MiB to 2 MiB): every extent is still whole units.
        let mut fine = spec("region0");
        fine.align = Bytes::mib(2);
        l.sync_regions("sim", &[fine]).unwrap();
        assert_eq!(l.regions().unwrap()[0].align, Bytes::mib(2));
        let mut w = vol("v2", "n2");
        w.offset = Bytes::mib(34);
        w.size = Bytes::mib(6);
        l.insert_creating(&w, "{}").unwrap();
        // Raised again: v2 (34 MiB + 6 MiB) is not in 16 MiB units.
        let e = l.sync_regions("sim", &[spec("region0")]).unwrap_err();
        assert!(e.to_string().contains("1 of its volumes"), "{e}");
        assert_eq!(l.regions().unwrap()[0].align, Bytes::mib(2));
    }
}
