//! The controller's day-two decisions over a fake cluster that records what it was
//! asked: when the holder is asked to freeze, thaw or grow, what a silent or failing
//! holder does to a snapshot, and what a clone is made of.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{Controller, ControllerConfig, FsGrow};
use crate::ceph::images::{Created, Disposal, ImageFacts};
use crate::ceph::ops::{MetaChanges, Remembering};
use crate::ceph::snapshots::{CloneSource, Snapshot};
use crate::ceph::sys::{CreateSpec, NotifyReplies, SnapInfo};
use crate::ceph::ClusterOps;
use crate::config::{RemovePolicy, RemoveSettings, VolumeDefaults};
use crate::error::{Error, Result};
use crate::testing::*;
use crate::volume::control::{Reply, Request};

/// [`FakeCluster`] plus snapshots, clones, resize and scripted answers to notifies.
#[derive(Default)]
struct DayTwo {
    base: FakeCluster,
    /// What was asked, in order: "snap pg@s", "freeze pg", "thaw pg", "grow pg", ...
    log: Mutex<Vec<String>>,
    /// Answers to the next notifies, in order; none left means nobody watches.
    answers: Mutex<VecDeque<NotifyReplies>>,
    fail_snap: bool,
}

fn ack(ok: bool) -> NotifyReplies {
    let r = Reply {
        host: "host-a".into(),
        ok,
        error: (!ok).then(|| "fsfreeze failed: device busy".into()),
    };
    NotifyReplies {
        acks: vec![(4721, r.to_bytes())],
        timeouts: vec![],
    }
}

fn silent() -> NotifyReplies {
    NotifyReplies {
        acks: vec![],
        timeouts: vec![4721],
    }
}

impl DayTwo {
    fn with(images: Vec<ImageFacts>, answers: Vec<NotifyReplies>) -> Arc<DayTwo> {
        Arc::new(DayTwo {
            base: FakeCluster::with(images),
            answers: Mutex::new(answers.into()),
            ..Default::default()
        })
    }

    fn said(&self, what: String) {
        self.log.lock().unwrap().push(what);
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait]
impl ClusterOps for DayTwo {
    async fn describe(&self, pools: Vec<String>, name: &str) -> Result<Option<ImageFacts>> {
        self.base.describe(pools, name).await
    }
    async fn list(&self, pools: Vec<String>, hint: usize) -> Result<Vec<String>> {
        self.base.list(pools, hint).await
    }
    async fn create(
        &self,
        pool: &str,
        name: &str,
        spec: CreateSpec,
        meta: Vec<(String, String)>,
    ) -> Result<Created> {
        self.base.create(pool, name, spec, meta).await
    }
    async fn remove(&self, pools: Vec<String>, name: &str, how: Disposal) -> Result<()> {
        self.base.remove(pools, name, how).await
    }
    async fn set_meta(&self, pool: &str, name: &str, changes: MetaChanges) -> Result<()> {
        self.base.set_meta(pool, name, changes).await
    }
    async fn has_data(&self, pool: &str, name: &str) -> Result<bool> {
        self.base.has_data(pool, name).await
    }
    async fn unblocklist(&self, addr: &str) -> Result<()> {
        self.base.unblocklist(addr).await
    }

    async fn messenger(&self) -> Result<crate::ceph::ops::Messenger> {
        self.base.messenger().await
    }

    async fn is_blocklisted(&self, addr: &str) -> Result<bool> {
        self.base.is_blocklisted(addr).await
    }

    async fn snapshots(&self, _pool: &str, _name: &str) -> Result<Vec<Snapshot>> {
        Ok(Vec::new())
    }

    async fn snap_create(&self, _pool: &str, name: &str, snap: &str) -> Result<()> {
        self.said(format!("snap {name}@{snap}"));
        if self.fail_snap {
            return Err(Error::Timeout {
                op: "creating a snapshot".into(),
                after: Duration::from_secs(45),
            });
        }
        self.base.set(|s| {
            let f = s.images.get_mut(name).unwrap();
            f.snapshots.push(SnapInfo {
                id: f.snapshots.len() as u64,
                name: snap.into(),
                size: f.stat.size,
                created: None,
            });
        });
        Ok(())
    }

