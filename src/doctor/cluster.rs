//! Doctor's cluster checks: the keyring, reaching the monitors, the cephx caps, each
//! pool, and who holds what. One short-lived librados connection, like `rbdvol lock ls`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Check;
use crate::ceph::{self, images, Rados};
use crate::config::Settings;

/// `key = value` from a ceph.conf, in any section; Ceph treats spaces and underscores
/// in key names alike.
pub fn conf_value(conf: &str, key: &str) -> Option<String> {
    let want = key.replace(' ', "_");
    conf.lines().find_map(|l| {
        let l = l.trim();
        if l.starts_with('#') || l.starts_with(';') {
            return None;
        }
        let (k, v) = l.split_once('=')?;
        (k.trim().replace(' ', "_") == want).then(|| v.trim().to_string())
    })
}

/// The keyring librados will use: the configured one, or the ceph.conf's (with
/// `$cluster` and `$name` expanded). `None`: Ceph's default search path.
pub fn keyring_path(settings: &Settings, conf: &str) -> Option<PathBuf> {
    if let Some(k) = &settings.ceph.keyring {
        return Some(k.clone());
    }
    let raw = conf_value(conf, "keyring")?;
    let first = raw.split(',').next()?.trim().to_string();
    Some(PathBuf::from(
        first
            .replace("$cluster", &settings.ceph.cluster)
            .replace("$name", &format!("client.{}", settings.ceph.client_id)),
    ))
}

/// The verdict on a keyring file: readable, private, and holding the user's key. Its
/// contents are only searched for the section header, never shown.
pub fn keyring_verdict(path: &Path, read: std::io::Result<(u32, String)>, entity: &str) -> Check {
    let shown = path.display();
    let name = "cluster: keyring";
    match read {
        Err(e) => Check::fail(
            name,
            format!("cannot read keyring {shown}: {e}"),
            format!("set ceph.keyring (or keyring = in the ceph.conf) to the keyring of {entity}, e.g. `ceph auth get {entity} -o {shown}`"),
        ),
        Ok((mode, _)) if mode & 0o004 != 0 => Check::fail(
            name,
            format!("keyring {shown} is world-readable (mode {:o}): any local user can act on the cluster as {entity}", mode & 0o7777),
            format!("chmod 600 {shown}"),
        ),
        Ok((_, text)) if !text.contains(&format!("[{entity}]")) => Check::fail(
            name,
            format!("keyring {shown} has no key for {entity}"),
            format!("`ceph auth get {entity} -o {shown}`, or set ceph.client_id to the user this keyring is for"),
        ),
        Ok(_) => Check::ok(name, format!("{shown} is readable by root only and holds {entity}'s key")),
    }
}

fn keyring_check(settings: &Settings, conf: &str) -> Check {
    use std::os::unix::fs::PermissionsExt;
    let entity = format!("client.{}", settings.ceph.client_id);
    let Some(path) = keyring_path(settings, conf) else {
        return Check::warn(
            "cluster: keyring",
            "no keyring is named; librados searches /etc/ceph/$cluster.$name.keyring and /etc/ceph/keyring",
            "name it: ceph.keyring in the rbdvol config, or keyring = in the ceph.conf",
        );
    };
    let read = std::fs::metadata(&path)
        .and_then(|m| Ok((m.permissions().mode(), std::fs::read_to_string(&path)?)));
    keyring_verdict(&path, read, &entity)
}

/// Whether cephx caps let rbdvol create images in `pool`, take their exclusive locks
/// (OSD read/write/class calls) and blocklist displaced owners (a monitor command).
/// `Err` names what is missing.
pub fn caps_verdict(mon: &str, osd: &str, pool: &str) -> Result<(), String> {
    let grants = |caps: &str| -> Vec<String> {
        caps.split(',')
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect()
    };
    let mon_ok = grants(mon).iter().any(|g| {
        let g = g.replace('"', "");
        matches!(g.as_str(), "allow *" | "allow all" | "profile rbd")
            || g.contains("osd blocklist")
            || g.contains("osd blacklist")
    });
    let osd_ok = grants(osd).iter().any(|g| {
        let (what, restriction) = match g.split_once(" pool=").or_else(|| g.split_once(" pool ")) {
            Some((w, p)) => (w.trim(), Some(p.trim().trim_matches('"'))),
            None => (g.as_str(), None),
        };
        let broad = matches!(what, "allow *" | "allow all" | "allow rwx" | "profile rbd");
        broad && restriction.is_none_or(|p| p == pool)
    });
    match (mon_ok, osd_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(format!("mon caps {mon:?} do not allow `osd blocklist` (needed to fence a displaced owner)")),
        (_, false) => Err(format!("osd caps {osd:?} do not allow create and lock in pool {pool} (need `profile rbd` or `allow rwx` for it)")),
    }
}

