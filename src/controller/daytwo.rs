//! Day-two operations on volumes, cluster-side and the same from every host:
//! snapshots (create, list, remove, rollback), clones at Create (`-o from=VOL` or
//! `-o from=VOL@SNAP`) and growing a volume. Front ends (the `rbdvol` CLI, Docker's
//! Create, later CSI) call these and render the typed results themselves.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::Controller;
use crate::ceph::images::{Created, ImageFacts};
use crate::ceph::snapshots::CloneSource;
pub use crate::ceph::snapshots::Snapshot as SnapshotRow;
use crate::ceph::ClusterOps;
use crate::error::{Error, Result};
use crate::units::{format_size, parse_size};
use crate::volume::control::{self, Reply, Request};
use crate::volume::{key, names};

/// The create option that makes a volume from another one.
pub const FROM: &str = "from";

/// Where a cloned volume came from: `pool/volume@snapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub pool: String,
    pub volume: String,
    pub snapshot: String,
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.pool, self.volume, self.snapshot)
    }
}

/// A snapshot taken: its name, and the host that froze the filesystem for it (none
/// when the volume was not mounted, or with `--crash-consistent`).
#[derive(Debug, Clone)]
pub struct Snapped {
    pub name: String,
    pub frozen_by: Option<String>,
}

/// What became of the filesystem after a resize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsGrow {
    /// Grown at once by the host holding the volume.
    Online { host: String },
    /// Grown at the next Mount; `why` not at once, when the volume is mounted.
    AtNextMount { why: Option<String> },
}

/// The result of a resize.
#[derive(Debug, Clone)]
pub struct Resized {
    pub old: u64,
    pub new: u64,
    pub filesystem: FsGrow,
}

