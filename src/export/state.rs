//! Writing the exporter's state file: the one thing the daemon reads to learn whether a
//! mapping is usable. Its format, [`ExportState`], is shared with the daemon's reader in
//! [`crate::host::mapper::userspace::state`]. Written atomically (temp file in the same
//! directory, fsync, rename), so a reader sees either the old or the new content, never
//! a torn one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use crate::host::mapper::userspace::state::{ExportState, Phase};

/// The state file and the facts that go into every version of it.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    base: ExportState,
}

impl StateFile {
    pub fn new(path: &Path, pool: &str, image: &str, file: &Path) -> StateFile {
        StateFile {
            path: path.to_path_buf(),
            base: ExportState {
                phase: Phase::Failed,
                pid: Some(std::process::id()),
                pool: pool.to_string(),
                image: image.to_string(),
                file: file.display().to_string(),
                client: None,
                addr: None,
                since: None,
                error: None,
                lock_wait_ms: None,
                took_over_from: Vec::new(),
            },
        }
    }

    /// Records who we are on the cluster, for every later write.
    pub fn set_identity(&mut self, client: String, addr: String) {
        self.base.client = Some(client);
        self.base.addr = Some(addr);
    }

    pub fn set_since(&mut self, since: String) {
        self.base.since = Some(since);
    }

    /// How the lock was taken, for the daemon's metrics.
    pub fn set_lock(&mut self, waited: std::time::Duration, took_over_from: Vec<String>) {
        self.base.lock_wait_ms = Some(waited.as_millis() as u64);
        self.base.took_over_from = took_over_from;
    }

    pub fn write(&self, phase: Phase, error: Option<String>) -> Result<()> {
        let report = ExportState {
            phase,
            error,
            ..self.base.clone()
        };
        let json = report
            .to_json()
            .map_err(|e| Error::io("encoding the state file", std::io::Error::other(e)))?;
        write_atomically(&self.path, &json)
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    pub fn remove(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the state file")
            }
        }
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the state file path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself must survive a crash too, or a reader could find the old file.
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_atomically_and_omits_unknown_facts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut sf = StateFile::new(&path, "rbd", "img", Path::new("/m/image"));
        sf.write(Phase::Failed, Some("no such image".into()))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["state"], "failed");
        assert_eq!(v["error"], "no such image");
        assert_eq!(v["file"], "/m/image");
        assert!(v.get("client").is_none());

        sf.set_identity("client.42".into(), "127.0.0.1:0/1".into());
        sf.write(Phase::Serving, None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["state"], "serving");
        assert_eq!(v["client"], "client.42");
        assert!(v.get("error").is_none());
        assert_eq!(v["pid"], std::process::id());
        // Only the state file is left behind: no temp files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        sf.remove();
        assert!(!path.exists());
        sf.remove();
    }

    #[test]
    fn the_daemon_reads_what_the_exporter_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut sf = StateFile::new(&path, "rbd", "img", Path::new("/m/image"));
        sf.write(Phase::Failed, Some("no such image".into()))
            .unwrap();
        let st = ExportState::read(&path).unwrap();
        assert_eq!(st.phase, Phase::Failed);
        assert_eq!(st.error.as_deref(), Some("no such image"));
        assert_eq!(st.addr, None);

        sf.set_identity("client.42".into(), "127.0.0.1:0/1".into());
        sf.set_since("2026-01-01T00:00:00Z".into());
        for phase in [Phase::Serving, Phase::Fenced] {
            sf.write(phase, None).unwrap();
            let st = ExportState::read(&path).unwrap();
            assert_eq!(st.phase, phase);
            assert_eq!(st.pid, Some(std::process::id()));
            assert_eq!((st.pool.as_str(), st.image.as_str()), ("rbd", "img"));
            assert_eq!(st.file, "/m/image");
            assert_eq!(st.client.as_deref(), Some("client.42"));
            assert_eq!(st.addr.as_deref(), Some("127.0.0.1:0/1"));
            assert_eq!(st.since.as_deref(), Some("2026-01-01T00:00:00Z"));
            assert_eq!(st.error, None);
        }
    }
}
