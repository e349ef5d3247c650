//! The node's decisions, with the cluster, the host and the mappers faked in memory
//! (`crate::testing`): references across IDs and dockerd instances, rollback after a
//! failure at every step of Mount, fencing, orphans, reconcile, and Remove racing Mount.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::attach::Mappers;
use super::{Node, NodeConfig};
use crate::error::Error;
use crate::host::fs::{Content, Probe};
use crate::host::mapper::{Health, KernelMapping, MapperKind};
use crate::testing::*;

mod grow;
mod reconcile;

struct World {
    node: Node,
    cluster: Arc<FakeCluster>,
    host: Arc<FakeHost>,
    mapper: Arc<FakeMapper>,
    krbd: Arc<FakeMapper>,
    dir: tempfile::TempDir,
}

impl World {
    fn mountpoint(&self, name: &str) -> PathBuf {
        self.dir.path().join("mounts/rbd").join(name)
    }

    /// Nothing of `name` is left on this host: no record, mapping or mount.
    fn assert_released(&self, name: &str) {
        assert!(self.node.attached(name).is_none(), "{name} still recorded");
        assert!(!self.mapper.is_mapped("rbd", name), "{name} still mapped");
        assert!(
            !self.host.is_mounted(&self.mountpoint(name)),
            "{name} still mounted"
        );
    }

    /// Makes every reference of `name` look `secs` old.
    fn age(&self, name: &str, secs: u64) {
        let now = super::mounts::now_secs();
        self.node
            .update_table(|vols| {
                for r in vols.get_mut(name).unwrap().refs.values_mut() {
                    r.since = now - secs;
                }
            })
            .unwrap();
    }

    /// A node restarted on the same state directory and effects.
    fn restarted(self) -> World {
        let node = node_on(
            self.dir.path(),
            self.cluster.clone(),
            self.host.clone(),
            self.mapper.clone(),
            self.krbd.clone(),
            true,
        );
        World { node, ..self }
    }
}

fn node_on(
    dir: &Path,
    cluster: Arc<FakeCluster>,
    host: Arc<FakeHost>,
    mapper: Arc<FakeMapper>,
    krbd: Arc<FakeMapper>,
    sees_all: bool,
) -> Node {
    let mappers = Mappers::new(
        mapper.kind,
        vec![mapper, krbd, Arc::new(FakeMapper::new(MapperKind::Nbd))],
    );
    Node::new(
        NodeConfig {
            host_id: "host-a".into(),
            mount_root: dir.join("mounts"),
            pools: vec!["rbd".into(), "fast".into()],
            takeover_wait: Duration::from_secs(1),
            orphan_grace: Duration::from_secs(60),
            state_dir: dir.join("state"),
            dockerd_pid_file: dir.join("docker.pid"),
            sees_all_processes: sees_all,
            ms_mode: "auto".into(),
        },
        cluster,
        host,
        mappers,
    )
    .unwrap()
}

fn world_with(images: Vec<crate::ceph::images::ImageFacts>, kind: MapperKind) -> World {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(FakeCluster::with(images));
    let host = Arc::new(FakeHost::default());
    let mapper = Arc::new(FakeMapper::new(kind));
    let krbd = if kind == MapperKind::Krbd {
        mapper.clone()
    } else {
        Arc::new(FakeMapper::new(MapperKind::Krbd))
    };
    let node = node_on(
        dir.path(),
        cluster.clone(),
        host.clone(),
        mapper.clone(),
        krbd.clone(),
        true,
    );
    World {
        node,
        cluster,
        host,
        mapper,
        krbd,
        dir,
    }
}

fn world() -> World {
    world_with(vec![fresh("rbd", "v")], MapperKind::Userspace)
}

fn id(n: u32) -> String {
    format!("{n:064x}")
}

#[tokio::test]
async fn a_first_mount_maps_formats_marks_and_mounts() {
    let w = world();
    let mp = w.node.mount("v", &id(1)).await.unwrap();
    assert_eq!(mp, w.mountpoint("v"));
    assert!(w.host.is_mounted(&mp) && w.mapper.is_mapped("rbd", "v"));
    let mkfs = w.host.state.lock().unwrap().mkfs.clone();
    assert_eq!(mkfs, [("ext4".into(), true, PathBuf::from("/dev/fake1"))]);
    assert!(w
        .cluster
        .meta("v", "formatted")
        .unwrap()
        .starts_with("ext4 by host-a"));
    assert!(w.cluster.meta("v", "first-mapped").is_some());
    let options = w.host.state.lock().unwrap().mounted[0].1.clone();
    assert!(
        options.contains("nosuid") && options.contains("nodev"),
        "{options}"
    );
    assert_eq!(w.node.attached("v").unwrap().container_mounts, 1);
}

