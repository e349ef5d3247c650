//! Snapshots, clones, rollback and resize in terms of RBD images. Runs on a blocking
//! thread with a borrowed connection, like [`super::images`].
//!
//! Clones are made from protected snapshots (what clone format 1 needs, harmless under
//! format 2), so the cluster itself refuses to remove a snapshot that has clones: a
//! volume's clones can never lose their parent data through rbdvol.

use std::time::SystemTime;

use super::ceph_err;
use super::images::{describe, META_PREFIX};
use super::sys::{Child, Errno, Pool, Rados};
use crate::error::{Error, Result};
use crate::volume::key;

/// One snapshot of a volume, as `snapshot ls` and Get show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
    pub created: Option<SystemTime>,
    pub protected: bool,
    /// Volumes cloned from this snapshot (`pool/name`).
    pub clones: Vec<String>,
}

fn pool<'r>(rados: &'r Rados, pool: &str) -> Result<Pool<'r>> {
    rados
        .pool(pool)
        .map_err(|e| ceph_err(format!("opening pool {pool}"), e))
}

fn not_found(volume: &str, e: Errno) -> Option<Error> {
    (e.0 == libc::ENOENT).then(|| Error::NotFound(volume.to_string()))
}

const TRASHED: &str = " (in the trash)";

fn child_name(c: &Child) -> String {
    let trash = if c.trash { TRASHED } else { "" };
    format!("{}/{}{trash}", c.pool, c.image)
}

/// The snapshots of `pool/volume`, with the clones of each protected one.
pub fn list(rados: &Rados, pool_name: &str, volume: &str) -> Result<Vec<Snapshot>> {
    let io = pool(rados, pool_name)?;
    let image = io.open_read_only(volume).map_err(|e| {
        not_found(volume, e)
            .unwrap_or_else(|| ceph_err(format!("opening image {pool_name}/{volume}"), e))
    })?;
    let ctx = |what: &str| format!("{what} of {pool_name}/{volume}");
    let snaps = image
        .snapshots()
        .map_err(|e| ceph_err(ctx("listing snapshots"), e))?;
    let mut out = Vec::with_capacity(snaps.len());
    for s in snaps {
        let protected = image
            .snap_is_protected(&s.name)
            .map_err(|e| ceph_err(ctx("reading snapshot protection"), e))?;
        // Only protected snapshots can have clones rbdvol made.
        let clones = if protected {
            io.open_snapshot(volume, &s.name)
                .and_then(|at| at.children())
                .map_err(|e| ceph_err(ctx(&format!("listing clones of snapshot {}", s.name)), e))?
                .iter()
                .map(child_name)
                .collect()
        } else {
            Vec::new()
        };
        out.push(Snapshot {
            name: s.name,
            size: s.size,
            created: s.created,
            protected,
            clones,
        });
    }
    Ok(out)
}

/// Takes a snapshot. With the exclusive lock held by a mapper (the volume is mounted),
/// librbd asks the lock owner to take it, so it lands between two of its writes.
pub fn create(rados: &Rados, pool_name: &str, volume: &str, snap: &str) -> Result<()> {
    let io = pool(rados, pool_name)?;
    let image = io.open(volume).map_err(|e| {
        not_found(volume, e)
            .unwrap_or_else(|| ceph_err(format!("opening image {pool_name}/{volume}"), e))
    })?;
    match image.snap_create(snap) {
        Ok(()) => Ok(()),
        Err(e) if e.0 == libc::EEXIST => Err(Error::Conflict {
            name: format!("{volume}@{snap}"),
            existing: "a snapshot of that name".into(),
            requested: "a new snapshot".into(),
        }),
        Err(e) => Err(ceph_err(
            format!("creating snapshot {pool_name}/{volume}@{snap}"),
            e,
        )),
    }
}