/// The caps of `entity` from `auth get`'s JSON (the key in it is dropped unread).
pub fn parse_caps(json: &str, entity: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(json).ok()?;
    let e = v.as_array()?.iter().find(|e| e["entity"] == entity)?;
    let cap = |k: &str| e["caps"][k].as_str().unwrap_or("").to_string();
    Some((cap("mon"), cap("osd")))
}

fn caps_checks(rados: &Rados, settings: &Settings) -> Vec<Check> {
    let entity = format!("client.{}", settings.ceph.client_id);
    let cmd = serde_json::json!({"prefix": "auth get", "entity": entity, "format": "json"});
    let caps = match rados.mon_command(&cmd.to_string()) {
        Ok((out, _)) => parse_caps(&out, &entity),
        Err(_) => None,
    };
    let Some((mon, osd)) = caps else {
        return vec![Check::warn(
            "cluster: caps",
            format!("could not read the caps of {entity} (it may not be allowed `auth get`)"),
            format!("check with an admin: `ceph auth get {entity}` should show mon 'profile rbd' and osd 'profile rbd pool=POOL' for each pool"),
        )];
    };
    settings
        .ceph
        .pools
        .iter()
        .map(|pool| match caps_verdict(&mon, &osd, pool) {
            Ok(()) => Check::ok(format!("cluster: caps for pool {pool}"), format!("{entity} may create, lock and blocklist")),
            Err(why) => Check::fail(
                format!("cluster: caps for pool {pool}"),
                why,
                format!("ceph auth caps {entity} mon 'profile rbd' osd 'profile rbd pool={pool}' (list every pool)"),
            ),
        })
        .collect()
}

/// The verdict on one pool from `osd pool application get`: `Ok(json)` or the errno.
pub fn pool_verdict(pool: &str, answer: Result<String, i32>) -> Check {
    let name = format!("cluster: pool {pool}");
    match answer {
        Err(libc::ENOENT) => Check::fail(
            name,
            format!("pool {pool} does not exist"),
            format!(
                "ceph osd pool create {pool} && rbd pool init {pool}, or remove it from ceph.pools"
            ),
        ),
        Err(e) => Check::warn(
            name,
            format!(
                "could not read pool {pool}'s applications: {}",
                ceph::Errno(e).describe()
            ),
            format!("check with an admin: ceph osd pool application get {pool}"),
        ),
        Ok(json) => {
            let apps: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
            if apps.get("rbd").is_some() {
                Check::ok(name, "exists, rbd application enabled")
            } else {
                Check::fail(
                    name,
                    format!("pool {pool} does not have the rbd application enabled"),
                    format!("rbd pool init {pool}"),
                )
            }
        }
    }
}

fn pool_checks(rados: &Rados, settings: &Settings) -> Vec<Check> {
    settings
        .ceph
        .pools
        .iter()
        .map(|pool| {
            let cmd = serde_json::json!({"prefix": "osd pool application get", "pool": pool, "format": "json"});
            let answer = rados.mon_command(&cmd.to_string()).map(|(o, _)| o).map_err(|(e, _)| e.0);
            pool_verdict(pool, answer)
        })
        .collect()
}

/// The IP part of a Ceph address (`v2:10.0.0.1:3300/123`, `10.0.0.1:0/456`).
pub fn addr_ip(addr: &str) -> &str {
    let a = addr.trim_start_matches("v2:").trim_start_matches("v1:");
    let a = a.split('/').next().unwrap_or(a);
    a.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(a)
}

