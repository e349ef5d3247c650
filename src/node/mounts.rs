//! Mount and Unmount as Docker drives them: references counted per mount ID, the
//! first reference attaches (map, format if provably blank, mount) and the last one
//! detaches; a host that lost a volume's lock (fenced) refuses new Mounts of it.
//! Everything here runs under the volume's name lock, so one volume's Mount and
//! Unmount never interleave while different volumes proceed in parallel.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::refs::{self, ActiveVolume};
use super::Node;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::host::mapper::Health;
use crate::volume::names;

/// Seconds since the epoch: when a reference was made.
pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Node {
    /// Notices volumes this host lost (its mapper was fenced: blocklisted, lock
    /// broken), marks them, and says so loudly. Fenced volumes refuse new Mounts until
    /// their last Unmount. Runs periodically and before answering Get.
    pub async fn check_fencing(&self, only: Option<&str>) {
        let candidates: Vec<(String, ActiveVolume)> = {
            let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            t.volumes
                .iter()
                .filter(|(n, v)| !v.fenced && only.is_none_or(|o| o == n.as_str()))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        for (name, v) in candidates {
            let req = self.attacher.request_for(&name, &v);
            let mapper = self.attacher.mappers.get(v.mapping.kind);
            let mut health = mapper.health(&req, &v.mapping).await;
            // The kernel client does not say that it was blocklisted: its client
            // instance's address on the OSD blocklist does.
            if health == Health::Serving {
                if let Some(addr) = mapper.client_addr(&req, &v.mapping) {
                    match self.cluster.is_blocklisted(&addr).await {
                        Ok(true) => health = Health::Fenced,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(volume = %name, error = %e, "could not read the blocklist")
                        }
                    }
                }
            }
            if health == Health::Fenced {
                tracing::error!(
                    volume = %name,
                    mountpoint = %v.mountpoint.display(),
                    "FENCED: this host lost the volume's lock (another host or an operator took it over). Its filesystem here now fails every write; stop the containers using it on this host"
                );
                self.mark_fenced(&name);
            }
        }
    }

    fn mark_fenced(&self, name: &str) {
        crate::metrics::event("fenced");
        let r = self.update_table(|vols| {
            if let Some(rec) = vols.get_mut(name) {
                rec.fenced = true;
            }
        });
        if let Err(e) = r {
            tracing::error!(volume = name, error = %e, "could not record the fencing in the reference table");
        }
    }

    fn fenced_error(&self, name: &str) -> Error {
        Error::InUse {
            name: name.to_string(),
            holder: format!(
                "this host ({}) lost the volume's lock: another host took it over and this host was fenced. It stays unavailable here until the containers using it on this host stop",
                self.cfg.host_id
            ),
        }
    }

    /// Mounts the volume for Docker mount `id`: map + format-if-blank + mount on the
    /// first reference, a counter increment after that.
    pub async fn mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        self.mount_as(name, id, false).await
    }

    /// [`Node::mount`], read-only when `read_only` (a CSI reader): the mapping is then
    /// read-only too. A read-write reference to a volume mounted read-only here is
    /// refused: it would need another mapping.
    pub async fn mount_as(&self, name: &str, id: &str, read_only: bool) -> Result<PathBuf> {
        names::validate(name)?;
        let lock = self.locks.get(name);
        let _serialised = lock.lock().await;
        let dockerd = refs::dockerd_instance(&self.cfg.dockerd_pid_file);
        let mut carried = BTreeMap::new();
        if let Some(v) = self.active(name) {
            if v.fenced {
                return Err(self.fenced_error(name));
            }
            if v.read_only && !read_only {
                return Err(Error::InUse {
                    name: name.to_string(),
                    holder: format!("mounted read-only on this host ({}); a read-write use must wait until the readers here are gone", self.cfg.host_id),
                });
            }
            match self.attacher.health(name, &v).await {
                Health::Serving => {
                    let mp = v.mountpoint.clone();
                    let total = self.update_table(|vols| {
                        let rec = vols.get_mut(name).expect("record under the volume lock");
                        rec.add_ref(id, dockerd.as_deref(), now_secs());
                        rec.total_refs()
                    })?;
                    tracing::info!(
                        volume = name,
                        id,
                        refs = total,
                        "mount: already mounted here; counted another reference"
                    );
                    crash_point("mount:before-reply");
                    return Ok(mp);
                }
                Health::Fenced => {
                    self.mark_fenced(name);
                    tracing::error!(volume = name, "mount: this host was fenced from the volume");
                    return Err(self.fenced_error(name));
                }
                Health::Gone => {
                    tracing::warn!(
                        volume = name,
                        "mount: the recorded mount is gone; mounting again"
                    );
                    // A teardown that fails (the device is still in use) keeps the
                    // record: mounting again on top of it could only make things worse.
                    self.attacher.detach(name, &v).await?;
                    carried = v.refs.clone();
                    self.update_table(|vols| vols.remove(name))?;
                }
            }
        }
        let facts = self
            .cluster
            .describe(self.cfg.pools.clone(), name)
            .await?
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let mut active = match self.attacher.attach(&facts, read_only).await {
            Ok(a) => a,
            Err(e) => {
                let waited = self.cfg.takeover_wait;
                return Err(self.explain_mount_failure(name, e, waited).await);
            }
        };
        active.refs = carried;
        active.add_ref(id, dockerd.as_deref(), now_secs());
        let mp = active.mountpoint.clone();
        let recorded = self.update_table(|vols| vols.insert(name.to_string(), active.clone()));
        if let Err(e) = recorded {
            // Not recorded, so not answered: Docker will not use it, nothing may hold it.
            if let Err(undo) = self.attacher.detach(name, &active).await {
                tracing::error!(volume = name, error = %undo, "could not undo a mount that could not be recorded; the next start reconciles it");
            }
            return Err(e);
        }
        self.attacher.intents.end(&active.pool, name);
        crash_point("mount:before-reply");
        Ok(mp)
    }

    /// A Mount that failed while another host holds the volume says who holds it and
    /// what happens next, rather than the mapper's low-level error.
    async fn explain_mount_failure(&self, name: &str, e: Error, waited: Duration) -> Error {
        let Ok(Some(facts)) = self.cluster.describe(self.cfg.pools.clone(), name).await else {
            return e;
        };
        let owners = crate::lock::owners(&facts);
        if owners.is_empty() {
            return e;
        }
        tracing::warn!(volume = name, error = %e, "mount refused: the volume is held elsewhere");
        crate::metrics::event("mount_refused");
        Error::HeldElsewhere(crate::lock::in_use_message(name, &owners, waited))
    }

    /// Drops Docker mount `id`'s reference; the last one unmounts and unmaps. An
    /// unknown ID succeeds (Docker retries nothing and may repeat itself). References
    /// left that no container can be using (orphans) do not keep the volume held.
    pub async fn unmount(&self, name: &str, id: &str) -> Result<()> {
        names::validate(name)?;
        let lock = self.locks.get(name);
        let _serialised = lock.lock().await;
        if self.active(name).is_none() {
            tracing::info!(volume = name, id, "unmount: volume is not mounted here");
            return Ok(());
        }
        let (known, remaining, record) = self.update_table(|vols| {
            let rec = vols.get_mut(name).expect("record under the volume lock");
            let known = rec.drop_ref(id);
            (known, rec.total_refs(), rec.clone())
        })?;
        if !known {
            tracing::info!(
                volume = name,
                id,
                "unmount: unknown mount ID; nothing to do"
            );
        }
        if remaining > 0 {
            if self.release_if_orphaned(name, &record).await {
                return Ok(());
            }
            tracing::info!(
                volume = name,
                id,
                refs = remaining,
                "unmount: still referenced"
            );
            return Ok(());
        }
        // Last reference: the record (with no references) stays until the teardown
        // succeeds, so a crash or a busy filesystem is retried, not forgotten.
        self.attacher.detach(name, &record).await?;
        self.update_table(|vols| vols.remove(name))?;
        Ok(())
    }
}
