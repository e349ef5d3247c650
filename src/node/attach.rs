//! The data path for one volume: map the image, decide whether it may be formatted
//! (only when provably blank), format or check it, mount it under the plugin-owned
//! root; and the reverse. A step that fails undoes the steps before it, so nothing
//! is left half-mapped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::reconcile::Intents;
use super::refs::ActiveVolume;
use crate::ceph::images::ImageFacts;
use crate::ceph::ops::MetaChanges;
use crate::ceph::ClusterOps;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::host::fs::{Content, Probe};
use crate::host::mapper::{
    msgr, Exporters, Health, Krbd, MapRequest, Mapper, MapperKind, Mapping, Nbd, Userspace,
};
use crate::host::ops::HostOps;
use crate::volume::fsopts::{self, StoredFs};
use crate::volume::{key, VolumeRecord};

/// Filesystems rbdvol mounts when it finds them (it formats only ext4 and xfs).
const MOUNTABLE: &[&str] = &["ext4", "ext3", "ext2", "xfs"];

/// What to do with what the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatDecision {
    Format,
    Mount { fstype: String },
    Refuse(String),
}

/// Formats only a device on which every independent signal says "blank": `blkid -p`
/// found no signature, rbdvol's own read of its first and last MiB succeeded and found
/// only zeros, and it carries no `rbdvol.formatted` marker (the allocation map is the
/// caller's further check). Everything else is mounted as found or refused: nothing
/// the user wrote is ever overwritten.
pub fn decide(
    volume: &str,
    probe: &Probe,
    content: &Content,
    marker: Option<&str>,
    read_only: bool,
) -> FormatDecision {
    match (probe, marker) {
        (Probe::Blank, _) if !matches!(content, Content::Zeros) => {
            FormatDecision::Refuse(match content {
                Content::Unreadable(why) => format!(
                    "volume {volume} could not be read ({why}), so rbdvol cannot tell whether it holds data; it was left untouched. Check the cluster's health (`ceph -s`) and the host's kernel log, then mount it again"
                ),
                _ => format!(
                    "volume {volume} holds data that no filesystem signature explains; rbdvol will not format it, so nothing is lost. Inspect it (e.g. `rbd export` it and look at the copy)"
                ),
            })
        }
        (Probe::Blank, None) if read_only => FormatDecision::Refuse(format!(
            "volume {volume} has no filesystem yet and is read-only, so there is nothing to mount; use it writable once to format it"
        )),
        (Probe::Blank, None) => FormatDecision::Format,
        (Probe::Blank, Some(m)) => FormatDecision::Refuse(format!(
            "volume {volume} was formatted before ({m}) but no filesystem is found on it now; rbdvol will not format it again, so nothing is lost. Inspect the image (e.g. `rbd export` it and run blkid/fsck on the copy)"
        )),
        (Probe::Signature(t), _) if MOUNTABLE.contains(&t.as_str()) => {
            FormatDecision::Mount { fstype: t.clone() }
        }
        (other, _) => FormatDecision::Refuse(format!(
            "volume {volume} holds {}, which rbdvol neither mounts nor formats; it was left untouched",
            other.describe()
        )),
    }
}

/// Every mapper, so records made under another mapper can still be released.
pub struct Mappers {
    pub chosen: MapperKind,
    all: Vec<Arc<dyn Mapper>>,
}

impl Mappers {
    /// `all` has one mapper of each kind; `chosen` is the one new mappings use.
    pub fn new(chosen: MapperKind, all: Vec<Arc<dyn Mapper>>) -> Mappers {
        Mappers { chosen, all }
    }

    /// This host's real mappers.
    pub fn real(
        chosen: MapperKind,
        ceph: crate::config::CephSettings,
        exporters: Exporters,
    ) -> Mappers {
        Mappers::new(
            chosen,
            vec![
                Arc::new(Krbd {
                    ceph: ceph.clone(),
                    sysfs: "/sys/bus/rbd".into(),
                }),
                Arc::new(Nbd { ceph }),
                Arc::new(Userspace { exporters }),
            ],
        )
    }

