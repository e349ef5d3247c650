//! The node after the fact: references Docker will never release (orphans) and
//! reconcile at start (adopt, mark fenced, release what is gone or unrecorded, kernel
//! mappings only with an intent), over the same fakes.

use std::path::Path;
use std::sync::Arc;

use super::*;

#[tokio::test]
async fn an_orphaned_reference_is_released_at_the_last_unmount_docker_sends() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap(); // Docker never got this answer
    w.node.mount("v", &id(2)).await.unwrap(); // its retry
    w.age("v", 120);
    w.node.unmount("v", &id(2)).await.unwrap();
    w.assert_released("v");
}

#[tokio::test]
async fn a_young_reference_is_kept_a_container_may_be_starting() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.node.mount("v", &id(2)).await.unwrap();
    w.node.unmount("v", &id(2)).await.unwrap();
    w.node.release_orphans().await;
    assert!(w.mapper.is_mapped("rbd", "v"));
}

#[tokio::test]
async fn a_volume_a_container_holds_is_never_released_as_an_orphan() {
    let w = world();
    let mp = w.node.mount("v", &id(1)).await.unwrap();
    w.age("v", 600);
    w.host.set(|s| {
        s.uses.insert(
            mp.clone(),
            vec!["mounted at /data in pid 42's namespace".into()],
        );
    });
    w.node.release_orphans().await;
    assert!(w.mapper.is_mapped("rbd", "v"));
    w.host.set(|s| s.uses.clear());
    w.node.release_orphans().await;
    w.assert_released("v");
}

#[tokio::test]
async fn without_sight_of_every_process_nothing_is_released_as_an_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(FakeCluster::with(vec![fresh("rbd", "v")]));
    let host = Arc::new(FakeHost::default());
    let mapper = Arc::new(FakeMapper::new(MapperKind::Userspace));
    let krbd = Arc::new(FakeMapper::new(MapperKind::Krbd));
    let node = node_on(dir.path(), cluster, host, mapper.clone(), krbd, false);
    node.mount("v", &id(1)).await.unwrap();
    node.update_table(|vols| {
        for r in vols.get_mut("v").unwrap().refs.values_mut() {
            r.since = 0;
        }
    })
    .unwrap();
    node.release_orphans().await;
    assert!(mapper.is_mapped("rbd", "v"));
}

#[tokio::test]
async fn a_fenced_client_that_exited_is_taken_off_the_blocklist() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.mapper
        .set(|s| s.fenced_client = Some("10.0.0.2:0/9".into()));
    w.node.unmount("v", &id(1)).await.unwrap();
    assert_eq!(
        w.cluster.state.lock().unwrap().unblocklisted,
        ["10.0.0.2:0/9"]
    );
}

#[tokio::test]
async fn reconcile_adopts_what_is_consistent() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    let w = w.restarted();
    w.node.reconcile().await;
    assert_eq!(w.node.attached("v").unwrap().container_mounts, 1);
    assert!(w.mapper.is_mapped("rbd", "v"));
}

#[tokio::test]
async fn reconcile_marks_a_fenced_volume() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.mapper.set(|s| {
        s.health.insert("rbd/v".into(), Health::Fenced);
    });
    let w = w.restarted();
    w.node.reconcile().await;
    assert!(w.node.attached("v").unwrap().fenced);
}

#[tokio::test]
async fn reconcile_releases_a_volume_whose_mount_is_gone() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.host.set(|s| s.mounts.clear());
    let w = w.restarted();
    w.node.reconcile().await;
    w.assert_released("v");
}

#[tokio::test]
async fn reconcile_keeps_the_record_of_what_it_cannot_release() {
    let w = world();
    let mp = w.node.mount("v", &id(1)).await.unwrap();
    w.mapper.set(|s| {
        s.health.insert("rbd/v".into(), Health::Gone);
    });
    w.host.set(|s| {
        s.busy.insert(mp);
    });
    let w = w.restarted();
    w.node.reconcile().await;
    assert!(w.node.attached("v").is_some());
}

