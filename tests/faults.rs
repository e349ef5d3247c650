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

impl OwnCluster {
    fn osd_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.join("run/osd.0.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

/// Resumes a frozen OSD even if the test fails half-way.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

#[test]
fn a_stalled_osd_blocks_only_the_io_that_needs_it() {
    let cluster = OwnCluster::up();
    let mut opts = DaemonOpts::host("host-osd").env("RBDVOL_CEPH__OP_TIMEOUT", "3s");
    opts.ceph_conf = cluster.conf.clone();
    opts.pools = vec!["rbd".into()];
    let d = Daemon::start(opts);
    let (busy, other) = (unique("osd-busy"), unique("osd-other"));
    d.create(&busy, r#"{"size":"64M"}"#);
    d.create(&other, r#"{"size":"64M"}"#);
    let mp = d.mount(&busy, &mount_id(1));
    d.get(&other);

    let osd = cluster.osd_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(osd),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let thaw = Thaw(osd);
    // A container writing to the volume now waits on the cluster…
    let file = mp.join("during-stall");
    let writer = std::thread::spawn(move || {
        std::fs::write(&file, b"written across a stall")?;
        std::fs::File::open(&file)?.sync_all()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !writer.is_finished(),
        "the write should be waiting for the stalled OSD"
    );

    // …while the plugin keeps answering Docker.
    let started = Instant::now();
    d.ok("VolumeDriver.Capabilities", "{}");
    let path = d.ok("VolumeDriver.Path", &format!(r#"{{"Name":"{busy}"}}"#));
    assert_eq!(path["Mountpoint"], mp.display().to_string());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "Path waited on the cluster"
    );
    for name in [&busy, &other] {
        let t = Instant::now();
        let got = d.get(name);
        assert_eq!(got["Volume"]["Name"], name.as_str(), "{got}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "Get took {:?}",
            t.elapsed()
        );
    }

    // The OSD comes back: the stalled write completes and nothing was lost.
    drop(thaw);
    let result = writer.join().unwrap();
    assert!(
        result.is_ok(),
        "the write failed after the OSD came back: {result:?}"
    );
    d.unmount(&busy, &mount_id(1));
    let mp = d.mount(&busy, &mount_id(2));
    assert_eq!(
        std::fs::read(mp.join("during-stall")).unwrap(),
        b"written across a stall"
    );
    d.unmount(&busy, &mount_id(2));
}

#[test]
fn the_keyring_secret_is_never_logged_and_a_readable_keyring_is_flagged() {
    use std::os::unix::fs::PermissionsExt;
    let keyring_src = ceph_conf().parent().unwrap().join("keyring");
    let text = std::fs::read_to_string(&keyring_src).unwrap();
    let secrets: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("key = ").map(str::to_string))
        .collect();
    assert!(
        !secrets.is_empty(),
        "no key found in {}",
        keyring_src.display()
    );
    // A world-readable copy of the keyring, named explicitly.
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring");
    std::fs::write(&keyring, &text).unwrap();
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = Daemon::start(
        DaemonOpts::host("host-secret")
            // The fixture logs at debug level.
            .env("RBDVOL_CEPH__KEYRING", keyring.to_str().unwrap()),
    );
    let name = unique("secret");
    d.create(&name, r#"{"size":"64M"}"#);
    d.get(&name);
    d.ok("VolumeDriver.List", "{}");
    let mp = d.mount(&name, &mount_id(1));
    assert!(is_mountpoint(&mp));
    d.unmount(&name, &mount_id(1));
    let log = d.log();
    assert!(
        log.contains("world-readable"),
        "no warning about the readable keyring:\n{log}"
    );
    for s in &secrets {
        assert!(
            !log.contains(s.as_str()),
            "the keyring secret appears in the log"
        );
    }
}
