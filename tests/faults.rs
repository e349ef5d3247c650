//! Faults and races: a client that never finishes its request, a monitor that goes
//! away and comes back, and a Remove racing a Mount on another host. rbdvol keeps
//! answering, says what is wrong, recovers by itself, and never removes a volume in use.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_client_that_never_finishes_its_headers_blocks_nobody() {
    let d = Daemon::start(DaemonOpts::host("host-slow"));
    let mut slow = d.connect();
    slow.raw()
        .write_all(b"POST /VolumeDriver.List HTTP/1.1\r\nHost: plugin.moby.localhost\r\n")
        .unwrap();
    // Everyone else is served meanwhile.
    for _ in 0..3 {
        d.ok("VolumeDriver.Capabilities", "{}");
        d.ok("VolumeDriver.List", "{}");
    }
    // The stalled connection is closed after the header timeout, not kept forever.
    let started = Instant::now();
    let answered = slow.try_receive();
    assert!(
        answered.is_none() || answered.is_some_and(|(s, _)| s == 408),
        "a request with unfinished headers was answered"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the stalled connection was kept open"
    );
}

/// A cluster of this test's own, so its monitor can be stopped without disturbing others.
struct OwnCluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl OwnCluster {
    fn up() -> OwnCluster {
        let dir = tempfile::Builder::new()
            .prefix("rbdvol-mon")
            .tempdir()
            .unwrap()
            .keep();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/ceph-up");
        let out = Command::new("timeout")
            .args(["-k", "5", "120"])
            .arg(script)
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ceph-up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        OwnCluster { dir, conf }
    }

    fn mon_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.join("run/mon.a.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Stops the monitor (SIGKILL, like a crash) and returns how to start it again.
    fn stop_mon(&self) -> Vec<String> {
        let pid = self.mon_pid();
        let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        argv
    }

    fn start_mon(&self, argv: &[String]) {
        // ceph-mon daemonizes and writes its pid file again.
        let st = Command::new("timeout")
            .args(["-k", "5", "60"])
            .args(argv)
            .status()
            .unwrap();
        assert!(st.success(), "restarting the monitor");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/ceph-down");
        let _ = Command::new("timeout")
            .args(["-k", "5", "60"])
            .arg(script)
            .arg(&self.dir)
            .output();
    }
}

#[test]
fn a_stopped_monitor_gives_clear_errors_in_time_and_service_recovers() {
    let cluster = OwnCluster::up();
    let mut opts = DaemonOpts::host("host-dark")
        .env("RBDVOL_CEPH__OP_TIMEOUT", "3s")
        .env("RBDVOL_CEPH__CONNECT_TIMEOUT", "3s");
    opts.ceph_conf = cluster.conf.clone();
    opts.pools = vec!["rbd".into()];
    let d = Daemon::start(opts);
    let name = unique("dark");
    d.create(&name, r#"{"size":"64M"}"#);
    d.get(&name);

    let mon = cluster.stop_mon();
    // An established connection keeps working while the OSDs are up (maps are cached).
    d.create(&unique("dark-nomon"), r#"{"size":"64M"}"#);

    // A daemon that must connect now cannot: clear errors within Docker's deadlines.
    let mut late_opts = DaemonOpts::host("host-late")
        .env("RBDVOL_CEPH__OP_TIMEOUT", "3s")
        .env("RBDVOL_CEPH__CONNECT_TIMEOUT", "3s");
    late_opts.ceph_conf = cluster.conf.clone();
    late_opts.pools = vec!["rbd".into()];
    let late = Daemon::start(late_opts);
    let started = Instant::now();
    late.err("VolumeDriver.List", "{}", "unreachable");
    late.err(
        "VolumeDriver.Create",
        &format!(r#"{{"Name":"{}","Opts":null}}"#, unique("dark-new")),
        "unreachable",
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "errors took {:?}",
        started.elapsed()
    );
    // Activate and Capabilities never depend on the cluster.
    late.ok("VolumeDriver.Capabilities", "{}");

    cluster.start_mon(&mon);
    // It recovers by itself once the monitor is back: no restart needed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = late.call("VolumeDriver.List", "{}");
        if v.get("Err").is_none() {
            assert!(v["Volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["Name"] == name.as_str()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered: {v}\n{}",
            late.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    d.create(&unique("dark-after"), r#"{"size":"64M"}"#);
}

#[test]
fn a_volume_mounted_on_one_host_is_never_removed_from_another() {
    let a = Daemon::start(DaemonOpts::host("host-a").env("RBDVOL_LOCK__TAKEOVER_WAIT", "2s"));
    let b = Daemon::start(DaemonOpts::host("host-b"));
    for round in 0..6 {
        let name = unique("race");
        a.create(&name, r#"{"size":"64M"}"#);
        let (mounted, removed) = std::thread::scope(|s| {
            let m = s.spawn(|| {
                a.call(
                    "VolumeDriver.Mount",
                    &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(1)),
                )
            });
            if round % 2 == 1 {
                std::thread::sleep(Duration::from_millis(40 * round as u64));
            }
            let r = b.call("VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
            (m.join().unwrap(), r)
        });
        let mount_ok = mounted.get("Err").is_none();
        let remove_ok = removed.get("Err").is_none();
        assert!(
            !(mount_ok && remove_ok),
            "round {round}: the volume was both mounted on A and removed by B: {mounted} {removed}"
        );
        if mount_ok {
            assert!(
                images_in("rbd").contains(&name),
                "round {round}: a mounted volume vanished"
            );
            a.unmount(&name, &mount_id(1));
        }
        assert_eq!(a.leftovers(), Vec::<String>::new(), "round {round}");
    }
}