/// Removes a snapshot; refused, naming them, while it has clones.
pub fn remove(rados: &Rados, pool_name: &str, volume: &str, snap: &str) -> Result<()> {
    let snaps = list(rados, pool_name, volume)?;
    let Some(s) = snaps.iter().find(|s| s.name == snap) else {
        return Err(Error::NotFound(format!("{volume}@{snap}")));
    };
    if !s.clones.is_empty() {
        return Err(Error::InUse {
            name: format!("{volume}@{snap}"),
            holder: format!(
                "volumes {} were cloned from this snapshot and read their unchanged data from it; remove those volumes first",
                s.clones.join(", ")
            ),
        });
    }
    let io = pool(rados, pool_name)?;
    let image = io
        .open(volume)
        .map_err(|e| ceph_err(format!("opening image {pool_name}/{volume}"), e))?;
    let ctx = |what: &str| format!("{what} {pool_name}/{volume}@{snap}");
    if s.protected {
        image.snap_unprotect(snap).map_err(|e| match e.0 {
            libc::EBUSY => Error::InUse {
                name: format!("{volume}@{snap}"),
                holder: "a volume was cloned from this snapshot meanwhile; remove it first".into(),
            },
            _ => ceph_err(ctx("unprotecting snapshot"), e),
        })?;
    }
    image
        .snap_remove(snap)
        .map_err(|e| ceph_err(ctx("removing snapshot"), e))
}

/// Readies the snapshots of a volume that is about to be removed. Refused, naming
/// them, while clones of it exist outside the trash (nothing changes then). Clones in
/// the trash still read from it, so it may follow them into the trash (every one of
/// them stays restorable) but not be deleted. Otherwise each snapshot is unprotected,
/// so the trash can purge the volume later, and with `delete` removed.
pub fn release_all(rados: &Rados, pool_name: &str, volume: &str, delete: bool) -> Result<()> {
    let snaps = list(rados, pool_name, volume)?;
    let live: Vec<String> = snaps
        .iter()
        .flat_map(|s| s.clones.iter().filter(|c| !c.ends_with(TRASHED)).cloned())
        .collect();
    if !live.is_empty() {
        return Err(Error::InUse {
            name: volume.to_string(),
            holder: format!(
                "volumes {} were cloned from its snapshots and read their unchanged data from them; remove those volumes first",
                live.join(", ")
            ),
        });
    }
    let trashed: Vec<String> = snaps.iter().flat_map(|s| s.clones.clone()).collect();
    if delete && !trashed.is_empty() {
        return Err(Error::InUse {
            name: volume.to_string(),
            holder: format!(
                "removed volumes {} were cloned from its snapshots and still read from them in the trash; purge them first (`rbd trash ls`, `rbd trash rm`)",
                trashed.join(", ")
            ),
        });
    }
    let io = pool(rados, pool_name)?;
    let image = io
        .open(volume)
        .map_err(|e| ceph_err(format!("opening image {pool_name}/{volume}"), e))?;
    for s in snaps.iter().filter(|s| s.clones.is_empty()) {
        let ctx = |what: &str| format!("{what} {pool_name}/{volume}@{}", s.name);
        if s.protected {
            image
                .snap_unprotect(&s.name)
                .map_err(|e| ceph_err(ctx("unprotecting snapshot"), e))?;
        }
        if delete {
            image
                .snap_remove(&s.name)
                .map_err(|e| ceph_err(ctx("removing snapshot"), e))?;
        }
    }
    Ok(())
}

/// Rolls the volume back to a snapshot. Only while nothing holds or watches it: a
/// mounted filesystem would not survive its blocks changing underneath.
pub fn rollback(rados: &Rados, pool_name: &str, volume: &str, snap: &str) -> Result<()> {
    let facts =
        describe(rados, pool_name, volume)?.ok_or_else(|| Error::NotFound(volume.to_string()))?;
    if let Some(holder) = facts.holder() {
        return Err(Error::InUse {
            name: volume.to_string(),
            holder: format!(
                "{holder}; roll it back once it is unmounted everywhere (stop the containers using it)"
            ),
        });
    }
    let io = pool(rados, pool_name)?;
    let image = io
        .open(volume)
        .map_err(|e| ceph_err(format!("opening image {pool_name}/{volume}"), e))?;
    match image.snap_rollback(snap) {
        Ok(()) => Ok(()),
        Err(e) if e.0 == libc::ENOENT => Err(Error::NotFound(format!("{volume}@{snap}"))),
        Err(e) => Err(ceph_err(
            format!("rolling {pool_name}/{volume} back to {snap}"),
            e,
        )),
    }
}

/// Where a clone comes from.
#[derive(Debug, Clone)]
pub struct CloneSource {
    pub pool: String,
    pub volume: String,
    pub snap: String,
}