/// Blocklist entries (from `osd blocklist ls` JSON) naming this client's IP.
pub fn blocklisted_here(json: &str, my_addr: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    let ip = addr_ip(my_addr);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["addr"].as_str())
                .filter(|a| addr_ip(a) == ip)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn ownership_checks(rados: &Rados, settings: &Settings) -> Vec<Check> {
    let host = settings.effective_host_id();
    let mut here = Vec::new();
    let mut dead: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pool in &settings.ceph.pools {
        let Ok(names) = images::list(rados, pool, 256) else {
            continue;
        };
        for name in names {
            let Ok(Some(facts)) = images::describe(rados, pool, &name) else {
                continue;
            };
            for o in crate::lock::owners(&facts) {
                if o.host.as_deref() == Some(host.as_str()) {
                    here.push(format!("{pool}/{name}"));
                }
                // A live owner watches its image header; an owner with no watch is
                // dead or cut off, and the next Mount elsewhere will fence it.
                if !facts
                    .watchers
                    .iter()
                    .any(|w| addr_ip(&w.addr) == addr_ip(&o.addr))
                {
                    dead.entry(o.host.clone().unwrap_or(o.addr.clone()))
                        .or_default()
                        .push(format!("{pool}/{name}"));
                }
            }
        }
    }
    let mut checks = vec![Check::ok(
        "ownership: held by this host",
        if here.is_empty() {
            format!("no volume is held by {host}")
        } else {
            format!("{host} holds {}", here.join(", "))
        },
    )];
    checks.push(if dead.is_empty() {
        Check::ok("ownership: dead holders", "no volume is held by a host whose lock looks dead")
    } else {
        let who: Vec<String> = dead.iter().map(|(h, v)| format!("{h}: {}", v.join(", "))).collect();
        Check::warn(
            "ownership: dead holders",
            format!("locks whose holder no longer watches the image: {}", who.join("; ")),
            "a Mount elsewhere takes them over (fencing the holder); to free one now: rbdvol lock break VOLUME",
        )
    });
    let me = rados.addrs().unwrap_or_default();
    let cmd = r#"{"prefix": "osd blocklist ls", "format": "json"}"#;
    checks.push(match rados.mon_command(cmd) {
        Ok((out, _)) => {
            let mine = blocklisted_here(&out, &me);
            if mine.is_empty() {
                Check::ok("ownership: blocklist", format!("no blocklist entry for this host ({})", addr_ip(&me)))
            } else {
                Check::warn(
                    "ownership: blocklist",
                    format!("{} blocklist entries name this host: {} (clients of volumes taken from it)", mine.len(), mine.join(", ")),
                    "rbdvol removes them once the fenced exporters exit; an entry for a client that is gone can be removed with `ceph osd blocklist rm ADDR`",
                )
            }
        }
        Err((e, _)) => Check::warn("ownership: blocklist", format!("could not list the blocklist: {}", e.describe()), "give the cephx user mon 'profile rbd'"),
    });
    checks
}