#[tokio::test]
async fn further_ids_are_counted_without_mapping_again() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.node.mount("v", &id(2)).await.unwrap();
    assert_eq!(w.mapper.maps(), 1);
    assert_eq!(w.node.attached("v").unwrap().container_mounts, 2);
    w.node.unmount("v", &id(1)).await.unwrap();
    assert!(
        w.mapper.is_mapped("rbd", "v"),
        "the other container still uses it"
    );
    w.node.unmount("v", &id(2)).await.unwrap();
    w.assert_released("v");
}

#[tokio::test]
async fn the_same_id_twice_needs_two_unmounts() {
    // docker cp on a running container mounts the container's ID again.
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.node.mount("v", &id(1)).await.unwrap();
    w.node.unmount("v", &id(1)).await.unwrap();
    assert!(w.node.attached("v").is_some());
    w.node.unmount("v", &id(1)).await.unwrap();
    w.assert_released("v");
}

#[tokio::test]
async fn an_unknown_id_or_volume_unmounts_as_a_no_op() {
    let w = world();
    w.node.unmount("v", &id(9)).await.unwrap();
    w.node.mount("v", &id(1)).await.unwrap();
    w.node.unmount("v", &id(9)).await.unwrap();
    assert_eq!(w.node.attached("v").unwrap().container_mounts, 1);
}

#[tokio::test]
async fn a_mount_from_a_restarted_dockerd_replaces_the_stale_count() {
    let w = world();
    let pid_file = w.dir.path().join("docker.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
    w.node.mount("v", &id(1)).await.unwrap();
    // dockerd crashed without Unmount; the new one (another pid) mounts the same ID.
    std::fs::write(&pid_file, "1\n").unwrap();
    w.node.mount("v", &id(1)).await.unwrap();
    w.node.unmount("v", &id(1)).await.unwrap();
    w.assert_released("v");
}

#[tokio::test]
async fn a_failed_map_leaves_nothing() {
    let w = world();
    w.mapper.set(|s| s.fail_map = true);
    assert!(w.node.mount("v", &id(1)).await.is_err());
    w.assert_released("v");
    assert!(w.cluster.meta("v", "first-mapped").is_none());
}

#[tokio::test]
async fn every_later_step_that_fails_is_undone() {
    for step in ["probe", "mkfs", "mount"] {
        let w = world();
        w.host.set(|s| {
            s.fail.insert(step);
        });
        let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
        assert!(err.contains(step), "{step}: {err}");
        w.assert_released("v");
        assert_eq!(w.mapper.state.lock().unwrap().unmaps.len(), 1, "{step}");
    }
}

#[tokio::test]
async fn a_failed_metadata_write_is_undone() {
    let w = world();
    w.cluster.set(|s| s.fail_set_meta = true);
    let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
    assert!(err.contains("Read-only"), "{err}");
    w.assert_released("v");
}

#[tokio::test]
async fn a_failed_check_of_an_existing_filesystem_is_undone() {
    let w = world();
    w.host.set(|s| {
        s.probes
            .insert("/dev/fake1".into(), Probe::Signature("ext4".into()));
        s.fail.insert("preen");
    });
    assert!(w.node.mount("v", &id(1)).await.is_err());
    w.assert_released("v");
    assert!(w.host.state.lock().unwrap().mkfs.is_empty());
}

#[tokio::test]
async fn a_reference_that_cannot_be_recorded_is_undone() {
    let w = world();
    // The table's temp file taken by a directory: the save fails, even as root.
    let state = w.dir.path().join("state");
    std::fs::create_dir_all(state.join("refs.tmp")).unwrap();
    assert!(w.node.mount("v", &id(1)).await.is_err());
    w.assert_released("v");
}

#[tokio::test]
async fn an_unreadable_blank_looking_device_is_refused_untouched() {
    let w = world_with(
        vec![facts(
            "rbd",
            "v",
            &[("fstype", "ext4"), ("first-mapped", "t")],
        )],
        MapperKind::Userspace,
    );
    w.host.set(|s| {
        s.content
            .insert("/dev/fake1".into(), Content::Unreadable("EIO".into()));
    });
    let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
    assert!(err.contains("could not be read"), "{err}");
    assert!(w.host.state.lock().unwrap().mkfs.is_empty());
    w.assert_released("v");
}

#[tokio::test]
async fn a_volume_that_was_written_but_shows_no_filesystem_is_never_formatted() {
    let w = world_with(
        vec![facts(
            "rbd",
            "v",
            &[
                ("fstype", "ext4"),
                ("created-at", "t"),
                ("first-mapped", "t"),
            ],
        )],
        MapperKind::Userspace,
    );
    w.cluster.set(|s| {
        s.allocated.insert("v".into());
    });
    let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
    assert!(err.contains("will not format"), "{err}");
    assert!(w.host.state.lock().unwrap().mkfs.is_empty());
    w.assert_released("v");
}

#[tokio::test]
async fn a_filesystem_found_is_mounted_as_is_and_marked() {
    let w = world_with(vec![facts("rbd", "v", &[])], MapperKind::Userspace);
    w.host.set(|s| {
        s.probes
            .insert("/dev/fake1".into(), Probe::Signature("xfs".into()));
    });
    w.node.mount("v", &id(1)).await.unwrap();
    assert!(w.host.state.lock().unwrap().mkfs.is_empty());
    let marker = w.cluster.meta("v", "formatted").unwrap();
    assert!(marker.starts_with("xfs found by host-a"), "{marker}");
    let options = w.host.state.lock().unwrap().mounted[0].1.clone();
    assert!(options.contains("nouuid"), "{options}");
}

#[tokio::test]
async fn tampered_metadata_is_refused_before_anything_is_mapped() {
    let w = world_with(
        vec![facts(
            "rbd",
            "v",
            &[("fstype", "ext4"), ("mkfs-options", "-d /etc")],
        )],
        MapperKind::Userspace,
    );
    let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
    assert!(err.contains("changed outside rbdvol"), "{err}");
    assert_eq!(w.mapper.maps(), 0);
}

#[tokio::test]
async fn a_volume_that_does_not_exist_is_not_found() {
    let w = world();
    let err = w.node.mount("nope", &id(1)).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(w.mapper.maps(), 0);
}

#[tokio::test]
async fn a_mount_refused_by_another_holder_names_it() {
    let mut f = fresh("rbd", "v");
    held_by(&mut f, "host-b", "10.0.0.3:0/7");
    let w = world_with(vec![f], MapperKind::Userspace);
    w.mapper.set(|s| s.fail_map = true);
    let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
    assert!(err.contains("in use on host host-b"), "{err}");
}

#[tokio::test]
async fn a_fenced_volume_refuses_new_mounts_until_its_last_unmount() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.mapper.set(|s| {
        s.health.insert("rbd/v".into(), Health::Fenced);
    });
    w.node.check_fencing(None).await;
    assert!(w.node.attached("v").unwrap().fenced);
    let err = w.node.mount("v", &id(2)).await.unwrap_err().to_string();
    assert!(err.contains("fenced"), "{err}");
    assert_eq!(w.mapper.maps(), 1);
    w.node.unmount("v", &id(1)).await.unwrap();
    w.assert_released("v");
}

