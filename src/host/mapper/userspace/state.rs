//! The state file of an `rbdvol export` process: the whole protocol between the daemon
//! and its exporters. The exporter ([`crate::export`]) writes it, the userspace mapper
//! reads it to learn whether a mapping is usable; both use this one type, so the two
//! sides cannot drift apart. The JSON is what earlier versions wrote (same field names,
//! the phase as `"state"` in lowercase), so an exporter started before an upgrade is
//! still understood after it.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the exporter is doing, as the daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The FUSE file is live and backed by the image, under our exclusive lock.
    Serving,
    /// Ownership was lost (lock broken, client blocklisted): every I/O now fails.
    Fenced,
    /// Startup failed; `error` says why. The process has exited.
    Failed,
    /// A phase this version does not know (a newer exporter's): not usable, but the
    /// file's pid and address still count when stopping it or lifting its fence.
    #[serde(other)]
    Unknown,
}

/// The JSON document. Facts not known yet (client, addr, since before the cluster was
/// reached) are left out rather than written empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportState {
    #[serde(rename = "state")]
    pub phase: Phase,
    /// Always written; optional when read, so a damaged file never names pid 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub image: String,
    /// The FUSE-exposed file that the daemon attaches a loop device to.
    #[serde(default)]
    pub file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The exporter's client address (what a blocklist entry names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// When the lock was taken (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the exporter waited for the exclusive lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_wait_ms: Option<u64>,
    /// The dead owners it declared dead, fenced and took the lock from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub took_over_from: Vec<String>,
}

/// What an exporter has done since it started, written next to its state file
/// (`io.json`) every watchdog period, for the daemon's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_errors: u64,
    pub write_errors: u64,
}

impl IoStats {
    /// The stats file that belongs to a state file.
    pub fn path_for(state_file: &Path) -> std::path::PathBuf {
        state_file.with_file_name("io.json")
    }

    pub fn read(path: &Path) -> Option<IoStats> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

impl ExportState {
    /// The file's bytes: one JSON line.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut json = serde_json::to_vec(self)?;
        json.push(b'\n');
        Ok(json)
    }

    /// None for a file that is missing or unreadable: the exporter is then not serving.
    pub fn parse(text: &str) -> Option<ExportState> {
        serde_json::from_str(text).ok()
    }

    pub fn read(path: &Path) -> Option<ExportState> {
        ExportState::parse(&std::fs::read_to_string(path).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving() -> ExportState {
        ExportState {
            phase: Phase::Serving,
            pid: Some(4242),
            pool: "rbd".into(),
            image: "pg".into(),
            file: "/run/rbdvol/exports/rbd/pg/fuse/image".into(),
            client: Some("client.4171".into()),
            addr: Some("10.0.0.1:0/123".into()),
            since: Some("2026-01-01T00:00:00Z".into()),
            error: None,
            lock_wait_ms: None,
            took_over_from: Vec::new(),
        }
    }

    #[test]
    fn what_the_exporter_writes_the_daemon_reads() {
        for phase in [Phase::Serving, Phase::Fenced, Phase::Failed] {
            let st = ExportState {
                phase,
                error: (phase == Phase::Failed).then(|| "no such image".into()),
                ..serving()
            };
            let json = String::from_utf8(st.to_json().unwrap()).unwrap();
            assert_eq!(ExportState::parse(&json), Some(st));
        }
    }

    #[test]
    fn the_file_is_what_earlier_versions_wrote() {
        // Byte for byte what the exporter wrote before the state type was shared.
        let old = r#"{"state":"serving","pid":4242,"pool":"rbd","image":"pg","file":"/run/rbdvol/exports/rbd/pg/fuse/image","client":"client.4171","addr":"10.0.0.1:0/123","since":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(ExportState::parse(old), Some(serving()));
        assert_eq!(
            serving().to_json().unwrap(),
            format!("{old}\n").into_bytes()
        );

        // An early failure: no identity yet.
        let failed = r#"{"state":"failed","pid":7,"pool":"rbd","image":"pg","file":"/m/image","error":"boom"}"#;
        let st = ExportState::parse(failed).unwrap();
        assert_eq!((st.phase, st.pid, st.addr), (Phase::Failed, Some(7), None));
        assert_eq!(st.error.as_deref(), Some("boom"));
        assert_eq!(
            ExportState::parse(r#"{"state":"fenced","addr":"a"}"#).map(|s| s.phase),
            Some(Phase::Fenced)
        );
    }

    #[test]
    fn an_unknown_phase_is_not_serving_but_keeps_its_pid() {
        let st = ExportState::parse(r#"{"state":"draining","pid":9,"addr":"a"}"#).unwrap();
        assert_eq!((st.phase, st.pid), (Phase::Unknown, Some(9)));
        assert_eq!(st.addr.as_deref(), Some("a"));
        assert!(ExportState::parse("{\"pid\":9}").is_none());
        assert!(ExportState::parse("{\"state\":").is_none());
    }
}
