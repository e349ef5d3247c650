//! The exporter's I/O counters: bytes read and written and failed requests, counted
//! on the FUSE request path (one relaxed atomic add each) and written to `io.json`
//! next to the state file every watchdog period, where the daemon's metrics read them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::host::mapper::userspace::state::IoStats;

#[derive(Debug, Default)]
pub struct IoCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
}

impl IoCounters {
    pub fn done(&self, write: bool, bytes: usize) {
        let c = if write {
            &self.write_bytes
        } else {
            &self.read_bytes
        };
        c.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn failed(&self, write: bool) {
        let c = if write {
            &self.write_errors
        } else {
            &self.read_errors
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> IoStats {
        IoStats {
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// Where the counters go: `io.json` beside the state file, replaced atomically.
pub struct IoStatsFile(PathBuf);

impl IoStatsFile {
    pub fn beside(state_file: &Path) -> IoStatsFile {
        IoStatsFile(IoStats::path_for(state_file))
    }

    /// Writes the counters; failing to is harmless (metrics only).
    pub fn write(&self, stats: IoStats) {
        let tmp = self.0.with_extension("json.tmp");
        if let Ok(body) = serde_json::to_vec(&stats) {
            if std::fs::write(&tmp, body).is_ok() {
                let _ = std::fs::rename(&tmp, &self.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_reach_the_file_the_daemon_reads() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let c = IoCounters::default();
        c.done(true, 4096);
        c.done(false, 512);
        c.done(false, 512);
        c.failed(false);
        let f = IoStatsFile::beside(&state);
        f.write(c.snapshot());
        let read = IoStats::read(&IoStats::path_for(&state)).unwrap();
        assert_eq!(
            read,
            IoStats {
                read_bytes: 1024,
                write_bytes: 4096,
                read_errors: 1,
                write_errors: 0
            }
        );
        assert!(IoStats::read(&dir.path().join("io.json.tmp")).is_none());
    }
}
