//! Takeover in seconds without changing Ceph's settings. Each test brings up its own
//! throwaway cluster with Ceph's default `osd_client_watch_timeout` (30 s; the shared
//! test cluster lowers it to 5 s, which would hide the difference):
//! - a dead host's volume is taken over long before that timeout, and the dead
//!   owner is blocklisted (for lock.fence_expiry) before the lock changes hands;
//! - a daemon restart on a live host (the daemon killed, its exporters running) never
//!   lets another host take the volume, however long the daemon stays down;
//! - an owner that published no liveness watch (an older rbdvol) is not taken over
//!   before its header watch times out, even with a stale record of an earlier owner.
//!
//! Hosts are daemon instances on this machine, each with its own client instances.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;

/// A cluster with Ceph's default watch timeout, torn down when dropped.
struct DefaultCluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl DefaultCluster {
    fn up() -> DefaultCluster {
        let dir = tempfile::Builder::new()
            .prefix("rbdvol-tk30-")
            .tempdir()
            .unwrap()
            .keep();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration");
        let out = Command::new("timeout")
            .args(["-k", "5", "180"])
            .arg(script.join("ceph-up"))
            .arg(&dir)
            .args(["--pool", "fast"])
            .output()
            .unwrap();
        let mut c = DefaultCluster {
            dir,
            conf: PathBuf::new(),
        };
        assert!(
            out.status.success(),
            "ceph-up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.conf = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // The point of these tests: the cluster's watch timeout is Ceph's default.
        let v = c.ceph(&["tell", "osd.0", "config", "get", "osd_client_watch_timeout"]);
        assert!(v.contains("\"30\""), "osd_client_watch_timeout: {v}");
        c
    }

    fn ceph(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["-k", "5", "60", "ceph", "-c"])
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ceph {args:?}: {text}");
        text
    }

    /// Until when `addr` is on the blocklist.
    fn blocklisted_until(&self, addr: &str) -> Option<SystemTime> {
        self.ceph(&["osd", "blocklist", "ls"])
            .lines()
            .find_map(|l| {
                let (a, until) = l.split_once(' ')?;
                (a == addr).then(|| {
                    humantime::parse_rfc3339_weak(&format!("{}Z", until.get(..19)?)).ok()
                })?
            })
    }

