//! Docker end to end, several hosts (one private Docker node each): a volume another
//! host holds cannot be removed or used here; a volume created through one host's
//! plugin is seen and used, with its data, through another's.
//! The fixtures and how they live with dockerd: tests/common/e2e/mod.rs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::e2e::*;
use common::image_meta;

/// While another host holds the volume, `docker volume rm` and `docker run` here are
/// refused with the holder named; once it lets go, this host uses the volume.
#[test]
fn rm_and_run_refused_while_another_host_holds_the_volume() {
    let Some(mut s) = Scene::new("held") else {
        return;
    };
    let a = s.host("a", &[("RBDVOL_LOCK__TAKEOVER_WAIT", "3s")]);
    s.remote_host("b", &[]);
    let vol = s.volume_name("held");
    s.create_ok(&a, &vol, &["size=64M"]);

    // Host B's dockerd mounts it (raw requests, as that dockerd would send them).
    let b = s.plugin("b");
    let id = format!("{:064x}", 0xb0b);
    let mp = b.ok(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{vol}","ID":"{id}"}}"#),
    )["Mountpoint"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(Path::new(&mp).join("from-b"), "hello from b\n").unwrap();
    std::fs::File::open(Path::new(&mp).join("from-b"))
        .unwrap()
        .sync_all()
        .unwrap();

    let e = s.rm(&vol);
    assert!(!e.ok, "removed while host-b holds it: {e}");
    assert!(
        e.stderr.contains("host-b"),
        "the error must name the holder: {e}"
    );
    assert_present("rbd", &vol);

    let started = Instant::now();
    let e = s.run(&vol, "cat /data/from-b");
    assert!(!e.ok, "host-a mounted a volume host-b holds: {e}");
    assert!(
        e.stderr.contains("host-b"),
        "the error must name the holder: {e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the refusal took {:?}; host-a waits 3 s for a live holder",
        started.elapsed()
    );
    s.plugin("a")
        .assert_idle("a refused Mount must leave nothing behind");

    let b = s.plugin("b");
    b.ok(
        "VolumeDriver.Unmount",
        &format!(r#"{{"Name":"{vol}","ID":"{id}"}}"#),
    );
    b.assert_idle("host-b unmounted");

    assert_eq!(s.run_ok(&vol, "cat /data/from-b"), "hello from b\n");
    assert!(s.rm(&vol).ok);
    assert_trashed("rbd", &vol);
    s.finish();
}

/// A volume created with options through host A's plugin is listed, inspected (with
/// those options) and used with its data through host B's plugin, each host a Docker
/// node of its own. Host A's plugin runs with `remove.policy = keep`: `docker volume
/// rm` there makes host A's dockerd forget the volume while the image stays.
#[test]
fn a_volume_created_on_host_a_is_seen_and_used_on_host_b() {
    let Some(mut s) = Scene::new("hosts") else {
        return;
    };
    let a = s.host("a", &[("RBDVOL_REMOVE__POLICY", "keep")]);
    let b = s.host("b", &[]);
    let vol = s.volume_name("moved");
    s.create_ok(
        &a,
        &vol,
        &[
            "size=320M",
            "fstype=xfs",
            "mount-options=noatime",
            "pool=fast",
        ],
    );
    s.run_ok(&vol, "echo written-on-a > /data/f && sync");
    s.plugin("a").assert_idle("released on host-a");

    // dockerd forgets it (host A keeps the image).
    assert!(s.rm(&vol).ok);
    assert_present("fast", &vol);

    // Host B lists it, and adopts it without a Create.
    assert!(
        s.ls(&b).iter().any(|(d, n, _)| *d == b && *n == vol),
        "{vol} not listed by host-b"
    );
    s.create_ok(&b, &vol, &[]);
    assert_eq!(
        s.plugin("b").answered("VolumeDriver.Create"),
        0,
        "Docker found the volume with Get and must not have created it"
    );
    let v = s.inspect(&vol);
    assert_eq!(v["Driver"], b.as_str());
    let st = status_of(&v);
    assert_eq!(st["fstype"], "xfs", "{v}");
    assert_eq!(st["mount_options"], "noatime", "{v}");
    assert_eq!(st["size_bytes"], 320 << 20, "{v}");
    assert_eq!(st["pool"], "fast", "{v}");
    assert_eq!(st["formatted"], "yes", "{v}");
    assert!(
        st["created_by"]
            .as_str()
            .unwrap_or_default()
            .contains("host-a"),
        "{v}"
    );

    // Host B mounts host A's filesystem with its data, without formatting it again.
    let out = s.run_ok(&vol, "cat /data/f && grep ' /data ' /proc/mounts");
    assert!(out.starts_with("written-on-a\n"), "{out}");
    assert!(out.contains(" xfs ") && out.contains("noatime"), "{out}");
    let marker = image_meta("fast", &vol, "rbdvol.formatted").unwrap();
    assert!(marker.contains("host-a"), "reformatted on host-b? {marker}");
    s.plugin("b").assert_idle("released on host-b");

    assert!(s.rm(&vol).ok);
    assert_trashed("fast", &vol);
    s.finish();
}
