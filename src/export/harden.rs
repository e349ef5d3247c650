//! Keeps the exporter serving under memory pressure. It sits in the block I/O path of
//! a mounted filesystem: if reclaim made it wait for writeback that only it can do, or
//! the OOM killer picked it, the filesystem above would hang or fail. So, before any
//! other thread exists (the flag is inherited by threads created later):
//! - `PR_SET_IO_FLUSHER`: its allocations never recurse into filesystem I/O;
//! - `oom_score_adj = -1000`: never chosen by the OOM killer;
//! - `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: its memory is never swapped
//!   out. ONFAULT locks pages as they are touched; without it every librados thread's
//!   8 MiB stack would be faulted in and locked (hundreds of MiB per exporter).
//!
//! Each step needs a privilege (CAP_SYS_RESOURCE for the first two, CAP_IPC_LOCK or an
//! unlimited RLIMIT_MEMLOCK for the third); a refused step is a warning naming what is
//! lost, not a failure: the mapping still works, it is just less robust under pressure.

use nix::sys::mman::{mlockall, MlockAllFlags};

use crate::ceph::sys;

/// CAP_IPC_LOCK's bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;

pub fn for_block_io() {
    if let Err(e) = sys::set_io_flusher() {
        tracing::warn!(error = %e, "could not mark the exporter as an I/O flusher (PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE): under memory pressure its own allocations may wait on writeback through the device it serves, which can deadlock that volume");
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!(error = %e, "could not set oom_score_adj to -1000 (needs CAP_SYS_RESOURCE): the OOM killer may pick this exporter, which fails every I/O of its volume");
    }
    if !may_lock_all() {
        tracing::warn!("not locking the exporter's memory: it needs CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK (under a limit, locking all future memory would make allocations fail once it is reached); its pages may be swapped out, slowing I/O under memory pressure");
        return;
    }
    let flags = MlockAllFlags::MCL_CURRENT
        | MlockAllFlags::MCL_FUTURE
        | MlockAllFlags::from_bits_retain(libc::MCL_ONFAULT);
    if let Err(e) = mlockall(flags) {
        tracing::warn!(error = %e, "could not lock the exporter's memory (mlockall): its pages may be swapped out, slowing I/O under memory pressure");
    }
}

/// Whether locking every future page cannot run into RLIMIT_MEMLOCK.
fn may_lock_all() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    has_capability(&status, CAP_IPC_LOCK) || memlock_unlimited(&limits)
}

fn has_capability(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|bits| bits & (1 << cap) != 0)
}

fn memlock_unlimited(limits: &str) -> bool {
    limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .is_some_and(|l| l.split_whitespace().nth(3) == Some("unlimited"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_and_limits_are_read_from_proc() {
        let status = "Name:\trbdvol\nCapEff:\t000001fffeffffff\n";
        assert!(has_capability(status, CAP_IPC_LOCK));
        assert!(!has_capability(status, 24), "CAP_SYS_RESOURCE is bit 24");
        assert!(!has_capability("CapEff:\t0000000000000000\n", CAP_IPC_LOCK));
        let limited = "Max locked memory         8388608              8388608              bytes\n";
        let unlimited =
            "Max locked memory         unlimited            unlimited            bytes\n";
        assert!(!memlock_unlimited(limited));
        assert!(memlock_unlimited(unlimited));
    }
}
