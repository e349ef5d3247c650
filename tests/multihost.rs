//! Hosts with their own network identity (a network namespace each, on a bridge the
//! cluster listens on): a volume is never writable on two hosts at once, moves cleanly,
//! is taken over from a dead or cut-off host, and every write the old host acknowledged
//! (fsync returned) is on the new host. `integration/test` builds the network; without
//! it these tests say so and skip.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const RECORD: u64 = 64;

/// The scenarios share host A's link and cut it: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn net_or_skip(test: &str) -> Option<TestNet> {
    let net = testnet();
    if net.is_none() {
        eprintln!("SKIPPED {test}: no test network (run the tests with integration/test, which builds one with integration/testnet)");
    }
    net
}

fn host(net: &TestNet, i: usize, takeover_wait: &str) -> Daemon {
    let name = ["host-a", "host-b"][i];
    Daemon::start(
        DaemonOpts::host(name)
            .in_netns(&net.ns[i])
            .env("RBDVOL_LOCK__TAKEOVER_WAIT", takeover_wait),
    )
}

/// Writes fixed-size numbered records with fdatasync after each, recording which
/// were acknowledged and when, until stopped or a write fails.
struct Writer {
    acks: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<String>>,
}

impl Writer {
    fn start(file: PathBuf) -> Writer {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&file)
            .unwrap();
        f.sync_all().unwrap();
        std::fs::File::open(file.parent().unwrap())
            .unwrap()
            .sync_all()
            .unwrap();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acks.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let rec = format!("{i:063}\n");
                if let Err(e) = f
                    .write_all_at(rec.as_bytes(), i * RECORD)
                    .and_then(|_| f.sync_data())
                {
                    return format!("stopped at record {i}: {e}");
                }
                a.lock().unwrap().push((i, Instant::now()));
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            format!("stopped after {i} records")
        });
        Writer {
            acks,
            stop,
            handle: Some(handle),
        }
    }

    fn acked(&self) -> Vec<(u64, Instant)> {
        self.acks.lock().unwrap().clone()
    }

    /// Stops the writer; a writer stuck in a write (its host cut off) is left behind.
    fn finish(&mut self, within: Duration) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                return self.handle.take().map(|h| h.join().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Every acknowledged record must read back intact on the new host.
fn lost_records(file: &Path, acked: &[(u64, Instant)]) -> Vec<u64> {
    let data = std::fs::read(file).unwrap_or_default();
    acked
        .iter()
        .filter(|(i, _)| {
            let at = (*i * RECORD) as usize;
            data.get(at..at + RECORD as usize) != Some(format!("{i:063}\n").as_bytes())
        })
        .map(|(i, _)| *i)
        .collect()
}

fn wait_fenced(d: &Daemon, name: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if d.get(name)["Volume"]["Status"]["mounted_here"]["fenced"] == true {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn exclusivity_names_the_holder_by_its_own_address() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = net_or_skip("exclusivity") else {
        return;
    };
    let (a, b) = (host(&net, 0, "2s"), host(&net, 1, "2s"));
    let name = unique("mh-excl");
    a.create(&name, r#"{"size":"64M"}"#);
    a.mount(&name, &mount_id(1));
    let e = b.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(2)),
        "in use on host host-a",
    );
    assert!(
        e.contains(&net.addr[0]),
        "the holder's address {} is not named: {e}",
        net.addr[0]
    );
    a.unmount(&name, &mount_id(1));
    b.mount(&name, &mount_id(2));
    b.unmount(&name, &mount_id(2));
}

#[test]
fn clean_migration_keeps_every_byte() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = net_or_skip("clean migration") else {
        return;
    };
    let (a, b) = (host(&net, 0, "5s"), host(&net, 1, "5s"));
    let name = unique("mh-move");
    a.create(&name, r#"{"size":"128M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    let mut expected = Vec::new();
    for d in 0..4 {
        std::fs::create_dir_all(mp.join(format!("d{d}"))).unwrap();
        for f in 0..8 {
            let rel = format!("d{d}/f{f}");
            let body: Vec<u8> = (0..(4096 * (f + 1)))
                .map(|k| ((k * 31 + d * 7 + f) % 251) as u8)
                .collect();
            std::fs::write(mp.join(&rel), &body).unwrap();
            expected.push((rel, body));
        }
    }
    let a_addr = a.exporter_state(&name)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    a.unmount(&name, &mount_id(1));
    let mp = b.mount(&name, &mount_id(2));
    for (rel, body) in &expected {
        assert_eq!(
            &std::fs::read(mp.join(rel)).unwrap(),
            body,
            "{rel} differs after the move"
        );
    }
    b.unmount(&name, &mount_id(2));
    assert!(
        !blocklist().contains(&a_addr),
        "a clean move must fence nobody"
    );
}

/// What one takeover trial observed.
struct Outcome {
    takeover: Duration,
    lost: Vec<u64>,
    /// Writes acknowledged on the old host after the new one took over.
    double_writes: usize,
    acked: usize,
    /// How the new host declared the old one dead: by its liveness watch, or by its
    /// header watch timing out (the cluster's osd_client_watch_timeout).
    by_liveness: bool,
    /// Times the new (live) host's own liveness watch was lost while it served.
    live_watch_lost: usize,
}

/// A writes continuously; A's I/O client dies (or A is cut off); B takes over.
fn takeover_trial(net: &TestNet, partition: bool, write_for: Duration) -> Outcome {
    let (a, b) = (host(net, 0, "5s"), host(net, 1, "60s"));
    let name = unique(if partition { "mh-cut" } else { "mh-dead" });
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    let a_addr = a.exporter_state(&name)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        a_addr.starts_with(&net.addr[0]),
        "A's client {a_addr} is not on A's address"
    );
    let mut writer = Writer::start(mp.join("log"));
    std::thread::sleep(write_for);

    if partition {
        set_link(&net.link[0], false);
    } else {
        let pid = a.exporter_state(&name)["pid"].as_i64().unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let started = Instant::now();
    let mp_b = b.mount(&name, &mount_id(2));
    let took_over = Instant::now();
    let takeover = took_over - started;
    assert!(
        blocklist().contains(&a_addr),
        "A's client {a_addr} was not blocklisted"
    );

    if partition {
        set_link(&net.link[0], true);
        // A comes back, learns it was fenced, and never writes again.
        assert!(
            wait_fenced(&a, &name, Duration::from_secs(30)),
            "A never noticed it was fenced:\n{}",
            a.log()
        );
        assert!(std::fs::write(mp.join("late"), "x")
            .and_then(|_| std::fs::File::open(mp.join("late"))?.sync_all())
            .is_err());
        a.err(
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(3)),
            "lost the volume's lock",
        );
    }
    let _ = writer.finish(Duration::from_secs(20));
    let acked = writer.acked();
    let lost = lost_records(&mp_b.join("log"), &acked);
    let double_writes = acked.iter().filter(|(_, t)| *t > took_over).count();
    let log = std::fs::read_to_string(
        b.state_dir()
            .join(format!("exports/rbd/{name}/exporter.log")),
    )
    .unwrap_or_default();
    let by_liveness = log.contains("liveness watch: the OSD has not heard");
    let live_watch_lost = log.matches("the liveness watch was lost").count();
    b.unmount(&name, &mount_id(2));
    a.unmount(&name, &mount_id(1));
    assert_eq!(a.leftovers(), Vec::<String>::new(), "{}", a.log());
    // A's fenced client is gone for good: its blocklist entry was cleaned up.
    assert!(
        !blocklist().contains(&a_addr),
        "stale blocklist entry {a_addr} left behind"
    );
    Outcome {
        takeover,
        lost,
        double_writes,
        acked: acked.len(),
        by_liveness,
        live_watch_lost,
    }
}

