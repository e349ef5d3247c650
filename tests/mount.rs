//! The data path, for real: Mount maps the image (here through rbdvol's userspace
//! mapper: FUSE exporter + loop device, as this kernel has neither rbd nor nbd),
//! formats only a provably blank image, mounts it; Unmount reverses it; reference
//! counts follow Docker's mount IDs; crashes in the middle leak nothing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
}

fn assert_unmapped(d: &Daemon, pool: &str, name: &str) {
    assert_eq!(
        d.leftovers(),
        Vec::<String>::new(),
        "{name}: something leaked\n{}",
        d.log()
    );
    assert_eq!(
        lock_holders(pool, name),
        Vec::<String>::new(),
        "{name}: lock still held"
    );
}

fn round_trip(fstype: &str, size: &str) {
    let d = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique(&format!("rt-{fstype}"));
    d.create(
        &name,
        &format!(r#"{{"size":"{size}","fstype":"{fstype}"}}"#),
    );
    let id = mount_id(1);
    let mp = d.mount(&name, &id);
    assert!(
        mp.is_absolute() && is_mountpoint(&mp),
        "{} is not mounted",
        mp.display()
    );
    assert!(
        mp.starts_with(d.mount_root()),
        "mounted outside the plugin's root"
    );
    write_file(&mp.join("hello.txt"), "written through rbd");
    std::fs::create_dir(mp.join("dir")).unwrap();
    write_file(&mp.join("dir/nested"), "nested");

    // While mounted: Get, Path and List all show where; the lock is held.
    let vol = d.get(&name)["Volume"].clone();
    assert_eq!(vol["Mountpoint"], mp.display().to_string());
    assert_eq!(vol["Status"]["mounted_here"]["container_mounts"], 1);
    assert_eq!(vol["Status"]["formatted"], "yes");
    assert_eq!(
        d.ok("VolumeDriver.Path", &format!(r#"{{"Name":"{name}"}}"#))["Mountpoint"],
        mp.display().to_string()
    );
    assert_eq!(
        lock_holders("rbd", &name).len(),
        1,
        "the exclusive lock must be held while mounted"
    );
    let formatted = image_meta("rbd", &name, "rbdvol.formatted").expect("formatted marker");
    assert!(formatted.starts_with(fstype), "{formatted}");

    d.unmount(&name, &id);
    assert!(!is_mountpoint(&mp));
    assert_unmapped(&d, "rbd", &name);
    assert_eq!(
        d.ok("VolumeDriver.Path", &format!(r#"{{"Name":"{name}"}}"#))["Mountpoint"],
        ""
    );

    let mp2 = d.mount(&name, &mount_id(2));
    assert_eq!(
        std::fs::read_to_string(mp2.join("hello.txt")).unwrap(),
        "written through rbd"
    );
    assert_eq!(
        std::fs::read_to_string(mp2.join("dir/nested")).unwrap(),
        "nested"
    );
    d.unmount(&name, &mount_id(2));
    assert_unmapped(&d, "rbd", &name);
}

#[test]
fn ext4_data_survives_unmount_and_mount() {
    round_trip("ext4", "64M");
}

#[test]
fn xfs_data_survives_unmount_and_mount() {
    round_trip("xfs", "320M");
}

#[test]
fn references_follow_docker_mount_ids() {
    let d = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique("refs");
    d.create(&name, r#"{"size":"64M"}"#);
    let (a, b) = (mount_id(10), mount_id(11));
    let mp = d.mount(&name, &a);
    assert_eq!(
        d.mount(&name, &b),
        mp,
        "a second container gets the same mount"
    );
    assert_eq!(
        d.mount(&name, &a),
        mp,
        "docker cp on a running container re-mounts the same ID"
    );
    assert_eq!(
        d.get(&name)["Volume"]["Status"]["mounted_here"]["container_mounts"],
        3
    );

    // In use on this host: Remove is refused and nothing is touched.
    d.err(
        "VolumeDriver.Remove",
        &format!(r#"{{"Name":"{name}"}}"#),
        "mounted on this host",
    );
    assert!(images_in("rbd").contains(&name));

    d.unmount(&name, &mount_id(99)); // unknown ID: success, no effect
    d.unmount(&name, &a);
    assert!(
        is_mountpoint(&mp),
        "ID a was mounted twice: one Unmount must not unmount it"
    );
    d.unmount(&name, &a);
    assert!(is_mountpoint(&mp), "ID b still holds the volume");
    d.unmount(&name, &b);
    assert!(!is_mountpoint(&mp));
    assert_unmapped(&d, "rbd", &name);
    d.unmount(&name, &b); // repeated Unmount: success
    d.ok("VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
}

#[test]
fn a_volume_formatted_on_one_host_is_mounted_by_another() {
    let a = Daemon::start(DaemonOpts::host("host-a"));
    let b = Daemon::start(DaemonOpts::host("host-b"));
    let name = unique("move");
    a.create(&name, r#"{"size":"320M","fstype":"xfs"}"#);
    let mp = a.mount(&name, &mount_id(1));
    write_file(&mp.join("from-a"), "hello b");
    a.unmount(&name, &mount_id(1));

    let mp = b.mount(&name, &mount_id(2));
    assert_eq!(
        std::fs::read_to_string(mp.join("from-a")).unwrap(),
        "hello b"
    );
    let marker = image_meta("rbd", &name, "rbdvol.formatted").unwrap();
    assert!(
        marker.contains("by host-a"),
        "B must not have formatted it again: {marker}"
    );
    b.unmount(&name, &mount_id(2));
    assert_unmapped(&b, "rbd", &name);
}

#[test]
fn a_second_host_cannot_mount_a_volume_in_use() {
    let a = Daemon::start(DaemonOpts::host("host-a"));
    // B waits this long for A to release before giving up (default 60 s).
    let b = Daemon::start(DaemonOpts::host("host-b").env("RBDVOL_LOCK__TAKEOVER_WAIT", "2s"));
    let name = unique("excl");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    let e = b.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(2)),
        "host-a",
    );
    assert!(!e.is_empty());
    assert_eq!(
        b.leftovers(),
        Vec::<String>::new(),
        "a refused Mount must leave nothing behind"
    );
    // A keeps working.
    write_file(&mp.join("still-mine"), "yes");
    a.unmount(&name, &mount_id(1));
}

/// Builds a small ext4 filesystem holding one file, as an image file to import.
fn ext4_image_with_file(dir: &Path, content: &str) -> std::path::PathBuf {
    let img = dir.join("fs.img");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let run = |args: &[&str]| {
        let st = Command::new("timeout")
            .args(["-k", "5", "60"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    };
    run(&["truncate", "-s", "64M", img.to_str().unwrap()]);
    run(&["mkfs.ext4", "-q", img.to_str().unwrap()]);
    run(&[
        "mount",
        "-o",
        "loop",
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    std::fs::write(mnt.join("precious"), content).unwrap();
    run(&["umount", mnt.to_str().unwrap()]);
    img
}

/// Imports `file` as image `rbd/<name>` (layering + exclusive-lock), as someone else
/// might have filled it before rbdvol saw it.
fn import(file: &Path, name: &str) {
    let (ok, out) = rbd(&[
        "import",
        "--image-feature",
        "layering,exclusive-lock",
        file.to_str().unwrap(),
        &format!("rbd/{name}"),
    ]);
    assert!(ok, "{out}");
}

/// Mount must refuse with `why`, leaving the image byte-for-byte as it was.
fn assert_refused_untouched(d: &Daemon, name: &str, id: u32, why: &str, work: &Path) {
    let before = image_checksum("rbd", name, work);
    d.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(id)),
        why,
    );
    assert_unmapped(d, "rbd", name);
    assert_eq!(
        image_checksum("rbd", name, work),
        before,
        "a refused volume was modified"
    );
}

fn image_checksum(pool: &str, name: &str, dir: &Path) -> String {
    let out = dir.join(format!("{name}.export"));
    let _ = std::fs::remove_file(&out);
    let (ok, text) = rbd(&["export", &format!("{pool}/{name}"), out.to_str().unwrap()]);
    assert!(ok, "{text}");
    let sum = Command::new("sha256sum").arg(&out).output().unwrap();
    String::from_utf8_lossy(&sum.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn existing_data_is_never_formatted_over() {
    let d = Daemon::start(DaemonOpts::host("host-a"));
    let work = tempfile::tempdir().unwrap();

    // An image someone filled before rbdvol saw it: mounted as found, data intact.
    let name = unique("adopt");
    let img = ext4_image_with_file(work.path(), "do not wipe");
    import(&img, &name);
    let mp = d.mount(&name, &mount_id(1));
    assert_eq!(
        std::fs::read_to_string(mp.join("precious")).unwrap(),
        "do not wipe"
    );
    d.unmount(&name, &mount_id(1));
    assert_unmapped(&d, "rbd", &name);

    // A partition table: refused, and not one byte changes.
    let name = unique("parted");
    let (ok, out) = rbd(&[
        "create",
        "--size",
        "64M",
        "--image-feature",
        "layering,exclusive-lock",
        &format!("rbd/{name}"),
    ]);
    assert!(ok, "{out}");
    let raw = work.path().join("pt.img");
    Command::new("truncate")
        .args(["-s", "64M", raw.to_str().unwrap()])
        .status()
        .unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&raw)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\n,,L\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    import(&raw, &format!("{name}-2"));
    let name = format!("{name}-2");
    assert_refused_untouched(&d, &name, 2, "gpt partition table", work.path());

    // Marked as formatted, yet blank: something is wrong, so refuse rather than format.
    let name = unique("marked");
    d.create(&name, r#"{"size":"64M"}"#);
    let (ok, out) = rbd(&[
        "image-meta",
        "set",
        &format!("rbd/{name}"),
        "rbdvol.formatted",
        "ext4 by host-z at 2026-01-01T00:00:00Z",
    ]);
    assert!(ok, "{out}");
    d.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(3)),
        "will not format it again",
    );
    assert_unmapped(&d, "rbd", &name);
}

#[test]
fn a_read_only_volume_refuses_writes() {
    let d = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique("ro");
    d.create(&name, r#"{"size":"64M"}"#);
    let mp = d.mount(&name, &mount_id(1));
    write_file(&mp.join("seed"), "seed");
    d.unmount(&name, &mount_id(1));
    // An operator marks the volume read-only (what -o read-only=true stores at create).
    let (ok, out) = rbd(&[
        "image-meta",
        "set",
        &format!("rbd/{name}"),
        "rbdvol.read-only",
        "true",
    ]);
    assert!(ok, "{out}");
    let mp = d.mount(&name, &mount_id(2));
    assert_eq!(std::fs::read_to_string(mp.join("seed")).unwrap(), "seed");
    let err = std::fs::write(mp.join("new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    d.unmount(&name, &mount_id(2));
    assert_unmapped(&d, "rbd", &name);

    // A blank read-only volume has nothing to mount: refused with a reason.
    let blank = unique("ro-blank");
    d.create(&blank, r#"{"size":"64M","read-only":"true"}"#);
    d.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{blank}","ID":"{}"}}"#, mount_id(3)),
        "read-only",
    );
    assert_unmapped(&d, "rbd", &blank);
}

/// Kills the daemon at `point` during Mount, restarts it, and checks that nothing
/// leaked and that the volume mounts again with its data.
fn crash_during_mount(point: &str) {
    let mut d = Daemon::start(DaemonOpts::host("host-a").env("RBDVOL_CRASH_AT", point));
    let name = unique("crash-m");
    d.create(&name, r#"{"size":"64M"}"#);
    d.call_expecting_crash(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(1)),
    );
    d.restart_with_env(&[("RBDVOL_CRASH_AT", "")]);
    assert_unmapped(&d, "rbd", &name);
    // Docker re-sends the Mount with the same ID when the container starts again.
    let mp = d.mount(&name, &mount_id(1));
    write_file(&mp.join("after"), point);
    d.unmount(&name, &mount_id(1));
    assert_unmapped(&d, "rbd", &name);
}

#[test]
fn a_crash_after_mapping_leaks_nothing() {
    crash_during_mount("mount:after-map");
}

#[test]
fn a_crash_after_mkfs_leaks_nothing() {
    crash_during_mount("mount:after-mkfs");
}

#[test]
fn a_crash_after_mounting_leaks_nothing() {
    crash_during_mount("mount:after-mount");
}

fn crash_during_unmount(point: &str) {
    let mut d = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique("crash-u");
    d.create(&name, r#"{"size":"64M"}"#);
    let mp = d.mount(&name, &mount_id(1));
    write_file(&mp.join("kept"), "kept");
    d.restart_with_env(&[("RBDVOL_CRASH_AT", point)]);
    d.call_expecting_crash(
        "VolumeDriver.Unmount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(1)),
    );
    d.restart_with_env(&[("RBDVOL_CRASH_AT", "")]);
    assert_unmapped(&d, "rbd", &name);
    let mp = d.mount(&name, &mount_id(2));
    assert_eq!(std::fs::read_to_string(mp.join("kept")).unwrap(), "kept");
    d.unmount(&name, &mount_id(2));
    assert_unmapped(&d, "rbd", &name);
}

#[test]
fn a_crash_after_umount_leaks_nothing() {
    crash_during_unmount("unmount:after-umount");
}

#[test]
fn a_crash_after_unmap_leaks_nothing() {
    crash_during_unmount("unmount:after-unmap");
}

#[test]
fn a_restarted_daemon_adopts_mounted_volumes() {
    let mut d = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique("adopt-mnt");
    d.create(&name, r#"{"size":"64M"}"#);
    let mp = d.mount(&name, &mount_id(1));
    write_file(&mp.join("live"), "still here");
    // A plugin restart (upgrade, crash) must not take filesystems away from containers.
    d.restart();
    assert!(is_mountpoint(&mp), "restart tore the mount down");
    assert_eq!(
        std::fs::read_to_string(mp.join("live")).unwrap(),
        "still here"
    );
    assert_eq!(
        d.get(&name)["Volume"]["Mountpoint"],
        mp.display().to_string()
    );
    d.unmount(&name, &mount_id(1));
    assert_unmapped(&d, "rbd", &name);
}

#[test]
fn a_foreign_image_is_formatted_only_if_nothing_was_ever_written() {
    let d = Daemon::start(DaemonOpts::host("host-a"));
    let work = tempfile::tempdir().unwrap();

    // Raw data with no signature (say, a database's raw device): refused, untouched.
    let name = unique("rawdata");
    let raw = work.path().join("raw.img");
    let st = Command::new("timeout")
        .args([
            "-k",
            "5",
            "60",
            "dd",
            "if=/dev/urandom",
            "bs=1M",
            "count=16",
            "status=none",
        ])
        .arg(format!("of={}", raw.display()))
        .status()
        .unwrap();
    assert!(st.success());
    import(&raw, &name);
    assert_refused_untouched(
        &d,
        &name,
        1,
        "holds data that no filesystem signature explains",
        work.path(),
    );

    // A foreign image nobody ever wrote to is provably blank: formatted and mounted.
    let name = unique("emptyforeign");
    let (ok, out) = rbd(&[
        "create",
        "--size",
        "64M",
        "--image-feature",
        "layering,exclusive-lock",
        &format!("rbd/{name}"),
    ]);
    assert!(ok, "{out}");
    let mp = d.mount(&name, &mount_id(2));
    write_file(&mp.join("f"), "ok");
    d.unmount(&name, &mount_id(2));
    assert_unmapped(&d, "rbd", &name);
}

#[test]
fn a_mount_root_that_is_itself_a_mount_point_is_kept() {
    let mut opts = DaemonOpts::host("host-a");
    opts.mount_root_is_a_mount = true;
    let mut d = Daemon::start(opts);
    assert!(is_mountpoint(&d.mount_root()));
    let name = unique("rootmnt");
    d.create(&name, r#"{"size":"64M"}"#);
    let mp = d.mount(&name, &mount_id(1));
    write_file(&mp.join("f"), "kept");
    // The start-up reconcile releases untracked mounts below the root, never the root.
    d.restart();
    assert!(
        is_mountpoint(&d.mount_root()),
        "the daemon unmounted its own mount root"
    );
    assert!(is_mountpoint(&mp));
    assert_eq!(std::fs::read_to_string(mp.join("f")).unwrap(), "kept");
    d.unmount(&name, &mount_id(1));
    // Only the root's own (test-made) mount remains.
    let root = format!("mount {}", d.mount_root().display());
    let left: Vec<String> = d.leftovers().into_iter().filter(|l| *l != root).collect();
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(lock_holders("rbd", &name), Vec::<String>::new());
}

/// The per-mount options (mountinfo field 6) of what is mounted at `path`.
fn per_mount_options(path: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(p.as_ref()))
        .unwrap_or_else(|| panic!("{p} is not mounted"));
    let opts = line.split(' ').nth(5).unwrap();
    opts.split(',').map(String::from).collect()
}

#[test]
fn volumes_mount_nosuid_nodev_under_a_private_root_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(DaemonOpts::host("host-a"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let plain = unique("nosuid");
    d.create(&plain, r#"{"size":"64M"}"#);
    let mp = d.mount(&plain, &mount_id(1));
    assert_eq!(
        mode(&d.mount_root()),
        0o700,
        "the mount root is open to other users"
    );
    let opts = per_mount_options(&mp);
    assert!(
        opts.iter().any(|o| o == "nosuid") && opts.iter().any(|o| o == "nodev"),
        "{opts:?}"
    );
    d.unmount(&plain, &mount_id(1));
    assert_unmapped(&d, "rbd", &plain);
    // The choice is part of the volume: a repeated Create asking otherwise conflicts.
    d.err(
        "VolumeDriver.Create",
        &format!(r#"{{"Name":"{plain}","Opts":{{"allow-suid-dev":"true"}}}}"#),
        "allow-suid-dev",
    );

    // The operator's opt-out, stored on the image like the other options.
    let allowed = unique("suid");
    d.create(&allowed, r#"{"size":"64M","allow-suid-dev":"true"}"#);
    assert_eq!(
        image_meta("rbd", &allowed, "rbdvol.allow-suid-dev").as_deref(),
        Some("true")
    );
    let mp = d.mount(&allowed, &mount_id(2));
    let opts = per_mount_options(&mp);
    assert!(
        !opts.iter().any(|o| o == "nosuid" || o == "nodev"),
        "{opts:?}"
    );
    d.unmount(&allowed, &mount_id(2));
    assert_unmapped(&d, "rbd", &allowed);
}
