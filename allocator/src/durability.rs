//! Group commit for the ledger: the durability barrier.
//!
//! The ledger runs sqlite in WAL mode with `synchronous=NORMAL`: a commit
//! only writes its frames to the `-wal` file (no sync), under the
//! allocator's state lock. What must survive power loss before the caller
//! goes on (an intent before device work, a reply to the CO) is made durable
//! by [`WalSync::barrier`], called *outside* the state lock: one
//! `fdatasync` of the `-wal` file covers every commit written before it
//! started, because sqlite appends frames in commit order. Concurrent
//! callers share that sync (one leader syncs, the others wait on a condvar
//! and find their commit covered), so N clients pay about one sync per
//! round, not N.
//!
//! Commits that reconciliation can redo after a crash (creating→ready, the
//! row removals, erasing, expansion finished) call no barrier: they become
//! durable with the next barrier (WAL order) or the next checkpoint.
//!
//! Checkpoints: sqlite's automatic checkpoint is off (it would run inside a
//! commit, under the state lock). After a barrier, when at least
//! [`CHECKPOINT_EVERY`] commits were written since the last one, the caller
//! runs a PASSIVE checkpoint on a second connection (no state lock; writers
//! go on meanwhile). With `synchronous=NORMAL` sqlite syncs the WAL before
//! and the database after a checkpoint, so every commit is durable in one
//! or the other; when it later reuses the WAL from its start it syncs the new
//! header first (that one sync happens inside the next commit, once per
//! checkpoint cycle).
//!
//! The descriptor synced is the `-wal` file sqlite has open: opened with
//! `O_NOFOLLOW` once the file exists, and checked by device and inode
//! against the descriptors of this process that name it. Its directory
//! entry is made durable once, at open.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::ledger::CommitObserver;

/// Commits between two checkpoints (a create+delete pair writes about five;
/// each commit a few pages).
pub const CHECKPOINT_EVERY: u64 = 1000;

#[derive(Debug, Default)]
struct SyncState {
    /// Every commit with a sequence number up to this one is durable.
    synced: u64,
    /// A leader is in `fdatasync` now.
    syncing: bool,
    /// A failed sync: the kernel may have dropped the dirty pages, so no
    /// later sync proves anything; every barrier fails from then on.
    failed: Option<String>,
}

/// The `-wal` file's durability state, shared by the ledger (which numbers
/// commits under the state lock) and the callers of [`WalSync::barrier`].
pub struct WalSync {
    path: PathBuf,
    wal: File,
    /// Commits written to the WAL so far (numbered under the state lock).
    written: AtomicU64,
    state: Mutex<SyncState>,
    done: Condvar,
    /// `fdatasync` calls made (instrumentation for tests and benches).
    syncs: AtomicU64,
    /// The checkpointing connection; `try_lock`ed, so one checkpoint runs at
    /// a time and nobody waits for it.
    checkpointer: Mutex<Connection>,
    checkpointed_at: AtomicU64,
    checkpoints: AtomicU64,
    observer: Mutex<Option<CommitObserver>>,
}