/// Clones `src` (a snapshot, protected here) into `pool/name` and writes `meta` on it.
/// The clone starts with its parent's metadata (librbd copies it); keys that describe
/// the parent's own history are replaced by `meta` or dropped. A failure removes the
/// half-made clone again.
pub fn clone(
    rados: &Rados,
    src: &CloneSource,
    pool_name: &str,
    name: &str,
    meta: &[(String, String)],
) -> Result<super::images::Created> {
    let sio = pool(rados, &src.pool)?;
    let parent = sio.open(&src.volume).map_err(|e| {
        not_found(&src.volume, e)
            .unwrap_or_else(|| ceph_err(format!("opening image {}/{}", src.pool, src.volume), e))
    })?;
    let stat = parent
        .stat()
        .map_err(|e| ceph_err(format!("stat of {}/{}", src.pool, src.volume), e))?;
    if stat.features & 1 == 0 {
        return Err(Error::NotSupported(format!(
            "volume {} was created without the layering feature, so it cannot be cloned; create it with -o features=layering,exclusive-lock",
            src.volume
        )));
    }
    let spec = format!("{}/{}@{}", src.pool, src.volume, src.snap);
    match parent.snap_protect(&src.snap) {
        Ok(()) => {}
        Err(e) if e.0 == libc::ENOENT => {
            return Err(Error::NotFound(format!("{}@{}", src.volume, src.snap)))
        }
        Err(e) => return Err(ceph_err(format!("protecting snapshot {spec}"), e)),
    }
    let dio = pool(rados, pool_name)?;
    // The clone has the parent's user-chosen features (exclusive-lock included).
    let features = stat.features & crate::volume::USER_FEATURE_MASK;
    match sio.clone_image(&src.volume, &src.snap, &dio, name, features) {
        Ok(()) => {}
        Err(e) if e.0 == libc::EEXIST => return Ok(super::images::Created::AlreadyExists),
        Err(e) => {
            return Err(ceph_err(
                format!("cloning {spec} into {pool_name}/{name}"),
                e,
            ))
        }
    }
    let written = (|| -> std::result::Result<(), Errno> {
        let image = dio.open(name)?;
        let mut drop_keys: Vec<&str> = key::OWNER.to_vec();
        drop_keys.push(key::GROW_FS);
        for k in drop_keys {
            image.metadata_remove(&format!("{META_PREFIX}{k}"))?;
        }
        for (k, v) in meta {
            image.metadata_set(&format!("{META_PREFIX}{k}"), v)?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let undo = dio.remove_image(name);
        tracing::error!(pool = pool_name, name, error = %e.describe(), undo = ?undo, "metadata write on the clone failed; removed the clone");
        return Err(ceph_err(
            format!("writing metadata of {pool_name}/{name}"),
            e,
        ));
    }
    Ok(super::images::Created::New)
}

/// Grows the image to `size` and marks its filesystem for growing. Returns the old
/// size. Shrinking is refused: it would cut off the end of the filesystem.
pub fn resize(rados: &Rados, pool_name: &str, volume: &str, size: u64, mark: &str) -> Result<u64> {
    let io = pool(rados, pool_name)?;
    let image = io.open(volume).map_err(|e| {
        not_found(volume, e)
            .unwrap_or_else(|| ceph_err(format!("opening image {pool_name}/{volume}"), e))
    })?;
    let ctx = |what: &str| format!("{what} {pool_name}/{volume}");
    let old = image.stat().map_err(|e| ceph_err(ctx("stat of"), e))?.size;
    if size < old {
        return Err(Error::InvalidOption {
            key: "size".into(),
            value: crate::units::format_size(size),
            reason: format!(
                "volume {volume} is {} now; rbdvol only grows volumes, because shrinking the image would cut off the end of its filesystem and the data there (xfs cannot shrink at all). Copy the data to a new, smaller volume instead",
                crate::units::format_size(old)
            ),
        });
    }
    if size > old {
        image
            .resize(size)
            .map_err(|e| ceph_err(ctx("resizing"), e))?;
    }
    // Set even when the size is already right: a resize whose filesystem grow was
    // interrupted is finished by running it again.
    image
        .metadata_set(&format!("{META_PREFIX}{}", key::GROW_FS), mark)
        .map_err(|e| ceph_err(ctx("writing metadata of"), e))?;
    Ok(old)
}