    /// Client names holding a lock on `rbd/<name>`.
    fn lockers(&self, name: &str) -> Vec<String> {
        let out = Command::new("timeout")
            .args(["-k", "5", "60", "rbd", "-c"])
            .arg(&self.conf)
            .args(["lock", "ls", &format!("rbd/{name}"), "--format", "json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["locker"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Whether object `oid` exists in pool rbd.
    fn rados_stat(&self, oid: &str) -> bool {
        Command::new("timeout")
            .args(["-k", "5", "60", "rados", "-c"])
            .arg(&self.conf)
            .args(["-p", "rbd", "stat", oid])
            .output()
            .unwrap()
            .status
            .success()
    }

    fn host(&self, name: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start(DaemonOpts {
            host_id: name.to_string(),
            pools: vec!["rbd".into(), "fast".into()],
            ceph_conf: self.conf.clone(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: None,
            mount_root_is_a_mount: false,
            socket: None,
            mount_root_via_symlink: false,
        })
    }
}

impl Drop for DefaultCluster {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["-k", "5", "120"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/ceph-down"))
            .arg(&self.dir)
            .output();
    }
}

const TAKEOVER_WAIT: &str = "RBDVOL_LOCK__TAKEOVER_WAIT";

fn kill(pid: i64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn exporter_log(d: &Daemon, name: &str) -> String {
    std::fs::read_to_string(
        d.state_dir()
            .join(format!("exports/rbd/{name}/exporter.log")),
    )
    .unwrap_or_default()
}

#[test]
fn a_dead_hosts_volume_is_taken_over_long_before_the_clusters_watch_timeout() {
    let c = DefaultCluster::up();
    let mut a = c.host("host-a", &[]);
    let b = c.host("host-b", &[(TAKEOVER_WAIT, "60s")]);
    let name = unique("tk-dead");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    write_synced(&mp.join("acked"), b"acknowledged before the crash");
    let st = a.exporter_state(&name);
    let a_addr = st["addr"].as_str().unwrap().to_string();

    // The whole host dies: its exporter and its daemon.
    kill(st["pid"].as_i64().unwrap());
    a.kill();
    let t = Instant::now();
    let mp_b = b.mount(&name, &mount_id(2));
    let took = t.elapsed();
    println!("dead host taken over after {took:?} (cluster watch timeout 30 s)");
    assert!(
        took < Duration::from_secs(20),
        "the takeover took {took:?}: it waited for the cluster's 30 s watch timeout\n{}",
        exporter_log(&b, &name)
    );
    // Fenced for lock.fence_expiry (a year), before the lock changed hands.
    let until = c.blocklisted_until(&a_addr);
    assert!(
        until.is_some_and(|u| u > SystemTime::now() + Duration::from_secs(300 * 86400)),
        "A's client {a_addr} is blocklisted until {until:?}"
    );
    let log = exporter_log(&b, &name);
    let fenced = log.find("fenced the previous lock owner");
    let broke = log.find("broke the dead owner's lock");
    assert!(
        fenced.is_some() && broke.is_some() && fenced < broke,
        "A must be blocklisted before its lock is broken:\n{log}"
    );
    assert!(log.contains("liveness watch"), "{log}");
    assert_eq!(
        b.exporter_state(&name)["took_over_from"][0].as_str(),
        Some(a_addr.as_str())
    );
    assert_eq!(
        std::fs::read(mp_b.join("acked")).unwrap(),
        b"acknowledged before the crash"
    );
    b.unmount(&name, &mount_id(2));
    // The liveness object goes with the volume.
    let oid = format!("rbdvol_alive.{name}");
    assert!(c.rados_stat(&oid), "{oid} missing while the volume exists");
    b.ok("VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
    assert!(!c.rados_stat(&oid), "{oid} left behind by Remove");
}

#[test]
fn a_daemon_restart_never_lets_another_host_take_the_volume() {
    let c = DefaultCluster::up();
    let mut a = c.host("host-a", &[]);
    let b = c.host("host-b", &[(TAKEOVER_WAIT, "15s")]);
    let name = unique("tk-restart");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    let st = a.exporter_state(&name);
    let a_addr = st["addr"].as_str().unwrap().to_string();
    let a_client = st["client"].as_str().unwrap().to_string();

    // The container keeps writing (fsync'd records) through all of it.
    let (stop, acked, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let writer = {
        let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
        let f = std::fs::File::create(mp.join("log")).unwrap();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let rec = format!("{i:063}\n");
                match f
                    .write_all_at(rec.as_bytes(), i * 64)
                    .and_then(|_| f.sync_data())
                {
                    Ok(()) => acked.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    // An upgrade: the daemon is gone for 8 s (longer than the liveness timeout)
    // while host B keeps trying to take the volume.
    a.kill();
    let t = Instant::now();
    let id = mount_id(2);
    let n = name.clone();
    let taker = std::thread::spawn(move || {
        let v = b.call(
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{n}","ID":"{id}"}}"#),
        );
        (b, v)
    });
    std::thread::sleep(Duration::from_secs(8));
    let acked_while_down = acked.load(Ordering::Relaxed);
    a.restart();
    let (b, v) = taker.join().unwrap();
    let waited = t.elapsed();
    let err = v["Err"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("in use"),
        "host B took the volume of a live host whose daemon restarted: {v}\n{}",
        exporter_log(&b, &name)
    );
    assert!(
        waited >= Duration::from_secs(14),
        "B gave up early: {waited:?}"
    );

    let before = acked.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "a write of A failed");
    assert!(
        acked.load(Ordering::Relaxed) > before && before > acked_while_down,
        "A's writes stalled"
    );
    assert_eq!(c.blocklisted_until(&a_addr), None, "A's client was fenced");
    assert_eq!(c.lockers(&name), vec![a_client]);
    assert_eq!(
        a.get(&name)["Volume"]["Status"]["mounted_here"]["fenced"],
        serde_json::Value::Bool(false),
        "{}",
        a.get(&name)
    );
    a.unmount(&name, &mount_id(1));
    assert_eq!(a.leftovers(), Vec::<String>::new(), "{}", a.log());
}

#[test]
fn an_owner_without_a_liveness_watch_is_not_taken_over_early() {
    let c = DefaultCluster::up();
    let name = unique("tk-old");
    // An earlier owner with a liveness watch leaves its record behind.
    let earlier = c.host("host-earlier", &[]);
    earlier.create(&name, r#"{"size":"64M"}"#);
    earlier.mount(&name, &mount_id(1));
    let earlier_addr = earlier.exporter_state(&name)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    earlier.unmount(&name, &mount_id(1));

    // The owner now stands in for an older rbdvol: no liveness watch, no record.
    let mut old = c.host("host-old", &[("RBDVOL_LOCK__LIVENESS_TIMEOUT", "0s")]);
    let b = c.host("host-b", &[(TAKEOVER_WAIT, "12s")]);
    let mp = old.mount(&name, &mount_id(2));
    write_synced(&mp.join("f"), b"old");
    let st = old.exporter_state(&name);
    let old_addr = st["addr"].as_str().unwrap().to_string();
    let old_client = st["client"].as_str().unwrap().to_string();
    let record = Command::new("rados")
        .arg("-c")
        .arg(&c.conf)
        .args(["-p", "rbd", "get", &format!("rbdvol_alive.{name}"), "-"])
        .output()
        .unwrap();
    let record = String::from_utf8_lossy(&record.stdout).into_owned();
    assert!(
        record.contains(&earlier_addr) && !record.contains(&old_addr),
        "{record}"
    );

    kill(st["pid"].as_i64().unwrap());
    old.kill();
    let t = Instant::now();
    let err = b.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(3)),
        "in use",
    );
    println!("refused after {:?}: {err}", t.elapsed());
    // Its header watch lasts the cluster's 30 s: nothing may declare it dead sooner.
    assert!(t.elapsed() >= Duration::from_secs(11), "{:?}", t.elapsed());
    assert_eq!(c.blocklisted_until(&old_addr), None);
    assert_eq!(c.lockers(&name), vec![old_client]);
}