impl std::fmt::Debug for WalSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalSync")
            .field("path", &self.path)
            .field("written", &self.written.load(Ordering::Relaxed))
            .field("syncs", &self.syncs.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WalSync {
    /// Opens the `-wal` file of the ledger at `db` (sqlite must have it
    /// open already) and the checkpointing connection.
    pub(crate) fn open(db: &Path, checkpointer: Connection) -> Result<WalSync> {
        let mut p = db.as_os_str().to_owned();
        p.push("-wal");
        let path = PathBuf::from(p);
        let io = |what: &str, e: std::io::Error| {
            Error::io(format!("{what} ledger WAL {}", path.display()), e)
        };
        let wal = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io("open", e))?;
        let meta = wal.metadata().map_err(|e| io("stat", e))?;
        let own = std::os::fd::AsRawFd::as_raw_fd(&wal);
        if !open_elsewhere(own, meta.dev(), meta.ino()).map_err(|e| io("find", e))? {
            return Err(Error::io(
                format!("open ledger WAL {}", path.display()),
                std::io::Error::other(
                    "the file at that name is not the one the ledger's sqlite connection writes (replaced while opening?)",
                ),
            ));
        }
        // The WAL's directory entry must survive power loss too, or a synced
        // WAL could vanish with its name.
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("sync the directory of", e))?;
        }
        Ok(WalSync {
            path,
            wal,
            written: AtomicU64::new(0),
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
            syncs: AtomicU64::new(0),
            checkpointer: Mutex::new(checkpointer),
            checkpointed_at: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            observer: Mutex::new(None),
        })
    }

    /// Numbers one commit just written to the WAL; called by the ledger
    /// under the state lock, so numbers follow WAL order.
    pub(crate) fn wrote(&self) -> u64 {
        self.written.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The number of the last commit written.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// `fdatasync` calls so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Checkpoints run so far.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }

    pub(crate) fn set_observer(&self, observer: CommitObserver) {
        *relock(&self.observer) = Some(observer);
    }

    /// Returns once commit `seq` (and every earlier one) is durable. Never
    /// call it with the state lock held: it may wait for a disk sync.
    pub fn barrier(&self, seq: u64) -> Result<()> {
        let t0 = Instant::now();
        let out = self.barrier_inner(seq);
        // What the caller waited for its commit to be durable (shared or
        // its own sync), once per durable point (metrics).
        if out.is_ok()
            && let Some(o) = relock(&self.observer).as_ref()
        {
            (o.0)(t0.elapsed());
        }
        out
    }

    fn barrier_inner(&self, seq: u64) -> Result<()> {
        let mut st = relock(&self.state);
        loop {
            if let Some(why) = &st.failed {
                return Err(self.failure(why));
            }
            if st.synced >= seq {
                return Ok(());
            }
            if !st.syncing {
                break;
            }
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        // Leader: every commit numbered so far is in the WAL file already.
        st.syncing = true;
        let upto = self.written();
        drop(st);
        let r = nix::unistd::fdatasync(&self.wal);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let mut st = relock(&self.state);
        st.syncing = false;
        let out = match r {
            Ok(()) => {
                st.synced = st.synced.max(upto);
                Ok(())
            }
            Err(e) => {
                let why = format!("fdatasync failed: {e}");
                let err = self.failure(&why);
                st.failed = Some(why);
                Err(err)
            }
        };
        drop(st);
        self.done.notify_all();
        if out.is_ok() {
            self.maybe_checkpoint();
        }
        out
    }

    /// Makes every commit written so far durable.
    pub fn barrier_all(&self) -> Result<()> {
        self.barrier(self.written())
    }

    fn failure(&self, why: &str) -> Error {
        Error::io(
            format!("make ledger WAL {} durable", self.path.display()),
            std::io::Error::other(format!(
                "{why}; commits since the last good sync may be lost, so nothing more is acknowledged: restart pmem-agent (the ledger is re-read and reconciled)"
            )),
        )
    }

    /// A PASSIVE checkpoint when enough commits piled up since the last
    /// one; skipped when another thread is checkpointing.
    fn maybe_checkpoint(&self) {
        let now = self.written();
        if now.saturating_sub(self.checkpointed_at.load(Ordering::Relaxed)) < CHECKPOINT_EVERY {
            return;
        }
        let Ok(conn) = self.checkpointer.try_lock() else {
            return;
        };
        if now.saturating_sub(self.checkpointed_at.load(Ordering::Relaxed)) < CHECKPOINT_EVERY {
            return;
        }
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        }) {
            Ok((busy, log, done)) => {
                self.checkpointed_at.store(now, Ordering::Relaxed);
                self.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    busy,
                    log_frames = log,
                    checkpointed = done,
                    "ledger checkpoint"
                );
            }
            Err(e) => {
                tracing::warn!(ledger = %self.path.display(), error = %e, "ledger checkpoint failed; retried after the next barrier");
            }
        }
    }
}