    async fn clone_volume(
        &self,
        src: CloneSource,
        pool: &str,
        name: &str,
        meta: Vec<(String, String)>,
    ) -> Result<Created> {
        self.said(format!("clone {}@{} {name}", src.volume, src.snap));
        let spec = CreateSpec {
            size: 1 << 30,
            features: 5,
            order: None,
            data_pool: None,
        };
        self.base.create(pool, name, spec, meta).await
    }

    async fn resize(&self, _pool: &str, name: &str, size: u64, mark: String) -> Result<u64> {
        self.said(format!("resize {name}"));
        let mut old = 0;
        self.base.set(|s| {
            let f = s.images.get_mut(name).unwrap();
            old = f.stat.size;
            f.stat.size = size;
            f.meta.insert("grow-fs".into(), mark);
        });
        Ok(old)
    }

    async fn notify(
        &self,
        _pool: &str,
        oid: &str,
        payload: Vec<u8>,
        _timeout: Duration,
    ) -> Result<NotifyReplies> {
        let req: Request = serde_json::from_slice(&payload).unwrap();
        assert_eq!(oid, format!("rbdvol.ctl.{}", req.volume()));
        let op = match req {
            Request::Freeze { .. } => "freeze",
            Request::Thaw { .. } => "thaw",
            Request::Grow { .. } => "grow",
        };
        self.said(format!("{op} {}", req.volume()));
        Ok(self.answers.lock().unwrap().pop_front().unwrap_or_default())
    }
}

fn controller(cluster: Arc<DayTwo>) -> Controller {
    Controller::new(
        ControllerConfig {
            host_id: "host-b".into(),
            pools: vec!["rbd".into()],
            defaults: VolumeDefaults::default(),
            remove: RemoveSettings {
                policy: RemovePolicy::Trash,
                trash_deferment: Duration::from_secs(3600),
            },
        },
        Arc::new(Remembering::new(cluster)),
    )
}

fn held(name: &str) -> ImageFacts {
    let mut f = fresh("rbd", name);
    held_by(&mut f, "host-a", "10.0.0.2:0/1");
    f
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn an_unmounted_volume_is_snapshotted_without_asking_anyone() {
    let cluster = DayTwo::with(vec![fresh("rbd", "pg")], vec![]);
    let s = controller(cluster.clone())
        .snapshot_create("pg", Some("s"), false)
        .await
        .unwrap();
    assert_eq!((s.name.as_str(), s.frozen_by), ("s", None));
    assert_eq!(cluster.log(), strings(&["snap pg@s"]));
}

#[tokio::test]
async fn a_mounted_volume_is_frozen_by_its_holder_around_the_snapshot() {
    let cluster = DayTwo::with(vec![held("pg")], vec![ack(true), ack(true)]);
    let s = controller(cluster.clone())
        .snapshot_create("pg", Some("s"), false)
        .await
        .unwrap();
    assert_eq!(s.frozen_by.as_deref(), Some("host-a"));
    assert_eq!(
        cluster.log(),
        strings(&["freeze pg", "snap pg@s", "thaw pg"])
    );
}

#[tokio::test]
async fn a_silent_holder_fails_the_snapshot_naming_it_unless_crash_consistent() {
    let cluster = DayTwo::with(vec![held("pg")], vec![silent(), silent()]);
    let c = controller(cluster.clone());
    let e = c.snapshot_create("pg", Some("s"), false).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::HeldElsewhere(_)), "{e:?}");
    for part in [
        "host host-a",
        "did not answer within 10s",
        "No snapshot was taken",
        "--crash-consistent",
    ] {
        assert!(text.contains(part), "{text}\nlacks: {part}");
    }
    assert_eq!(
        cluster.log(),
        strings(&["freeze pg"]),
        "a snapshot was taken"
    );
    let s = c.snapshot_create("pg", Some("s"), true).await.unwrap();
    assert_eq!(s.frozen_by, None);
    assert_eq!(
        cluster.log(),
        strings(&["freeze pg", "freeze pg", "snap pg@s"])
    );
}

