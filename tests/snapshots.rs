//! Snapshots, clones, rollback and resize against the real cluster and the real data
//! path: every check reads the data back through a mounted filesystem (or fscks a
//! copy of the image), and the `rbdvol` CLI is run as an operator would run it.

mod common;
#[path = "snapshots/util.rs"]
mod util;

use common::*;
use serde_json::Value;
use util::*;

#[test]
fn snapshots_are_created_listed_shown_in_inspect_and_removed() {
    let a = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique("snap");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    write_synced(&mp.join("a"), b"before");

    // Taken while the volume is mounted and held on host-a.
    let out = rbdvol_ok(&["snapshot", "create", &name, "first"]);
    assert_eq!(
        out.trim(),
        format!("created snapshot {name}@first (filesystem frozen for it on host-a)")
    );
    let out = rbdvol_ok(&["snapshot", "create", &name, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let auto = v["snapshot"].as_str().unwrap().to_string();
    assert!(auto.starts_with("snap-"), "{out}");
    rbdvol_refused(&["snapshot", "create", &name, "first"], "already exists");
    rbdvol_refused(
        &["snapshot", "create", &name, "bad/name"],
        "invalid volume name",
    );
    rbdvol_refused(
        &["snapshot", "create", "no-such-volume-x", "s"],
        "does not exist",
    );

    let out = rbdvol_ok(&["snapshot", "ls", &name]);
    let line = out
        .lines()
        .find(|l| l.starts_with("first "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("64 MiB") && line.contains("20"), "{line}");
    let v: Value = serde_json::from_str(&rbdvol_ok(&["snapshot", "ls", &name, "--json"])).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", auto.as_str()]);
    assert_eq!(v[0]["size_bytes"], 64 << 20);

    // docker volume inspect: Status lists name, time and size.
    let st = a.get(&name)["Volume"]["Status"]["snapshots"].clone();
    assert_eq!(st[0]["name"], "first", "{st}");
    assert_eq!(st[0]["size"], "64 MiB", "{st}");
    assert!(st[0]["created"].as_str().unwrap().ends_with('Z'), "{st}");

    rbdvol_refused(&["snapshot", "rm", &name], "VOLUME@SNAPSHOT");
    rbdvol_refused(
        &["snapshot", "rm", &format!("{name}@nope")],
        "does not exist",
    );
    assert_eq!(
        rbdvol_ok(&["snapshot", "rm", &format!("{name}@first")]).trim(),
        format!("removed snapshot {name}@first")
    );
    rbdvol_ok(&["snapshot", "rm", &format!("{name}@{auto}")]);
    assert!(rbdvol_ok(&["snapshot", "ls", &name]).contains("has no snapshots"));
    assert!(a.get(&name)["Volume"]["Status"].get("snapshots").is_none());
    // The volume was never disturbed.
    assert_same(&mp.join("a"), b"before");
    let ctl = format!("rbdvol.ctl.{name}");
    assert!(
        object_exists("rbd", &ctl),
        "the holder does not watch {ctl}"
    );
    a.unmount(&name, &mount_id(1));
    a.ok("VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
    assert!(!object_exists("rbd", &ctl), "{ctl} outlived its volume");
}

#[test]
fn clones_and_restores_hold_their_data_byte_for_byte_and_protect_their_source() {
    let a = Daemon::start(DaemonOpts::host("host-a"));
    let src = unique("src");
    a.create(&src, r#"{"size":"320M","fstype":"xfs"}"#);
    let one = pattern(1, 6 << 20);
    let two = pattern(2, 3 << 20);
    let mp = a.mount(&src, &mount_id(1));
    write_synced(&mp.join("one"), &one);
    rbdvol_ok(&["snapshot", "create", &src, "nightly"]);
    write_synced(&mp.join("two"), &two);

    // From a snapshot: the state at the snapshot. From the volume: its state now.
    let restored = unique("restored");
    a.create(&restored, &format!(r#"{{"from":"{src}@nightly"}}"#));
    let copy = unique("copy");
    a.create(&copy, &format!(r#"{{"from":"{src}"}}"#));
    // Repeating a Create is accepted; a different source is a conflict.
    a.create(&restored, &format!(r#"{{"from":"{src}@nightly"}}"#));
    a.err(
        "VolumeDriver.Create",
        &format!(r#"{{"Name":"{restored}","Opts":{{"from":"{copy}"}}}}"#),
        "already exists",
    );
    a.err(
        "VolumeDriver.Create",
        &format!(
            r#"{{"Name":"{}","Opts":{{"from":"{src}","size":"1G"}}}}"#,
            unique("x")
        ),
        "only pool= may be given",
    );
    a.err(
        "VolumeDriver.Create",
        &format!(
            r#"{{"Name":"{}","Opts":{{"from":"{src}@nope"}}}}"#,
            unique("x")
        ),
        "has no snapshot nope",
    );
    a.unmount(&src, &mount_id(1));

    let st = a.get(&restored)["Volume"]["Status"].clone();
    assert_eq!(st["origin"], format!("rbd/{src}@nightly"), "{st}");
    assert_eq!(st["fstype"], "xfs", "{st}");
    let mr = a.mount(&restored, &mount_id(2));
    assert_same(&mr.join("one"), &one);
    assert!(
        !mr.join("two").exists(),
        "the restore holds data written after its snapshot"
    );
    let mc = a.mount(&copy, &mount_id(3));
    assert_same(&mc.join("one"), &one);
    assert_same(&mc.join("two"), &two);
    // Clones are volumes of their own: writing one changes nothing elsewhere.
    write_synced(&mc.join("one"), b"changed in the copy");
    assert_same(&mr.join("one"), &one);
    a.unmount(&restored, &mount_id(2));
    a.unmount(&copy, &mount_id(3));
    let ms = a.mount(&src, &mount_id(4));
    assert_same(&ms.join("one"), &one);
    a.unmount(&src, &mount_id(4));
    let formats = a.log().matches("volume is blank: formatting").count();
    assert_eq!(formats, 1, "a clone was formatted:\n{}", a.log());

    // The source and its snapshots stay while clones depend on them.
    let ls = rbdvol_ok(&["snapshot", "ls", &src]);
    assert!(ls.contains(&format!("rbd/{restored}")), "{ls}");
    rbdvol_refused(&["snapshot", "rm", &format!("{src}@nightly")], &restored);
    let e = a.err(
        "VolumeDriver.Remove",
        &format!(r#"{{"Name":"{src}"}}"#),
        "cloned from",
    );
    assert!(e.contains(&restored) && e.contains(&copy), "{e}");
    assert!(images_in("rbd").contains(&src));
    for v in [&restored, &copy] {
        a.ok("VolumeDriver.Remove", &format!(r#"{{"Name":"{v}"}}"#));
    }
    // With its clones in the trash (still restorable, still reading from it), the
    // source follows them there, snapshots included.
    a.ok("VolumeDriver.Remove", &format!(r#"{{"Name":"{src}"}}"#));
    assert!(trashed_names("rbd").contains(&src));
    let (ok, out) = rbd(&["snap", "ls", "-p", "rbd", "--image-id", &trash_id(&src)]);
    assert!(ok && out.contains("nightly"), "{out}");
}

#[test]
fn rollback_is_refused_while_mounted_and_correct_when_not() {
    let a = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique("rb");
    a.create(&name, r#"{"size":"64M"}"#);
    let keep = pattern(3, 2 << 20);
    let mp = a.mount(&name, &mount_id(1));
    write_synced(&mp.join("keep"), &keep);
    rbdvol_ok(&["snapshot", "create", &name, "good"]);
    write_synced(&mp.join("keep"), b"overwritten after the snapshot");
    write_synced(&mp.join("later"), b"written after the snapshot");

    let e = rbdvol_refused(&["snapshot", "rollback", &format!("{name}@good")], "host-a");
    assert!(e.contains("unmounted everywhere"), "{e}");
    assert_same(&mp.join("later"), b"written after the snapshot");
    a.unmount(&name, &mount_id(1));

    rbdvol_refused(
        &["snapshot", "rollback", &format!("{name}@nope")],
        "does not exist",
    );
    let out = rbdvol_ok(&["snapshot", "rollback", &format!("{name}@good"), "--json"]);
    assert!(out.contains(r#""rolled_back":true"#), "{out}");
    let dir = tempfile::tempdir().unwrap();
    assert_fsck_clean(&format!("rbd/{name}"), dir.path());
    let mp = a.mount(&name, &mount_id(2));
    assert_same(&mp.join("keep"), &keep);
    assert!(!mp.join("later").exists());
    a.unmount(&name, &mount_id(2));
}

fn grow_at_next_mount(fstype: &str, from: &str, to: &str, to_bytes: u64) {
    let a = Daemon::start(DaemonOpts::host("host-a"));
    let name = unique("grow");
    a.create(
        &name,
        &format!(r#"{{"size":"{from}","fstype":"{fstype}"}}"#),
    );
    let data = pattern(4, 4 << 20);
    let mp = a.mount(&name, &mount_id(1));
    write_synced(&mp.join("data"), &data);
    let before = fs_size(&mp);
    a.unmount(&name, &mount_id(1));

    let e = rbdvol_refused(&["resize", &name, "16M"], "only grows volumes");
    assert!(e.contains("shrinking"), "{e}");
    rbdvol_refused(&["resize", &name, "ten"], "invalid option size");
    let out = rbdvol_ok(&["resize", &name, to, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["new_bytes"], to_bytes, "{out}");
    assert_eq!(a.get(&name)["Volume"]["Status"]["size_bytes"], to_bytes);

    let mp = a.mount(&name, &mount_id(2));
    let after = fs_size(&mp);
    assert!(
        after > before + (to_bytes - before) / 2,
        "{fstype} was not grown at Mount: {before} -> {after} bytes on a {to_bytes}-byte volume\n{}",
        a.log()
    );
    assert_same(&mp.join("data"), &data);
    assert_eq!(
        image_meta("rbd", &name, "rbdvol.grow-fs"),
        None,
        "the grow mark stayed"
    );
    a.unmount(&name, &mount_id(2));
}

#[test]
fn ext4_grows_at_the_next_mount_and_shrinking_is_refused() {
    grow_at_next_mount("ext4", "64M", "160M", 160 << 20);
}

#[test]
fn xfs_grows_at_the_next_mount_and_shrinking_is_refused() {
    grow_at_next_mount("xfs", "320M", "640M", 640 << 20);
}

/// The trash id of an image removed to the trash.
fn trash_id(name: &str) -> String {
    let (ok, out) = rbd(&["trash", "ls", "-p", "rbd", "--format", "json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["id"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{name} is not in the trash: {out}"))
}