/// Whether a descriptor of this process other than `own` refers to the
/// file with that device and inode (sqlite's, as it opened the WAL first).
fn open_elsewhere(own: i32, dev: u64, ino: u64) -> std::io::Result<bool> {
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        if entry.file_name().to_str() == Some(own.to_string().as_str()) {
            continue;
        }
        if let Ok(m) = std::fs::metadata(entry.path())
            && m.dev() == dev
            && m.ino() == ino
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use std::sync::Arc;

    fn ledger(dir: &tempfile::TempDir) -> Ledger {
        Ledger::open(&dir.path().join("l.db")).unwrap()
    }

    /// One small commit, numbered.
    fn put(l: &mut Ledger, key: &str) -> u64 {
        l.conn_mut()
            .execute("INSERT INTO meta (key, value) VALUES (?1, 'x')", [key])
            .unwrap();
        l.wrote();
        l.written()
    }

    #[test]
    fn concurrent_barriers_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = ledger(&dir);
        let wal = Arc::clone(l.wal());
        let before = wal.syncs();
        // Eight commits written (as by eight clients under the state lock),
        // then their eight barriers at once: the first leader's sync covers
        // all of them.
        let seqs: Vec<u64> = (0..8).map(|i| put(&mut l, &format!("k{i}"))).collect();
        let start = Arc::new(std::sync::Barrier::new(seqs.len()));
        let threads: Vec<_> = seqs
            .iter()
            .map(|&seq| {
                let (wal, start) = (Arc::clone(&wal), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    wal.barrier(seq).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(wal.syncs() - before, 1, "eight barriers, one sync");
    }

    #[test]
    fn the_barrier_covers_every_earlier_commit_and_syncs_only_for_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = ledger(&dir);
        let wal = Arc::clone(l.wal());
        let s0 = wal.syncs();
        let a = put(&mut l, "a");
        let b = put(&mut l, "b");
        let c = put(&mut l, "c");
        assert_eq!(wal.syncs(), s0, "commits alone do not sync");
        wal.barrier(b).unwrap();
        assert_eq!(wal.syncs(), s0 + 1);
        // `c` was written before that sync started: covered too.
        wal.barrier(a).unwrap();
        wal.barrier(c).unwrap();
        assert_eq!(wal.syncs(), s0 + 1);
        let d = put(&mut l, "d");
        wal.barrier(d).unwrap();
        assert_eq!(wal.syncs(), s0 + 2);
        wal.barrier_all().unwrap();
        assert_eq!(wal.syncs(), s0 + 2, "nothing new to sync");
    }

    #[test]
    fn checkpoints_run_outside_commits_and_keep_the_wal_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = ledger(&dir);
        let n = 3 * CHECKPOINT_EVERY;
        for i in 0..n {
            put(&mut l, &format!("k{i}"));
            if i % 50 == 49 {
                l.wal().barrier_all().unwrap();
            }
        }
        assert!(l.wal().checkpoints() >= 2, "{:?}", l.wal());
        let wal = std::fs::metadata(dir.path().join("l.db-wal"))
            .unwrap()
            .len();
        // One cycle of small commits (a few pages each), not all of them.
        assert!(wal < n * 3 * 4096, "WAL of {wal} bytes after {n} commits");
        drop(l);
        let mut l = ledger(&dir);
        let rows: i64 = l
            .conn_mut()
            .query_row("SELECT COUNT(*) FROM meta", [], |r| r.get(0))
            .unwrap();
        assert_eq!(u64::try_from(rows).unwrap(), n, "every commit is there");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Whatever the order of commits and barriers: a barrier returns
        /// with its commit durable, and syncs only when an unsynced commit
        /// at or below its number exists.
        #[test]
        fn barriers_sync_only_what_is_unsynced(ops in proptest::collection::vec(0u8..3, 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut l = ledger(&dir);
            let wal = Arc::clone(l.wal());
            let mut durable = wal.written();
            for (i, op) in ops.iter().enumerate() {
                match op {
                    0 => { put(&mut l, &format!("k{i}")); }
                    1 => {
                        let before = wal.syncs();
                        let seq = wal.written();
                        wal.barrier(seq).unwrap();
                        let synced = wal.syncs() - before;
                        proptest::prop_assert_eq!(synced, u64::from(seq > durable));
                        durable = durable.max(seq);
                    }
                    _ => {
                        // A barrier for an older commit never syncs again.
                        let before = wal.syncs();
                        wal.barrier(durable).unwrap();
                        proptest::prop_assert_eq!(wal.syncs(), before);
                    }
                }
            }
        }
    }
}