#[tokio::test]
async fn a_holder_that_cannot_freeze_says_why_and_nothing_is_taken() {
    let cluster = DayTwo::with(vec![held("pg")], vec![ack(false)]);
    let e = controller(cluster.clone())
        .snapshot_create("pg", Some("s"), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("host-a could not do it: fsfreeze failed: device busy"),
        "{e}"
    );
    assert_eq!(cluster.log(), strings(&["freeze pg"]));
}

#[tokio::test]
async fn a_failed_snapshot_still_thaws() {
    let cluster = Arc::new(DayTwo {
        base: FakeCluster::with(vec![held("pg")]),
        answers: Mutex::new(vec![ack(true), ack(true)].into()),
        fail_snap: true,
        ..Default::default()
    });
    let e = controller(cluster.clone())
        .snapshot_create("pg", Some("s"), false)
        .await;
    assert!(matches!(e, Err(Error::Timeout { .. })), "{e:?}");
    assert_eq!(
        cluster.log(),
        strings(&["freeze pg", "snap pg@s", "thaw pg"])
    );
}

#[tokio::test]
async fn resize_grows_online_through_the_holder_or_leaves_it_to_the_next_mount() {
    let cluster = DayTwo::with(vec![held("pg"), fresh("rbd", "idle")], vec![ack(true)]);
    let c = controller(cluster.clone());
    let r = c.resize("pg", "2G").await.unwrap();
    assert_eq!((r.old, r.new), (1 << 30, 2 << 30));
    assert_eq!(
        r.filesystem,
        FsGrow::Online {
            host: "host-a".into()
        }
    );
    assert_eq!(
        cluster.base.meta("pg", "grow-fs"),
        None,
        "the mark stayed after an online grow"
    );
    let r = c.resize("idle", "2G").await.unwrap();
    assert_eq!(r.filesystem, FsGrow::AtNextMount { why: None });
    assert!(cluster.base.meta("idle", "grow-fs").is_some());
    assert_eq!(
        cluster.log(),
        strings(&["resize pg", "grow pg", "resize idle"])
    );
    assert!(matches!(
        c.resize("idle", "2 apples").await,
        Err(Error::InvalidOption { .. })
    ));
}

#[tokio::test]
async fn a_clone_of_a_volume_is_made_from_a_fresh_snapshot_and_carries_its_lineage() {
    let mut src = fresh("rbd", "pg");
    src.meta.insert("formatted".into(), "xfs by host-a".into());
    src.meta.insert("fstype".into(), "xfs".into());
    let cluster = DayTwo::with(vec![src], vec![]);
    let c = controller(cluster.clone());
    let from =
        |v: &str| -> BTreeMap<String, String> { [("from".to_string(), v.to_string())].into() };
    c.create("pg-test", &from("pg")).await.unwrap();
    assert_eq!(
        cluster.log(),
        strings(&["snap pg@clone-pg-test", "clone pg@clone-pg-test pg-test"])
    );
    let meta = |k: &str| cluster.base.meta("pg-test", k);
    assert_eq!(meta("origin").as_deref(), Some("rbd/pg@clone-pg-test"));
    assert_eq!(meta("formatted").as_deref(), Some("xfs by host-a"));
    assert_eq!(meta("created-by").as_deref(), Some("host-b"));
    assert!(meta("first-mapped")
        .unwrap()
        .starts_with("cloned from rbd/pg@clone-pg-test"));
    // Again: accepted without a second clone; another source for the name: a conflict.
    c.create("pg-test", &from("pg")).await.unwrap();
    assert_eq!(cluster.log().len(), 2);
    let e = c
        .create("pg-test", &from("pg@other"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no snapshot other") || e.contains("already exists"),
        "{e}"
    );
    let e = c.create("x", &from("nope")).await.unwrap_err().to_string();
    assert!(e.contains("volume nope does not exist"), "{e}");
    let mut o = from("pg");
    o.insert("size".into(), "1G".into());
    assert!(c
        .create("y", &o)
        .await
        .unwrap_err()
        .to_string()
        .contains("only pool= may be given"));
    assert!(
        c.create("pg", &from("pg")).await.is_err(),
        "a volume made from itself"
    );
}
