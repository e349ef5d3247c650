//! Loop devices over the userspace exporter's image file: attach, detach, and find
//! which loop device backs which file (for reconciling after a restart).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::host::command::{run, run_ok};

const DEADLINE: Duration = Duration::from_secs(30);

/// Attaches `file` to a free loop device and returns its path.
pub(super) async fn attach(file: &Path, read_only: bool) -> Result<PathBuf> {
    // Direct I/O: the loop device hands its requests to the exporter asynchronously
    // (many in flight, not one at a time through its worker) and keeps no second copy of
    // the data in the page cache of the FUSE file.
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--find".as_ref(),
        "--show".as_ref(),
        "--direct-io=on".as_ref(),
    ];
    if read_only {
        args.push("--read-only".as_ref());
    }
    args.push(file.as_os_str());
    let out = run_ok("losetup", args, DEADLINE).await?;
    let dev = out.stdout.trim();
    if !dev.starts_with("/dev/loop") {
        return Err(Error::Command {
            program: "losetup".into(),
            detail: format!("unexpected output {dev:?} attaching {}", file.display()),
        });
    }
    Ok(PathBuf::from(dev))
}

/// Detaches a loop device; one that is already gone counts as detached.
pub(super) async fn detach(device: &Path) -> Result<()> {
    let out = run("losetup", ["-d".as_ref(), device.as_os_str()], DEADLINE).await?;
    if out.success() || out.stderr.contains("No such device") {
        return Ok(());
    }
    Err(Error::Command {
        program: "losetup".into(),
        detail: crate::host::command::failure_text(
            &format!("losetup -d {}", device.display()),
            &out,
        ),
    })
}

#[derive(Debug, Deserialize)]
struct LoopList {
    loopdevices: Vec<LoopEntry>,
}

#[derive(Debug, Deserialize)]
struct LoopEntry {
    name: String,
    #[serde(rename = "back-file")]
    back_file: Option<String>,
}

/// Parses `losetup --list --json` into (device, backing file) pairs.
pub fn parse_list(json: &str) -> Result<Vec<(PathBuf, PathBuf)>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let list: LoopList = serde_json::from_str(json).map_err(|e| Error::Command {
        program: "losetup".into(),
        detail: format!("cannot read `losetup --list --json`: {e}"),
    })?;
    Ok(list
        .loopdevices
        .into_iter()
        .filter_map(|e| {
            // losetup appends " (deleted)" when the file is gone.
            let f = e.back_file?;
            let f = f.strip_suffix(" (deleted)").unwrap_or(&f).to_string();
            Some((PathBuf::from(e.name), PathBuf::from(f)))
        })
        .collect())
}

#[derive(Debug, Deserialize)]
struct IdentityList {
    loopdevices: Vec<IdentityEntry>,
}

#[derive(Debug, Deserialize)]
struct IdentityEntry {
    #[serde(rename = "back-maj:min")]
    dev: Option<String>,
    #[serde(rename = "back-ino")]
    ino: Option<u64>,
}

/// Parses `losetup --list --json -O NAME,BACK-MAJ:MIN,BACK-INO DEV` into the backing
/// file's identity, "major:minor:inode", or `None` for a detached device.
pub fn parse_identity(json: &str) -> Result<Option<String>> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    let list: IdentityList = serde_json::from_str(json).map_err(|e| Error::Command {
        program: "losetup".into(),
        detail: format!("cannot read `losetup --list --json`: {e}"),
    })?;
    Ok(list.loopdevices.into_iter().next().and_then(|e| {
        let dev = e.dev?;
        Some(format!("{}:{}", dev.trim(), e.ino?))
    }))
}

/// The identity of the file `device` is attached to, as the kernel recorded it when it
/// was attached: it stays the same when the file's path stops resolving, and differs
/// for any other file attached to the device since.
pub(super) async fn identity(device: &Path) -> Result<Option<String>> {
    let out = run(
        "losetup",
        [
            "--list".as_ref(),
            "--json".as_ref(),
            "-O".as_ref(),
            "NAME,BACK-MAJ:MIN,BACK-INO".as_ref(),
            device.as_os_str(),
        ],
        DEADLINE,
    )
    .await?;
    if !out.success() {
        // No such loop device, or not attached: nothing is attached there.
        return Ok(None);
    }
    parse_identity(&out.stdout)
}

pub(super) async fn list() -> Result<Vec<(PathBuf, PathBuf)>> {
    let out = run_ok(
        "losetup",
        ["--list", "--json", "-O", "NAME,BACK-FILE"],
        DEADLINE,
    )
    .await?;
    parse_list(&out.stdout)
}

/// Loop devices whose backing file is `file`.
pub(super) async fn backing(file: &Path) -> Result<Vec<PathBuf>> {
    Ok(list()
        .await?
        .into_iter()
        .filter(|(_, f)| f == file)
        .map(|(d, _)| d)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losetup_json_is_parsed() {
        let json = r#"{"loopdevices": [
            {"name": "/dev/loop0", "back-file": "/var/lib/rbdvol/state/exports/rbd/v/fuse/image"},
            {"name": "/dev/loop1", "back-file": "/tmp/x (deleted)"},
            {"name": "/dev/loop2", "back-file": null}]}"#;
        let l = parse_list(json).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1], (PathBuf::from("/dev/loop1"), PathBuf::from("/tmp/x")));
        assert!(parse_list("").unwrap().is_empty());
    }

    #[test]
    fn loop_identity_is_read_and_a_detached_device_has_none() {
        let attached = r#"{"loopdevices": [{"name": "/dev/loop0", "back-maj:min": "     0:53  ", "back-ino": 2}]}"#;
        assert_eq!(parse_identity(attached).unwrap().as_deref(), Some("0:53:2"));
        let detached =
            r#"{"loopdevices": [{"name": "/dev/loop0", "back-maj:min": null, "back-ino": null}]}"#;
        assert_eq!(parse_identity(detached).unwrap(), None);
        assert_eq!(parse_identity("").unwrap(), None);
    }
}
