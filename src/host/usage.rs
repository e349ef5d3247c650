//! Who on this host still uses a volume's filesystem or block device, as the kernel
//! sees it: every mount namespace is asked (through one of its processes'
//! `/proc/PID/mountinfo`) whether it holds a mount of the device.
//!
//! A container never shares the daemon's mount namespace: runc bind-mounts the volume
//! into the container's own namespace and drops the rest of the host's mount table
//! (pivot_root). So "some namespace holds a mount of this device somewhere other than
//! at rbdvol's own mount point" is how a container that uses the volume shows up,
//! whatever Docker remembers or forgot to tell us. Two kinds of mounts are not a use:
//! - a copy at rbdvol's own mount point path: a namespace cloned from the host's
//!   (`unshare -m`, a service with private mounts) inherits it, then pivot_roots away
//!   or never enters it;
//! - a propagated copy (a peer or slave of rbdvol's mount) whose path ends in the same
//!   `<pool>/<name>`: the host's view of a managed plugin's propagatedMount.
//!
//! The scan is conservative: anything else holding the device counts as a user, so a
//! volume in use is never released; the price is that a stray copy (a namespace that
//! cloned the host while the volume was mounted) keeps it held until that namespace ends.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::fs::{parse_mountinfo, MountEntry};

/// One mount of the device that counts as a use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    /// A process in the namespace that holds the mount.
    pub pid: u32,
    /// Where that namespace has it mounted.
    pub target: PathBuf,
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mounted at {} in the mount namespace of pid {} ({})",
            self.target.display(),
            self.pid,
            process_name(self.pid)
        )
    }
}

/// rbdvol's own mount of a volume: what copies of it look like.
#[derive(Debug, Clone)]
pub struct OwnMount {
    pub dev: String,
    pub target: PathBuf,
    pub shared: Option<u64>,
}

impl OwnMount {
    pub fn from_entry(e: &MountEntry) -> OwnMount {
        OwnMount {
            dev: e.dev.clone(),
            target: e.target.clone(),
            shared: e.shared,
        }
    }

    /// True when `e`, a mount of our device in some namespace, is only a copy of ours.
    pub fn is_copy(&self, e: &MountEntry) -> bool {
        if e.target == self.target {
            return true;
        }
        let peer = self
            .shared
            .is_some_and(|g| e.shared == Some(g) || e.master == Some(g));
        let tail: Vec<_> = self.target.components().rev().take(2).collect();
        let same_tail = tail.len() == 2 && e.target.components().rev().take(2).eq(tail);
        peer && same_tail
    }
}

/// The mounts in one namespace's mountinfo that use device `dev`, copies excluded.
pub fn uses_in(mountinfo: &str, own: &OwnMount, pid: u32) -> Vec<Use> {
    parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|e| e.dev == own.dev && !own.is_copy(e))
        .map(|e| Use {
            pid,
            target: e.target,
        })
        .collect()
}

/// Every use of `own`'s device in every mount namespace of this host, ours included.
pub fn uses(own: &OwnMount) -> Vec<Use> {
    let mut out = Vec::new();
    for_each_namespace(|pid, mountinfo| out.extend(uses_in(mountinfo, own, pid)));
    out
}

/// Every mount of block device `dev` ("major:minor") anywhere on this host.
pub fn mounts_of_device(dev: &str) -> Vec<Use> {
    let mut out = Vec::new();
    for_each_namespace(|pid, mountinfo| {
        out.extend(
            parse_mountinfo(mountinfo)
                .into_iter()
                .filter(|e| e.dev == dev)
                .map(|e| Use {
                    pid,
                    target: e.target,
                }),
        )
    });
    out
}

/// Calls `f` once per mount namespace with a pid in it and that pid's mountinfo.
fn for_each_namespace(mut f: impl FnMut(u32, &str)) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut seen = HashSet::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        // A process that exits meanwhile leaves nothing to read: its namespace, if it
        // still exists, has other processes, which come later in the listing or hold
        // nothing new.
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) {
            f(pid, &text);
        }
    }
}

