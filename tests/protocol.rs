//! Docker's volume plugin protocol, spoken exactly as dockerd speaks it, against a real
//! daemon and a real Ceph cluster. Every effect is checked in the cluster itself.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn daemon() -> Daemon {
    Daemon::start(DaemonOpts::host("host-a"))
}

#[test]
fn activate_and_capabilities_answer_as_docker_expects() {
    let d = daemon();
    // Activate comes with an empty body.
    assert_eq!(
        d.call("Plugin.Activate", ""),
        serde_json::json!({"Implements": ["VolumeDriver"]})
    );
    assert_eq!(
        d.call("VolumeDriver.Capabilities", "{}"),
        serde_json::json!({"Capabilities": {"Scope": "global"}})
    );
}

#[test]
fn create_get_list_remove_work_against_the_cluster() {
    let d = daemon();
    let name = unique("life");
    d.create(&name, "null");
    assert!(images_in("rbd").contains(&name), "image was not created");
    assert_eq!(
        image_meta("rbd", &name, "rbdvol.fstype").as_deref(),
        Some("ext4")
    );
    assert_eq!(
        image_meta("rbd", &name, "rbdvol.created-by").as_deref(),
        Some("host-a")
    );

    let got = d.get(&name);
    let vol = &got["Volume"];
    assert_eq!(vol["Name"], name.as_str());
    let created = vol["CreatedAt"].as_str().expect("CreatedAt");
    humantime::parse_rfc3339(created).expect("CreatedAt must be RFC 3339");
    let st = &vol["Status"];
    assert_eq!(st["size"], "10 GiB");
    assert_eq!(st["pool"], "rbd");
    assert_eq!(st["features"], "layering,exclusive-lock");
    assert_eq!(st["in_use"], "no");
    assert!(
        vol.get("Mountpoint").is_none(),
        "not mounted: no Mountpoint"
    );

    let listed = d.ok("VolumeDriver.List", "{}");
    let names: Vec<&str> = listed["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&name.as_str()));

    assert_eq!(
        d.ok("VolumeDriver.Path", &format!("{{\"Name\":\"{name}\"}}"))["Mountpoint"],
        ""
    );

    d.ok("VolumeDriver.Remove", &format!("{{\"Name\":\"{name}\"}}"));
    assert!(!images_in("rbd").contains(&name), "image still listed");
    assert!(
        trashed_names("rbd").contains(&name),
        "default remove must trash"
    );
    d.err(
        "VolumeDriver.Get",
        &format!("{{\"Name\":\"{name}\"}}"),
        "does not exist",
    );
    // Removing an absent volume succeeds.
    d.ok("VolumeDriver.Remove", &format!("{{\"Name\":\"{name}\"}}"));
}

#[test]
fn options_are_stored_on_the_image_and_read_by_another_host() {
    let a = daemon();
    let b = Daemon::start(DaemonOpts::host("host-b"));
    let name = unique("opts");
    a.create(
        &name,
        r#"{"size":"512M","fstype":"xfs","pool":"fast","mkfs-options":"-m crc=1","mount-options":"noatime,nouuid","features":"layering,exclusive-lock,object-map,fast-diff","object-size":"8M","read-only":"true"}"#,
    );
    assert!(images_in("fast").contains(&name));
    assert_eq!(
        image_meta("fast", &name, "rbdvol.mount-options").as_deref(),
        Some("noatime,nouuid")
    );
    let (ok, info) = rbd(&["info", &format!("fast/{name}"), "--format", "json"]);
    assert!(ok, "{info}");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["size"], 512u64 << 20);
    assert_eq!(info["object_size"], 8u64 << 20);

    // Host B never saw the Create, yet lists and inspects the volume with its options.
    let listed = b.ok("VolumeDriver.List", "{}");
    assert!(listed["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["Name"] == name.as_str()));
    let st = b.get(&name)["Volume"]["Status"].clone();
    assert_eq!(st["fstype"], "xfs");
    assert_eq!(st["pool"], "fast");
    assert_eq!(st["size"], "512 MiB");
    assert_eq!(st["mkfs_options"], "-m crc=1");
    assert_eq!(st["mount_options"], "noatime,nouuid");
    assert_eq!(st["read_only"], true);
    assert_eq!(st["created_by"], "host-a");
    assert_eq!(
        st["features"],
        "layering,exclusive-lock,object-map,fast-diff"
    );
    assert_eq!(st["object_size"], "8 MiB");
}

#[test]
fn create_is_idempotent_and_explains_conflicts() {
    let d = daemon();
    let name = unique("idem");
    d.create(&name, r#"{"size":"1G"}"#);
    d.create(&name, r#"{"size":"1G"}"#);
    // Docker sends Opts:null when the user repeats a create without options.
    d.create(&name, "null");
    let e = d.err(
        "VolumeDriver.Create",
        &format!(r#"{{"Name":"{name}","Opts":{{"size":"2G","fstype":"xfs"}}}}"#),
        "already exists",
    );
    assert!(
        e.contains("size=1 GiB") && e.contains("size=2 GiB") && e.contains("fstype=ext4"),
        "{e}"
    );
    // The conflicting create changed nothing.
    let (_, info) = rbd(&["info", &format!("rbd/{name}"), "--format", "json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&info).unwrap()["size"],
        1u64 << 30
    );
}

#[test]
fn remove_refuses_a_locked_volume_and_names_the_holder() {
    let d = daemon();
    let name = unique("held");
    d.create(&name, r#"{"size":"64M"}"#);
    let spec = format!("rbd/{name}");
    let (ok, out) = rbd(&["lock", "add", &spec, "someone"]);
    assert!(ok, "{out}");
    let e = d.err(
        "VolumeDriver.Remove",
        &format!("{{\"Name\":\"{name}\"}}"),
        "is in use",
    );
    assert!(e.contains("advisory lock") && e.contains("someone"), "{e}");
    assert!(
        images_in("rbd").contains(&name),
        "a locked volume was removed"
    );
    let st = d.get(&name)["Volume"]["Status"].clone();
    assert!(
        st["in_use"].as_str().unwrap().contains("advisory lock"),
        "{st}"
    );

    let (_, lockers) = rbd(&["lock", "ls", &spec, "--format", "json"]);
    let lockers: Value = serde_json::from_str(&lockers).unwrap();
    let locker = lockers[0]["locker"].as_str().unwrap().to_string();
    let (ok, out) = rbd(&["lock", "rm", &spec, "someone", &locker]);
    assert!(ok, "{out}");
    d.ok("VolumeDriver.Remove", &format!("{{\"Name\":\"{name}\"}}"));
    assert!(!images_in("rbd").contains(&name));
}

#[test]
fn remove_refuses_while_another_client_holds_the_exclusive_lock() {
    use rbdvol::ceph::{connect_spec, sys::Rados};
    let d = daemon();
    let name = unique("owned");
    d.create(&name, r#"{"size":"64M"}"#);
    // Another "host": its own RADOS client instance taking the managed lock.
    let settings = rbdvol::config::CephSettings {
        conf: ceph_conf(),
        ..Default::default()
    };
    let other = Rados::connect(&connect_spec(&settings)).expect("connect");
    let pool = other.pool("rbd").unwrap();
    let image = pool.open(&name).unwrap();
    image.lock_acquire_exclusive().unwrap();
    image.write(0, b"owned").unwrap();
    image.flush().unwrap();

    let e = d.err(
        "VolumeDriver.Remove",
        &format!("{{\"Name\":\"{name}\"}}"),
        "is in use",
    );
    let addr = other.addrs().unwrap();
    assert!(
        e.contains("exclusive lock held by") && e.contains(&addr),
        "{e} (holder {addr})"
    );
    assert!(images_in("rbd").contains(&name));

    drop(image);
    drop(pool);
    d.ok("VolumeDriver.Remove", &format!("{{\"Name\":\"{name}\"}}"));
    assert!(trashed_names("rbd").contains(&name));
}

#[test]
fn remove_policy_delete_and_keep() {
    let deleting =
        Daemon::start(DaemonOpts::host("host-del").env("RBDVOL_REMOVE__POLICY", "delete"));
    let name = unique("del");
    deleting.create(&name, r#"{"size":"64M"}"#);
    deleting.ok("VolumeDriver.Remove", &format!("{{\"Name\":\"{name}\"}}"));
    assert!(!images_in("rbd").contains(&name));
    assert!(
        !trashed_names("rbd").contains(&name),
        "delete policy must not trash"
    );

    let keeping = Daemon::start(DaemonOpts::host("host-keep").env("RBDVOL_REMOVE__POLICY", "keep"));
    let name = unique("keep");
    keeping.create(&name, r#"{"size":"64M"}"#);
    keeping.ok("VolumeDriver.Remove", &format!("{{\"Name\":\"{name}\"}}"));
    assert!(
        images_in("rbd").contains(&name),
        "keep policy must leave the image"
    );
}

#[test]
fn mount_of_a_missing_volume_fails_and_unknown_unmount_succeeds() {
    let d = daemon();
    let name = unique("absent");
    let id = "a".repeat(64);
    d.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
        "does not exist",
    );
    assert!(d.leftovers().is_empty());
    d.ok(
        "VolumeDriver.Unmount",
        &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
    );
}

#[test]
fn keep_alive_and_concurrent_requests_are_served() {
    let d = daemon();
    let mut conn = d.connect();
    for _ in 0..5 {
        let (s, v) = conn.request("VolumeDriver.Capabilities", "{}");
        assert_eq!(
            (s, v["Capabilities"]["Scope"].as_str()),
            (200, Some("global"))
        );
    }
    let names: Vec<String> = (0..8).map(|_| unique("par")).collect();
    std::thread::scope(|s| {
        for n in &names {
            let d = &d;
            s.spawn(move || {
                d.create(n, r#"{"size":"64M"}"#);
                assert_eq!(d.get(n)["Volume"]["Name"], n.as_str());
            });
        }
    });
    let present = images_in("rbd");
    for n in &names {
        assert!(present.contains(n));
    }
}

#[test]
fn concurrent_creates_of_one_name_make_one_volume() {
    let a = daemon();
    let b = Daemon::start(DaemonOpts::host("host-b"));
    let name = unique("race");
    std::thread::scope(|s| {
        for i in 0..6 {
            let d = if i % 2 == 0 { &a } else { &b };
            let n = &name;
            s.spawn(move || d.create(n, r#"{"size":"128M"}"#));
        }
    });
    assert_eq!(images_in("rbd").iter().filter(|n| **n == name).count(), 1);
    assert_eq!(a.get(&name)["Volume"]["Status"]["size"], "128 MiB");
}

#[test]
fn unknown_endpoints_and_methods_get_an_err() {
    let d = daemon();
    let mut c = d.connect();
    let (status, v) = c.request("VolumeDriver.Frobnicate", "{}");
    assert_eq!(status, 404);
    assert!(v["Err"].as_str().unwrap().contains("unknown endpoint"));
    let mut c = d.connect();
    use std::io::Write;
    c.raw()
        .write_all(b"GET /VolumeDriver.List HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, v) = c.receive();
    assert_eq!(status, 405);
    assert!(v["Err"].as_str().unwrap().contains("POST"));
}

#[test]
fn oversized_bodies_are_refused() {
    let d = daemon();
    let mut c = d.connect();
    let big = format!(
        r#"{{"Name":"x","Opts":{{"pad":"{}"}}}}"#,
        "p".repeat(10 << 20)
    );
    let head = format!(
        "POST /VolumeDriver.Create HTTP/1.1\r\nHost: plugin.moby.localhost\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    c.send_raw_lenient(head.as_bytes());
    c.send_raw_lenient(big.as_bytes());
    let (status, v) = c.receive();
    assert_eq!(status, 413);
    assert!(v["Err"].as_str().unwrap().contains("limit"));
    d.ok("VolumeDriver.List", "{}");
}

#[test]
fn get_never_reports_absent_while_the_cluster_is_unreachable() {
    // A daemon pointed at a cluster that does not answer: a mon address nobody serves.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = v2:127.0.0.1:9\nauth client required = none\n",
    )
    .unwrap();
    let mut opts = DaemonOpts::host("host-dark").env("RBDVOL_CEPH__CONNECT_TIMEOUT", "2s");
    opts.ceph_conf = conf;
    let d = Daemon::start(opts);

    let started = Instant::now();
    // Activate and Capabilities never touch the cluster.
    d.ok("Plugin.Activate", "");
    d.ok("VolumeDriver.Capabilities", "{}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // List fails with an explanation, within its deadline.
    d.err("VolumeDriver.List", "{}", "unreachable");
    // Get of a volume the daemon cannot check: no answer at all (a transport error for
    // dockerd), never an Err that Docker would read as "this volume does not exist".
    let mut c = d.connect();
    c.send("VolumeDriver.Get", r#"{"Name":"pg-data"}"#);
    assert!(
        c.try_receive().is_none(),
        "Get must not answer while the cluster is unreachable"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn the_socket_is_private_and_removed_on_exit() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = daemon();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    // A second daemon on the same socket is refused, and the first keeps serving.
    let out = d.command().output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process is serving"));
    d.ok("VolumeDriver.List", "{}");

    assert!(d.stop().success());
    assert!(!d.socket.exists(), "socket left behind after SIGTERM");

    // A stale socket file (no listener) is replaced at start.
    let stale = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
    drop(stale);
    assert!(d.socket.exists());
    d.restart();
    d.ok("VolumeDriver.Capabilities", "{}");
}

#[test]
fn a_world_writable_socket_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = daemon();
    let open = d.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = d.command_on(&open.join("x.sock")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("world-writable"));
    assert!(!open.join("x.sock").exists());
}
