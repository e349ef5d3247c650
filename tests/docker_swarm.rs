//! Docker Swarm on private nodes (one manager, two workers, rbdvol on each): a
//! single-replica stateful service whose node is killed, or cut off, or that is moved
//! on purpose, and a global service with a volume per node. The service runs an
//! fsync-acknowledged writer (tests/common/swarm.rs); afterwards the volume must hold
//! every acknowledged record, in one unbroken sequence, with no two copies of the
//! service interleaved.
//!
//! `swarm_trials` (ignored; integration/swarm-trials runs it) repeats the node kill and
//! reports the time from the kill to the first acknowledged write of the new task.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::e2e::say;
use common::nodes::nodes_missing;
use common::swarm::{Acks, Swarm, Tuning, WRITER};
use common::{blocklist, unique};

fn skip() -> bool {
    if let Some(why) = nodes_missing() {
        say(&format!("SKIPPED: {why}"));
        return true;
    }
    false
}

/// The records in the volume: (number, task) in file order. Panics on a torn or
/// malformed line.
fn records(log: &str) -> Vec<(u64, String)> {
    assert!(
        log.is_empty() || log.ends_with('\n'),
        "torn last record: {log:?}"
    );
    log.lines()
        .map(|l| {
            let (n, t) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad record {l:?}"));
            (
                n.parse().unwrap_or_else(|_| panic!("bad record {l:?}")),
                t.to_string(),
            )
        })
        .collect()
}

/// What a user of the service must see: records numbered 1, 2, 3, ... without a gap or
/// a repeat; each task's records in one run (never two tasks interleaved); every
/// record a task acknowledged present. Returns the tasks in the order they wrote.
fn check_volume(log: &str, acks: &BTreeMap<String, Acks>) -> Vec<String> {
    let recs = records(log);
    for (i, (n, t)) in recs.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "record {} is {n} ({t}): gap or repeat",
            i + 1
        );
    }
    let mut order: Vec<String> = Vec::new();
    for (_, t) in &recs {
        if order.last() != Some(t) {
            assert!(
                !order.contains(t),
                "{t} wrote again after another task: interleaved\n{log}"
            );
            order.push(t.clone());
        }
    }
    for (t, a) in acks {
        for n in &a.acked {
            assert!(
                recs.get(*n as usize - 1)
                    .is_some_and(|(m, u)| m == n && u == t),
                "record {n}, acknowledged by {t}, is not in the volume"
            );
        }
    }
    order
}

/// The one task writing now, and the index of its node.
fn writer_of(s: &Swarm, within: Duration) -> (String, usize) {
    let t = s.await_writer(None, 20, within);
    let host = t.split('.').next().unwrap().to_string();
    (t, s.index_of(&host))
}

fn tuned_swarm(key: &str) -> Option<Swarm> {
    if skip() {
        return None;
    }
    Some(Swarm::start(key, 2, Tuning::Tuned, &[]))
}

/// What an exporter logs when it takes a volume over from a dead holder (the warning in
/// src/export/lock.rs, whichever rule declared the holder dead). The clean-migration
/// test asserts its absence, so it must match the current wording exactly.
const TAKEOVER: &str = "declaring the lock owner dead, fencing it and taking the lock over";

/// The kill test looks for TAKEOVER and the clean-migration test for its absence; if the
/// exporter's wording changed, the first would fail and the second could never fail.
#[test]
fn takeover_marker_is_the_exporters_wording() {
    assert!(
        include_str!("../src/export/lock.rs").contains(TAKEOVER),
        "src/export/lock.rs no longer logs {TAKEOVER:?}; update TAKEOVER"
    );
}

const WORKERS_ONLY: &[&str] = &["--constraint", "node.role==worker"];

/// How long each Mount answered by this plugin took, in seconds, from its log: on the
/// node that takes a volume over, rbdvol's share of a failover (the wait for the dead
/// holder to be declared dead, the fencing, the map and the mount).
fn mount_seconds(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("endpoint=/VolumeDriver.Mount}") && l.contains("answered"))
        .filter_map(|l| l.split("elapsed_ms=").nth(1)?.trim().parse::<f64>().ok())
        .map(|ms| ms / 1000.0)
        .collect()
}

