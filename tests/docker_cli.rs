//! Docker end to end, the volume commands: `docker volume create/ls/inspect/rm`
//! through a private Docker node's dockerd and a real legacy (v1) plugin, with options
//! checked in the cluster, and bad options refused with the plugin's words.
//! The fixtures and how they live with dockerd: tests/common/e2e/mod.rs.

mod common;

use serde_json::Value;

use common::e2e::*;
use common::{image_meta, images_in};

/// `docker volume create/ls/inspect/rm` with options; bad options are refused with the
/// plugin's words shown by the CLI, and nothing is created, in dockerd or the cluster.
#[test]
fn create_ls_inspect_rm_and_bad_options_through_dockerd() {
    let Some(mut s) = Scene::new("cli") else {
        return;
    };
    let a = s.host("a", &[]);
    let small = s.volume_name("ext4");
    let big = s.volume_name("xfs");
    s.create_ok(
        &a,
        &small,
        &[
            "size=64M",
            "fstype=ext4",
            "pool=fast",
            "mount-options=noatime",
            "features=layering,exclusive-lock,object-map,fast-diff",
        ],
    );
    s.create_ok(&a, &big, &["size=320M", "fstype=xfs"]);

    // The cluster has what was asked for.
    let info = rbd_info("fast", &small);
    assert_eq!(info["size"], 64 << 20, "{info}");
    let features: Vec<&str> = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for f in ["layering", "exclusive-lock", "object-map", "fast-diff"] {
        assert!(features.contains(&f), "{f} missing: {info}");
    }
    assert_eq!(
        image_meta("fast", &small, "rbdvol.fstype").as_deref(),
        Some("ext4")
    );
    assert_eq!(
        image_meta("fast", &small, "rbdvol.mount-options").as_deref(),
        Some("noatime")
    );
    assert_eq!(rbd_info("rbd", &big)["size"], 320 << 20);
    assert_eq!(
        image_meta("rbd", &big, "rbdvol.fstype").as_deref(),
        Some("xfs")
    );

    // docker volume ls (this driver only), with the plugin's global scope.
    let ls = s.ls(&a);
    for n in [&small, &big] {
        assert!(
            ls.contains(&(a.clone(), n.clone(), "global".into())),
            "{n} not listed: {ls:?}"
        );
    }

    // docker volume inspect shows the plugin's Status.
    let v = s.inspect(&small);
    assert_eq!(v["Name"], small.as_str());
    assert_eq!(v["Driver"], a.as_str());
    assert_eq!(v["Scope"], "global");
    let st = status_of(&v);
    assert_eq!(st["pool"], "fast", "{v}");
    assert_eq!(st["size_bytes"], 64 << 20, "{v}");
    assert_eq!(st["fstype"], "ext4", "{v}");
    assert_eq!(st["mount_options"], "noatime", "{v}");
    assert_eq!(st["formatted"], "no", "{v}");
    assert_eq!(st["in_use"], "no", "{v}");
    assert!(
        st["created_by"]
            .as_str()
            .unwrap_or_default()
            .contains("host-a"),
        "{v}"
    );
    assert!(
        v["CreatedAt"].as_str().is_some_and(|t| t.len() >= 20),
        "CreatedAt: {v}"
    );
    assert_eq!(s.inspect(&big)["Status"]["fstype"], "xfs");

    // Bad input: the CLI shows the plugin's error; nothing is created anywhere.
    let bad: &[(&[&str], &str, &str)] = &[
        (&["size=10X"], "size", "a bad size"),
        (&["fstype=btrfs"], "ext4", "an unknown fstype"),
        (&["colour=blue"], "unknown option", "an unknown option"),
        (&["pool=nope"], "pool", "an unconfigured pool"),
        (&["mkfs-options=-F"], "mkfs-options", "forced mkfs"),
        (&["size=1M"], "size", "a too-small size"),
    ];
    for (i, (opts, needle, what)) in bad.iter().enumerate() {
        let name = s.volume_name(&format!("bad{i}"));
        let o = s.create(&a, &name, opts);
        assert!(!o.ok, "{what} was accepted: {o}");
        assert!(o.stderr.contains(needle), "{what}: {o}");
        assert!(
            o.stderr.contains(&name),
            "{what}: the error names the volume: {o}"
        );
        for pool in ["rbd", "fast"] {
            assert!(
                !images_in(pool).contains(&name),
                "{what}: {pool}/{name} exists"
            );
        }
        assert!(
            !s.ls(&a).iter().any(|(_, n, _)| *n == name),
            "{what}: dockerd lists {name}"
        );
    }
    let o = s.create(&a, "bad name", &[]);
    assert!(!o.ok && o.stderr.contains("invalid volume name"), "{o}");

    // Re-creating with other options through the same dockerd: Docker answers from
    // its own record and never sends Create, so the volume is left as it was.
    let creates = s.plugin("a").answered("VolumeDriver.Create");
    let _ = s.create(&a, &small, &["size=128M"]);
    assert_eq!(s.plugin("a").answered("VolumeDriver.Create"), creates);
    assert_eq!(rbd_info("fast", &small)["size"], 64 << 20);

    // docker volume rm: into the RBD trash.
    for n in [&small, &big] {
        let o = s.rm(n);
        assert!(o.ok, "{o}");
    }
    assert_trashed("fast", &small);
    assert_trashed("rbd", &big);
    assert!(!s.ls(&a).iter().any(|(_, n, _)| *n == small || *n == big));
    s.finish();
}
