//! Loop devices over the userspace exporter's image file: attach, detach, and find
//! which loop device backs which file (for reconciling after a restart).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::command::{run, run_ok};
use crate::error::{Error, Result};

const DEADLINE: Duration = Duration::from_secs(30);

/// Attaches `file` to a free loop device and returns its path.
pub async fn attach(file: &Path, read_only: bool) -> Result<PathBuf> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--find".as_ref(), "--show".as_ref()];
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
pub async fn detach(device: &Path) -> Result<()> {
    let out = run("losetup", ["-d".as_ref(), device.as_os_str()], DEADLINE).await?;
    if out.success() || out.stderr.contains("No such device") {
        return Ok(());
    }
    Err(Error::Command {
        program: "losetup".into(),
        detail: super::command::failure_text(&format!("losetup -d {}", device.display()), &out),
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

pub async fn list() -> Result<Vec<(PathBuf, PathBuf)>> {
    let out = run_ok(
        "losetup",
        ["--list", "--json", "-O", "NAME,BACK-FILE"],
        DEADLINE,
    )
    .await?;
    parse_list(&out.stdout)
}

/// Loop devices whose backing file is `file`.
pub async fn backing(file: &Path) -> Result<Vec<PathBuf>> {
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
}
