//! Ownership in `rbdvol export`, against a real cluster: a second exporter waits for the
//! lock and names its owner, a broken lock fences the exporter, a dead owner is taken
//! over and blocklisted for the fence expiry, and the exporter is hardened for the
//! block I/O path. Fixtures as in `tests/exporter.rs`.
#![allow(unused_imports)]

mod common;
#[path = "exporter/fixtures.rs"]
mod fixtures;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{blocklisted_until, ceph_conf, image_meta, rbd, unique};
use fixtures::*;

#[test]
fn second_exporter_waits_its_lock_wait_then_fails_naming_the_owner() {
    let dir = tempdir();
    let img = TestImage::create("exp-two", 64, "layering,exclusive-lock");
    let mut first = Exporter::spawn(dir.path(), "first", &img.name, "host-one", &[]);
    let owner = first.wait_state("serving", Duration::from_secs(30))["client"]
        .as_str()
        .unwrap()
        .to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(first.file())
        .unwrap();
    file.write_all_at(b"first", 0).unwrap();

    // A live owner is asked again until --lock-wait runs out (it may release meanwhile).
    let started = Instant::now();
    let (_second, err) = refused(dir.path(), "second", &img.name, &["--lock-wait", "2"]);
    let waited = started.elapsed();
    assert!(err.contains(&owner) && err.contains("host-one"), "{err}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "{waited:?}"
    );

    // The first is untouched: still serving, still the owner, still readable/writable.
    assert_eq!(first.state().unwrap()["state"], "serving");
    let lockers = img.lockers();
    assert_eq!(lockers.len(), 1);
    assert_eq!(lockers[0]["locker"], owner.as_str());
    file.write_all_at(b"still", 4096).unwrap();
    file.sync_all().unwrap();
    let mut buf = [0u8; 5];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"first");
    drop(file);
    assert!(first.stop().success(), "{}", first.log());
}

