//! Ownership of volumes across hosts. Enforcement is Ceph's: the mapper holds the
//! image's exclusive lock on its own client instance, a live owner refuses others, and
//! a dead owner is blocklisted by whoever takes the lock next. This module says who
//! holds a volume, in words, and implements the operator's commands: list holders, and
//! break a lock (librbd blocklists the holder before breaking, so it is fenced).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::ceph::images::{self, ImageFacts};
use crate::ceph::{ceph_err, sys::Rados};
use crate::error::{Error, Result};
use crate::volume::key;

/// One holder of a volume's exclusive lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub client: String,
    pub addr: String,
    /// From the owner record the holder wrote (`rbdvol.owner.*`), when it matches.
    pub host: Option<String>,
    pub since: Option<String>,
}

/// The lock owners of an image, joined with the owner record when it names the same
/// client (a stale record from a dead owner is not attributed to a new one).
pub fn owners(facts: &ImageFacts) -> Vec<Owner> {
    owners_from(&facts.lock_owners, &facts.meta)
}

fn owners_from(
    lockers: &[crate::ceph::sys::Locker],
    meta: &BTreeMap<String, String>,
) -> Vec<Owner> {
    lockers
        .iter()
        .map(|l| {
            let recorded = meta.get(key::OWNER_ADDR) == Some(&l.addr);
            Owner {
                client: l.client.clone(),
                addr: l.addr.clone(),
                host: meta.get(key::OWNER_HOST).filter(|_| recorded).cloned(),
                since: meta.get(key::OWNER_SINCE).filter(|_| recorded).cloned(),
            }
        })
        .collect()
}

impl Owner {
    pub fn describe(&self) -> String {
        let mut s = match &self.host {
            Some(h) => format!("host {h} ({} at {})", self.client, self.addr),
            None => format!("{} at {} (no rbdvol owner record)", self.client, self.addr),
        };
        if let Some(t) = &self.since {
            s.push_str(&format!(" since {t}"));
        }
        s
    }
}

/// The error a Mount gets while another host holds the volume: who, since when, and
/// what happens next.
pub fn in_use_message(volume: &str, owners: &[Owner], waited: Duration) -> String {
    let who: Vec<String> = owners.iter().map(Owner::describe).collect();
    let host = owners
        .iter()
        .find_map(|o| o.host.clone())
        .unwrap_or_else(|| "that host".into());
    format!(
        "volume {volume} is in use on {}; waited {}s for it. It is released when {host} stops its containers using it; if {host} is down or cut off, the next Mount declares it dead once its liveness watch times out (lock.liveness_timeout, 5 s by default; for a holder without one, an older rbdvol or a kernel mapping, once its watch on the image times out, osd_client_watch_timeout, 30 s by default) and takes the volume over, fencing {host} first. To force it now: rbdvol lock break {volume}",
        who.join(", "),
        waited.as_secs()
    )
}

/// A row of `rbdvol lock ls`.
#[derive(Debug, Clone)]
pub struct LockRow {
    pub pool: String,
    pub volume: String,
    pub kind: &'static str,
    pub holder: String,
}

/// Every lock on every volume in `pools` (one open per image: an operator command).
pub fn list(rados: &Rados, pools: &[String]) -> Result<Vec<LockRow>> {
    let mut rows = Vec::new();
    for pool in pools {
        for name in images::list(rados, pool, 1024)? {
            let Some(facts) = images::describe(rados, pool, &name)? else {
                continue;
            };
            for o in owners(&facts) {
                rows.push(LockRow {
                    pool: pool.clone(),
                    volume: name.clone(),
                    kind: "exclusive",
                    holder: o.describe(),
                });
            }
            for l in &facts.advisory_locks {
                rows.push(LockRow {
                    pool: pool.clone(),
                    volume: name.clone(),
                    kind: "advisory",
                    holder: format!("{} at {} (cookie {:?})", l.client, l.addr, l.cookie),
                });
            }
        }
    }
    Ok(rows)
}

/// Blocklists a lock owner that is being displaced (declared dead, or broken by the
/// operator) for `expiry`, before anything else blocklists it. Fencing must outlive the
/// fenced client: an exporter waits for the cluster forever (`rados_osd_op_timeout=0`),
/// so a host cut off for longer than the blocklist entry would land its queued writes
/// once the entry expired. The entry is removed early only when the fenced client is
/// known to have exited (the daemon of its host does that on unmount).
///
/// Returns whether the client is fenced for the whole `expiry`. Failing is logged at
/// ERROR but not fatal: librbd's own blocklisting still fences it, for the monitor's
/// default expiry only.
pub fn fence_owner(rados: &Rados, addr: &str, expiry: Duration) -> bool {
    let wanted = SystemTime::now() + expiry;
    match images::blocklist(rados, addr, expiry) {
        // A minute of slack for clock skew between this host and the monitor.
        Ok(until) if until + Duration::from_secs(60) >= wanted => {
            tracing::info!(client = addr, until = %humantime::format_rfc3339_seconds(until), "fenced the previous lock owner: blocklisted until it is known to have exited");
            true
        }
        Ok(until) => {
            tracing::error!(
                client = addr,
                until = %humantime::format_rfc3339_seconds(until),
                wanted = %humantime::format_rfc3339_seconds(wanted),
                "the previous lock owner was already on the blocklist with an earlier expiry, which the monitor keeps: \
                 it is fenced only until then. If it is cut off and comes back later, its queued writes land on this \
                 volume. Keep it fenced with `ceph osd blocklist rm ADDR` followed at once by \
                 `ceph osd blocklist add ADDR SECONDS` while it is still cut off, or stop it"
            );
            false
        }
        Err(e) => {
            tracing::error!(
                client = addr,
                error = %e,
                "could not blocklist the previous lock owner for lock.fence_expiry: it is fenced only by librbd's \
                 own blocklisting, which lasts the monitor's default expiry (mon_osd_blocklist_default_expire, \
                 1 hour by default). If it is cut off for longer and then comes back, its queued writes land on \
                 this volume. Check this client's cephx caps (`profile rbd` allows `osd blocklist add`)"
            );
            false
        }
    }
}