#[tokio::test]
async fn a_mount_finding_its_recorded_mount_gone_mounts_again_and_keeps_the_counts() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.host.set(|s| s.mounts.clear());
    w.node.mount("v", &id(2)).await.unwrap();
    assert_eq!(w.mapper.maps(), 2);
    assert_eq!(w.node.attached("v").unwrap().container_mounts, 2);
}

#[tokio::test]
async fn a_teardown_that_fails_keeps_the_record_for_a_retry() {
    let w = world();
    let mp = w.node.mount("v", &id(1)).await.unwrap();
    w.host.set(|s| {
        s.busy.insert(mp.clone());
    });
    assert!(w.node.unmount("v", &id(1)).await.is_err());
    assert!(
        w.node.attached("v").is_some(),
        "forgotten while still mounted"
    );
    w.host.set(|s| s.busy.clear());
    // The sweep retries a record with no references.
    w.node.release_orphans().await;
    w.assert_released("v");
}

#[tokio::test]
async fn a_device_still_in_use_is_not_released_and_not_mounted_over() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.host.set(|s| s.mounts.clear());
    w.mapper.set(|s| s.fail_unmap = true);
    assert!(w.node.mount("v", &id(2)).await.is_err());
    assert_eq!(
        w.mapper.maps(),
        1,
        "mapped a second time over a device in use"
    );
    assert!(w.node.attached("v").is_some());
}

#[tokio::test]
async fn remove_is_refused_while_mounted_here_and_runs_otherwise() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    let err = w
        .node
        .while_unmounted("v", async { Ok(()) })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("mounted on this host (host-a) by 1"), "{err}");
    w.node.unmount("v", &id(1)).await.unwrap();
    w.node.while_unmounted("v", async { Ok(()) }).await.unwrap();
}