/// Breaks the exporter's lock from another client instance, as a host taking over
/// would: the exporter must notice on its own, say "fenced", and never write again.
#[test]
fn breaking_the_lock_fences_the_exporter() {
    use rbdvol::ceph::sys::{ConnectSpec, Rados};

    let dir = tempdir();
    let img = TestImage::create("exp-fence", 64, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "fence", &img.name, "host-a", &[]);
    let st = exp.wait_state("serving", Duration::from_secs(30));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(exp.file())
        .unwrap();
    f.write_all_at(b"before", 0).unwrap();
    f.sync_all().unwrap();

    let taker = Rados::connect(&ConnectSpec {
        cluster: "ceph".into(),
        entity: "client.admin".into(),
        conf: Some(ceph_conf().to_string_lossy().into_owned()),
        keyring: None,
        options: vec![("rados_osd_op_timeout".into(), "30".into())],
    })
    .expect("second client instance");
    let pool = taker.pool("rbd").unwrap();
    let image = pool.open(&img.name).unwrap();
    let t = Instant::now();
    image
        .lock_break(st["addr"].as_str().unwrap())
        .expect("lock break");
    let st = exp.wait_state("fenced", Duration::from_secs(10));
    println!("fenced {:?} after the lock break", t.elapsed());
    assert_eq!(st["pid"], exp.pid());
    assert!(exp.log().contains("FENCED"), "{}", exp.log());

    // Every further I/O fails with EIO, and nothing reaches the image.
    let err = f.write_all_at(b"after!", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = f.read_exact_at(&mut [0u8; 6], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    let mut data = [0u8; 6];
    assert_eq!(image.read(0, &mut data).unwrap(), 6);
    assert_eq!(&data, b"before");
    drop(image);
    drop(pool);
    drop(f);

    // Stopping a fenced exporter: mount gone, non-zero exit, the state file kept.
    assert!(!exp.stop().success(), "{}", exp.log());
    assert!(!is_mounted(&exp.mountpoint));
    assert_eq!(exp.state().unwrap()["state"], "fenced");
}

/// A crashed owner (SIGKILL) is taken over once the cluster declares it dead: a short
/// --lock-wait gives up with the promised explanation; a long one waits, gets the lock,
/// and the old client is blocklisted.
#[test]
fn dead_owner_is_taken_over_after_the_watch_timeout() {
    let dir = tempdir();
    let img = TestImage::create("exp-dead", 64, "layering,exclusive-lock");
    let mut old = Exporter::spawn(dir.path(), "old", &img.name, "host-old", &[]);
    let st = old.wait_state("serving", Duration::from_secs(30));
    let old_client = st["client"].as_str().unwrap().to_string();
    let old_addr = st["addr"].as_str().unwrap().to_string();
    {
        // No truncation: the file's size is the image's.
        let f = OpenOptions::new().write(true).open(old.file()).unwrap();
        f.write_all_at(b"from the old owner", 0).unwrap();
        f.sync_all().unwrap();
    }
    old.signal(nix::sys::signal::Signal::SIGKILL);
    old.wait_exit(Duration::from_secs(10));
    // Its dead FUSE mount is removed by the guard (lazy unmount of its exact path).
    drop(old);

    let t = Instant::now();
    let mut quick = Exporter::spawn(
        dir.path(),
        "quick",
        &img.name,
        "host-new",
        &["--lock-wait", "1"],
    );
    assert!(!quick.wait_exit(Duration::from_secs(20)).success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let err = quick.state().unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("still waiting for the lock"), "{err}");
    assert!(
        err.contains("host-old") && err.contains(&old_client),
        "{err}"
    );
    assert!(!is_mounted(&quick.mountpoint));

    // A stop signal ends the wait at once.
    let mut stopped = Exporter::spawn(dir.path(), "stopped", &img.name, "host-new", &[]);
    std::thread::sleep(Duration::from_millis(500));
    stopped.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(!stopped.wait_exit(Duration::from_secs(5)).success());
    let st = stopped.state().unwrap();
    assert!(st["error"].as_str().unwrap().contains("signal 15"), "{st}");

    let mut new = Exporter::spawn(
        dir.path(),
        "new",
        &img.name,
        "host-new",
        &["--lock-wait", "60"],
    );
    let st = new.wait_state("serving", Duration::from_secs(60));
    println!("dead owner taken over after {:?}", t.elapsed());
    assert_ne!(st["client"], old_client.as_str());
    // Fenced for lock.fence_expiry (365 days by default), not the monitor's 1 hour:
    // a dead-looking owner may only be cut off, with writes queued for its return.
    let until = blocklisted_until(&old_addr);
    assert!(
        until.is_some_and(|t| t > SystemTime::now() + Duration::from_secs(300 * 86400)),
        "old owner {old_addr} blocklisted until {until:?}"
    );
    assert!(
        new.log().contains(&old_client),
        "the wait names the old owner: {}",
        new.log()
    );
    let mut buf = vec![0u8; 18];
    let f = std::fs::File::open(new.file()).unwrap();
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"from the old owner");
    drop(f);
    assert_eq!(
        image_meta("rbd", &img.name, "rbdvol.owner.host").as_deref(),
        Some("host-new")
    );
    assert!(new.stop().success(), "{}", new.log());
}

/// A `/proc/PID/status` field's first word, e.g. `VmRSS` in kB.
fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Whether this (root) test process has a capability, which the exporter it starts inherits.
fn have_capability(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << bit) != 0
}

