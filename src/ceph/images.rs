//! Volume operations on the cluster, in terms of RBD images: describe, list, create
//! with metadata, and the in-use checks that guard removal. Runs on a blocking thread
//! with a borrowed connection (see [`super::Cluster::run`]).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::ceph_err;
use super::sys::{CreateSpec, Errno, ImageStat, Locker, Rados, SnapInfo, Watcher};
use crate::error::{Error, Result};

use crate::volume::key;
pub use crate::volume::META_PREFIX;

/// Everything Get needs to know about one image, read in a handful of calls.
#[derive(Debug, Clone)]
pub struct ImageFacts {
    pub pool: String,
    pub name: String,
    pub stat: ImageStat,
    /// rbdvol's metadata with the prefix stripped (`fstype`, `created-by`, ...).
    pub meta: BTreeMap<String, String>,
    /// Managed exclusive-lock owners (`client.N` and address).
    pub lock_owners: Vec<Locker>,
    pub watchers: Vec<Watcher>,
    pub advisory_locks: Vec<Locker>,
    /// Its snapshots (name, size, time), read from the open image at no extra cost.
    pub snapshots: Vec<SnapInfo>,
}

impl ImageFacts {
    /// Who holds the image, in words, if anyone does.
    pub fn holder(&self) -> Option<String> {
        let owner_host = self.meta.get(key::OWNER_HOST);
        let since = self.meta.get(key::OWNER_SINCE);
        let mut parts = Vec::new();
        if !self.lock_owners.is_empty() {
            let who: Vec<String> = self
                .lock_owners
                .iter()
                .map(|l| format!("{} at {}", l.client, l.addr))
                .collect();
            let mut s = format!("exclusive lock held by {}", who.join(", "));
            if let Some(h) = owner_host {
                s.push_str(&format!(" (host {h}"));
                if let Some(t) = since {
                    s.push_str(&format!(", since {t}"));
                }
                s.push(')');
            }
            parts.push(s);
        }
        if !self.advisory_locks.is_empty() {
            let who: Vec<String> = self
                .advisory_locks
                .iter()
                .map(|l| format!("{} at {} (cookie {:?})", l.client, l.addr, l.cookie))
                .collect();
            parts.push(format!(
                "advisory lock by {}; remove it with `rbd lock rm` if its holder is gone",
                who.join(", ")
            ));
        }
        if parts.is_empty() && !self.watchers.is_empty() {
            let who: Vec<String> = self
                .watchers
                .iter()
                .map(|w| format!("client.{} at {}", w.id, w.addr))
                .collect();
            parts.push(format!(
                "opened by {} (a crashed client's watch expires by itself within the cluster's watch timeout)",
                who.join(", ")
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

fn is_enoent(e: &Errno) -> bool {
    e.0 == libc::ENOENT
}

/// Facts of `name` from the first of `pools` that holds it; `None` if none does.
pub fn describe_in(rados: &Rados, pools: &[String], name: &str) -> Result<Option<ImageFacts>> {
    for pool in pools {
        if let Some(f) = describe(rados, pool, name)? {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// Reads an image's facts; `None` if it does not exist. A read-only open registers no
/// watch, so describing an image never shows up as "in use".
pub fn describe(rados: &Rados, pool: &str, name: &str) -> Result<Option<ImageFacts>> {
    let io = match rados.pool(pool) {
        Ok(io) => io,
        Err(e) if is_enoent(&e) => return Ok(None),
        Err(e) => return Err(ceph_err(format!("opening pool {pool}"), e)),
    };
    let image = match io.open_read_only(name) {
        Ok(i) => i,
        Err(e) if is_enoent(&e) => return Ok(None),
        Err(e) => return Err(ceph_err(format!("opening image {pool}/{name}"), e)),
    };
    let ctx = |what: &str| format!("{what} of {pool}/{name}");
    let stat = image.stat().map_err(|e| ceph_err(ctx("stat"), e))?;
    let meta = image
        .metadata_with_prefix(META_PREFIX)
        .map_err(|e| ceph_err(ctx("reading metadata"), e))?
        .into_iter()
        .map(|(k, v)| (k[META_PREFIX.len()..].to_string(), v))
        .collect();
    let (lock_owners, advisory_locks): (Vec<Locker>, Vec<Locker>) = image
        .lockers()
        .map_err(|e| ceph_err(ctx("listing locks"), e))?
        .into_iter()
        .partition(Locker::is_managed);
    let watchers = image
        .watchers()
        .map_err(|e| ceph_err(ctx("listing watchers"), e))?;
    let snapshots = image
        .snapshots()
        .map_err(|e| ceph_err(ctx("listing snapshots"), e))?;
    Ok(Some(ImageFacts {
        pool: pool.to_string(),
        name: name.to_string(),
        stat,
        meta,
        lock_owners,
        watchers,
        advisory_locks,
        snapshots,
    }))
}

/// All image names in `pool` (one directory listing); a missing pool lists as empty.
pub fn list(rados: &Rados, pool: &str, hint: usize) -> Result<Vec<String>> {
    let io = match rados.pool(pool) {
        Ok(io) => io,
        Err(e) if is_enoent(&e) => {
            tracing::warn!(pool, "configured pool does not exist; listing it as empty");
            return Ok(Vec::new());
        }
        Err(e) => return Err(ceph_err(format!("opening pool {pool}"), e)),
    };
    io.list_images(hint)
        .map_err(|e| ceph_err(format!("listing pool {pool}"), e))
}

/// Outcome of [`create`].
pub enum Created {
    New,
    AlreadyExists,
}

/// Creates the image and writes its metadata. If the metadata cannot be written the
/// fresh, never-used image is deleted again, so a failed Create leaves nothing behind.
pub fn create(
    rados: &Rados,
    pool: &str,
    name: &str,
    spec: &CreateSpec,
    meta: &[(String, String)],
) -> Result<Created> {
    let io = rados
        .pool(pool)
        .map_err(|e| ceph_err(format!("opening pool {pool}"), e))?;
    match io.create_image(name, spec) {
        Ok(()) => {}
        Err(e) if e.0 == libc::EEXIST => return Ok(Created::AlreadyExists),
        Err(e) => return Err(ceph_err(format!("creating image {pool}/{name}"), e)),
    }
    let written = (|| -> std::result::Result<(), Errno> {
        let image = io.open(name)?;
        for (k, v) in meta {
            image.metadata_set(&format!("{META_PREFIX}{k}"), v)?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let undo = io.remove_image(name);
        tracing::error!(pool, name, error = %e.describe(), undo = ?undo, "metadata write failed; removed the new image");
        return Err(ceph_err(format!("writing metadata of {pool}/{name}"), e));
    }
    Ok(Created::New)
}

/// Sets (or with `None`, removes) rbdvol metadata keys on an image.
pub fn set_meta(
    rados: &Rados,
    pool: &str,
    name: &str,
    pairs: &[(&str, Option<String>)],
) -> Result<()> {
    let io = rados
        .pool(pool)
        .map_err(|e| ceph_err(format!("opening pool {pool}"), e))?;
    let image = io
        .open(name)
        .map_err(|e| ceph_err(format!("opening image {pool}/{name}"), e))?;
    for (k, v) in pairs {
        let key = format!("{META_PREFIX}{k}");
        let r = match v {
            Some(v) => image.metadata_set(&key, v),
            None => image.metadata_remove(&key),
        };
        r.map_err(|e| ceph_err(format!("writing metadata {key} of {pool}/{name}"), e))?;
    }
    Ok(())
}

/// What Remove does once the image is known to be idle.
#[derive(Debug, Clone, Copy)]
pub enum Disposal {
    Trash(Duration),
    Delete,
}

/// Trashes or deletes an idle image, searching `pools` in order. Refuses while anyone
/// holds it; an image that is already gone counts as removed.
pub fn remove(rados: &Rados, pools: &[String], name: &str, how: Disposal) -> Result<()> {
    // Describing the image is also the search for its pool.
    let Some(facts) = describe_in(rados, pools, name)? else {
        return Ok(());
    };
    let pool = facts.pool.as_str();
    if let Some(holder) = facts.holder() {
        return Err(Error::InUse {
            name: name.to_string(),
            holder: format!("{holder}; it can be removed once it is unmounted everywhere"),
        });
    }
    // Refused while clones depend on its snapshots. Otherwise the snapshots go with
    // it: into the trash (restored with it), or deleted first.
    super::snapshots::release_all(rados, pool, name, matches!(how, Disposal::Delete))?;
    let io = rados
        .pool(pool)
        .map_err(|e| ceph_err(format!("opening pool {pool}"), e))?;
    let r = match how {
        Disposal::Trash(deferment) => io.trash_image(name, deferment),
        Disposal::Delete => io.remove_image(name),
    };
    match r {
        Ok(()) => {
            // The small objects beside it go too: the one its holders watched for
            // snapshot and resize requests, and its liveness object
            // (crate::ceph::liveness). Left behind they would only be a few bytes that a
            // future volume of the name reuses.
            for oid in [
                crate::volume::control::object(name),
                super::liveness::object_name(name),
            ] {
                if let Err(e) = io.remove_object(&oid) {
                    tracing::warn!(pool, object = %oid, error = %e.describe(), "could not remove an object beside the removed volume; it is small and harmless");
                }
            }
            Ok(())
        }
        Err(e) if is_enoent(&e) => Ok(()),
        // Someone opened it between the check and the removal: the cluster refused.
        Err(e) if e.0 == libc::EBUSY => Err(Error::InUse {
            name: name.to_string(),
            holder: "it was opened by another client while being removed; try again once it is unmounted".into(),
        }),
        Err(e) => Err(ceph_err(format!("removing image {pool}/{name}"), e)),
    }
}

/// Whether the image holds any written data at all (see `Image::has_allocated_data`).
pub fn has_data(rados: &Rados, pool: &str, name: &str) -> Result<bool> {
    let io = rados
        .pool(pool)
        .map_err(|e| ceph_err(format!("opening pool {pool}"), e))?;
    let image = io
        .open_read_only(name)
        .map_err(|e| ceph_err(format!("opening image {pool}/{name}"), e))?;
    image
        .has_allocated_data()
        .map_err(|e| ceph_err(format!("reading the allocation map of {pool}/{name}"), e))
}

/// Removes `addr` from the OSD blocklist. Only for a client instance that is gone for
/// good (its process exited): the entry then protects nothing.
pub fn unblocklist(rados: &Rados, addr: &str) -> Result<()> {
    let cmd = serde_json::json!({ "prefix": "osd blocklist", "blocklistop": "rm", "addr": addr })
        .to_string();
    rados
        .mon_command(&cmd)
        .map(|_| ())
        .map_err(|(e, status)| Error::Ceph {
            op: format!("removing {addr} from the blocklist"),
            errno: e.0,
            detail: format!("{} {status}", e.describe()),
        })
}

/// Blocklists the client instance `addr` (`IP:PORT/NONCE`) for `expiry`, then reads
/// the entry back and returns until when it really holds.
///
/// The monitor only ever adds entries: for an address already on the blocklist the
/// old expiry stays, even though its reply names the new one (the OSD map applies new
/// entries with `map::insert`; measured on 16.2.15, same in current Ceph). So this must
/// run *before* anyone else blocklists that client, e.g. before a lock break, whose
/// own blocklisting uses the monitor's default expiry (`mon_osd_blocklist_default_expire`,
/// 1 hour). The expiry is sent as a JSON float: 16.2.15 refuses an integer or a string
/// with EINVAL.
pub fn blocklist(rados: &Rados, addr: &str, expiry: Duration) -> Result<SystemTime> {
    let cmd = serde_json::json!({
        "prefix": "osd blocklist",
        "blocklistop": "add",
        "addr": addr,
        "expire": expiry.as_secs_f64().max(1.0),
    })
    .to_string();
    rados.mon_command(&cmd).map_err(|(e, status)| Error::Ceph {
        op: format!("blocklisting {addr}"),
        errno: e.0,
        detail: format!("{} {status}", e.describe()),
    })?;
    match blocklisted_until(rados, addr)? {
        Some(until) => Ok(until),
        None => Err(Error::Ceph {
            op: format!("blocklisting {addr}"),
            errno: libc::ENOENT,
            detail: "the monitor accepted the entry but `osd blocklist ls` does not show it".into(),
        }),
    }
}

/// Until when `addr` is on the OSD blocklist, if it is (`osd blocklist ls`, which
/// `profile rbd` allows).
pub fn blocklisted_until(rados: &Rados, addr: &str) -> Result<Option<SystemTime>> {
    let cmd = serde_json::json!({ "prefix": "osd blocklist ls", "format": "json" }).to_string();
    let (out, _) = rados.mon_command(&cmd).map_err(|(e, status)| Error::Ceph {
        op: "listing the OSD blocklist".into(),
        errno: e.0,
        detail: format!("{} {status}", e.describe()),
    })?;
    Ok(parse_blocklist(&out)
        .into_iter()
        .find(|(a, _)| same_client(a, addr))
        .and_then(|(_, until)| until))
}

/// `osd blocklist ls` JSON: the address entries, then (16.2.8+) a second array with
/// the CIDR ranges, concatenated. Only the first is read.
fn parse_blocklist(out: &str) -> Vec<(String, Option<SystemTime>)> {
    let first = serde_json::Deserializer::from_str(out)
        .into_iter::<serde_json::Value>()
        .next()
        .and_then(|v| v.ok());
    first
        .as_ref()
        .and_then(|v| v.as_array())
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| {
                    let addr = e["addr"].as_str()?.to_string();
                    Some((addr, e["until"].as_str().and_then(parse_ceph_time)))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether two spellings of a client address name the same instance (`v2:` prefixes
/// and brackets aside).
pub fn same_client(a: &str, b: &str) -> bool {
    fn bare(s: &str) -> &str {
        let s = s.trim().trim_start_matches('[').trim_end_matches(']');
        ["v2:", "v1:", "any:"]
            .iter()
            .find_map(|p| s.strip_prefix(p))
            .unwrap_or(s)
    }
    bare(a) == bare(b)
}

/// Ceph's `2027-12-02T02:34:16.214411+0000` (utime_t, with a numeric UTC offset).
fn parse_ceph_time(s: &str) -> Option<SystemTime> {
    let (main, offset) = match s.rfind(['+', '-']) {
        Some(i) if i > 10 => (&s[..i], &s[i..]),
        _ => (s.trim_end_matches('Z'), "+0000"),
    };
    let local = humantime::parse_rfc3339_weak(&format!("{main}Z")).ok()?;
    let digits = offset.get(1..)?.replace(':', "");
    let (h, m): (u64, u64) = (
        digits.get(..2)?.parse().ok()?,
        digits.get(2..4)?.parse().ok()?,
    );
    let shift = Duration::from_secs(h * 3600 + m * 60);
    // local = utc + offset, so utc = local - offset.
    if offset.starts_with('+') {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocklist_listing_is_parsed_with_its_range_array_and_offsets() {
        let out = r#"[{"addr":"10.0.0.2:0/123","until":"2027-12-02T02:34:16.214411+0000"},{"addr":"10.0.0.3:0/9","until":"2026-12-02T04:34:12.5+0200"}][]"#;
        let entries = parse_blocklist(out);
        assert_eq!(entries.len(), 2);
        let t = |s: &str| humantime::parse_rfc3339_weak(s).unwrap();
        assert_eq!(entries[0].1, Some(t("2027-12-02T02:34:16.214411Z")));
        assert_eq!(entries[1].1, Some(t("2026-12-02T02:34:12.5Z")));
        assert!(parse_blocklist("").is_empty());
        assert!(parse_blocklist("[][]").is_empty());
    }

    #[test]
    fn client_addresses_compare_without_their_protocol_prefix() {
        assert!(same_client("10.0.0.2:0/123", "v2:10.0.0.2:0/123"));
        assert!(same_client("[any:10.0.0.2:0/123]", "10.0.0.2:0/123"));
        assert!(!same_client("10.0.0.2:0/123", "10.0.0.2:0/1234"));
    }
}
