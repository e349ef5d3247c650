//! Growing a filesystem to fill its (grown) device: `resize2fs` for ext2/3/4, offline
//! or (with CAP_SYS_RESOURCE) online, and `xfs_growfs`, which works only on a mounted
//! filesystem. A loop device (the userspace mapper) first re-reads the size of the
//! file behind it.

use std::path::Path;
use std::time::Duration;

use super::command::{failure_text, run, run_ok};
use crate::error::{Error, Result};

/// Growing touches only new block groups / allocation groups, but a large grow writes
/// their metadata; generous, and still inside Docker's Mount deadline.
const GROW_DEADLINE: Duration = Duration::from_secs(60);

/// `losetup -c`: a loop device picks up a new size of its backing file.
pub async fn refresh_loop(device: &Path) -> Result<()> {
    let is_loop = device
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("loop"));
    if !is_loop {
        return Ok(());
    }
    run_ok(
        "losetup",
        [Path::new("-c").as_os_str(), device.as_os_str()],
        Duration::from_secs(10),
    )
    .await
    .map(|_| ())
}

fn mounted(mountpoint: &Path) -> bool {
    matches!(super::fs::mounted_at(mountpoint), Ok(Some(_)))
}

/// Grows the filesystem `fstype` on `device`, mounted at `mountpoint`, to the device.
pub async fn grow(fstype: &str, device: &Path, mountpoint: &Path) -> Result<()> {
    refresh_loop(device).await?;
    match fstype {
        // Unmounted: resize2fs insists on a full check first (which also proves the
        // filesystem sound before it is changed).
        "ext4" | "ext3" | "ext2" if !mounted(mountpoint) => {
            let out = run(
                "e2fsck",
                [Path::new("-f"), Path::new("-p"), device],
                GROW_DEADLINE,
            )
            .await?;
            if !matches!(out.code, Some(0..=1)) {
                return Err(Error::Command {
                    program: "e2fsck".into(),
                    detail: failure_text(&format!("e2fsck -f -p {}", device.display()), &out),
                });
            }
            run_ok("resize2fs", [device], GROW_DEADLINE)
                .await
                .map(|_| ())
        }
        // Mounted: online, which the kernel allows only with CAP_SYS_RESOURCE.
        "ext4" | "ext3" | "ext2" => run_ok("resize2fs", [device], GROW_DEADLINE)
            .await
            .map(|_| ()),
        "xfs" => run_ok("xfs_growfs", [mountpoint], GROW_DEADLINE)
            .await
            .map(|_| ()),
        other => Err(Error::NotSupported(format!(
            "rbdvol cannot grow a {other} filesystem; grow it by hand"
        ))),
    }
}

/// The size of a block device in bytes, from sysfs.
fn device_size(device: &Path) -> Option<u64> {
    let name = device.file_name()?.to_str()?;
    let sectors = std::fs::read_to_string(format!("/sys/class/block/{name}/size")).ok()?;
    sectors.trim().parse::<u64>().ok().map(|s| s * 512)
}

/// Grows a mounted filesystem after its image grew to `size`: waits (up to 15 s) for
/// the device to show the new size (the userspace exporter notices a resize within a
/// couple of seconds; krbd at once), then grows the filesystem online.
pub async fn grow_online(fstype: &str, device: &Path, mountpoint: &Path, size: u64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        refresh_loop(device).await?;
        let seen = device_size(device).unwrap_or(0);
        if seen >= size {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotSupported(format!(
                "device {} still shows {seen} bytes, not the new {size}; the filesystem grows at the next Mount",
                device.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    grow(fstype, device, mountpoint).await
}
