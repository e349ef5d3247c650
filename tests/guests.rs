//! The guest-VM tier: rbdvol's krbd and rbd-nbd mappers against real kernels (QEMU
//! guests running Debian's kernel; these machines have no rbd or nbd module), each
//! guest an rbdvol host running this tree's binary. Run by `integration/guest`, which
//! prepares the guests' kernel, network and cluster; `integration/test` runs it
//! whenever QEMU can run. The guests stay up across scenarios (a boot costs ~10-30 s
//! under TCG), so the scenarios run in order in one test, each printing its wall
//! time. Performance under TCG proves nothing: these tests check behaviour only.

mod common;

use std::time::{Duration, Instant};

use common::guest::{Guest, GuestEnv};
use common::*;

/// Settings of every daemon in a guest: a Mount refused by a live holder answers
/// soon (the test cluster's watch timeout is 5 s).
const DAEMON_ENV: &[(&str, &str)] = &[("RBDVOL_LOCK__TAKEOVER_WAIT", "20s")];

fn timed(name: &str, f: impl FnOnce()) {
    let started = Instant::now();
    f();
    println!(
        "SCENARIO {name}: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn md5_of(g: &Guest, file: &str) -> String {
    g.sh(&format!("md5sum < {file}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Writes `mib` MiB of random data to `file` and fsyncs it; returns its md5.
fn write_synced(g: &Guest, file: &str, mib: u32) -> String {
    g.sh(&format!(
        "dd if=/dev/urandom of={file} bs=1M count={mib} conv=fsync status=none"
    ));
    md5_of(g, file)
}

fn assert_nothing_left(g: &Guest, volume: &str) {
    let maps = g.kernel_mappings();
    if maps.contains(volume) || maps.contains("nbd ") {
        g.fail(&format!("{volume}: a kernel mapping was left: {maps}"));
    }
    let mounts = g.mounts();
    if mounts.contains(volume) {
        g.fail(&format!("{volume}: a mount was left: {mounts}"));
    }
}

/// Create, Mount (the daemon's mapper), write and fsync, Unmount, Mount again, read
/// back; the image is marked formatted and nothing is left mapped.
fn round_trip(g: &Guest, kind: &str) {
    let v = unique(&format!("{kind}rt"));
    g.create(&v, r#"{"size":"128M"}"#);
    let mp = g.mount(&v, &mount_id(1));
    let maps = g.kernel_mappings();
    let expected = if kind == "krbd" {
        format!("rbd rbd/{v}")
    } else {
        "nbd ".to_string()
    };
    if !maps.contains(&expected) {
        g.fail(&format!("{v} is not mapped by {kind}: {maps}"));
    }
    let sum = write_synced(g, &format!("{mp}/data"), 4);
    g.unmount(&v, &mount_id(1));
    assert_nothing_left(g, &v);
    let marker = image_meta("rbd", &v, "rbdvol.formatted")
        .unwrap_or_else(|| g.fail(&format!("{v} carries no rbdvol.formatted marker")));
    assert!(marker.starts_with("ext4 by guest"), "{marker}");
    let mp = g.mount(&v, &mount_id(2));
    assert_eq!(md5_of(g, &format!("{mp}/data")), sum, "{v}: data read back");
    g.unmount(&v, &mount_id(2));
    assert_nothing_left(g, &v);
}

fn krbd_chosen_automatically(g: &Guest) {
    g.start_daemon("auto", DAEMON_ENV);
    let log = g.daemon_log();
    let chosen = log
        .lines()
        .find(|l| l.contains("mapper chosen automatically"))
        .unwrap_or_else(|| g.fail("the daemon did not say which mapper it chose"));
    assert!(
        chosen.contains("krbd") && chosen.contains("rbd module"),
        "{chosen}"
    );
    round_trip(g, "krbd");
    // The test cluster's monitors speak msgr2 only.
    let log = g.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("krbd messenger mode") && l.contains("prefer-crc")),
        "no ms_mode choice in the log:\n{log}"
    );
}

/// guest2 has nbd and no rbd module: its daemon runs with `map.mapper = "nbd"`.
fn nbd_round_trip(g: &Guest) {
    g.start_daemon("nbd", DAEMON_ENV);
    round_trip(g, "nbd");
}

/// A second guest's Mount is refused naming the holder; it succeeds once the first
/// unmounts.
fn second_guest_refused_then_served(g1: &Guest, g2: &Guest) {
    let v = unique("held");
    g1.create(&v, r#"{"size":"128M"}"#);
    let mp = g1.mount(&v, &mount_id(1));
    let sum = write_synced(g1, &format!("{mp}/data"), 1);
    let started = Instant::now();
    let err = g2.err("VolumeDriver.Mount", &Guest::mount_body(&v, &mount_id(2)));
    println!(
        "  refused in {:.1} s: {err}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        err.contains("in use") && err.contains(&g1.addr),
        "the refusal does not name {}: {err}",
        g1.addr
    );
    assert_nothing_left(g2, &v);
    g1.unmount(&v, &mount_id(1));
    let mp = g2.mount(&v, &mount_id(2));
    assert_eq!(md5_of(g2, &format!("{mp}/data")), sum);
    g2.unmount(&v, &mount_id(2));
    assert_nothing_left(g2, &v);
}

/// Mounts on `g` until it succeeds (a dead holder is declared dead after the watch
/// timeout); returns the mountpoint and how long it took.
fn mount_until_taken_over(g: &Guest, v: &str, id: &str, within: Duration) -> (String, f64) {
    let started = Instant::now();
    loop {
        let r = g.call("VolumeDriver.Mount", &Guest::mount_body(v, id));
        match r["Err"].as_str() {
            None | Some("") => {
                let mp = r["Mountpoint"].as_str().unwrap().to_string();
                return (mp, started.elapsed().as_secs_f64());
            }
            Some(e) if started.elapsed() < within => {
                println!("  not yet: {e}");
                std::thread::sleep(Duration::from_secs(2));
            }
            Some(e) => g.fail(&format!("{v} was not taken over within {within:?}: {e}")),
        }
    }
}

/// The holder's QEMU is killed: the other guest takes the volume over after the watch
/// timeout, and every write acknowledged by fsync is there.
fn dead_guest_taken_over(g1: &mut Guest, g2: &Guest) {
    let v = unique("dead");
    g1.create(&v, r#"{"size":"128M"}"#);
    let mp = g1.mount(&v, &mount_id(1));
    let sums: Vec<(String, String)> = (0..3)
        .map(|i| {
            let f = format!("f{i}");
            let s = write_synced(g1, &format!("{mp}/{f}"), 2);
            (f, s)
        })
        .collect();
    g1.kill();
    let (mp, secs) = mount_until_taken_over(g2, &v, &mount_id(2), Duration::from_secs(90));
    println!("  taken over {secs:.1} s after the holder was killed");
    for (f, s) in &sums {
        assert_eq!(&md5_of(g2, &format!("{mp}/{f}")), s, "{v}/{f}");
    }
    g2.unmount(&v, &mount_id(2));
    assert_nothing_left(g2, &v);
    g1.reboot();
    g1.start_daemon("auto", DAEMON_ENV);
}

/// The holder's QEMU is stopped past the watch timeout: the other guest takes over;
/// resumed, the first guest's kernel client is blocklisted, its writes fail, it never
/// writes again, and its daemon notices and reports it.
fn frozen_guest_fenced(g1: &mut Guest, g2: &Guest) {
    let v = unique("frozen");
    g1.create(&v, r#"{"size":"128M"}"#);
    let mp1 = g1.mount(&v, &mount_id(1));
    let sum = write_synced(g1, &format!("{mp1}/before"), 1);
    g1.freeze();
    std::thread::sleep(Duration::from_secs(8));
    let taken = mount_until_taken_over(g2, &v, &mount_id(2), Duration::from_secs(90));
    println!("  taken over from the frozen guest in {:.1} s", taken.1);
    let mp2 = taken.0;
    g1.thaw();
    let (rc, out) = g1.sh_rc(&format!(
        "timeout 90 dd if=/dev/urandom of={mp1}/after bs=1M count=1 conv=fsync status=none"
    ));
    println!("  write on the fenced guest: exit {rc}: {}", out.trim());
    if rc == 0 {
        g1.fail("a write and fsync on the fenced guest succeeded");
    }
    // Its daemon notices (it checks every 5 s) and says so, in the log and in Get.
    let started = Instant::now();
    loop {
        let log = g1.daemon_log();
        if log.lines().any(|l| l.contains("FENCED") && l.contains(&v)) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            g1.fail("the fenced guest's daemon did not report the fencing");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let err = g1.err("VolumeDriver.Mount", &Guest::mount_body(&v, &mount_id(3)));
    assert!(err.contains("fenced"), "{err}");
    // The new holder sees the data from before, and nothing from the fenced guest.
    assert_eq!(md5_of(g2, &format!("{mp2}/before")), sum);
    g2.unmount(&v, &mount_id(2));
    let mp2 = g2.mount(&v, &mount_id(4));
    assert_eq!(md5_of(g2, &format!("{mp2}/before")), sum);
    let (rc, _) = g2.sh_rc(&format!("test -e {mp2}/after"));
    assert_ne!(rc, 0, "the fenced guest's write landed");
    g2.unmount(&v, &mount_id(4));
    // Docker's Unmount on the fenced guest releases what is left there.
    let r = g1.call("VolumeDriver.Unmount", &Guest::mount_body(&v, &mount_id(1)));
    println!("  Unmount on the fenced guest: {r}");
    let left = g1.kernel_mappings() + &g1.mounts();
    if r["Err"].as_str().is_some_and(|e| !e.is_empty()) || left.contains(&v) {
        println!("  the fenced guest kept {left:?}; booting it again");
        g1.reboot();
        g1.start_daemon("auto", DAEMON_ENV);
    }
}

/// Breaking one volume's lock (an operator's `rbd lock rm`) fences that volume only:
/// the guest's other kernel-mapped volume stays writable (`noshare`).
fn noshare_blast_radius(g: &Guest) {
    let (a, b) = (unique("nsa"), unique("nsb"));
    g.create(&a, r#"{"size":"128M"}"#);
    g.create(&b, r#"{"size":"128M"}"#);
    let mpa = g.mount(&a, &mount_id(1));
    let mpb = g.mount(&b, &mount_id(2));
    let (ok, out) = rbd(&["lock", "ls", &format!("rbd/{a}"), "--format", "json"]);
    assert!(ok, "{out}");
    let locks: serde_json::Value = serde_json::from_str(&out).unwrap();
    let l = &locks[0];
    let (id, locker) = (l["id"].as_str().unwrap(), l["locker"].as_str().unwrap());
    let (ok, out) = rbd(&["lock", "rm", &format!("rbd/{a}"), id, locker]);
    assert!(ok, "rbd lock rm: {out}");
    let (rc, _) = g.sh_rc(&format!(
        "timeout 90 dd if=/dev/urandom of={mpa}/x bs=1M count=1 conv=fsync status=none"
    ));
    assert_ne!(rc, 0, "{a}: a write after its lock was broken succeeded");
    let sum = write_synced(g, &format!("{mpb}/x"), 1);
    assert_eq!(md5_of(g, &format!("{mpb}/x")), sum);
    g.unmount(&b, &mount_id(2));
    assert_nothing_left(g, &b);
    let _ = g.call("VolumeDriver.Unmount", &Guest::mount_body(&a, &mount_id(1)));
}

/// A volume with a feature the guest kernel's rbd module cannot map gets an error
/// that names the feature and the fix, before anything is mapped.
fn kernel_feature_refused(g: &Guest) {
    let supported = g.sh("cat /sys/bus/rbd/supported_features");
    println!("  /sys/bus/rbd/supported_features: {}", supported.trim());
    let v = unique("journal");
    g.create(
        &v,
        r#"{"size":"128M","features":"layering,exclusive-lock,journaling"}"#,
    );
    let err = g.err("VolumeDriver.Mount", &Guest::mount_body(&v, &mount_id(1)));
    assert!(
        err.contains("journaling") && err.contains("rbd feature disable") && err.contains("nbd"),
        "{err}"
    );
    assert_nothing_left(g, &v);
}

/// Kills the daemon at every crash point (with `mapper`), restarting it with the next
/// one: after each restart nothing is left mapped or mounted (or what is left is the
/// recorded, consistent mount a crash before the reply leaves), and at the end the
/// volume mounts with its data and its last Unmount leaves no mapping, mount or lock.
/// The order matters: a restart's reconcile releases what the last crash left
/// through the same Unmount steps, so it must not arm one of those.
fn crash_reconcile(g: &Guest, mapper: &str) {
    let v = unique(&format!("crash{mapper}"));
    let mount = |id: u32| Guest::mount_body(&v, &mount_id(id));
    let restart = |point: &str| {
        let _ = g.sh("p=$(cat /run/share/daemon.pid); kill -0 $p 2>/dev/null && kill -9 $p; true");
        let mut env = DAEMON_ENV.to_vec();
        env.push(("RBDVOL_CRASH_AT", point));
        g.start_daemon(mapper, &env);
    };
    let crash = |endpoint: &str, body: &str| {
        let (rc, out) = g.sh_rc(&format!(
            "printf '%s' '{body}' | curl -sS --max-time 150 --unix-socket {} --data-binary @- http://plugin/{endpoint}",
            common::guest::SOCKET
        ));
        if rc == 0 {
            g.fail(&format!("{endpoint} answered instead of crashing: {out}"));
        }
    };
    restart("mount:after-map");
    g.create(&v, r#"{"size":"128M"}"#);
    crash("VolumeDriver.Mount", &mount(1));
    for point in ["mount:after-mkfs", "mount:after-mount"] {
        restart(point);
        assert_nothing_left(g, &v);
        crash("VolumeDriver.Mount", &mount(1));
    }
    restart("unmount:after-umount");
    assert_nothing_left(g, &v);
    let mp = g.mount(&v, &mount_id(1));
    let sum = write_synced(g, &format!("{mp}/kept"), 1);
    crash("VolumeDriver.Unmount", &mount(1));
    restart("mount:before-reply");
    assert_nothing_left(g, &v);
    crash("VolumeDriver.Mount", &mount(2));
    // Recorded and consistent: adopted, and Docker's Unmount of it releases it.
    restart("unmount:after-unmap");
    assert_eq!(md5_of(g, &format!("{mp}/kept")), sum);
    crash("VolumeDriver.Unmount", &mount(2));
    restart("");
    assert_nothing_left(g, &v);
    let mp = g.mount(&v, &mount_id(3));
    assert_eq!(md5_of(g, &format!("{mp}/kept")), sum);
    g.unmount(&v, &mount_id(3));
    assert_nothing_left(g, &v);
    let holders = lock_holders("rbd", &v);
    assert!(holders.is_empty(), "{v}: locks left: {holders:?}");
}

#[test]
#[ignore = "guest VM tier: run by integration/guest (integration/test runs it when QEMU can run)"]
fn kernel_mappers_in_guests() {
    let started = Instant::now();
    let (mut g1, g2) = two_guests();
    println!(
        "SCENARIO boot two guests: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            timed("krbd end to end, auto chooses krbd (guest1)", || {
                krbd_chosen_automatically(&g1)
            })
        });
        s.spawn(|| timed("nbd end to end (guest2)", || nbd_round_trip(&g2)));
    });
    timed("second guest refused, then served", || {
        second_guest_refused_then_served(&g1, &g2)
    });
    timed("dead guest taken over", || {
        dead_guest_taken_over(&mut g1, &g2)
    });
    timed("frozen guest fenced", || frozen_guest_fenced(&mut g1, &g2));
    timed("noshare blast radius", || noshare_blast_radius(&g1));
    timed("kernel feature refused", || kernel_feature_refused(&g1));
    println!(
        "guest scenarios: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

fn two_guests() -> (Guest, Guest) {
    let Some(env) = GuestEnv::from_env() else {
        panic!("RBDVOL_GUEST_* is not set: run this tier with integration/guest");
    };
    println!("guest kernel {}", env.release);
    // guest1 is a krbd host, guest2 an rbd-nbd host (each daemon lists only the
    // kernel mappings its modules can have: every `rbd` call costs seconds here).
    let (e1, e2) = (env.clone(), env);
    let b1 = std::thread::spawn(move || Guest::boot(&e1, 0, "rbd ext4 xfs"));
    let b2 = std::thread::spawn(move || Guest::boot(&e2, 1, "nbd ext4 xfs"));
    (
        b1.join().expect("booting guest1"),
        b2.join().expect("booting guest2"),
    )
}

#[test]
#[ignore = "guest VM tier: run by integration/guest (integration/test runs it when QEMU can run)"]
fn kernel_mappings_crash_reconcile_in_guests() {
    let started = Instant::now();
    let (g1, g2) = two_guests();
    timed("crash reconcile, krbd and nbd (one guest each)", || {
        std::thread::scope(|s| {
            s.spawn(|| crash_reconcile(&g1, "krbd"));
            s.spawn(|| crash_reconcile(&g2, "nbd"));
        })
    });
    println!(
        "crash reconcile: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

/// For debugging the tier: boots one guest and runs the shell commands in
/// `RBDVOL_GUEST_SHELL` (one per line), printing what each printed.
/// `integration/guest guest_shell` with the variable set.
#[test]
#[ignore = "a developer's tool: run by integration/guest with RBDVOL_GUEST_SHELL set"]
fn guest_shell() {
    let (Some(env), Ok(cmds)) = (GuestEnv::from_env(), std::env::var("RBDVOL_GUEST_SHELL")) else {
        return;
    };
    let g = Guest::boot(&env, 0, "rbd nbd ext4 xfs");
    for cmd in cmds.lines().filter(|l| !l.trim().is_empty()) {
        let (rc, out) = g.sh_rc(cmd);
        println!("$ {cmd}\n{out}[exit {rc}]");
    }
}