/// The exporter sits in the block I/O path: memory pressure must neither deadlock it
/// (PF_MEMALLOC_NOIO through PR_SET_IO_FLUSHER) nor let the OOM killer pick it, and its
/// memory is locked, as it is touched only (MCL_ONFAULT: no ballooning). Where this
/// machine withholds CAP_SYS_RESOURCE, the exporter must say what is lost instead.
#[test]
fn the_exporter_is_hardened_for_the_block_io_path() {
    const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
    const CAP_IPC_LOCK: u32 = 14;
    const CAP_SYS_RESOURCE: u32 = 24;
    let dir = tempdir();
    let img = TestImage::create("exp-hard", 128, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "hard", &img.name, "host-a", &[]);
    exp.wait_state("serving", Duration::from_secs(30));
    let pid = exp.pid();
    println!(
        "exporter VmRSS when serving: {} kB",
        status_kb(pid, "VmRSS")
    );
    // Some I/O first, so the measurement includes librbd's working set.
    let f = OpenOptions::new().write(true).open(exp.file()).unwrap();
    let chunk = vec![0x5au8; 4 << 20];
    for i in 0..16u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);

    let rss = status_kb(pid, "VmRSS");
    let locked = status_kb(pid, "VmLck");
    println!("exporter VmRSS after 64 MiB of writes: {rss} kB, VmLck {locked} kB");
    assert!(rss < 200 * 1024, "the exporter's RSS ballooned: {rss} kB");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Field 9 (flags) is the 7th after the parenthesised command name.
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let flags: u64 = after_comm.split(' ').nth(6).unwrap().parse().unwrap();
    let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    let log = exp.log();
    if have_capability(CAP_SYS_RESOURCE) {
        assert_eq!(oom.trim(), "-1000", "{log}");
        assert_ne!(flags & PF_MEMALLOC_NOIO, 0, "flags {flags:#x}\n{log}");
    } else {
        println!("no CAP_SYS_RESOURCE here: checking that the exporter says what is lost");
        assert!(
            log.contains("PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE")
                && log.contains("can deadlock that volume"),
            "{log}"
        );
        assert!(
            log.contains("oom_score_adj") && log.contains("OOM killer may pick this exporter"),
            "{log}"
        );
    }
    if have_capability(CAP_IPC_LOCK) {
        // VmLck counts whole locked mappings (thread stacks included), RSS only what
        // was touched: a small RSS next to a large VmLck is MCL_ONFAULT at work.
        assert!(locked > 0, "no memory locked: VmLck {locked} kB\n{log}");
    } else {
        assert!(log.contains("not locking the exporter's memory"), "{log}");
    }
    assert!(exp.stop().success(), "{}", exp.log());
}

/// `rbdvol lock break` fences the holder for lock.fence_expiry: its client is
/// blocklisted before librbd's break (which would use the monitor's default expiry,
/// and the monitor never extends an entry).
#[test]
fn lock_break_fences_the_owner_for_the_fence_expiry() {
    use rbdvol::ceph::sys::{ConnectSpec, Rados};

    let dir = tempdir();
    let img = TestImage::create("exp-breakx", 64, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "breakx", &img.name, "host-a", &[]);
    let addr = exp.wait_state("serving", Duration::from_secs(30))["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let rados = Rados::connect(&ConnectSpec {
        cluster: "ceph".into(),
        entity: "client.admin".into(),
        conf: Some(ceph_conf().to_string_lossy().into_owned()),
        keyring: None,
        options: vec![("rados_osd_op_timeout".into(), "30".into())],
    })
    .expect("operator's client instance");
    let expiry = Duration::from_secs(30 * 86400);
    let said = rbdvol::lock::break_lock(&rados, &["rbd".to_string()], &img.name, expiry)
        .expect("lock break");
    assert!(
        said.contains("blocklisted first") && !said.contains("WARNING"),
        "{said}"
    );
    let until = blocklisted_until(&addr).expect("the holder is blocklisted");
    let from_now = until
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    assert!(
        (29 * 86400..31 * 86400).contains(&from_now),
        "blocklisted for {from_now} s, not about {} s",
        expiry.as_secs()
    );
    exp.wait_state("fenced", Duration::from_secs(10));
    assert!(!exp.stop().success(), "{}", exp.log());
    // The exporter has exited: its entry protects nothing now (the daemon would do this).
    rbdvol::ceph::images::unblocklist(&rados, &addr).unwrap();
}