    pub fn get(&self, kind: MapperKind) -> Arc<dyn Mapper> {
        self.all
            .iter()
            .find(|m| m.kind() == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {} mapper was set up", kind.name()))
    }

    pub fn all(&self) -> &[Arc<dyn Mapper>] {
        &self.all
    }
}

pub struct Attacher {
    pub mappers: Mappers,
    pub cluster: Arc<dyn ClusterOps>,
    pub host: Arc<dyn HostOps>,
    pub mount_root: PathBuf,
    pub host_id: String,
    pub takeover_wait: Duration,
    /// The configured pools: kernel mappings of other pools are never ours.
    pub pools: Vec<String>,
    /// Kernel maps under way, so a crash's leftover mapping can be told from others.
    pub intents: Intents,
    /// `map.ms_mode`: "auto" or the kernel messenger mode krbd maps with.
    pub ms_mode: String,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Attacher {
    pub fn mountpoint(&self, pool: &str, name: &str) -> PathBuf {
        self.mount_root.join(pool).join(name)
    }

    pub(super) fn request(
        &self,
        pool: &str,
        name: &str,
        read_only: bool,
        features: u64,
    ) -> MapRequest {
        MapRequest {
            pool: pool.to_string(),
            image: name.to_string(),
            read_only,
            features,
            host_id: self.host_id.clone(),
            lock_wait: self.takeover_wait,
            mountpoint: self.mountpoint(pool, name),
            ms_mode: None,
            ms_mode_why: String::new(),
        }
    }

    pub fn request_for(&self, name: &str, v: &ActiveVolume) -> MapRequest {
        self.request(&v.pool, name, v.read_only, v.features)
    }

    /// Maps, formats if provably blank, and mounts; read-only when the volume says so
    /// or `force_read_only` (a CSI reader on one of several nodes). On failure
    /// everything done so far is undone and the error says what happened.
    pub async fn attach(&self, facts: &ImageFacts, force_read_only: bool) -> Result<ActiveVolume> {
        let name = facts.name.as_str();
        // What reaches mkfs and mount as root is checked again here, from metadata that
        // anyone with write access to the pool could have changed since Create.
        let mut stored = fsopts::check_stored(&facts.meta)?;
        stored.read_only |= force_read_only;
        let read_only = stored.read_only;
        let mut req = self.request(&facts.pool, name, read_only, facts.stat.features);
        let mountpoint = self.mountpoint(&facts.pool, name);
        self.host.create_dir(&mountpoint)?;
        if self.host.mounted_at(&mountpoint)?.is_some() {
            // A leftover the reconcile could not release: never stack a second mount.
            self.host.umount(&mountpoint).await?;
        }
        let mapper = self.mappers.get(self.mappers.chosen);
        if mapper.kind() == MapperKind::Krbd {
            (req.ms_mode, req.ms_mode_why) = self.ms_mode().await?;
        }
        let kernel = mapper.kind() != MapperKind::Userspace;
        if kernel {
            self.intents.begin(&facts.pool, name)?;
        }
        let mapping = match mapper.map(&req).await {
            Ok(m) => m,
            Err(e) => {
                if kernel {
                    self.intents.end(&facts.pool, name);
                }
                return Err(e);
            }
        };
        tracing::info!(volume = name, device = %mapping.device.display(), mapper = mapping.kind.name(), "mapped");
        crash_point("mount:after-map");
        let mounted = match self.prepare(facts, &stored, &mapping).await {
            Ok((fstype, marks)) => self
                .mark(facts, &req, mapper.as_ref(), mapping, &fstype, marks)
                .await
                .map(|mapping| (fstype, mapping)),
            Err(e) => Err((e, Some(mapping))),
        };
        let (fstype, mapping) = match mounted {
            Ok(done) => done,
            Err((e, mapping)) => {
                return Err(self.undo(facts, &req, mapper.as_ref(), mapping, e).await)
            }
        };
        match self
            .mount(facts, &stored, &fstype, &mapping, &mountpoint)
            .await
        {
            Ok(()) => Ok(ActiveVolume {
                pool: facts.pool.clone(),
                mountpoint,
                mapping,
                fstype,
                read_only,
                features: facts.stat.features,
                since: now(),
                refs: BTreeMap::new(),
                fenced: false,
            }),
            Err(e) => Err(self
                .undo(facts, &req, mapper.as_ref(), Some(mapping), e)
                .await),
        }
    }

    /// The messenger mode krbd maps with, and why: from the config, or from the
    /// cluster's monitors and settings (read at each map: they may change).
    async fn ms_mode(&self) -> Result<(Option<String>, String)> {
        let facts = if self.ms_mode == "auto" {
            let m = self.cluster.messenger().await?;
            msgr::Messenger {
                mon_v1: m.mon_v1,
                mon_v2: m.mon_v2,
                client_mode: m.client_mode,
                other_modes: m.other_modes,
            }
        } else {
            msgr::Messenger::default()
        };
        let (mode, why) = msgr::choose(&self.ms_mode, &facts);
        tracing::info!(ms_mode = mode.as_deref().unwrap_or("legacy (kernel default)"), reason = %why, "krbd messenger mode");
        Ok((mode, why))
    }

    /// Undoes a Mount that failed after mapping: unmounts and unmaps whatever is left,
    /// and returns the error that made it fail.
    async fn undo(
        &self,
        facts: &ImageFacts,
        req: &MapRequest,
        mapper: &dyn Mapper,
        mapping: Option<Mapping>,
        e: Error,
    ) -> Error {
        let name = facts.name.as_str();
        if matches!(self.host.mounted_at(&req.mountpoint), Ok(Some(_))) {
            let _ = self.host.umount(&req.mountpoint).await;
        }
        let undone = match &mapping {
            Some(m) => mapper.unmap(req, m).await,
            None => Ok(()),
        };
        match undone {
            Ok(()) => self.intents.end(&facts.pool, name),
            Err(undo) => {
                tracing::error!(volume = name, error = %undo, "could not unmap after a failed mount")
            }
        }
        e
    }

    /// Writes the marks `prepare` asked for and returns the mapping to mount. A kernel
    /// client holding the exclusive lock refuses every other client's write to the
    /// image, metadata included (librbd owners serve such requests for their peers; the
    /// kernel does not), so under krbd the image is unmapped for the write and mapped
    /// again, and must then still show the filesystem just made or found. The marks
    /// say only what is already true, so a crash or a lost lock in between leaves a
    /// volume that the next Mount treats exactly as before: it finds the filesystem
    /// and marks it then. On failure, the mapping still held (if any) comes back with
    /// the error.
    async fn mark(
        &self,
        facts: &ImageFacts,
        req: &MapRequest,
        mapper: &dyn Mapper,
        mapping: Mapping,
        fstype: &str,
        marks: MetaChanges,
    ) -> std::result::Result<Mapping, (Error, Option<Mapping>)> {
        let name = facts.name.as_str();
        if marks.is_empty() {
            return Ok(mapping);
        }
        if !mapper.refuses_peer_writes() || req.read_only {
            // One metadata update for every mark (each opens the image). A read-only
            // kernel mapping holds no lock, so it refuses nobody.
            return match self.cluster.set_meta(&facts.pool, name, marks).await {
                Ok(()) => Ok(mapping),
                Err(e) => Err((e, Some(mapping))),
            };
        }
        if let Err(e) = mapper.unmap(req, &mapping).await {
            return Err((e, Some(mapping)));
        }
        tracing::info!(
            volume = name,
            "writing the volume's marks with the image unmapped (the kernel client's lock refuses other writers)"
        );
        if let Err(e) = self.cluster.set_meta(&facts.pool, name, marks).await {
            return Err((e, None));
        }
        let mapping = match mapper.map(req).await {
            Ok(m) => m,
            Err(e) => return Err((e, None)),
        };
        match self.host.probe(&mapping.device).await {
            Ok(Probe::Signature(t)) if t == fstype => Ok(mapping),
            Ok(other) => Err((
                Error::NotSupported(format!(
                    "volume {name} changed while it was unmapped to record its {fstype} filesystem: it now holds {}; another host may have used it. Mount it again",
                    other.describe()
                )),
                Some(mapping),
            )),
            Err(e) => Err((e, Some(mapping))),
        }
    }

    /// Probes the mapped device and decides: checks a filesystem found (and asks to
    /// mark it), or formats a provably blank volume (and asks to mark that). Returns
    /// the filesystem type and the metadata marks to write.
    async fn prepare(
        &self,
        facts: &ImageFacts,
        stored: &StoredFs,
        mapping: &Mapping,
    ) -> Result<(String, MetaChanges)> {
        let name = facts.name.as_str();
        let read_only = stored.read_only;
        let declared = stored.fstype.clone();
        let device = &mapping.device;
        let record = VolumeRecord::from_meta(&facts.meta);
        let found = self.host.probe(device).await?;
        // Only a probe that found nothing needs the second opinion.
        let content = match found {
            Probe::Blank => self.host.sample(device).await,
            _ => Content::Zeros,
        };
        let marker = record.formatted.as_deref();
        let mut marks: MetaChanges = Vec::new();
        let fstype = match decide(name, &found, &content, marker, read_only) {
            FormatDecision::Refuse(why) => return Err(Error::NotSupported(why)),
            FormatDecision::Mount { fstype } => {
                if fstype != declared {
                    tracing::warn!(volume = name, found = %fstype, declared = %declared, "mounting the filesystem found on the volume, not the declared one");
                }
                // A read-only device cannot be repaired; a dirty journal then makes
                // the read-only mount itself fail, with the kernel's reason.
                if !read_only {
                    self.host.preen(&fstype, device).await?;
                    // A filesystem is there: say so on the image, so that losing it later
                    // (a wiped superblock, a failing read) is refused, never formatted.
                    if marker.is_none() {
                        let found = format!("{fstype} found by {} at {}", self.host_id, now());
                        marks.push((key::FORMATTED, Some(found)));
                    }
                }
                fstype
            }
            FormatDecision::Format => {
                // Only an image rbdvol created and never mapped before is known to hold
                // nothing. Any other may hold raw data no probe recognises (a
                // database's raw device, an encrypted blob) or lost its marker: format
                // it only if nothing was ever written to it.
                let fresh = record.is_fresh();
                if !fresh && self.cluster.has_data(&facts.pool, name).await? {
                    return Err(Error::NotSupported(format!(
                        "volume {name} holds data that no filesystem signature explains (it was written to, but shows no filesystem); rbdvol will not format it. If it really is disposable, `rbd rm` it and create the volume with docker volume create"
                    )));
                }
                tracing::info!(volume = name, fstype = %declared, fresh, "volume is blank: formatting");
                self.host
                    .mkfs(&declared, &stored.mkfs_options, fresh, device)
                    .await?;
                crash_point("mount:after-mkfs");
                let marker = format!("{declared} by {} at {}", self.host_id, now());
                marks.push((key::FORMATTED, Some(marker)));
                declared
            }
        };
        if record.first_mapped.is_none() {
            marks.push((key::FIRST_MAPPED, Some(now())));
        }
        Ok((fstype, marks))
    }

    /// Mounts the prepared device under the plugin-owned mountpoint.
    async fn mount(
        &self,
        facts: &ImageFacts,
        stored: &StoredFs,
        fstype: &str,
        mapping: &Mapping,
        mountpoint: &Path,
    ) -> Result<()> {
        let name = facts.name.as_str();
        let device = &mapping.device;
        let read_only = stored.read_only;
        // The options were checked for the declared type; the type found may differ
        // (ext2 and ext3 are mounted by the ext4 driver and take its options).
        let family = if fstype.starts_with("ext") {
            "ext4"
        } else {
            fstype
        };
        let user_options = fsopts::check_mount(family, &stored.mount_options).map_err(|why| {
            Error::InvalidOption {
                key: key::MOUNT_OPTIONS.into(),
                value: stored.mount_options.clone(),
                reason: format!(
                    "not valid for the {fstype} filesystem found on volume {name}: {why}"
                ),
            }
        })?;
        let options =
            crate::host::fs::mount_options(fstype, &user_options, read_only, stored.allow_suid_dev);
        // ext4 grows online only with CAP_SYS_RESOURCE, which a managed plugin lacks,
        // so it grows here, before the mount; xfs grows only while mounted.
        let record = VolumeRecord::from_meta(&facts.meta);
        let ext = fstype.starts_with("ext");
        if let (Some(mark), false, true) = (&record.grow_fs, read_only, ext) {
            self.grow_marked(&facts.pool, name, fstype, device, mountpoint, mark)
                .await;
        }
        self.host
            .mount(device, mountpoint, fstype, &options)
            .await?;
        crash_point("mount:after-mount");
        tracing::info!(volume = name, mountpoint = %mountpoint.display(), fstype = %fstype, options = %options, "mounted");
        if let (Some(mark), false, false) = (&record.grow_fs, read_only, ext) {
            self.grow_marked(&facts.pool, name, fstype, device, mountpoint, mark)
                .await;
        }
        Ok(())
    }

    /// The volume was resized while not mounted (or its holder could not grow it):
    /// grows the filesystem to the device, then clears the mark. Neither failure fails
    /// the Mount: a failed grow leaves the data as it was (mounted at its old size, the
    /// mark kept for the next Mount), and a mark that could not be cleared (a kernel
    /// client's lock refuses the daemon's metadata writes) only makes the next Mount
    /// grow again, which finds nothing to do.
    async fn grow_marked(
        &self,
        pool: &str,
        name: &str,
        fstype: &str,
        device: &Path,
        mountpoint: &Path,
        mark: &str,
    ) {
        if let Err(e) = self.host.grow_fs(fstype, device, mountpoint).await {
            tracing::warn!(volume = name, resize = %mark, error = %e, "could not grow the filesystem; mounting it at its old size, the next Mount tries again");
            return;
        }
        tracing::info!(volume = name, resize = %mark, "grew the filesystem to the volume's size");
        if let Err(e) = self
            .cluster
            .set_meta(pool, name, vec![(key::GROW_FS, None)])
            .await
        {
            tracing::info!(volume = name, error = %e, "the grow mark stays until a later Mount clears it (growing again is a no-op)");
        }
    }

    /// Unmounts and unmaps. A busy filesystem, or a device something else still
    /// holds, is an error: the volume stays as it is, and the caller keeps its record.
    pub async fn detach(&self, name: &str, v: &ActiveVolume) -> Result<()> {
        self.host.umount(&v.mountpoint).await?;
        crash_point("unmount:after-umount");
        let req = self.request_for(name, v);
        let mapper = self.mappers.get(v.mapping.kind);
        // Read before the mapping goes away with its state: once stopped, a client that
        // was fenced (or died) never comes back, and its blocklist entry is then moot.
        let exited = mapper.fenced_client(&req, &v.mapping);
        mapper.unmap(&req, &v.mapping).await?;
        crash_point("unmount:after-unmap");
        if let Some(addr) = exited {
            self.forget_fenced_client(name, addr).await;
        }
        self.host.remove_dir(&v.mountpoint);
        tracing::info!(volume = name, "unmounted and unmapped");
        Ok(())
    }

    /// Removes the blocklist entry of this host's exited, fenced client, to keep the
    /// blocklist to entries that protect something; failing to is harmless.
    async fn forget_fenced_client(&self, name: &str, addr: String) {
        match self.cluster.unblocklist(&addr).await {
            Ok(()) => {
                crate::metrics::event("blocklist_cleanup");
                tracing::info!(volume = name, client = %addr, "removed this host's exited, fenced client from the blocklist")
            }
            Err(e) => {
                crate::metrics::event("blocklist_cleanup_failed");
                tracing::warn!(volume = name, client = %addr, error = %e, "could not remove a stale blocklist entry; it expires by itself")
            }
        }
    }

    /// What on this host still uses the volume's filesystem (or, when it is not
    /// mounted, its device), besides rbdvol's own mount; see [`crate::host::usage`].
    pub fn uses(&self, v: &ActiveVolume) -> Vec<String> {
        match self.host.mounted_at(&v.mountpoint) {
            Ok(Some(entry)) => self.host.uses(&entry),
            Ok(None) => self.host.device_users(&v.mapping.device, &v.mountpoint),
            // Not knowing is not "unused".
            Err(e) => vec![format!("unknown: {e}")],
        }
    }

    pub async fn health(&self, name: &str, v: &ActiveVolume) -> Health {
        if !matches!(self.host.mounted_at(&v.mountpoint), Ok(Some(_))) {
            return Health::Gone;
        }
        let req = self.request_for(name, v);
        self.mappers
            .get(v.mapping.kind)
            .health(&req, &v.mapping)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_blank_never_formatted_writable_volume_is_formatted() {
        assert_eq!(
            decide("v", &Probe::Blank, &Content::Zeros, None, false),
            FormatDecision::Format
        );
        for (probe, marker, ro) in [
            (Probe::Blank, Some("ext4 by a at t"), false),
            (Probe::Blank, None, true),
            (Probe::PartitionTable("gpt".into()), None, false),
            (Probe::Signature("crypto_LUKS".into()), None, false),
            (Probe::Signature("swap".into()), None, false),
            (Probe::Ambivalent, None, false),
        ] {
            assert!(
                matches!(
                    decide("v", &probe, &Content::Zeros, marker, ro),
                    FormatDecision::Refuse(_)
                ),
                "{probe:?} {marker:?} {ro}"
            );
        }
    }

    #[test]
    fn existing_filesystems_are_mounted_as_found() {
        assert_eq!(
            decide(
                "v",
                &Probe::Signature("xfs".into()),
                &Content::Zeros,
                None,
                false
            ),
            FormatDecision::Mount {
                fstype: "xfs".into()
            }
        );
        assert_eq!(
            decide(
                "v",
                &Probe::Signature("ext4".into()),
                &Content::Zeros,
                Some("ext4 by a"),
                true
            ),
            FormatDecision::Mount {
                fstype: "ext4".into()
            }
        );
    }

    #[test]
    fn refusals_say_that_nothing_was_touched() {
        let FormatDecision::Refuse(why) = decide(
            "pg",
            &Probe::Blank,
            &Content::Zeros,
            Some("ext4 by a at t"),
            false,
        ) else {
            panic!()
        };
        assert!(
            why.contains("will not format") && why.contains("pg"),
            "{why}"
        );
        let FormatDecision::Refuse(why) = decide(
            "pg",
            &Probe::PartitionTable("dos".into()),
            &Content::Zeros,
            None,
            false,
        ) else {
            panic!()
        };
        assert!(
            why.contains("dos partition table") && why.contains("untouched"),
            "{why}"
        );
    }

    #[test]
    fn a_probe_that_found_nothing_is_not_enough_to_format() {
        // blkid exits 2 both for "nothing" and for "could not read": the read of the
        // device's ends must have succeeded and found zeros.
        let unreadable = Content::Unreadable("reading /dev/loop3: Input/output error".into());
        let FormatDecision::Refuse(why) = decide("pg", &Probe::Blank, &unreadable, None, false)
        else {
            panic!("an unreadable device was formatted")
        };
        assert!(
            why.contains("could not be read") && why.contains("untouched"),
            "{why}"
        );
        let FormatDecision::Refuse(why) = decide("pg", &Probe::Blank, &Content::Data, None, false)
        else {
            panic!("a device with data was formatted")
        };
        assert!(why.contains("will not format"), "{why}");
        // Signatures are mounted as found; the content sample is not consulted.
        assert_eq!(
            decide(
                "pg",
                &Probe::Signature("ext4".into()),
                &unreadable,
                None,
                false
            ),
            FormatDecision::Mount {
                fstype: "ext4".into()
            }
        );
    }
}