/// Kill the node running the task (every process in its cgroup): Swarm starts the task
/// on the other worker, whose Mount takes the volume over from the dead holder
/// (fencing it), and every acknowledged record is there.
#[test]
fn killed_node_task_moves_and_keeps_every_acknowledged_write() {
    let Some(mut s) = tuned_swarm("kill") else {
        return;
    };
    let vol = unique("swk");
    s.volumes.push(vol.clone());
    s.create_writer("swk", &vol, WORKERS_ONLY, WRITER);
    let (old, i) = writer_of(&s, Duration::from_secs(120));
    let killed_at = Instant::now();
    s.kill(i);
    let new = s.await_writer(Some(&old), 1, Duration::from_secs(120));
    say(&format!(
        "kill: first new acknowledged write {:.2}s after the kill",
        killed_at.elapsed().as_secs_f64()
    ));
    let j = s.index_of(new.split('.').next().unwrap());
    assert!(
        j != i && j != 0,
        "the task restarted on node {j}, not the other worker"
    );
    s.await_acks(&new, 20, Duration::from_secs(60));
    let fenced = blocklist();
    assert!(
        fenced.contains(&format!("{}:", s.nodes[i].addr)),
        "the dead node's client was not fenced (blocklisted): {fenced}"
    );
    let logs = s.plugin_logs(j);
    assert!(
        logs.contains(TAKEOVER),
        "the new node's plugin did not take the volume over:\n{logs}"
    );

    s.remove_service("swk");
    let order = check_volume(&s.read_log(j, &vol), &s.acks());
    assert_eq!(order, vec![old, new]);
}