pub async fn checks(settings: &Settings) -> Vec<Check> {
    let conf_text = std::fs::read_to_string(&settings.ceph.conf).unwrap_or_default();
    let mut checks = vec![keyring_check(settings, &conf_text)];
    let spec = ceph::connect_spec(&settings.ceph);
    let s = settings.clone();
    let connected = tokio::task::spawn_blocking(move || {
        let rados = Rados::connect(&spec)?;
        let mut more = caps_checks(&rados, &s);
        more.extend(pool_checks(&rados, &s));
        more.extend(ownership_checks(&rados, &s));
        Ok::<_, (String, ceph::Errno)>(more)
    })
    .await;
    let mons = conf_value(&conf_text, "mon_host").unwrap_or_else(|| "(no mon_host)".into());
    match connected {
        Ok(Ok(more)) => {
            checks.push(Check::ok("cluster: reachable", format!("connected to {mons} as client.{}", settings.ceph.client_id)));
            checks.extend(more);
        }
        Ok(Err((step, e))) => checks.push(Check::fail(
            "cluster: reachable",
            format!("cannot connect to the cluster ({mons}, {}): {step}: {}", settings.ceph.conf.display(), e.describe()),
            format!("check that the monitors in {} are up and reachable from this host (ports 3300 and 6789), and the keyring and client_id match; the cluster, pool and ownership checks were skipped", settings.ceph.conf.display()),
        )),
        Err(e) => checks.push(Check::fail("cluster: reachable", format!("the connection attempt crashed: {e}"), "report this")),
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_values_and_the_keyring_path() {
        let conf = "[global]\nmon host = v2:10.0.0.1:3300\n# keyring = /no\nkeyring = /etc/ceph/$cluster.$name.keyring\n";
        assert_eq!(
            conf_value(conf, "mon_host").as_deref(),
            Some("v2:10.0.0.1:3300")
        );
        let s = Settings::default();
        assert_eq!(
            keyring_path(&s, conf),
            Some(PathBuf::from("/etc/ceph/ceph.client.admin.keyring"))
        );
        assert_eq!(keyring_path(&s, "[global]\n"), None);
    }

    #[test]
    fn keyring_verdicts() {
        let p = Path::new("/k");
        let e = "client.admin";
        let good = "[client.admin]\n\tkey = AQ==\n".to_string();
        assert_eq!(
            keyring_verdict(p, Ok((0o100600, good.clone())), e).status,
            super::super::Status::Ok
        );
        let c = keyring_verdict(p, Ok((0o100644, good)), e);
        assert!(c.fix.contains("chmod 600"), "{c:?}");
        assert!(!c.detail.contains("AQ=="), "contents never shown");
        let c = keyring_verdict(p, Ok((0o100600, "[client.other]\n".into())), e);
        assert!(c.detail.contains("no key for client.admin"), "{c:?}");
        let c = keyring_verdict(p, Err(std::io::Error::from_raw_os_error(libc::ENOENT)), e);
        assert_eq!(c.status, super::super::Status::Fail);
    }

    #[test]
    fn caps_verdicts() {
        assert!(caps_verdict("allow *", "allow *", "rbd").is_ok());
        assert!(caps_verdict(
            "profile rbd",
            "profile rbd pool=fast, profile rbd pool=bulk",
            "bulk"
        )
        .is_ok());
        assert!(caps_verdict("profile rbd", "profile rbd pool=fast", "bulk")
            .unwrap_err()
            .contains("pool bulk"));
        assert!(caps_verdict("allow r", "allow *", "rbd")
            .unwrap_err()
            .contains("blocklist"));
        assert!(caps_verdict(
            "allow r, allow command \"osd blocklist\"",
            "allow rwx pool=rbd",
            "rbd"
        )
        .is_ok());
        assert!(caps_verdict("profile rbd", "allow r", "rbd").is_err());
        let json = r#"[{"entity":"client.admin","key":"SECRET","caps":{"mon":"allow *","osd":"allow *"}}]"#;
        assert_eq!(
            parse_caps(json, "client.admin"),
            Some(("allow *".into(), "allow *".into()))
        );
    }

    #[test]
    fn pool_verdicts() {
        use super::super::Status;
        assert_eq!(
            pool_verdict("p", Ok(r#"{"rbd":{}}"#.into())).status,
            Status::Ok
        );
        let c = pool_verdict("p", Ok("{}".into()));
        assert_eq!(
            (c.status, c.fix.as_str()),
            (Status::Fail, "rbd pool init p")
        );
        assert!(pool_verdict("p", Err(libc::ENOENT))
            .detail
            .contains("does not exist"));
        assert_eq!(pool_verdict("p", Err(libc::EACCES)).status, Status::Warn);
    }

    #[test]
    fn blocklist_entries_of_this_host() {
        let json =
            r#"[{"addr":"10.0.0.5:0/1234","until":"x"},{"addr":"10.0.0.6:0/9","until":"y"}]"#;
        assert_eq!(
            blocklisted_here(json, "10.0.0.5:0/777"),
            vec!["10.0.0.5:0/1234"]
        );
        assert_eq!(addr_ip("v2:10.0.0.1:3300/0"), "10.0.0.1");
    }
}