#[test]
fn a_dead_host_is_fenced_and_taken_over_with_its_acknowledged_writes() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = net_or_skip("dead host") else {
        return;
    };
    let o = takeover_trial(&net, false, Duration::from_secs(1));
    eprintln!(
        "dead host: takeover {:?}, {} acknowledged writes",
        o.takeover, o.acked
    );
    assert!(o.acked > 0);
    assert_eq!(o.lost, Vec::<u64>::new(), "acknowledged writes lost");
    assert_eq!(o.double_writes, 0);
}

#[test]
fn a_cut_off_host_is_taken_over_and_fences_itself_when_it_returns() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = net_or_skip("partitioned host") else {
        return;
    };
    let o = takeover_trial(&net, true, Duration::from_secs(1));
    eprintln!(
        "partition: takeover {:?}, {} acknowledged writes",
        o.takeover, o.acked
    );
    assert!(o.acked > 0);
    assert_eq!(o.lost, Vec::<u64>::new(), "acknowledged writes lost");
    assert_eq!(o.double_writes, 0);
}

/// Sets the monitor's default blocklist expiry (what librbd's own blocklisting in a
/// takeover uses) for one test and puts the old value back when dropped, even when the
/// test fails. A runtime override (`ceph tell`): `ceph config set` would lose to the
/// value ceph-up writes into the ceph.conf.
struct MonDefaultExpiry {
    previous: String,
}

