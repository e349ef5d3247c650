//! Docker end to end, data: what one container writes the next reads (ext4, xfs);
//! two containers on one volume at once; `docker cp` into a running container;
//! `docker volume rm` refused while any container references the volume.
//! The fixtures and how they live with dockerd: tests/common/e2e/mod.rs.

mod common;

use std::path::Path;

use common::e2e::*;
use common::{image_meta, lock_holders, mounts_under};

/// Data written by one container is read back by the next, on ext4 and xfs; between
/// containers nothing is mounted or mapped and no lock is held.
#[test]
fn data_written_by_one_container_is_read_by_the_next() {
    let Some(mut s) = Scene::new("data") else {
        return;
    };
    let a = s.host("a", &[]);
    for (fstype, size) in [("ext4", "64M"), ("xfs", "320M")] {
        let vol = s.volume_name(fstype);
        s.create_ok(
            &a,
            &vol,
            &[&format!("size={size}"), &format!("fstype={fstype}")],
        );
        let out = s.run_ok(
            &vol,
            "echo hi > /data/f && dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null \
             && sha256sum /data/blob > /data/blob.sha256 && sync && cat /proc/mounts",
        );
        let line = out
            .lines()
            .find(|l| l.split(' ').nth(1) == Some("/data"))
            .unwrap_or_else(|| panic!("/data is not a mount in the container: {out}"));
        assert_eq!(line.split(' ').nth(2), Some(fstype), "{line}");
        s.plugin("a")
            .assert_idle("the container exited: its volume must be released");
        assert_eq!(lock_holders("rbd", &vol), Vec::<String>::new());
        let marker = image_meta("rbd", &vol, "rbdvol.formatted").expect("formatted marker");
        assert!(
            marker.starts_with(fstype) && marker.contains("host-a"),
            "{marker}"
        );

        let out = s.run_ok(&vol, "cat /data/f && sha256sum -c /data/blob.sha256");
        assert_eq!(out, "hi\n/data/blob: OK\n");
        s.plugin("a").assert_idle("the second container exited");
        assert!(s.rm(&vol).ok);
        assert_trashed("rbd", &vol);
    }
    s.finish();
}

/// Two containers hold one volume at once and see each other's files; `docker cp`
/// into and out of the running one mounts its mount ID a second time and must leave
/// its mount in place; `docker volume rm` is refused while any container (running or
/// stopped) references the volume, and trashes it afterwards.
#[test]
fn shared_volume_docker_cp_and_rm_while_in_use() {
    let Some(mut s) = Scene::new("share") else {
        return;
    };
    let a = s.host("a", &[]);
    let vol = s.volume_name("shared");
    s.create_ok(&a, &vol, &["size=64M"]);

    let holder = s.start_container(&vol, &["sleep", "600"]);
    s.exec(&holder, "echo from-first > /data/first && sync");
    let st = s.inspect(&vol);
    let mountpoint = st["Mountpoint"].as_str().unwrap_or_default().to_string();
    assert!(
        mountpoint.starts_with(s.plugin("a").root().to_str().unwrap()),
        "Mountpoint {mountpoint:?} is not under the plugin's mount root: {st}"
    );
    assert_eq!(st["Status"]["mounted_here"]["container_mounts"], 1, "{st}");
    assert_eq!(lock_holders("rbd", &vol).len(), 1);

    // A second container on the same volume, at the same time.
    let out = s.run_ok(
        &vol,
        "cat /data/first && echo from-second > /data/second && sync",
    );
    assert_eq!(out, "from-first\n");
    assert_eq!(s.exec(&holder, "cat /data/second"), "from-second\n");
    assert_eq!(
        s.inspect(&vol)["Status"]["mounted_here"]["container_mounts"],
        1,
        "the second container's mount was released"
    );

    // docker cp into the running container: Mount(same ID) + Unmount(same ID).
    let holder_ids = s.plugin("a").mount_ids(&vol);
    assert_eq!(holder_ids.len(), 1, "{holder_ids:?}");
    let mounts_before = s.plugin("a").mount_requests().len();
    let src = s.scratch.path().join("copied.txt");
    std::fs::write(&src, "copied in\n").unwrap();
    s.docker_ok(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{holder}:/data/copied.txt"),
    ]);
    let out = s.docker_ok(&["cp", &format!("{holder}:/data/second"), "-"]);
    assert!(out.contains("from-second"), "copy out: {out:?}");
    let cp_mounts = s.plugin("a").mount_requests().split_off(mounts_before);
    assert!(!cp_mounts.is_empty(), "docker cp did not mount the volume");
    assert!(
        cp_mounts
            .iter()
            .all(|id| id.as_ref() == Some(&holder_ids[0])),
        "docker cp on a running container mounts with the container's own ID {}: {cp_mounts:?}",
        holder_ids[0]
    );
    assert_eq!(s.plugin("a").mount_ids(&vol), holder_ids);
    // The running container still has its volume, with everything in it.
    assert_eq!(
        s.exec(&holder, "cat /data/copied.txt /data/first /data/second"),
        "copied in\nfrom-first\nfrom-second\n"
    );
    s.exec(&holder, "echo after-cp > /data/after && sync");
    assert!(
        mounts_under(Path::new(&mountpoint)).contains(&mountpoint),
        "the host mount went away under the running container"
    );
    assert_eq!(
        s.inspect(&vol)["Status"]["mounted_here"]["container_mounts"],
        1
    );

    // rm while a running container uses it: Docker refuses without asking the plugin.
    let removes = s.plugin("a").answered("VolumeDriver.Remove");
    let e = s.rm(&vol);
    assert!(!e.ok && e.stderr.contains("in use"), "{e}");
    s.docker_ok(&["stop", "-t", "1", &holder]);
    s.plugin("a")
        .assert_idle("the container stopped: its volume must be released");
    assert_eq!(lock_holders("rbd", &vol), Vec::<String>::new());
    // ... and while a stopped container still references it.
    let e = s.rm(&vol);
    assert!(!e.ok && e.stderr.contains("in use"), "{e}");
    assert_eq!(s.plugin("a").answered("VolumeDriver.Remove"), removes);
    assert_present("rbd", &vol);

    // The stopped container's files are all there for the next one.
    assert_eq!(
        s.run_ok(
            &vol,
            "cat /data/first /data/second /data/copied.txt /data/after"
        ),
        "from-first\nfrom-second\ncopied in\nafter-cp\n"
    );
    s.docker_ok(&["rm", &holder]);
    assert!(s.rm(&vol).ok);
    assert_trashed("rbd", &vol);
    s.finish();
}