/// Breaks the exclusive lock on `volume`. Each holder's client instance is blocklisted
/// first, for `fence_expiry` ([`fence_owner`]), and librbd's break blocklists it again
/// (a no-op then), so the holder can never write to the volume again; only then is the
/// lock gone. Returns what was done, in words.
pub fn break_lock(
    rados: &Rados,
    pools: &[String],
    volume: &str,
    fence_expiry: Duration,
) -> Result<String> {
    let facts = images::describe_in(rados, pools, volume)?
        .ok_or_else(|| Error::NotFound(volume.to_string()))?;
    let pool = facts.pool.clone();
    if let Some(l) = facts.advisory_locks.first() {
        return Err(Error::NotSupported(format!(
            "volume {volume} has an advisory lock by {} at {} (cookie {:?}), which rbdvol never takes; remove it with `rbd lock rm {pool}/{volume} {:?} {}`",
            l.client, l.addr, l.cookie, l.cookie, l.client
        )));
    }
    let holders = owners(&facts);
    if holders.is_empty() {
        return Ok(format!(
            "volume {volume} is not locked by anyone; nothing to break"
        ));
    }
    let io = rados
        .pool(&pool)
        .map_err(|e| ceph_err(format!("opening pool {pool}"), e))?;
    let image = io
        .open(volume)
        .map_err(|e| ceph_err(format!("opening image {pool}/{volume}"), e))?;
    let mut done = Vec::new();
    let mut short = Vec::new();
    for o in &holders {
        if !fence_owner(rados, &o.addr, fence_expiry) {
            short.push(o.addr.clone());
        }
        match image.lock_break(&o.addr) {
            Ok(()) => done.push(o.describe()),
            // Released meanwhile: nothing left to break.
            Err(e) if e.0 == libc::ENOENT => {}
            Err(e) => {
                return Err(ceph_err(
                    format!(
                        "breaking the lock of {pool}/{volume} held by {}",
                        o.describe()
                    ),
                    e,
                ))
            }
        }
    }
    for k in key::OWNER {
        let _ = image.metadata_remove(&crate::volume::full_key(k));
    }
    let mut msg = format!(
        "broke the exclusive lock of {pool}/{volume} held by {}; that client was blocklisted first, so it can no longer write to this volume (its other volumes are unaffected: each mapping has its own client). The volume can now be mounted on another host.",
        done.join(", ")
    );
    if !short.is_empty() {
        msg.push_str(&format!(
            " WARNING: {} could not be blocklisted for {} (see the log above); it is fenced only for the monitor's default blocklist expiry.",
            short.join(", "),
            humantime::format_duration(fence_expiry)
        ));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceph::sys::Locker;

    fn locker(addr: &str) -> Locker {
        Locker {
            client: "client.4721".into(),
            cookie: "auto 1".into(),
            addr: addr.into(),
        }
    }

    #[test]
    fn the_owner_record_names_the_host_only_when_it_matches_the_lock() {
        let meta: BTreeMap<String, String> = [
            ("owner.host", "host-a"),
            ("owner.addr", "10.0.0.2:0/1"),
            ("owner.since", "2026-11-23T12:03:00Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let o = owners_from(&[locker("10.0.0.2:0/1")], &meta);
        assert_eq!(o[0].host.as_deref(), Some("host-a"));
        assert_eq!(
            o[0].describe(),
            "host host-a (client.4721 at 10.0.0.2:0/1) since 2026-11-23T12:03:00Z"
        );
        // A stale record (a dead owner's) is not attributed to the new holder.
        let o = owners_from(&[locker("10.0.0.3:0/9")], &meta);
        assert_eq!(o[0].host, None);
        assert!(o[0].describe().contains("no rbdvol owner record"));
    }

    #[test]
    fn the_in_use_message_says_who_and_what_next() {
        let o = Owner {
            client: "client.4721".into(),
            addr: "10.0.0.2:0/1".into(),
            host: Some("host-a".into()),
            since: Some("12:03".into()),
        };
        let m = in_use_message("pg-data", &[o], Duration::from_secs(60));
        for part in [
            "volume pg-data is in use on host host-a (client.4721 at 10.0.0.2:0/1) since 12:03",
            "released when host-a stops",
            "watch times out",
            "rbdvol lock break pg-data",
        ] {
            assert!(m.contains(part), "{m}\nlacks: {part}");
        }
    }
}
