//! Ownership across hosts (here: daemon instances with their own client instances on
//! one machine): a volume is mounted on one host at a time, the refusal names the
//! holder, and an operator can take a volume from a live but unwanted holder, which is
//! fenced (blocklisted) and can never write to it again.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn short_wait(host: &str) -> DaemonOpts {
    DaemonOpts::host(host).env("RBDVOL_LOCK__TAKEOVER_WAIT", "3s")
}

fn rbdvol(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rbdvol.toml");
    std::fs::write(&config, "").unwrap();
    let out = Command::new("timeout")
        .args(["-k", "5", "60", env!("CARGO_BIN_EXE_rbdvol")])
        .args(args)
        .arg("--ceph-conf")
        .arg(ceph_conf())
        .args(["--pool", "rbd", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn try_write(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, b"after the break")?;
    std::fs::File::open(path)?.sync_all()
}

#[test]
fn a_held_volume_is_refused_with_the_holder_and_the_way_out() {
    let a = short_wait("host-a");
    let a = Daemon::start(a);
    let b = Daemon::start(short_wait("host-b"));
    let name = unique("held");
    a.create(&name, r#"{"size":"64M"}"#);
    a.mount(&name, &mount_id(1));
    let e = b.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(2)),
        "is in use on host host-a",
    );
    assert!(e.contains(&format!("rbdvol lock break {name}")), "{e}");
    assert!(e.contains("since "), "{e}");
    assert_eq!(b.leftovers(), Vec::<String>::new());

    let (ok, out) = rbdvol(&["lock", "ls"]);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("exclusive") && line.contains("host host-a"),
        "{line}"
    );
    a.unmount(&name, &mount_id(1));
    // Released cleanly: B gets it at once, and nothing was blocklisted.
    b.mount(&name, &mount_id(2));
    b.unmount(&name, &mount_id(2));
}

#[test]
fn lock_break_fences_the_holder_and_frees_the_volume() {
    let a = Daemon::start(short_wait("host-a"));
    let b = Daemon::start(short_wait("host-b"));
    let name = unique("break");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    std::fs::write(mp.join("before"), "a wrote this").unwrap();
    std::fs::File::open(mp.join("before"))
        .unwrap()
        .sync_all()
        .unwrap();

    let (ok, out) = rbdvol(&["lock", "break", &name]);
    assert!(ok, "{out}");
    assert!(
        out.contains("blocklisted") && out.contains("host-a"),
        "{out}"
    );

    // A notices and stops writing: the exporter's watchdog marks it fenced.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = a.get(&name)["Volume"]["Status"]["mounted_here"]["fenced"].clone();
        if st == true {
            break;
        }
        // Any I/O also reveals it.
        let _ = try_write(&mp.join("probe"));
        assert!(
            Instant::now() < deadline,
            "host A never noticed it was fenced:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        try_write(&mp.join("after")).is_err(),
        "a fenced host could still write"
    );
    a.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(3)),
        "lost the volume's lock",
    );

    // B takes the volume over and sees everything A had synced.
    let mp_b = b.mount(&name, &mount_id(2));
    assert_eq!(
        std::fs::read_to_string(mp_b.join("before")).unwrap(),
        "a wrote this"
    );
    assert!(!mp_b.join("after").exists());

    // A's containers stop: its last Unmount cleans up what is left on A.
    a.unmount(&name, &mount_id(1));
    assert_eq!(a.leftovers(), Vec::<String>::new(), "{}", a.log());
    b.unmount(&name, &mount_id(2));
    assert_eq!(lock_holders("rbd", &name), Vec::<String>::new());
}

#[test]
fn lock_break_of_an_idle_volume_says_so() {
    let a = Daemon::start(short_wait("host-a"));
    let name = unique("idle");
    a.create(&name, r#"{"size":"64M"}"#);
    let (ok, out) = rbdvol(&["lock", "break", &name]);
    assert!(ok, "{out}");
    assert!(out.contains("not locked"), "{out}");
    let (ok, out) = rbdvol(&["lock", "break", "no-such-volume-x"]);
    assert!(!ok && out.contains("does not exist"), "{out}");
}

#[test]
fn a_volume_released_while_another_host_waits_is_handed_over() {
    let a = Daemon::start(short_wait("host-a"));
    let b = Daemon::start(DaemonOpts::host("host-b").env("RBDVOL_LOCK__TAKEOVER_WAIT", "20s"));
    let name = unique("handover");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    std::fs::write(mp.join("baton"), "passed").unwrap();
    let started = Instant::now();
    let mp_b = std::thread::scope(|s| {
        let waiting = s.spawn(|| b.mount(&name, &mount_id(2)));
        std::thread::sleep(Duration::from_secs(2));
        a.unmount(&name, &mount_id(1));
        waiting.join().unwrap()
    });
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        std::fs::read_to_string(mp_b.join("baton")).unwrap(),
        "passed"
    );
    b.unmount(&name, &mount_id(2));
    assert_eq!(a.leftovers(), Vec::<String>::new());
}

#[test]
fn a_dead_holder_is_fenced_and_its_acknowledged_writes_survive() {
    let a = Daemon::start(short_wait("host-a"));
    let b = Daemon::start(DaemonOpts::host("host-b").env("RBDVOL_LOCK__TAKEOVER_WAIT", "60s"));
    let name = unique("dead");
    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    // Every write that fsync acknowledged must be on B after the takeover.
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let f = mp.join(format!("w{i}"));
        std::fs::write(&f, format!("write {i}")).unwrap();
        std::fs::File::open(&f).unwrap().sync_all().unwrap();
        acknowledged.push(i);
    }
    let st = a.exporter_state(&name);
    let (pid, addr) = (
        st["pid"].as_u64().unwrap() as i32,
        st["addr"].as_str().unwrap().to_string(),
    );
    // Host A's I/O client dies without releasing anything.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let started = Instant::now();
    let mp_b = b.mount(&name, &mount_id(2));
    let takeover = started.elapsed();
    eprintln!("takeover after the holder died: {takeover:?}");
    assert!(takeover < Duration::from_secs(60));
    for i in acknowledged {
        assert_eq!(
            std::fs::read_to_string(mp_b.join(format!("w{i}"))).unwrap(),
            format!("write {i}")
        );
    }
    let list = blocklist();
    assert!(
        list.contains(&addr),
        "the dead holder {addr} was not blocklisted:\n{list}"
    );
    b.unmount(&name, &mount_id(2));
}
