//! The reference table: which volumes are mounted on this host, where, through which
//! mapping, and how many times each Docker mount ID holds them. Persisted atomically
//! (write, fsync, rename, fsync dir) so a crash leaves either the old or the new table.
//!
//! Docker sends the same mount ID twice while a container runs (`docker cp`), and
//! re-sends a Mount with the same ID after dockerd crashed without unmounting. Counts
//! are kept per ID and stamped with the dockerd instance that made them: a Mount from a
//! new dockerd for an ID counted by an old one replaces that count instead of adding
//! to it, because the old container mount is gone.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::host::mapper::Mapping;

/// Prefix of the reference a CSI NodeStage holds (followed by its staging path). Such
/// a reference belongs to the CO, not to a container: see `orphans`.
pub const CSI_STAGE_REF: &str = "csi-stage:";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRef {
    pub count: u32,
    /// The dockerd instance ("pid:starttime") that sent these Mounts, if known.
    #[serde(default)]
    pub dockerd: Option<String>,
    /// When this ID was last mounted (seconds since the epoch; 0 in older tables). A
    /// reference younger than the orphan grace may belong to a container that is still
    /// starting and has not bind-mounted the volume yet.
    #[serde(default)]
    pub since: u64,
}

/// A volume mounted on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveVolume {
    pub pool: String,
    pub mountpoint: PathBuf,
    pub mapping: Mapping,
    pub fstype: String,
    pub read_only: bool,
    pub features: u64,
    pub since: String,
    pub refs: BTreeMap<String, IdRef>,
    /// Set when this host lost the volume's lock: no new Mounts until it is released.
    #[serde(default)]
    pub fenced: bool,
}

impl ActiveVolume {
    pub fn total_refs(&self) -> u32 {
        self.refs.values().map(|r| r.count).sum()
    }

    /// When any of its IDs was last mounted (seconds since the epoch).
    pub fn last_mounted(&self) -> u64 {
        self.refs.values().map(|r| r.since).max().unwrap_or(0)
    }

    /// Counts one more Mount of `id` at `now` (seconds since the epoch).
    pub fn add_ref(&mut self, id: &str, dockerd: Option<&str>, now: u64) {
        let entry = self.refs.entry(id.to_string()).or_insert(IdRef {
            count: 0,
            dockerd: dockerd.map(String::from),
            since: now,
        });
        let from_older_dockerd =
            matches!((&entry.dockerd, dockerd), (Some(old), Some(new)) if old != new);
        if from_older_dockerd {
            entry.count = 0;
        }
        entry.count += 1;
        entry.dockerd = dockerd.map(String::from);
        entry.since = now;
    }

    /// Counts one Unmount of `id`; returns false for an ID that holds nothing.
    pub fn drop_ref(&mut self, id: &str) -> bool {
        let Some(r) = self.refs.get_mut(id) else {
            return false;
        };
        r.count = r.count.saturating_sub(1);
        if r.count == 0 {
            self.refs.remove(id);
        }
        true
    }
}

/// The table and where it lives.
#[derive(Debug)]
pub struct RefTable {
    path: PathBuf,
    pub volumes: BTreeMap<String, ActiveVolume>,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    volumes: BTreeMap<String, ActiveVolume>,
}