#[tokio::test]
async fn reconcile_unmounts_untracked_mounts_below_the_root_only_when_unused() {
    let w = world();
    let root = w.dir.path().join("mounts");
    let stray = root.join("rbd/stray");
    let used = root.join("rbd/used");
    w.host.set(|s| {
        s.mounts.push(entry(Path::new("/dev/loop5"), &root, "ext4"));
        s.mounts
            .push(entry(Path::new("/dev/loop6"), &stray, "ext4"));
        s.mounts.push(entry(Path::new("/dev/loop7"), &used, "ext4"));
        s.uses.insert(used.clone(), vec!["a container".into()]);
    });
    w.node.reconcile().await;
    assert!(w.host.is_mounted(&root), "the root itself is not ours");
    assert!(!w.host.is_mounted(&stray));
    assert!(w.host.is_mounted(&used));
}

#[tokio::test]
async fn reconcile_releases_unrecorded_mappings_but_not_recorded_ones() {
    let w = world();
    w.node.mount("v", &id(1)).await.unwrap();
    w.mapper.set(|s| {
        s.unrecorded = vec![("rbd".into(), "v".into()), ("rbd".into(), "crashed".into())];
        s.mapped.insert("rbd/crashed".into(), "/dev/fake9".into());
    });
    let w = w.restarted();
    w.node.reconcile().await;
    assert!(w.mapper.is_mapped("rbd", "v"));
    assert!(!w.mapper.is_mapped("rbd", "crashed"));
}

#[tokio::test]
async fn reconcile_releases_kernel_mappings_only_with_an_intent() {
    let w = world_with(vec![fresh("rbd", "v")], MapperKind::Krbd);
    let mapping = |image: &str, device: &str| KernelMapping {
        pool: "rbd".into(),
        image: image.into(),
        snap: "-".into(),
        device: device.into(),
    };
    // A crash between map and record: the intent is on disk, the mapping in the kernel.
    w.node.attacher.intents.begin("rbd", "crashed").unwrap();
    w.krbd.set(|s| {
        s.kernel = vec![
            mapping("crashed", "/dev/rbd0"),
            mapping("admins", "/dev/rbd1"),
        ];
        s.mapped.insert("rbd/crashed".into(), "/dev/rbd0".into());
        s.mapped.insert("rbd/admins".into(), "/dev/rbd1".into());
    });
    w.node.reconcile().await;
    assert!(!w.krbd.is_mapped("rbd", "crashed"));
    assert!(!w.node.attacher.intents.exists("rbd", "crashed"));
    assert!(w.krbd.is_mapped("rbd", "admins"), "not rbdvol's to unmap");
}

#[tokio::test]
async fn kernel_maps_leave_no_intent_behind() {
    let w = world_with(vec![fresh("rbd", "v"), fresh("rbd", "w")], MapperKind::Krbd);
    w.node.mount("v", &id(1)).await.unwrap();
    assert!(!w.node.attacher.intents.exists("rbd", "v"));
    w.host.set(|s| {
        s.fail.insert("mkfs");
    });
    assert!(w.node.mount("w", &id(1)).await.is_err());
    assert!(!w.node.attacher.intents.exists("rbd", "w"));
}

#[tokio::test]
async fn a_csi_stage_is_never_released_as_an_orphan_only_by_unstage() {
    let w = world();
    let staging = Path::new("/csi/staged/v");
    w.node.stage("v", staging, false).await.unwrap();
    w.node.stage("v", staging, false).await.unwrap(); // repeated by the CO
                                                      // Nothing but rbdvol holds it between stage and publish, for however long.
    w.age("v", 6000);
    w.node.release_orphans().await;
    assert!(w.mapper.is_mapped("rbd", "v"));
    assert_eq!(w.node.attached("v").unwrap().container_mounts, 1);
    w.node.unstage("v", staging).await.unwrap();
    w.node.unstage("v", staging).await.unwrap();
    w.assert_released("v");
}
