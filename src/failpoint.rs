//! Crash points for tests: `RBDVOL_CRASH_AT=mount:after-map` makes the daemon SIGKILL
//! itself at that step, the way a power cut or an OOM kill would, so recovery from a
//! crash in the middle of Mount or Unmount is tested deterministically. Unset in
//! production; reading an environment variable is the whole cost.

/// Kills this process with SIGKILL if `RBDVOL_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    let Some(wanted) = std::env::var_os("RBDVOL_CRASH_AT") else {
        return;
    };
    if wanted.to_string_lossy().split(',').any(|p| p == point) {
        tracing::warn!(point, "RBDVOL_CRASH_AT: killing this process");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Injected faults for tests: `RBDVOL_FAULTS=export:read-eio` makes the exporter fail
/// every read with EIO, the way a failing disk or an unreachable placement group would,
/// so that rbdvol's behaviour on unreadable volumes is tested against the real data
/// path. Read once per process; unset in production.
pub fn fault(name: &str) -> bool {
    static FAULTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FAULTS
        .get_or_init(|| {
            std::env::var("RBDVOL_FAULTS")
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default()
        })
        .iter()
        .any(|f| f == name)
}
