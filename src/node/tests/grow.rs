//! Growing the filesystem at Mount after `rbdvol resize` marked the volume.

use super::*;

fn resized(read_only: bool) -> World {
    let mut f = fresh("rbd", "v");
    f.meta.insert("grow-fs".into(), "2 GiB by op at t".into());
    if read_only {
        f.meta.insert("read-only".into(), "true".into());
        f.meta
            .insert("formatted".into(), "ext4 by host-b at t".into());
        f.meta.insert("first-mapped".into(), "t".into());
    }
    let w = world_with(vec![f], MapperKind::Userspace);
    w.host
        .state
        .lock()
        .unwrap()
        .probes
        .insert(PathBuf::from("/dev/fake1"), Probe::Signature("ext4".into()));
    w
}

#[tokio::test]
async fn a_resized_volume_is_grown_at_mount_and_its_mark_cleared() {
    let w = resized(false);
    w.node.mount("v", &id(1)).await.unwrap();
    assert_eq!(w.cluster.meta("v", "grow-fs"), None);
}

#[tokio::test]
async fn a_failed_grow_still_mounts_and_keeps_the_mark_for_the_next_mount() {
    let w = resized(false);
    w.host.state.lock().unwrap().fail.insert("grow");
    let mp = w.node.mount("v", &id(1)).await.unwrap();
    assert!(w.host.is_mounted(&mp));
    assert!(w.cluster.meta("v", "grow-fs").is_some());
    w.node.unmount("v", &id(1)).await.unwrap();
    w.host.state.lock().unwrap().fail.remove("grow");
    w.node.mount("v", &id(2)).await.unwrap();
    assert_eq!(w.cluster.meta("v", "grow-fs"), None);
}

#[tokio::test]
async fn a_read_only_volume_is_not_grown() {
    let w = resized(true);
    let mp = w.node.mount("v", &id(1)).await.unwrap();
    assert!(w.host.is_mounted(&mp));
    assert!(w.cluster.meta("v", "grow-fs").is_some());
}