/// "major:minor" of a block device node, as mountinfo spells a filesystem's device.
pub fn device_number(device: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(device).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    Some(format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

/// Whether anything still holds block device `device`: a mount of it in any
/// namespace, or a kernel holder (device-mapper, md) stacked on it. Copies at
/// `mountpoint`, rbdvol's own mount point for it, are not uses: a namespace cloned from
/// the host's while the volume was mounted keeps one (runc's init does, until it
/// pivots into the container's root), and it holds nothing anyone reaches.
pub fn device_users(device: &Path, mountpoint: &Path) -> Vec<String> {
    let mut out: Vec<String> = match device_number(device) {
        Some(dev) => mounts_of_device(&dev)
            .iter()
            .filter(|u| u.target != mountpoint)
            .map(|u| u.to_string())
            .collect(),
        None => Vec::new(),
    };
    if let Some(name) = device.file_name().and_then(|n| n.to_str()) {
        if let Ok(holders) = std::fs::read_dir(format!("/sys/class/block/{name}/holders")) {
            out.extend(
                holders
                    .flatten()
                    .map(|h| format!("held by {}", h.file_name().to_string_lossy())),
            );
        }
    }
    out
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "exited".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnMount {
        OwnMount {
            dev: "7:3".into(),
            target: "/var/lib/rbdvol/mounts/rbd/pg".into(),
            shared: Some(40),
        }
    }

    const HOST: &str = "\
24 1 8:1 / / rw - ext4 /dev/sda1 rw
90 24 7:3 / /var/lib/rbdvol/mounts/rbd/pg rw,nosuid shared:40 - ext4 /dev/loop3 rw
";

    #[test]
    fn rbdvol_own_mount_is_not_a_use() {
        assert!(uses_in(HOST, &own(), 1).is_empty());
    }

    #[test]
    fn a_container_bind_mount_is_a_use() {
        // runc after pivot_root: the volume bound at /data, nothing else of the host.
        let container = "\
600 580 0:52 / / rw - overlay overlay rw
610 600 7:3 / /data rw,nosuid - ext4 /dev/loop3 rw
";
        let u = uses_in(container, &own(), 4242);
        assert_eq!(
            u,
            [Use {
                pid: 4242,
                target: "/data".into()
            }]
        );
    }

    #[test]
    fn a_subdirectory_bind_and_a_rslave_bind_are_uses() {
        let container = "\
610 600 7:3 /sub /app/cache rw - ext4 /dev/loop3 rw
611 600 7:3 / /data rw master:40 - ext4 /dev/loop3 rw
";
        assert_eq!(uses_in(container, &own(), 7).len(), 2);
    }

    #[test]
    fn clones_and_propagated_copies_are_not_uses() {
        // A namespace cloned from the host keeps the mount at the same path; the host's
        // view of a managed plugin's propagatedMount is a peer at another prefix.
        let clone = "90 24 7:3 / /var/lib/rbdvol/mounts/rbd/pg rw - ext4 /dev/loop3 rw\n";
        assert!(uses_in(clone, &own(), 9).is_empty());
        let propagated = "\
300 24 7:3 / /var/lib/docker/plugins/abc/propagated-mount/rbd/pg rw master:40 - ext4 /dev/loop3 rw
";
        assert!(uses_in(propagated, &own(), 9).is_empty());
        // ...but only as a peer: an unrelated mount with that tail is a use.
        let unrelated = "301 24 7:3 / /srv/rbd/pg rw - ext4 /dev/loop3 rw\n";
        assert_eq!(uses_in(unrelated, &own(), 9).len(), 1);
    }

    #[test]
    fn other_devices_are_ignored() {
        let other = "610 600 7:4 / /data rw - ext4 /dev/loop4 rw\n";
        assert!(uses_in(other, &own(), 7).is_empty());
    }

    #[test]
    fn this_process_namespace_is_scanned() {
        // The root filesystem's device is mounted in our own namespace.
        let root = crate::host::fs::mounted_at(Path::new("/"))
            .unwrap()
            .unwrap();
        assert!(mounts_of_device(&root.dev)
            .iter()
            .any(|u| u.target == Path::new("/")));
        assert_eq!(device_number(Path::new("/etc/hostname")), None);
    }
}
