//! The controller's decisions over a fake cluster: idempotent and conflicting Create,
//! Get while the cluster cannot be reached, List, and the remove policies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Controller, ControllerConfig};
use crate::config::{RemovePolicy, RemoveSettings, VolumeDefaults};
use crate::error::Error;
use crate::testing::*;

fn controller_with(cluster: Arc<FakeCluster>, policy: RemovePolicy) -> Controller {
    Controller::new(
        ControllerConfig {
            host_id: "host-a".into(),
            pools: vec!["rbd".into(), "fast".into()],
            defaults: VolumeDefaults::default(),
            remove: RemoveSettings {
                policy,
                trash_deferment: Duration::from_secs(3600),
            },
        },
        Arc::new(crate::ceph::ops::Remembering::new(cluster)),
    )
}

fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn setup() -> (Controller, Arc<FakeCluster>) {
    let cluster = Arc::new(FakeCluster::default());
    (
        controller_with(cluster.clone(), RemovePolicy::Trash),
        cluster,
    )
}

#[tokio::test]
async fn create_stores_every_option_for_every_host_to_read() {
    let (c, cluster) = setup();
    c.create(
        "pg",
        &opts(&[("size", "1G"), ("fstype", "xfs"), ("pool", "fast")]),
    )
    .await
    .unwrap();
    let f = cluster.image("pg").unwrap();
    assert_eq!((f.pool.as_str(), f.stat.size), ("fast", 1 << 30));
    assert_eq!(cluster.meta("pg", "fstype").as_deref(), Some("xfs"));
    assert_eq!(cluster.meta("pg", "created-by").as_deref(), Some("host-a"));
    assert!(cluster.meta("pg", "created-at").is_some());
}

#[tokio::test]
async fn a_repeated_compatible_create_succeeds_and_a_conflicting_one_says_why() {
    let (c, cluster) = setup();
    c.create("pg", &opts(&[("size", "1G")])).await.unwrap();
    c.create("pg", &opts(&[("size", "1G")])).await.unwrap();
    c.create("pg", &opts(&[])).await.unwrap();
    let err = c
        .create("pg", &opts(&[("size", "2G")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("size=1 GiB") && err.contains("size=2 GiB"),
        "{err}"
    );
    assert_eq!(cluster.state.lock().unwrap().creates, 1);
}

#[tokio::test]
async fn a_create_racing_another_hosts_compares_with_theirs() {
    let (c, cluster) = setup();
    let mut theirs = facts("rbd", "pg", &[("fstype", "xfs")]);
    theirs.stat.size = 1 << 30;
    cluster.set(|s| s.created_meanwhile = Some(theirs));
    let err = c
        .create("pg", &opts(&[("fstype", "ext4")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("fstype=xfs"), "{err}");
}

#[tokio::test]
async fn bad_names_and_options_create_nothing() {
    let (c, cluster) = setup();
    for (name, o) in [
        ("../etc", opts(&[])),
        ("ok", opts(&[("color", "red")])),
        ("ok", opts(&[("mkfs-options", "-qF")])),
        ("ok", opts(&[("pool", "elsewhere")])),
    ] {
        assert!(c.create(name, &o).await.is_err(), "{name} {o:?}");
    }
    assert_eq!(cluster.state.lock().unwrap().creates, 0);
}

#[tokio::test]
async fn get_describes_the_volume_from_its_record() {
    let (c, cluster) = setup();
    c.create("pg", &opts(&[("read-only", "true")]))
        .await
        .unwrap();
    let info = c.get("pg").await.unwrap();
    assert!(info.record.read_only && info.stale.is_none());
    assert_eq!(info.holder, None);
    assert_eq!(info.created_at, cluster.meta("pg", "created-at"));
    assert!(matches!(c.get("nope").await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn get_answers_from_the_last_state_while_the_cluster_is_unreachable() {
    let (c, cluster) = setup();
    c.create("pg", &opts(&[])).await.unwrap();
    c.get("pg").await.unwrap();
    cluster.set(|s| s.unreachable = true);
    let info = c.get("pg").await.unwrap();
    assert!(info.stale.unwrap().contains("monitors down"));
    // A volume never seen cannot be vouched for: an error Docker must not read as absent.
    let err = c.get("other").await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
}

#[tokio::test]
async fn a_volume_seen_gone_is_forgotten() {
    let (c, cluster) = setup();
    c.create("pg", &opts(&[])).await.unwrap();
    c.get("pg").await.unwrap();
    cluster.set(|s| {
        s.images.clear();
    });
    assert!(matches!(c.get("pg").await, Err(Error::NotFound(_))));
    cluster.set(|s| s.unreachable = true);
    assert!(c.get("pg").await.unwrap_err().is_unreachable());
}

#[tokio::test]
async fn list_shows_every_pool_and_skips_names_docker_could_not_use() {
    let cluster = Arc::new(FakeCluster::with(vec![
        fresh("rbd", "a"),
        fresh("fast", "b"),
        fresh("rbd", "bad name"),
        fresh("other", "c"),
    ]));
    let c = controller_with(cluster, RemovePolicy::Trash);
    let mut names = c.list().await.unwrap();
    names.sort();
    assert_eq!(names, ["a", "b"]);
}

#[tokio::test]
async fn remove_follows_the_policy() {
    for (policy, gone, how) in [
        (RemovePolicy::Trash, true, "Trash"),
        (RemovePolicy::Delete, true, "Delete"),
        (RemovePolicy::Keep, false, ""),
    ] {
        let cluster = Arc::new(FakeCluster::with(vec![fresh("rbd", "pg")]));
        let c = controller_with(cluster.clone(), policy);
        c.remove("pg").await.unwrap();
        assert_eq!(cluster.image("pg").is_none(), gone, "{policy:?}");
        let removed = cluster.state.lock().unwrap().removed.clone();
        assert!(
            removed.iter().all(|(_, h)| h.starts_with(how)),
            "{removed:?}"
        );
    }
}

#[tokio::test]
async fn remove_is_refused_while_another_host_holds_the_volume() {
    let mut f = fresh("rbd", "pg");
    held_by(&mut f, "host-b", "10.0.0.3:0/7");
    let cluster = Arc::new(FakeCluster::with(vec![f]));
    let c = controller_with(cluster.clone(), RemovePolicy::Delete);
    let err = c.remove("pg").await.unwrap_err().to_string();
    assert!(err.contains("host-b"), "{err}");
    assert!(cluster.image("pg").is_some());
}

#[tokio::test]
async fn a_volume_the_node_read_is_answerable_while_the_cluster_is_unreachable() {
    use crate::ceph::ClusterOps;
    let fake = Arc::new(FakeCluster::with(vec![fresh("rbd", "mounted")]));
    let shared = Arc::new(crate::ceph::ops::Remembering::new(fake.clone()));
    let c = Controller::new(
        ControllerConfig {
            host_id: "host-a".into(),
            pools: vec!["rbd".into()],
            defaults: VolumeDefaults::default(),
            remove: RemoveSettings::default(),
        },
        shared.clone(),
    );
    // The node describes the volume at Mount (Docker's Get may not have come yet).
    shared
        .describe(vec!["rbd".into()], "mounted")
        .await
        .unwrap();
    fake.set(|s| s.unreachable = true);
    let info = c.get("mounted").await.unwrap();
    assert!(info.stale.is_some());
}