impl MonDefaultExpiry {
    const KEY: &'static str = "mon_osd_blocklist_default_expire";

    fn set(secs: u64) -> MonDefaultExpiry {
        let out = ceph(&["tell", "mon.*", "config", "get", Self::KEY]);
        let json = &out[out.find('{').unwrap_or_else(|| panic!("config get: {out}"))..];
        let v: serde_json::Value = serde_json::Deserializer::from_str(json)
            .into_iter()
            .next()
            .unwrap()
            .unwrap();
        let previous = v[Self::KEY].as_str().unwrap().to_string();
        ceph(&[
            "tell",
            "mon.*",
            "config",
            "set",
            Self::KEY,
            &secs.to_string(),
        ]);
        MonDefaultExpiry { previous }
    }
}

impl Drop for MonDefaultExpiry {
    fn drop(&mut self) {
        ceph(&["tell", "mon.*", "config", "set", Self::KEY, &self.previous]);
    }
}

/// Runs the ceph CLI against the test cluster; panics on failure.
fn ceph(args: &[&str]) -> String {
    let out = std::process::Command::new("timeout")
        .args(["-k", "5", "60", "ceph", "-c"])
        .arg(ceph_conf())
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ceph {args:?}: {text}");
    text
}

/// A host cut off for longer than the monitor's default blocklist expiry (what librbd
/// gives the client it fences in a takeover) comes back still fenced: its queued writes
/// never land on the volume another host now owns, and its entry outlives it.
#[test]
fn a_host_cut_off_longer_than_the_default_blocklist_expiry_stays_fenced() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = net_or_skip("long partition") else {
        return;
    };
    const SHORT: u64 = 8;
    let _short = MonDefaultExpiry::set(SHORT);
    let (a, b) = (host(&net, 0, "5s"), host(&net, 1, "60s"));
    let name = unique("mh-long");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    let a_addr = a.exporter_state(&name)["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let mut writer = Writer::start(mp.join("log"));
    std::thread::sleep(Duration::from_secs(1));

    set_link(&net.link[0], false);
    let mp_b = b.mount(&name, &mount_id(2));
    let took_over = Instant::now();
    // An entry with the short default expires SHORT s after the takeover; the monitor
    // drops it at its next tick (every 5 s). Stay cut off well past that.
    std::thread::sleep(Duration::from_secs(SHORT + 5 + 7));
    let until = blocklisted_until(&a_addr);
    set_link(&net.link[0], true);

    let year = Duration::from_secs(300 * 24 * 3600);
    assert!(
        until.is_some_and(|t| t > std::time::SystemTime::now() + year),
        "A's client {a_addr} is not fenced for long: blocklisted until {until:?} (the monitor's default here is {SHORT} s)\n{}",
        blocklist()
    );
    assert!(
        wait_fenced(&a, &name, Duration::from_secs(30)),
        "A never noticed it was fenced:\n{}",
        a.log()
    );
    assert!(
        blocklisted_until(&a_addr).is_some(),
        "A's entry went away while its exporter still runs"
    );
    let _ = writer.finish(Duration::from_secs(20));
    let acked = writer.acked();
    let late: Vec<u64> = acked
        .iter()
        .filter(|(_, t)| *t > took_over)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(
        late,
        Vec::<u64>::new(),
        "A acknowledged writes after the takeover"
    );
    assert!(!acked.is_empty());
    assert_eq!(
        lost_records(&mp_b.join("log"), &acked),
        Vec::<u64>::new(),
        "acknowledged writes lost"
    );
    b.unmount(&name, &mount_id(2));
    a.unmount(&name, &mount_id(1));
    // A's fenced exporter has exited: its host removed the year-long entry.
    assert!(
        blocklisted_until(&a_addr).is_none(),
        "stale blocklist entry {a_addr} left behind"
    );
}