/// Cut the node running the task off: Swarm starts a second copy elsewhere while the
/// first keeps running. The new copy writes only once the old one is fenced; the old
/// copy never acknowledges a write again and, reconnected, its writes fail; nothing it
/// did after the takeover reaches the volume.
#[test]
fn partitioned_node_old_copy_is_fenced_and_never_reaches_the_volume() {
    let Some(mut s) = tuned_swarm("part") else {
        return;
    };
    let vol = unique("swp");
    s.volumes.push(vol.clone());
    s.create_writer("swp", &vol, WORKERS_ONLY, WRITER);
    let (old, i) = writer_of(&s, Duration::from_secs(120));
    let cut_at = Instant::now();
    s.cut(i, false);
    let new = s.await_writer(Some(&old), 1, Duration::from_secs(120));
    say(&format!(
        "partition: first new acknowledged write {:.2}s after the cut",
        cut_at.elapsed().as_secs_f64()
    ));
    // By the new copy's first acknowledged write the old one is fenced.
    let fenced = blocklist();
    assert!(
        fenced.contains(&format!("{}:", s.nodes[i].addr)),
        "the new copy wrote before the old one was fenced: {fenced}"
    );
    let old_acked = s.acks()[&old].acked.len();
    s.await_acks(&new, 20, Duration::from_secs(60));
    assert_eq!(
        s.acks()[&old].acked.len(),
        old_acked,
        "the cut-off copy acknowledged a write"
    );

    // Heal, with the old node's engine (and its Swarm agent) held so that the old copy
    // keeps running, as it would on a node whose agent is slow: the storage, not
    // Swarm, must stop its writes.
    s.nodes[i].freeze_engine(true);
    s.cut(i, true);
    let deadline = Instant::now() + Duration::from_secs(90);
    while s.acks()[&old].fails == 0 {
        assert!(
            Instant::now() < deadline,
            "the old copy's writes did not fail after the partition healed: {:?}",
            s.acks()[&old]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.await_acks(&new, 40, Duration::from_secs(60));
    assert_eq!(
        s.acks()[&old].acked.len(),
        old_acked,
        "the fenced copy acknowledged a write"
    );
    s.nodes[i].freeze_engine(false);

    s.remove_service("swp");
    let j = s.index_of(new.split('.').next().unwrap());
    let order = check_volume(&s.read_log(j, &vol), &s.acks());
    assert_eq!(order, vec![old, new]);
}

/// Move the service on purpose (its constraint changed): the old task stops and
/// unmounts, the new one mounts at once, with no takeover and nobody fenced.
#[test]
fn clean_migration_takes_no_takeover() {
    let Some(mut s) = tuned_swarm("move") else {
        return;
    };
    let vol = unique("swm");
    s.volumes.push(vol.clone());
    let (w1, w2) = (s.nodes[1].id.clone(), s.nodes[2].id.clone());
    let on_w1 = format!("node.hostname=={w1}");
    s.create_writer("swm", &vol, &["--constraint", &on_w1], WRITER);
    let (old, i) = writer_of(&s, Duration::from_secs(120));
    assert_eq!(i, 1);
    let moved_at = Instant::now();
    s.manager().docker_ok(&[
        "service",
        "update",
        "-d",
        "--constraint-rm",
        &on_w1,
        "--constraint-add",
        &format!("node.hostname=={w2}"),
        "swm",
    ]);
    let new = s.await_writer(Some(&old), 1, Duration::from_secs(120));
    say(&format!(
        "migration: first new acknowledged write {:.2}s after the update",
        moved_at.elapsed().as_secs_f64()
    ));
    assert!(new.starts_with(&format!("{w2}.")), "{new}");
    s.await_acks(&new, 10, Duration::from_secs(60));
    for k in 0..s.nodes.len() {
        let logs = s.plugin_logs(k);
        assert!(
            !logs.contains(TAKEOVER),
            "node {k} took a volume over in a clean migration:\n{logs}"
        );
    }
    // How long the new node's Mounts took (for the report; a takeover would wait for
    // the holder's liveness or header watch to expire).
    let mounts = mount_seconds(&s.plugins[2].log());
    say(&format!(
        "migration: the new node's Mounts took {mounts:.2?} s"
    ));
    let fenced = blocklist();
    assert!(
        !fenced.contains(&format!("{}:", s.nodes[1].addr)),
        "the old node was fenced in a clean migration: {fenced}"
    );

    s.remove_service("swm");
    let order = check_volume(&s.read_log(2, &vol), &s.acks());
    assert_eq!(order, vec![old, new]);
}

/// A global service whose volume source names the node (`{{.Node.Hostname}}`): every
/// node, manager included, creates and mounts a volume of its own through its own
/// plugin, and each volume holds what its node wrote.
#[test]
fn global_service_mounts_a_volume_per_node() {
    let Some(mut s) = tuned_swarm("glob") else {
        return;
    };
    let prefix = unique("swg");
    for n in &s.nodes {
        s.volumes.push(format!("{prefix}-{}", n.id));
    }
    let source = format!("{prefix}-{{{{.Node.Hostname}}}}");
    let script =
        r#"echo "$W" > /data/who && sync /data/who && echo 1 >> /acks/$W && exec sleep 1000"#;
    s.create_writer("swg", &source, &["--mode", "global"], script);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let acks = s.acks();
        let hosts: Vec<&str> = acks.keys().map(|t| t.split('.').next().unwrap()).collect();
        if s.nodes.iter().all(|n| hosts.contains(&n.id.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every node wrote: {acks:?}\n{}",
            s.service_ps()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.remove_service("swg");
    // Each node's volume, read on the manager, holds that node's task.
    for n in &s.nodes {
        let who = s.manager().docker_ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &format!("{prefix}-{}:/data", n.id),
            "--volume-driver",
            "rbdvol",
            common::e2e::BASE,
            "cat",
            "/data/who",
        ]);
        assert!(
            who.starts_with(&format!("{}.", n.id)),
            "{prefix}-{}: {who}",
            n.id
        );
    }
}

/// Measurement, not a test (integration/swarm-trials): SWARM_TRIALS times, a fresh
/// swarm (SWARM_TUNING=defaults|tuned), the writer's node killed; prints the time from
/// the kill to the new task's first acknowledged write, each trial and p50/p99, and
/// checks the volume each time.
#[test]
#[ignore]
fn swarm_trials() {
    if skip() {
        return;
    }
    let n: usize = std::env::var("SWARM_TRIALS").map_or(10, |v| v.parse().unwrap());
    let tuning = match std::env::var("SWARM_TUNING").as_deref() {
        Ok("defaults") => Tuning::Defaults,
        _ => Tuning::Tuned,
    };
    let mut times = Vec::new();
    for k in 0..n {
        let mut s = Swarm::start("trial", 2, tuning, &[]);
        let vol = unique("swt");
        s.volumes.push(vol.clone());
        s.create_writer("swt", &vol, WORKERS_ONLY, WRITER);
        let (old, i) = writer_of(&s, Duration::from_secs(180));
        let killed_at = Instant::now();
        s.kill(i);
        let new = s.await_writer(Some(&old), 1, Duration::from_secs(180));
        let t = killed_at.elapsed().as_secs_f64();
        s.await_acks(&new, 5, Duration::from_secs(60));
        s.remove_service("swt");
        let j = s.index_of(new.split('.').next().unwrap());
        check_volume(&s.read_log(j, &vol), &s.acks());
        let mounts = mount_seconds(&s.plugin_logs(j));
        say(&format!(
            "trial {}/{n} ({tuning:?}): kill to first new acknowledged write {t:.2}s; the new node's Mounts took {mounts:.2?} s",
            k + 1
        ));
        times.push(t);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| times[((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
    say(&format!(
        "swarm trials ({tuning:?}, {n}): p50 {:.2}s p99 {:.2}s min {:.2}s max {:.2}s; all: {times:.2?}",
        pct(0.5),
        pct(0.99),
        times[0],
        times[times.len() - 1]
    ));
}