/// The host holding the volume's exclusive lock (from its owner record), if anyone holds it.
fn holder_host(facts: &ImageFacts) -> Option<String> {
    let owners = crate::lock::owners(facts);
    let first = owners.first()?;
    Some(
        first
            .host
            .clone()
            .map(|h| format!("host {h}"))
            .unwrap_or_else(|| first.describe()),
    )
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Splits `VOLUME@SNAPSHOT`, both validated like volume names.
pub fn parse_snapshot_ref(text: &str) -> Result<(String, String)> {
    let Some((volume, snap)) = text.split_once('@') else {
        return Err(Error::InvalidName {
            name: text.to_string(),
            reason: "name the snapshot as VOLUME@SNAPSHOT, e.g. pg-data@nightly".into(),
        });
    };
    names::validate(volume)?;
    validate_snapshot_name(snap)?;
    Ok((volume.to_string(), snap.to_string()))
}

/// Snapshot names follow the volume-name rules.
pub fn validate_snapshot_name(snap: &str) -> Result<()> {
    names::validate(snap).map_err(|e| match e {
        Error::InvalidName { name, reason } => Error::InvalidName {
            name,
            reason: format!("as a snapshot name: {reason}"),
        },
        other => other,
    })
}

/// The snapshot `from=VOL` takes of VOL's current state for the clone `new`.
pub fn clone_snapshot_name(new: &str) -> String {
    // Volume names are at most 95 characters; snapshot names have the same limit.
    let mut s = format!("clone-{new}");
    s.truncate(names::MAX_NAME_LEN);
    s
}

impl Controller {
    async fn facts_of(&self, volume: &str) -> Result<ImageFacts> {
        names::validate(volume)?;
        self.lookup(volume)
            .await?
            .ok_or_else(|| Error::NotFound(volume.to_string()))
    }

    /// Takes a snapshot of `volume` named `snap` (default: `snap-<UTC time>`) and
    /// returns its name and the host that froze its filesystem for it. While the
    /// volume is mounted, the holding host freezes the filesystem around the snapshot
    /// (asked through the cluster, see [`crate::volume::control`]); if it does not
    /// answer, the snapshot is refused, or with `crash_consistent` taken unfrozen.
    pub async fn snapshot_create(
        &self,
        volume: &str,
        snap: Option<&str>,
        crash_consistent: bool,
    ) -> Result<Snapped> {
        let snap = match snap {
            Some(s) => {
                validate_snapshot_name(s)?;
                s.to_string()
            }
            None => format!(
                "snap-{}",
                humantime::format_rfc3339_seconds(SystemTime::now())
                    .to_string()
                    .replace([':', '-'], "")
            ),
        };
        let facts = self.facts_of(volume).await?;
        if facts.snapshots.iter().any(|s| s.name == snap) {
            return Err(Error::Conflict {
                name: format!("{volume}@{snap}"),
                existing: "a snapshot of that name".into(),
                requested: "a new snapshot".into(),
            });
        }
        let frozen_by = self.snap_frozen(&facts, &snap, crash_consistent).await?;
        tracing::info!(volume, snapshot = %snap, frozen_by = ?frozen_by, "created snapshot");
        Ok(Snapped {
            name: snap,
            frozen_by,
        })
    }

    /// The snapshot itself, inside the holder's freeze when the volume is held.
    async fn snap_frozen(
        &self,
        facts: &ImageFacts,
        snap: &str,
        crash_consistent: bool,
    ) -> Result<Option<String>> {
        let volume = facts.name.as_str();
        let Some(holder) = holder_host(facts) else {
            self.cluster.snap_create(&facts.pool, volume, snap).await?;
            return Ok(None);
        };
        let id = format!(
            "{}-{}",
            self.cfg.host_id,
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let freeze = Request::Freeze {
            volume: volume.to_string(),
            id: id.clone(),
            max_secs: control::MAX_FREEZE.as_secs(),
        };
        match self.ask_holder(facts, &freeze, control::ANSWER_WITHIN).await {
            Ok(host) => {
                let taken = self.cluster.snap_create(&facts.pool, volume, snap).await;
                let thaw = Request::Thaw {
                    volume: volume.to_string(),
                    id,
                };
                if let Err(why) = self.ask_holder(facts, &thaw, control::ANSWER_WITHIN).await {
                    tracing::warn!(volume, host = %host, why = %why, "the holder did not confirm the thaw; its freeze guard thaws by itself within {}s", control::MAX_FREEZE.as_secs());
                }
                taken.map(|()| Some(host))
            }
            Err(why) if crash_consistent => {
                tracing::warn!(volume, holder = %holder, why = %why, "taking a crash-consistent snapshot: the holder could not freeze the filesystem");
                self.cluster.snap_create(&facts.pool, volume, snap).await?;
                Ok(None)
            }
            Err(why) => Err(Error::HeldElsewhere(format!(
                "volume {volume} is mounted on {holder}, which must freeze its filesystem for a consistent snapshot, but {why}. No snapshot was taken. Retry once {holder} is reachable, or take it without freezing with `rbdvol snapshot create --crash-consistent` (like a power cut: the filesystem replays its journal when the snapshot is used)"
            ))),
        }
    }

    /// Sends `req` to the daemon holding the volume and returns its host once it has
    /// done it; otherwise says why not, in words.
    async fn ask_holder(
        &self,
        facts: &ImageFacts,
        req: &Request,
        within: Duration,
    ) -> std::result::Result<String, String> {
        let holder = holder_host(facts).unwrap_or_else(|| "its holder".into());
        let payload = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let oid = control::object(&facts.name);
        let mut replies = self
            .cluster
            .notify(&facts.pool, &oid, payload.clone(), within)
            .await
            .map_err(|e| format!("it could not be asked: {e}"))?;
        if replies.acks.is_empty() && replies.timeouts.is_empty() {
            // Nobody watches yet: a daemon starts watching within a second of a Mount.
            tokio::time::sleep(Duration::from_secs(2)).await;
            replies = self
                .cluster
                .notify(&facts.pool, &oid, payload, within)
                .await
                .map_err(|e| format!("it could not be asked: {e}"))?;
        }
        let answers: Vec<Reply> = replies
            .acks
            .iter()
            .filter_map(|(_, body)| serde_json::from_slice::<Reply>(body).ok())
            .collect();
        if let Some(ok) = answers.iter().find(|r| r.ok) {
            return Ok(ok.host.clone());
        }
        if let Some(failed) = answers.first() {
            return Err(format!(
                "{} could not do it: {}",
                failed.host,
                failed.error.clone().unwrap_or_default()
            ));
        }
        if !replies.timeouts.is_empty() {
            return Err(format!(
                "{holder} did not answer within {}s",
                within.as_secs()
            ));
        }
        Err(format!(
            "no rbdvol daemon on {holder} watches for requests about it (the daemon is stopped or cut off from the cluster, or it is too old)"
        ))
    }

    /// The snapshots of `volume`, oldest first, with the clones made from each.
    pub async fn snapshots(&self, volume: &str) -> Result<Vec<SnapshotRow>> {
        let facts = self.facts_of(volume).await?;
        self.cluster.snapshots(&facts.pool, volume).await
    }

    /// Removes `volume@snap`; refused while volumes cloned from it exist.
    pub async fn snapshot_remove(&self, volume: &str, snap: &str) -> Result<()> {
        validate_snapshot_name(snap)?;
        let facts = self.facts_of(volume).await?;
        self.cluster.snap_remove(&facts.pool, volume, snap).await?;
        tracing::info!(volume, snapshot = snap, "removed snapshot");
        Ok(())
    }

    /// Rolls `volume` back to `snap`; refused, naming the holder, while it is mounted
    /// (held or watched) anywhere.
    pub async fn rollback(&self, volume: &str, snap: &str) -> Result<()> {
        validate_snapshot_name(snap)?;
        let facts = self.facts_of(volume).await?;
        let lock = self.locks.get(volume);
        let _serialised = lock.lock().await;
        self.cluster.rollback(&facts.pool, volume, snap).await?;
        tracing::info!(volume, snapshot = snap, "rolled back");
        Ok(())
    }

    /// Grows `volume` to `size` (e.g. `20G`). The filesystem is grown at once by the
    /// host holding the volume, or else at its next Mount.
    pub async fn resize(&self, volume: &str, size: &str) -> Result<Resized> {
        let bytes = parse_size(size).map_err(|reason| Error::InvalidOption {
            key: "size".into(),
            value: size.to_string(),
            reason,
        })?;
        let bytes = bytes.div_ceil(4096) * 4096;
        let facts = self.facts_of(volume).await?;
        let mark = format!(
            "{} by {} at {}",
            format_size(bytes),
            self.cfg.host_id,
            now()
        );
        let old = self
            .cluster
            .resize(&facts.pool, volume, bytes, mark)
            .await?;
        tracing::info!(volume, old = %format_size(old), new = %format_size(bytes), "resized");
        let filesystem = match holder_host(&facts) {
            None => FsGrow::AtNextMount { why: None },
            Some(_) => {
                let grow = Request::Grow {
                    volume: volume.to_string(),
                    size: bytes,
                };
                match self.ask_holder(&facts, &grow, control::GROW_WITHIN).await {
                    Ok(host) => {
                        self.cluster
                            .set_meta(&facts.pool, volume, vec![(key::GROW_FS, None)])
                            .await?;
                        FsGrow::Online { host }
                    }
                    Err(why) => FsGrow::AtNextMount { why: Some(why) },
                }
            }
        };
        Ok(Resized {
            old,
            new: bytes,
            filesystem,
        })
    }

    /// Create with `-o from=VOL[@SNAP]`: a clone of a snapshot of VOL (taken now when
    /// none is named), which keeps VOL's filesystem and settings and is never
    /// formatted. Only `pool` may be given besides `from`.
    pub(super) async fn create_from(
        &self,
        name: &str,
        opts: &BTreeMap<String, String>,
    ) -> Result<()> {
        let from = opts.get(FROM).cloned().unwrap_or_default();
        if let Some(k) = opts.keys().find(|k| !matches!(k.as_str(), FROM | "pool")) {
            return Err(Error::InvalidOption {
                key: k.clone(),
                value: opts[k].clone(),
                reason: format!(
                    "a volume made with from= takes its size, filesystem and options from its source; only pool= may be given with it (grow it afterwards with `rbdvol resize {name} SIZE`)"
                ),
            });
        }
        let (src_volume, snap) = match from.split_once('@') {
            Some(_) => {
                let (v, s) = parse_snapshot_ref(&from)?;
                (v, Some(s))
            }
            None => {
                names::validate(&from).map_err(|_| Error::InvalidOption {
                    key: FROM.into(),
                    value: from.clone(),
                    reason: "name a volume (from=pg-data) or one of its snapshots (from=pg-data@nightly)".into(),
                })?;
                (from.clone(), None)
            }
        };
        if src_volume == name {
            return Err(Error::InvalidOption {
                key: FROM.into(),
                value: from,
                reason: "a volume cannot be made from itself".into(),
            });
        }
        let pool = match opts.get("pool") {
            Some(p) if !self.cfg.pools.contains(p) => {
                return Err(Error::InvalidOption {
                    key: "pool".into(),
                    value: p.clone(),
                    reason: format!(
                        "not a configured pool; use one of {}",
                        self.cfg.pools.join(", ")
                    ),
                })
            }
            Some(p) => Some(p.clone()),
            None => None,
        };
        let lock = self.locks.get(name);
        let _serialised = lock.lock().await;
        if let Some(existing) = self.lookup(name).await? {
            return same_origin(name, &existing, &src_volume, snap.as_deref());
        }
        let source = self
            .lookup(&src_volume)
            .await?
            .ok_or_else(|| Error::InvalidOption {
                key: FROM.into(),
                value: from.clone(),
                reason: format!("volume {src_volume} does not exist"),
            })?;
        let snap = match snap {
            Some(s) => {
                if !source.snapshots.iter().any(|x| x.name == s) {
                    return Err(Error::InvalidOption {
                        key: FROM.into(),
                        value: from.clone(),
                        reason: format!("volume {src_volume} has no snapshot {s}; `rbdvol snapshot ls {src_volume}` lists them"),
                    });
                }
                s
            }
            None => {
                let s = clone_snapshot_name(name);
                // A retried Create finds its snapshot from the first attempt.
                if !source.snapshots.iter().any(|x| x.name == s) {
                    self.cluster
                        .snap_create(&source.pool, &src_volume, &s)
                        .await?;
                }
                s
            }
        };
        let lineage = Lineage {
            pool: source.pool.clone(),
            volume: src_volume.clone(),
            snapshot: snap.clone(),
        };
        let pool = pool.unwrap_or_else(|| source.pool.clone());
        let meta = clone_meta(&source.meta, &lineage, &self.cfg.host_id);
        let src = CloneSource {
            pool: source.pool.clone(),
            volume: src_volume,
            snap,
        };
        match self.cluster.clone_volume(src, &pool, name, meta).await? {
            Created::New => {
                tracing::info!(volume = name, pool = %pool, origin = %lineage, "created volume as a clone");
                Ok(())
            }
            Created::AlreadyExists => match self.lookup(name).await? {
                Some(existing) => {
                    same_origin(name, &existing, &lineage.volume, Some(&lineage.snapshot))
                }
                None => Err(Error::Conflict {
                    name: name.to_string(),
                    existing: "a concurrent create or remove".into(),
                    requested: format!("a clone of {lineage}"),
                }),
            },
        }
    }
}

/// The metadata of a clone: its source's filesystem settings and `formatted` marker
/// (the filesystem came along), its own creation, and its lineage. `first-mapped` is
/// set so that it never counts as a fresh, all-zero volume.
pub fn clone_meta(
    source: &BTreeMap<String, String>,
    lineage: &Lineage,
    host_id: &str,
) -> Vec<(String, String)> {
    let own = [
        key::CREATED_BY,
        key::CREATED_AT,
        key::FIRST_MAPPED,
        key::ORIGIN,
        key::GROW_FS,
    ];
    let mut meta: Vec<(String, String)> = source
        .iter()
        .filter(|(k, _)| !own.contains(&k.as_str()) && !key::OWNER.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let at = now();
    meta.push((key::CREATED_BY.into(), host_id.to_string()));
    meta.push((key::ORIGIN.into(), lineage.to_string()));
    meta.push((
        key::FIRST_MAPPED.into(),
        format!("cloned from {lineage} at {at}"),
    ));
    // Written last, like at Create: its presence means the volume was made completely.
    meta.push((key::CREATED_AT.into(), at));
    meta
}

/// A repeated Create of a clone succeeds when the existing volume came from the same
/// source.
fn same_origin(name: &str, existing: &ImageFacts, volume: &str, snap: Option<&str>) -> Result<()> {
    let origin = existing.meta.get(key::ORIGIN).cloned().unwrap_or_default();
    let matches = origin
        .split_once('/')
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split_once('@'))
        .is_some_and(|(v, s)| v == volume && snap.is_none_or(|want| want == s));
    if matches {
        return Ok(());
    }
    Err(Error::Conflict {
        name: name.to_string(),
        existing: if origin.is_empty() {
            "no origin (it was not made with from=)".into()
        } else {
            format!("from={origin}")
        },
        requested: format!(
            "from={volume}{}",
            snap.map(|s| format!("@{s}")).unwrap_or_default()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_references_are_checked() {
        assert_eq!(
            parse_snapshot_ref("pg@nightly").unwrap(),
            ("pg".to_string(), "nightly".to_string())
        );
        for bad in ["pg", "pg@", "@x", "pg@a/b", "pg@..", "../x@y"] {
            assert!(parse_snapshot_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_clone_keeps_the_filesystem_and_never_looks_fresh() {
        let source: BTreeMap<String, String> = [
            ("fstype", "xfs"),
            ("formatted", "xfs by a at t"),
            ("created-at", "t0"),
            ("first-mapped", "t1"),
            ("owner.host", "host-a"),
            ("grow-fs", "20 GiB"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let l = Lineage {
            pool: "rbd".into(),
            volume: "pg".into(),
            snapshot: "nightly".into(),
        };
        let meta: BTreeMap<String, String> =
            clone_meta(&source, &l, "host-b").into_iter().collect();
        let r = crate::volume::VolumeRecord::from_meta(&meta);
        assert_eq!(r.fstype.as_deref(), Some("xfs"));
        assert_eq!(r.formatted.as_deref(), Some("xfs by a at t"));
        assert_eq!(r.origin.as_deref(), Some("rbd/pg@nightly"));
        assert!(
            !r.is_fresh(),
            "a clone holds data; it must never count as blank"
        );
        assert_eq!(r.owner_host, None);
        assert_eq!(r.grow_fs, None);
        assert_eq!(r.created_by.as_deref(), Some("host-b"));
    }
}
