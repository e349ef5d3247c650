//! Snapshots and resizes of volumes in use on another host, against the real cluster:
//! the holding daemon freezes the filesystem for the snapshot (asked through RADOS
//! watch/notify), grows it online, and a holder that does not answer, or dies while
//! frozen, never leaves a snapshot half-consistent or a filesystem frozen.

mod common;
#[path = "snapshots/util.rs"]
mod util;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use util::*;

const RECORD: usize = 4096;

fn record(i: u64) -> Vec<u8> {
    let mut r = format!("record {i:012}\n").into_bytes();
    r.extend(pattern(i + 100, RECORD - r.len()));
    r
}

/// Appends records with one write and an fdatasync each, counting those acknowledged.
struct Writer {
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(path: PathBuf) -> Writer {
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(0)
                .open(&path)
                .unwrap();
            let mut i = 0;
            while !s.load(Ordering::SeqCst) {
                f.write_all(&record(i)).unwrap();
                f.sync_data().unwrap();
                i += 1;
                a.store(i, Ordering::SeqCst);
            }
        });
        Writer {
            acked,
            stop,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.acked()
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The holder's daemon, in test host A's network namespace when there is a test network.
fn holder(host: &str, env: &[(&str, &str)]) -> (Daemon, Option<String>) {
    let net = testnet();
    let mut opts = DaemonOpts::host(host);
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    if let Some(n) = &net {
        opts = opts.in_netns(&n.ns[0]);
    }
    (Daemon::start(opts), net.map(|n| n.ns[1].clone()))
}

/// Whether a write to `dir` completes within 10 s (a frozen filesystem blocks it).
fn writable(dir: &Path) -> bool {
    Command::new("timeout")
        .args([
            "-k",
            "2",
            "10",
            "dd",
            "if=/dev/zero",
            "bs=4096",
            "count=1",
            "conv=fsync",
        ])
        .arg(format!("of={}", dir.join("probe").display()))
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn a_snapshot_under_steady_writes_from_another_host_is_clean_and_holds_what_was_written_before_it()
{
    let (a, other) = holder("host-a", &[]);
    let name = unique("load");
    a.create(&name, r#"{"size":"128M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    let w = Writer::start(mp.join("log"));
    wait_for("the first records", || w.acked() >= 50);

    let before = w.acked();
    let asked = std::time::Instant::now();
    let (code, out, err) = rbdvol_in(
        other.as_deref(),
        &["snapshot", "create", &name, "under-load"],
    );
    let after = w.acked();
    eprintln!(
        "snapshot under load: {:?}, {} records acknowledged meanwhile",
        asked.elapsed(),
        after - before
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("frozen for it on host-a"), "{out}");
    let total = w.finish();
    assert!(
        total > after,
        "the writer stopped while the snapshot was taken"
    );

    // Frozen, not crashed: the copy is clean as it is, without a journal replay.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.img");
    let (ok, text) = rbd(&[
        "export",
        &format!("rbd/{name}@under-load"),
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the snapshot is not clean:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    // Exactly what was written before it: whole records, in order, none torn.
    let copy = unique("load-copy");
    a.create(&copy, &format!(r#"{{"from":"{name}@under-load"}}"#));
    let mc = a.mount(&copy, &mount_id(2));
    let log = std::fs::read(mc.join("log")).unwrap();
    assert_eq!(log.len() % RECORD, 0, "a torn record: {} bytes", log.len());
    let n = (log.len() / RECORD) as u64;
    assert!(
        (before..=after).contains(&n),
        "the snapshot holds {n} records; {before} were acknowledged before it was asked for and {after} when it returned"
    );
    for (i, chunk) in log.chunks(RECORD).enumerate() {
        assert!(chunk == record(i as u64).as_slice(), "record {i} differs");
    }
    a.unmount(&copy, &mount_id(2));
    a.unmount(&name, &mount_id(1));
}

#[test]
fn a_holder_that_does_not_answer_fails_the_snapshot_unless_crash_consistent_is_asked() {
    let (a, other) = holder("host-a", &[]);
    let name = unique("silent");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    write_synced(&mp.join("data"), b"synced before");
    rbdvol_ok(&["snapshot", "create", &name, "answered"]);

    let pid = nix::unistd::Pid::from_raw(a.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let asked = std::time::Instant::now();
    let (code, out, err) = rbdvol_in(other.as_deref(), &["snapshot", "create", &name, "refused"]);
    eprintln!("a silent holder: refused after {:?}", asked.elapsed());
    let (code2, out2, err2) = rbdvol_in(
        other.as_deref(),
        &["snapshot", "create", &name, "crashy", "--crash-consistent"],
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("mounted on host host-a") && err.contains("No snapshot was taken"),
        "{err}"
    );
    assert!(err.contains("--crash-consistent"), "{err}");
    assert_eq!(code2, 0, "{out2}{err2}");
    let ls = rbdvol_ok(&["snapshot", "ls", &name]);
    assert!(ls.contains("crashy") && !ls.contains("refused"), "{ls}");
    // The crash-consistent snapshot still holds what was synced before it.
    let c = unique("crashy-copy");
    a.create(&c, &format!(r#"{{"from":"{name}@crashy"}}"#));
    let mc = a.mount(&c, &mount_id(2));
    assert_same(&mc.join("data"), b"synced before");
    a.unmount(&c, &mount_id(2));
    a.unmount(&name, &mount_id(1));
}

#[test]
fn a_daemon_killed_while_the_filesystem_is_frozen_leaves_it_thawed() {
    let (mut a, other) = holder("host-a", &[("RBDVOL_CRASH_AT", "control:before-thaw")]);
    let name = unique("thaw");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    write_synced(&mp.join("data"), b"before the crash");

    // The daemon froze the filesystem, the snapshot was taken, and the daemon dies when
    // asked to thaw: its freeze guard thaws by itself.
    let (code, out, err) = rbdvol_in(other.as_deref(), &["snapshot", "create", &name, "s"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for("the daemon to die", || {
        !Path::new(&format!("/proc/{}", a.pid())).exists() || {
            std::fs::read_to_string(format!("/proc/{}/stat", a.pid()))
                .is_ok_and(|s| s.contains(") Z "))
        }
    });
    assert!(
        writable(&mp),
        "the filesystem stayed frozen after its daemon died"
    );
    assert!(
        processes_mentioning(&mp)
            .iter()
            .all(|p| !cmdline(*p).contains("freeze-guard")),
        "a freeze guard outlived the freeze"
    );
    a.restart_with_env(&[("RBDVOL_CRASH_AT", "")]);
    assert_same(&mp.join("data"), b"before the crash");
    a.unmount(&name, &mount_id(1));
}

fn online_grow(fstype: &str, from: &str, to: &str, to_bytes: u64) {
    let (a, other) = holder("host-a", &[]);
    let name = unique("online");
    a.create(
        &name,
        &format!(r#"{{"size":"{from}","fstype":"{fstype}"}}"#),
    );
    let mp = a.mount(&name, &mount_id(1));
    let data = pattern(9, 3 << 20);
    write_synced(&mp.join("data"), &data);
    let before = fs_size(&mp);
    // Make sure the holder watches before asking it (it starts within a second).
    rbdvol_ok(&["snapshot", "create", &name, "ready"]);
    let (code, out, err) = rbdvol_in(other.as_deref(), &["resize", &name, to]);
    assert_eq!(code, 0, "{out}{err}");
    let online = out.contains("grown on host-a");
    if fstype == "ext4" && !has_cap_sys_resource() {
        // The kernel lets only CAP_SYS_RESOURCE grow a mounted ext4; it grows at the next Mount.
        assert!(
            out.contains("grows at its next Mount") && out.contains("resize2fs"),
            "{out}"
        );
        a.unmount(&name, &mount_id(1));
        let mp = a.mount(&name, &mount_id(2));
        assert!(
            fs_size(&mp) > before + (to_bytes - before) / 2,
            "ext4 was not grown at the next Mount"
        );
        assert_same(&mp.join("data"), &data);
        a.unmount(&name, &mount_id(2));
        return;
    }
    assert!(online, "{out}");
    let after = fs_size(&mp);
    assert!(
        after > before + (to_bytes - before) / 2,
        "{fstype} did not grow while mounted: {before} -> {after} bytes on a {to_bytes}-byte volume"
    );
    assert_same(&mp.join("data"), &data);
    assert_eq!(image_meta("rbd", &name, "rbdvol.grow-fs"), None);
    a.unmount(&name, &mount_id(1));
}

fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << 24) != 0
}

#[test]
fn xfs_grows_online_inside_the_mounted_filesystem() {
    online_grow("xfs", "320M", "640M", 640 << 20);
}

#[test]
fn ext4_grows_online_or_says_why_and_grows_at_the_next_mount() {
    online_grow("ext4", "64M", "160M", 160 << 20);
}
