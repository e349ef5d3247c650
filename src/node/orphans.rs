//! References Docker will never release. Docker keeps a mount ID only after it got a
//! successful answer to the Mount; when the answer was lost (the daemon died after
//! mounting, Docker gave up at its deadline) its retry carries a new ID, and after a
//! dockerd crash no Unmount comes at all. Such a reference would pin the volume to this
//! host for good: mounted, mapped, and its exclusive lock held against every other host.
//!
//! rbdvol does not trust its counts alone. A volume is released when both hold:
//! - every reference on it is at least `map.orphan_grace` old (a younger one may belong
//!   to a container that runc has not bind-mounted the volume into yet), and
//! - no mount namespace on the host holds its filesystem, other than rbdvol's own mount
//!   and copies of it (see [`crate::host::usage`]): a running container always does.
//!
//! It is checked at every Unmount that leaves references behind, and periodically, so
//! an orphan is released within the grace (plus one sweep) of its last Mount. The check
//! needs to see every process: in a PID namespace of its own (a managed plugin without
//! `pidhost`) rbdvol cannot see containers, and never releases anything this way.

use std::time::Duration;

use super::mounts::now_secs;
use super::refs::{ActiveVolume, CSI_STAGE_REF};
use super::Node;

/// Inode of the initial PID namespace (`PROC_PID_INIT_INO`): only there are all of the
/// host's processes, and so all containers' mount namespaces, visible in /proc.
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

/// What to do with a volume's remaining references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Something holds the filesystem: these say what.
    InUse(Vec<String>),
    /// A reference is younger than the grace: a container may still be starting.
    TooRecent,
    /// Nothing uses it and nothing may be about to: release it.
    Orphaned,
}

/// Decides from the newest reference's time, the clock, the grace and what the kernel
/// says holds the filesystem.
pub fn verdict(last_mounted: u64, now: u64, grace: Duration, uses: Vec<String>) -> Verdict {
    if !uses.is_empty() {
        return Verdict::InUse(uses);
    }
    if now.saturating_sub(last_mounted) < grace.as_secs().max(1) {
        return Verdict::TooRecent;
    }
    Verdict::Orphaned
}

/// True when this process can see every process on the host.
pub fn sees_all_processes() -> bool {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|l| l.as_os_str() == INITIAL_PID_NAMESPACE)
        .unwrap_or(false)
}

impl Node {
    /// Releases every volume on this host whose references are orphaned.
    pub async fn release_orphans(&self) {
        if !self.cfg.sees_all_processes {
            return;
        }
        for name in self.volume_names() {
            let lock = self.locks.get(&name);
            // A volume whose Mount or Unmount is under way is in use right now; the
            // sweep does not wait behind it (a Mount may wait a minute for a lock).
            let Ok(_serialised) = lock.try_lock() else {
                continue;
            };
            if let Some(v) = self.active(&name) {
                self.release_if_orphaned(&name, &v).await;
            }
        }
    }

    /// Under the volume's name lock: releases `v` if its references are orphaned.
    /// Returns true if it was released.
    pub(super) async fn release_if_orphaned(&self, name: &str, v: &ActiveVolume) -> bool {
        if !self.cfg.sees_all_processes {
            return false;
        }
        // A CSI stage is released by its NodeUnstage alone: between stage and publish
        // nothing but rbdvol holds the filesystem, and that is no orphan.
        if v.refs.keys().any(|id| id.starts_with(CSI_STAGE_REF)) {
            return false;
        }
        let grace = self.cfg.orphan_grace;
        match verdict(v.last_mounted(), now_secs(), grace, self.attacher.uses(v)) {
            Verdict::InUse(uses) => {
                tracing::debug!(volume = name, refs = v.total_refs(), uses = ?uses, "references are live");
                false
            }
            Verdict::TooRecent => false,
            Verdict::Orphaned => {
                let ids: Vec<&String> = v.refs.keys().collect();
                tracing::warn!(
                    volume = name,
                    refs = v.total_refs(),
                    ids = ?ids,
                    grace_s = grace.as_secs(),
                    "releasing a volume nothing uses: no mount namespace on this host holds its filesystem, and Docker last mounted it longer ago than the grace (its Mount answer was lost, or dockerd restarted without Unmount)"
                );
                if let Err(e) = self.attacher.detach(name, v).await {
                    tracing::error!(volume = name, error = %e, "could not release an orphaned volume; retrying later");
                    return false;
                }
                crate::metrics::event("orphan_released");
                if let Err(e) = self.update_table(|vols| vols.remove(name)) {
                    tracing::error!(volume = name, error = %e, "released an orphaned volume but could not update the reference table");
                }
                true
            }
        }
    }

    /// How often the periodic sweep runs: often enough that an orphan goes within
    /// Docker's 2 minutes of its last Unmount.
    pub fn orphan_sweep_period(&self) -> Duration {
        (self.cfg.orphan_grace / 2).clamp(Duration::from_secs(1), Duration::from_secs(15))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn a_volume_a_container_holds_is_never_released() {
        let uses = vec!["mounted at /data in the mount namespace of pid 42".to_string()];
        assert_eq!(
            verdict(0, 10_000, GRACE, uses.clone()),
            Verdict::InUse(uses)
        );
    }

    #[test]
    fn a_young_reference_may_be_a_container_still_starting() {
        assert_eq!(verdict(1000, 1030, GRACE, vec![]), Verdict::TooRecent);
        assert_eq!(verdict(1000, 1059, GRACE, vec![]), Verdict::TooRecent);
        // A clock that went backwards is not a reason to release.
        assert_eq!(verdict(1000, 900, GRACE, vec![]), Verdict::TooRecent);
    }

    #[test]
    fn an_old_reference_nothing_uses_is_orphaned() {
        assert_eq!(verdict(1000, 1060, GRACE, vec![]), Verdict::Orphaned);
        // Tables written before references had times count as old.
        assert_eq!(verdict(0, 1000, GRACE, vec![]), Verdict::Orphaned);
    }

    #[test]
    fn this_test_runs_where_it_can_see_every_process() {
        // The machines tests run on; a PID namespace of its own would turn release off.
        let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
        assert_eq!(
            sees_all_processes(),
            ns.as_os_str() == INITIAL_PID_NAMESPACE
        );
    }
}