/// `integration/trials N`: repeats the takeover scenarios with random timing and
/// reports double-writer incidents, lost acknowledged writes and takeover times.
#[test]
#[ignore]
fn randomized_takeover_trials() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = net_or_skip("randomized trials") else {
        return;
    };
    let n: usize = std::env::var("TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut seed: u64 = std::env::var("TRIAL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("trials: {n}, seed {seed} (TRIAL_SEED={seed} repeats this run)");
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let watch_timeout = std::env::var("WATCH_TIMEOUT").unwrap_or_else(|_| "30".into());
    let (mut lost, mut doubles, mut times) = (0usize, 0usize, Vec::new());
    let (mut by_liveness, mut live_lost) = (0usize, 0usize);
    let mut kinds: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for t in 0..n {
        let partition = next() % 2 == 0;
        let write_for = Duration::from_millis(100 + next() % 2000);
        let o = takeover_trial(&net, partition, write_for);
        println!(
            "trial {t}: {} after {write_for:?} of writing: takeover {:.2}s ({}), {} acked, {} lost, {} double writes, new owner's watch lost {} times",
            if partition { "partition" } else { "dead host" },
            o.takeover.as_secs_f64(),
            if o.by_liveness { "liveness watch" } else { "header watch" },
            o.acked,
            o.lost.len(),
            o.double_writes,
            o.live_watch_lost
        );
        lost += o.lost.len();
        doubles += o.double_writes;
        by_liveness += o.by_liveness as usize;
        live_lost += o.live_watch_lost;
        times.push(o.takeover.as_secs_f64());
        kinds[partition as usize].push(o.takeover.as_secs_f64());
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    };
    for (kind, v) in ["dead host", "partition"].iter().zip(kinds.iter_mut()) {
        println!(
            "summary {kind}: {} trials, takeover p50 {:.2}s p90 {:.2}s max {:.2}s",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 1.0)
        );
    }
    println!(
        "summary: {n} trials, double-writer incidents: {doubles}, lost acknowledged writes: {lost}, takeover p50 {:.2}s p90 {:.2}s p99 {:.2}s max {:.2}s (cluster watch timeout {watch_timeout} s); declared dead by the liveness watch in {by_liveness}/{n}; live owners' liveness watch lost {live_lost} times",
        pct(&mut times, 0.5),
        pct(&mut times, 0.9),
        pct(&mut times, 0.99),
        pct(&mut times, 1.0)
    );
    assert_eq!((doubles, lost), (0, 0));
}
