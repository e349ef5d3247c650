//! The safety review's data-path findings, each reproduced against the real daemon, the
//! real cluster and real loop devices and mounts:
//! - a Mount whose answer Docker never got (daemon killed before replying, or Docker
//!   dropping the connection at its deadline) must not pin the volume to this host;
//! - a volume a container still uses is never released as an orphan;
//! - a symlink in the mount root must not make a live mount look gone;
//! - a volume whose reads fail is never taken for blank (and formatted);
//! - a recorded loop device that now backs another file is never detached.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Orphans are released after this grace in these tests (60 s by default).
const GRACE: &str = "2s";

fn write_file(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

fn released(d: &Daemon, pool: &str, name: &str) -> bool {
    d.leftovers().is_empty() && lock_holders(pool, name).is_empty()
}

/// Waits up to `limit` for the volume to be fully released on `d`.
fn wait_released(d: &Daemon, pool: &str, name: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while !released(d, pool, name) {
        assert!(
            started.elapsed() < limit,
            "{name} still held after {limit:?}: {:?}, lock {:?}\n{}",
            d.leftovers(),
            lock_holders(pool, name),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    started.elapsed()
}

fn wait_for_log(d: &Daemon, needle: &str, limit: Duration) {
    let started = Instant::now();
    while !d.log().contains(needle) {
        assert!(
            started.elapsed() < limit,
            "no {needle:?} after {limit:?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn host(id: &str) -> DaemonOpts {
    DaemonOpts::host(id).env("RBDVOL_MAP__ORPHAN_GRACE", GRACE)
}

/// A volume mounted for ID 1 whose answer Docker never got (the daemon died after
/// recording it), then mounted again for ID 2 - Docker's retry - by the restarted daemon.
fn mounted_after_a_lost_answer(prefix: &str) -> (Daemon, String, PathBuf) {
    let mut d = Daemon::start(host("host-a").env("RBDVOL_CRASH_AT", "mount:before-reply"));
    let name = unique(prefix);
    d.create(&name, r#"{"size":"64M"}"#);
    d.call_expecting_crash(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(1)),
    );
    d.restart_with_env(&[("RBDVOL_CRASH_AT", "")]);
    let mp = d.mount(&name, &mount_id(2));
    (d, name, mp)
}

#[test]
fn a_mount_whose_answer_was_lost_does_not_pin_the_volume() {
    // The container runs, stops, and Docker unmounts only the ID it knows.
    let (d, name, mp) = mounted_after_a_lost_answer("lost-answer");
    write_file(&mp.join("data"), "kept");
    std::thread::sleep(Duration::from_secs(3));
    d.unmount(&name, &mount_id(2));
    let took = wait_released(&d, "rbd", &name, Duration::from_secs(30));
    eprintln!("released {took:?} after the last Unmount");
    assert!(
        d.log().contains("releasing a volume nothing uses"),
        "{}",
        d.log()
    );
    // Another host can have it now, with its data.
    let b = Daemon::start(host("host-b"));
    let mp = b.mount(&name, &mount_id(3));
    assert_eq!(std::fs::read_to_string(mp.join("data")).unwrap(), "kept");
    b.unmount(&name, &mount_id(3));
}

#[test]
fn a_mount_docker_gave_up_on_finishes_and_is_then_released() {
    let a = Daemon::start(host("host-a").env("RBDVOL_LOCK__TAKEOVER_WAIT", "30s"));
    let b = Daemon::start(host("host-b"));
    let name = unique("gave-up");
    a.create(&name, r#"{"size":"64M"}"#);
    b.mount(&name, &mount_id(1));
    // A's Mount waits for B's lock; Docker gives up on it (the connection drops).
    let mut c = a.connect();
    c.send(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(2)),
    );
    std::thread::sleep(Duration::from_secs(1));
    drop(c);
    // B lets go: A's Mount, no longer awaited by anyone, takes the volume and, as no
    // container ever uses it, gives it back.
    b.unmount(&name, &mount_id(1));
    wait_for_log(
        &a,
        "releasing a volume nothing uses",
        Duration::from_secs(60),
    );
    wait_released(&a, "rbd", &name, Duration::from_secs(20));
    let mp = b.mount(&name, &mount_id(3));
    assert!(is_mountpoint(&mp));
    b.unmount(&name, &mount_id(3));
}

/// A stand-in for a container: a process in a mount namespace of its own that holds a
/// bind mount of the volume somewhere else, as runc makes one.
fn container_using(mp: &Path, dir: &Path) -> Child {
    let target = dir.join("data");
    std::fs::create_dir_all(&target).unwrap();
    let script = format!(
        "mount --bind '{}' '{}' && echo ready && exec sleep 600",
        mp.display(),
        target.display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

#[test]
fn a_volume_a_container_uses_is_never_released_as_an_orphan() {
    let (d, name, mp) = mounted_after_a_lost_answer("in-use");
    let work = tempfile::tempdir().unwrap();
    let mut container = container_using(&mp, work.path());
    // The container's Unmount is lost too (dockerd crashed): only the kernel knows.
    d.unmount(&name, &mount_id(2));
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        is_mountpoint(&mp),
        "released under a running container\n{}",
        d.log()
    );
    assert!(!lock_holders("rbd", &name).is_empty());
    // The container goes: now nothing uses the volume.
    let _ = container.kill();
    let _ = container.wait();
    wait_released(&d, "rbd", &name, Duration::from_secs(30));
}

#[test]
fn a_symlink_in_the_mount_root_never_makes_a_live_mount_look_gone() {
    let mut opts = host("host-a");
    opts.mount_root_via_symlink = true;
    let mut d = Daemon::start(opts);
    let name = unique("symlinked");
    d.create(&name, r#"{"size":"64M"}"#);
    let mp = d.mount(&name, &mount_id(1));
    let mut open = std::fs::File::create(mp.join("open")).unwrap();
    // docker cp on the running container: the same volume mounted again.
    let mp2 = d.mount(&name, &mount_id(1));
    assert_eq!(mp, mp2);
    d.restart();
    // The container's open file still reaches the volume.
    open.write_all(b"still writable").unwrap();
    open.sync_all().unwrap();
    let log = d.log();
    assert!(!log.contains("the recorded mount is gone"), "{log}");
    assert!(log.contains("adopted a mounted volume"), "{log}");
    drop(open);
    d.unmount(&name, &mount_id(1));
    d.unmount(&name, &mount_id(1));
    wait_released(&d, "rbd", &name, Duration::from_secs(10));
}

#[test]
fn a_volume_whose_reads_fail_is_refused_not_formatted() {
    let mut d = Daemon::start(host("host-a"));
    let name = unique("eio");
    d.create(&name, r#"{"size":"64M"}"#);
    let mp = d.mount(&name, &mount_id(1));
    write_file(&mp.join("precious"), "do not lose me");
    d.unmount(&name, &mount_id(1));
    // A filesystem rbdvol did not mark (made by an older version, or the marker lost).
    let (ok, out) = rbd(&[
        "image-meta",
        "remove",
        &format!("rbd/{name}"),
        "rbdvol.formatted",
    ]);
    assert!(ok, "{out}");
    // Every read now fails: blkid exits 2 ("nothing found") and finds nothing.
    d.restart_with_env(&[("RBDVOL_FAULTS", "export:read-eio")]);
    let err = d.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(2)),
        "could not be read",
    );
    assert!(err.contains("untouched"), "{err}");
    wait_released(&d, "rbd", &name, Duration::from_secs(10));
    // Readable again: the data is there, and the filesystem is now marked.
    d.restart_with_env(&[("RBDVOL_FAULTS", "")]);
    let mp = d.mount(&name, &mount_id(3));
    assert_eq!(
        std::fs::read_to_string(mp.join("precious")).unwrap(),
        "do not lose me"
    );
    d.unmount(&name, &mount_id(3));
    let marker = image_meta("rbd", &name, "rbdvol.formatted").unwrap_or_default();
    assert!(marker.starts_with("ext4 found by host-a"), "{marker:?}");
}

fn loop_device_of(mp: &Path) -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = text
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
        .unwrap();
    PathBuf::from(line.split(" - ").nth(1).unwrap().split(' ').nth(1).unwrap())
}

fn backing_file(device: &Path) -> String {
    let name = device.file_name().unwrap().to_str().unwrap();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn a_recorded_loop_device_that_now_backs_another_file_is_left_alone() {
    let mut d = Daemon::start(host("host-a"));
    let name = unique("reused-loop");
    d.create(&name, r#"{"size":"64M"}"#);
    let mp = d.mount(&name, &mount_id(1));
    let device = loop_device_of(&mp);
    // The host goes down hard; what it had mounted and mapped is gone when it returns,
    // and another program has taken the same loop device for a file of its own.
    let pid = d.pid();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    assert!(Command::new("losetup")
        .arg("-d")
        .arg(&device)
        .status()
        .unwrap()
        .success());
    for p in processes_mentioning(d.dir.path()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let theirs = tempfile::tempdir().unwrap();
    let file = theirs.path().join("theirs.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let attached = Command::new("losetup")
        .arg(&device)
        .arg(&file)
        .status()
        .unwrap();
    assert!(attached.success(), "attaching {}", device.display());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _cleanup = Detach(device.clone());
    d.restart();
    assert_eq!(
        backing_file(&device),
        file.display().to_string(),
        "rbdvol detached another program's loop device\n{}",
        d.log()
    );
    // The volume itself was released, and mounts again.
    let mp = d.mount(&name, &mount_id(2));
    assert!(is_mountpoint(&mp));
    d.unmount(&name, &mount_id(2));
}

#[test]
fn options_changed_in_the_pool_after_create_are_refused_at_mount() {
    let d = Daemon::start(host("host-a"));
    for (key, value, needle) in [
        ("rbdvol.mkfs-options", "-d /etc", "-d is not allowed"),
        ("rbdvol.fstype", "../../tmp/x", "fstype"),
        ("rbdvol.mount-options", "errors=panic", "errors=panic"),
    ] {
        let name = unique("tampered");
        d.create(&name, r#"{"size":"64M"}"#);
        let (ok, out) = rbd(&[
            "image-meta",
            "set",
            &format!("rbd/{name}"),
            key,
            "--",
            value,
        ]);
        assert!(ok, "{out}");
        let err = d.err(
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(1)),
            needle,
        );
        assert!(err.contains("changed outside rbdvol"), "{err}");
        assert!(released(&d, "rbd", &name), "{name}: {:?}", d.leftovers());
        assert_eq!(image_meta("rbd", &name, "rbdvol.formatted"), None);
    }
}