impl RefTable {
    /// Loads the table, or starts empty if there is none. A table that cannot be read
    /// is kept aside (renamed) rather than silently discarded.
    pub fn load(path: &Path) -> Result<RefTable> {
        let volumes = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(d) => d.volumes,
                Err(e) => {
                    let aside = path.with_extension("unreadable");
                    tracing::error!(path = %path.display(), error = %e, aside = %aside.display(), "reference table unreadable; starting empty and keeping the old file aside");
                    let _ = std::fs::rename(path, &aside);
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        Ok(RefTable {
            path: path.to_path_buf(),
            volumes,
        })
    }

    /// An empty table saved to the same place.
    pub fn empty_like(&self) -> RefTable {
        RefTable {
            path: self.path.clone(),
            volumes: BTreeMap::new(),
        }
    }

    /// Applies `f` to a copy of the table and saves the copy; only once it is saved
    /// does it replace the table in memory. A failed save changes nothing, so memory
    /// never holds a reference that the file (and after a restart, we) would not.
    pub fn apply<T>(
        &mut self,
        f: impl FnOnce(&mut BTreeMap<String, ActiveVolume>) -> T,
    ) -> Result<T> {
        let mut next = self.volumes.clone();
        let out = f(&mut next);
        save_to(&self.path, &next)?;
        self.volumes = next;
        Ok(out)
    }

    pub fn save(&self) -> Result<()> {
        save_to(&self.path, &self.volumes)
    }
}

fn save_to(path: &Path, volumes: &BTreeMap<String, ActiveVolume>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec_pretty(&OnDisk {
        version: 1,
        volumes: volumes.clone(),
    })
    .map_err(|e| Error::io("encoding the reference table", std::io::Error::other(e)))?;
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(ctx("creating"), e))?;
    f.write_all(&body)
        .map_err(|e| Error::io(ctx("writing"), e))?;
    f.sync_all().map_err(|e| Error::io(ctx("syncing"), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(ctx("renaming"), e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
    Ok(())
}

/// Identifies the running dockerd ("pid:starttime") from its pid file, if any.
pub fn dockerd_instance(pid_file: &Path) -> Option<String> {
    let pid = std::fs::read_to_string(pid_file).ok()?;
    let pid = pid.trim();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime) counts from after the command name, which may hold spaces.
    let after = stat.rsplit_once(") ")?.1;
    let start = after.split(' ').nth(19)?;
    Some(format!("{pid}:{start}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mapper::MapperKind;

    fn vol() -> ActiveVolume {
        ActiveVolume {
            pool: "rbd".into(),
            mountpoint: "/m/rbd/v".into(),
            mapping: Mapping {
                kind: MapperKind::Userspace,
                device: "/dev/loop3".into(),
                exporter_pid: Some(42),
                backing: None,
            },
            fstype: "ext4".into(),
            read_only: false,
            features: 5,
            since: "t".into(),
            refs: BTreeMap::new(),
            fenced: false,
        }
    }

    #[test]
    fn the_same_id_twice_needs_two_unmounts() {
        let mut v = vol();
        v.add_ref("a", Some("d1"), 1);
        v.add_ref("a", Some("d1"), 1); // docker cp on a running container
        v.add_ref("b", Some("d1"), 1);
        assert_eq!(v.total_refs(), 3);
        assert!(v.drop_ref("a"));
        assert_eq!(v.total_refs(), 2);
        assert!(v.drop_ref("a"));
        assert!(!v.drop_ref("a"), "an ID with no references holds nothing");
        assert!(!v.drop_ref("never"));
        assert!(v.drop_ref("b"));
        assert_eq!(v.total_refs(), 0);
    }

    #[test]
    fn a_mount_from_a_restarted_dockerd_replaces_the_stale_count() {
        let mut v = vol();
        v.add_ref("a", Some("100:5"), 1);
        // dockerd crashed (no Unmount) and the restarted one mounts the same ID again.
        v.add_ref("a", Some("200:9"), 2);
        assert_eq!(v.total_refs(), 1);
        assert!(v.drop_ref("a"));
        assert_eq!(v.total_refs(), 0);
        // Without a known dockerd, counts simply add up.
        v.add_ref("b", None, 3);
        v.add_ref("b", None, 3);
        assert_eq!(v.total_refs(), 2);
        assert_eq!(v.last_mounted(), 3);
    }

    #[test]
    fn a_failed_save_changes_nothing_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refs.json");
        let mut t = RefTable::load(&path).unwrap();
        t.apply(|vols| vols.insert("v".into(), vol())).unwrap();
        // The temp file's name taken by a directory: the next save fails (even as root).
        std::fs::create_dir(path.with_extension("tmp")).unwrap();
        let r = t.apply(|vols| {
            vols.get_mut("v").unwrap().add_ref("orphan", None, 1);
        });
        assert!(r.is_err());
        assert_eq!(
            t.volumes["v"].total_refs(),
            0,
            "a reference Docker never got an answer for must not be counted"
        );
        std::fs::remove_dir(path.with_extension("tmp")).unwrap();
        assert_eq!(RefTable::load(&path).unwrap().volumes["v"].total_refs(), 0);
    }

    #[test]
    fn tables_from_before_mount_times_load_as_long_ago() {
        let json = r#"{"version":1,"volumes":{"v":{"pool":"rbd","mountpoint":"/m/rbd/v",
            "mapping":{"kind":"userspace","device":"/dev/loop3","exporter_pid":42},
            "fstype":"ext4","read_only":false,"features":5,"since":"t",
            "refs":{"a":{"count":1,"dockerd":null}}}}}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refs.json");
        std::fs::write(&path, json).unwrap();
        let t = RefTable::load(&path).unwrap();
        assert_eq!(t.volumes["v"].refs["a"].since, 0);
        assert_eq!(t.volumes["v"].last_mounted(), 0);
    }

    #[test]
    fn the_table_survives_a_round_trip_and_an_unreadable_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refs.json");
        let mut t = RefTable::load(&path).unwrap();
        let mut v = vol();
        v.add_ref("x", None, 1);
        t.volumes.insert("v".into(), v.clone());
        t.save().unwrap();
        assert_eq!(RefTable::load(&path).unwrap().volumes["v"], v);
        std::fs::write(&path, "{garbage").unwrap();
        assert!(RefTable::load(&path).unwrap().volumes.is_empty());
        assert!(path.with_extension("unreadable").exists());
    }

    #[test]
    fn dockerd_instance_reads_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("docker.pid");
        std::fs::write(&f, format!("{}\n", std::process::id())).unwrap();
        let id = dockerd_instance(&f).unwrap();
        assert!(id.starts_with(&format!("{}:", std::process::id())), "{id}");
        assert!(dockerd_instance(&dir.path().join("none")).is_none());
    }
}
