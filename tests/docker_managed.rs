//! Docker end to end, the managed (v2) plugin that integration/build-managed-plugin
//! builds from this build's binary and Debian packages (the first run on a machine
//! builds and caches its root filesystem), installed and enabled in a private Docker
//! node's dockerd.
//! The fixtures and how they live with dockerd: tests/common/e2e/mod.rs.

mod common;

use std::path::Path;
use std::time::Instant;

use common::e2e::*;
use common::host::live_pids;
use common::{cmdline, images_in, lock_holders};

/// Mounts strictly below `dir` as the node sees them (Docker's propagated mount is
/// itself a mount point, in the node's mount namespace).
fn mounts_below(node: &DockerNode, dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    node.mounts_under(dir)
        .into_iter()
        .filter(|m| *m != d)
        .collect()
}

/// Processes in the managed plugin `id`'s cgroup: its daemon plus one exporter per
/// mapped volume.
fn managed_processes(id: &str) -> Vec<String> {
    live_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .unwrap_or_default()
                .contains(id)
        })
        .map(|pid| format!("{pid}: {}", cmdline(pid)))
        .collect()
}

/// The managed (v2) plugin, built without a registry by integration/build-managed-plugin
/// and enabled in a private Docker node's dockerd: create/ls/inspect, data across containers, two
/// containers at once, docker cp, rm into the trash; Mount's in-plugin path reaches
/// the host through the propagated mount; disable and rm leave nothing behind.
#[test]
fn managed_plugin_end_to_end() {
    let Some(mut s) = Scene::new("managed") else {
        return;
    };
    let started = Instant::now();
    let name = s.managed_plugin("host-managed");
    say(&format!(
        "docker_e2e: managed plugin {name} built and enabled in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let id = s
        .docker_ok(&["plugin", "inspect", "-f", "{{.Id}}", &name])
        .trim()
        .to_string();
    let propagated = s
        .node("a")
        .data_root()
        .join(format!("plugins/{id}/propagated-mount"));
    assert_eq!(
        managed_processes(&id).len(),
        1,
        "the plugin runs one process: {:?}",
        managed_processes(&id)
    );

    let vol = s.volume_name("v2");
    s.create_ok(
        &name,
        &vol,
        &[
            "size=64M",
            "fstype=ext4",
            "mount-options=noatime",
            "pool=fast",
        ],
    );
    assert!(images_in("fast").contains(&vol));
    assert!(
        s.ls(&name)
            .contains(&(name.clone(), vol.clone(), "global".into())),
        "not listed: {:?}",
        s.ls(&name)
    );
    let v = s.inspect(&vol);
    assert_eq!(v["Driver"], name.as_str());
    let st = status_of(&v);
    assert_eq!(st["fstype"], "ext4", "{v}");
    assert_eq!(st["size_bytes"], 64 << 20, "{v}");
    assert_eq!(st["mount_options"], "noatime", "{v}");
    assert!(
        st["created_by"]
            .as_str()
            .unwrap_or_default()
            .contains("host-managed"),
        "{v}"
    );

    let out = s.run_ok(
        &vol,
        "echo managed > /data/f && sync && grep ' /data ' /proc/mounts",
    );
    assert!(out.contains(" ext4 ") && out.contains("noatime"), "{out}");
    assert!(
        mounts_below(s.node("a"), &propagated).is_empty(),
        "still mounted on the host"
    );
    assert_eq!(
        managed_processes(&id).len(),
        1,
        "an exporter outlived its volume"
    );
    assert_eq!(lock_holders("fast", &vol), Vec::<String>::new());

    // A container holding it, a second one at the same time, docker cp into the first.
    let holder = s.start_container(&vol, &["sleep", "600"]);
    let host_mp = propagated.join(format!("rbdvol/fast/{vol}"));
    assert!(
        mounts_below(s.node("a"), &propagated).contains(&host_mp.display().to_string()),
        "Mount's in-plugin path must reach the host at {}: {:?}",
        host_mp.display(),
        mounts_below(s.node("a"), &propagated)
    );
    let v = s.inspect(&vol);
    // Docker scopes Mount's answer but shows Get's Mountpoint as the plugin said it.
    assert_eq!(
        v["Mountpoint"],
        format!("/mnt/volumes/rbdvol/fast/{vol}").as_str(),
        "{v}"
    );
    assert_eq!(v["Status"]["mounted_here"]["container_mounts"], 1, "{v}");
    assert_eq!(managed_processes(&id).len(), 2, "daemon + one exporter");
    assert_eq!(
        s.run_ok(&vol, "cat /data/f && echo second > /data/g && sync"),
        "managed\n"
    );
    assert_eq!(s.exec(&holder, "cat /data/g"), "second\n");
    let src = s.scratch.path().join("in.txt");
    std::fs::write(&src, "copied\n").unwrap();
    s.docker_ok(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{holder}:/data/in.txt"),
    ]);
    assert_eq!(
        s.exec(&holder, "cat /data/in.txt /data/f"),
        "copied\nmanaged\n"
    );
    assert_eq!(
        s.inspect(&vol)["Status"]["mounted_here"]["container_mounts"],
        1
    );
    let e = s.rm(&vol);
    assert!(!e.ok && e.stderr.contains("in use"), "{e}");
    s.docker_ok(&["rm", "-f", &holder]);
    assert!(
        mounts_below(s.node("a"), &propagated).is_empty(),
        "still mounted on the host"
    );
    assert_eq!(
        managed_processes(&id).len(),
        1,
        "an exporter outlived its volume"
    );

    assert!(s.rm(&vol).ok);
    assert_trashed("fast", &vol);
    s.finish();
    assert!(
        !s.docker(&["plugin", "inspect", &name]).ok,
        "the plugin is still installed"
    );
    assert!(managed_processes(&id).is_empty(), "the plugin still runs");
    for dir in [s.node("a").exec_root(), s.node("a").plugin_dir()] {
        assert!(
            !dir.join("plugins").join(&id).exists() && !dir.join(&id).exists(),
            "the plugin's socket directory is still there"
        );
    }
}