#[tokio::test]
async fn a_remove_racing_a_mount_waits_for_it_and_refuses() {
    let w = Arc::new(world());
    w.mapper.set(|s| s.map_delay = Duration::from_millis(200));
    let m = w.clone();
    let mounting = tokio::spawn(async move { m.node.mount("v", &id(1)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let removed = std::sync::atomic::AtomicBool::new(false);
    let r = w
        .node
        .while_unmounted("v", async {
            removed.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
        .await;
    assert!(
        r.is_err(),
        "Remove ran while a Mount of the volume was under way"
    );
    assert!(!removed.load(std::sync::atomic::Ordering::SeqCst));
    mounting.await.unwrap().unwrap();
}

/// A krbd world whose mapper holds the fake cluster's image locks like the kernel
/// client: while mapped writable, the daemon's own metadata writes get EROFS.
fn krbd_world(images: Vec<crate::ceph::images::ImageFacts>) -> World {
    let w = world_with(images, MapperKind::Krbd);
    let cluster = w.cluster.clone();
    w.mapper.set(|s| s.locks_in = Some(cluster));
    w
}

#[tokio::test]
async fn under_krbd_the_marks_are_written_while_the_image_is_unmapped() {
    // Measured on a 6.1 kernel: the first Mount failed with "writing metadata
    // rbdvol.formatted … Read-only file system" while krbd held the lock.
    let w = krbd_world(vec![fresh("rbd", "v")]);
    let mp = w.node.mount("v", &id(1)).await.unwrap();
    assert!(w.host.is_mounted(&mp) && w.mapper.is_mapped("rbd", "v"));
    let marker = w.cluster.meta("v", "formatted").unwrap();
    assert!(marker.starts_with("ext4 by host-a"), "{marker}");
    assert!(w.cluster.meta("v", "first-mapped").is_some());
    assert_eq!(w.host.state.lock().unwrap().mkfs.len(), 1, "formatted once");
    assert_eq!(w.mapper.maps(), 2, "mapped again after the marks");
    // The fake cluster's monitors speak msgr2 only.
    let modes = w.mapper.state.lock().unwrap().ms_modes.clone();
    assert_eq!(modes, vec![Some("prefer-crc".to_string()); 2]);
    // The next Mount has nothing to mark: one map, no detour.
    w.node.unmount("v", &id(1)).await.unwrap();
    w.assert_released("v");
    w.node.mount("v", &id(2)).await.unwrap();
    assert_eq!(w.mapper.maps(), 3);
    assert_eq!(
        w.host.state.lock().unwrap().mkfs.len(),
        1,
        "never formatted again"
    );
}

#[tokio::test]
async fn under_krbd_a_filesystem_found_unmarked_is_marked_too() {
    let w = krbd_world(vec![facts("rbd", "v", &[("fstype", "ext4")])]);
    w.host.set(|s| {
        s.probes
            .insert("/dev/fake1".into(), Probe::Signature("xfs".into()));
    });
    w.node.mount("v", &id(1)).await.unwrap();
    let marker = w.cluster.meta("v", "formatted").unwrap();
    assert!(marker.starts_with("xfs found by host-a"), "{marker}");
    assert!(w.host.state.lock().unwrap().mkfs.is_empty());
}

#[tokio::test]
async fn under_krbd_a_mark_that_cannot_be_written_leaves_nothing_mapped() {
    let w = krbd_world(vec![fresh("rbd", "v")]);
    w.cluster.set(|s| s.fail_set_meta = true);
    let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
    assert!(err.contains("Read-only"), "{err}");
    w.assert_released("v");
    // The filesystem made is found (and marked) by the next Mount, never formatted.
    w.cluster.set(|s| s.fail_set_meta = false);
    w.node.mount("v", &id(1)).await.unwrap();
    assert_eq!(w.host.state.lock().unwrap().mkfs.len(), 1);
    assert!(w
        .cluster
        .meta("v", "formatted")
        .unwrap()
        .starts_with("ext4 found by host-a"));
}

#[tokio::test]
async fn under_krbd_a_volume_changed_while_unmapped_is_not_mounted() {
    let w = krbd_world(vec![fresh("rbd", "v")]);
    // What was just made is gone once the image is mapped again (another host wiped
    // it meanwhile): the fake maps to a fresh, blank device each time.
    w.mapper.set(|s| s.new_device_each_map = true);
    let err = w.node.mount("v", &id(1)).await.unwrap_err().to_string();
    assert!(err.contains("changed while it was unmapped"), "{err}");
    w.assert_released("v");
}

#[tokio::test]
async fn a_kernel_mapping_whose_client_is_blocklisted_is_fenced() {
    // krbd says nothing when it is blocklisted; the blocklist does.
    let w = krbd_world(vec![fresh("rbd", "v")]);
    w.node.mount("v", &id(1)).await.unwrap();
    w.mapper
        .set(|s| s.client_addr = Some("192.168.151.11:0/2735839371".into()));
    w.node.check_fencing(None).await;
    assert!(!w.node.attached("v").unwrap().fenced, "not blocklisted yet");
    w.cluster.set(|s| {
        s.blocklist.insert("192.168.151.11:0/2735839371".into());
    });
    w.node.check_fencing(None).await;
    assert!(w.node.attached("v").unwrap().fenced);
    let err = w.node.mount("v", &id(2)).await.unwrap_err().to_string();
    assert!(err.contains("fenced"), "{err}");
}
