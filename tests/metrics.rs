//! The Prometheus endpoint (`[metrics] listen`): a real daemon is scraped before and
//! after real events (requests, a mount, a mount refused because another host holds
//! the volume, an unmount), and the numbers move with them.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("application/openmetrics-text"), "{out}");
    out
}

/// The value of the sample `series` (name with labels, exactly as exposed), 0 if absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn requests(text: &str, endpoint: &str, outcome: &str) -> f64 {
    value(
        text,
        &format!("rbdvol_requests_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\"}}"),
    )
}

#[test]
fn real_events_move_the_numbers() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let a = Daemon::start(DaemonOpts::host("host-a").env("RBDVOL_METRICS__LISTEN", &listen));
    let name = unique("metrics");

    // The daemon connects to the cluster in the background after it starts.
    let started = Instant::now();
    let mut before = scrape(port);
    while value(&before, "rbdvol_ceph_connected") != 1.0 {
        assert!(started.elapsed() < Duration::from_secs(30), "{before}");
        std::thread::sleep(Duration::from_millis(200));
        before = scrape(port);
    }
    assert_eq!(value(&before, "rbdvol_mounted_volumes"), 0.0, "{before}");
    assert!(
        value(
            &before,
            "rbdvol_ceph_connection_changes_total{kind=\"connected\"}"
        ) >= 1.0
    );

    a.create(&name, r#"{"size":"64M"}"#);
    let mp = a.mount(&name, &mount_id(1));
    // A container writes 1 MiB and syncs it: the exporter counts what reached the image.
    let f = std::fs::File::create(mp.join("blob")).unwrap();
    (&f).write_all(&vec![7u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let series = format!("rbdvol_exporter_written_bytes{{volume=\"rbd/{name}\"}}");
    let started = Instant::now();
    loop {
        // The exporter writes its counters every second.
        let text = scrape(port);
        if text.contains(&series) && value(&text, &series) >= (1 << 20) as f64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{text}");
        std::thread::sleep(Duration::from_millis(300));
    }
    a.err(
        "VolumeDriver.Mount",
        r#"{"Name":"metrics-no-such-volume","ID":"x"}"#,
        "",
    );
    let mounted = scrape(port);
    assert_eq!(
        requests(&mounted, "/VolumeDriver.Create", "ok")
            - requests(&before, "/VolumeDriver.Create", "ok"),
        1.0,
        "{mounted}"
    );
    assert_eq!(
        requests(&mounted, "/VolumeDriver.Mount", "ok"),
        1.0,
        "{mounted}"
    );
    assert_eq!(
        requests(&mounted, "/VolumeDriver.Mount", "error"),
        1.0,
        "{mounted}"
    );
    assert!(
        mounted.contains("rbdvol_request_duration_seconds_count{endpoint=\"/VolumeDriver.Mount\",outcome=\"ok\"} 1"),
        "{mounted}"
    );
    assert_eq!(value(&mounted, "rbdvol_mounted_volumes"), 1.0, "{mounted}");
    assert_eq!(
        value(&mounted, "rbdvol_volume_references"),
        1.0,
        "{mounted}"
    );

    // Another host waits for the lock, then is refused: counted on that host.
    let port_b = free_port();
    let listen_b = format!("127.0.0.1:{port_b}");
    let b = Daemon::start(
        DaemonOpts::host("host-b")
            .env("RBDVOL_LOCK__TAKEOVER_WAIT", "2s")
            .env("RBDVOL_METRICS__LISTEN", &listen_b),
    );
    b.err(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(2)),
        "in use",
    );
    let refused = scrape(port_b);
    assert_eq!(
        value(&refused, "rbdvol_lock_events_total{kind=\"mount_refused\"}"),
        1.0,
        "{refused}"
    );
    drop(b);

    a.unmount(&name, &mount_id(1));
    let after = scrape(port);
    assert_eq!(value(&after, "rbdvol_mounted_volumes"), 0.0, "{after}");
    assert_eq!(value(&after, "rbdvol_volume_references"), 0.0, "{after}");
    assert_eq!(
        requests(&after, "/VolumeDriver.Unmount", "ok"),
        1.0,
        "{after}"
    );
    a.ok("VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
}

/// A dead host's volume taken over: the new host counts a takeover and the lock wait
/// (about the cluster's 5 s watch timeout here).
#[test]
fn a_takeover_and_its_lock_wait_are_counted() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let a = Daemon::start(DaemonOpts::host("host-a"));
    let b = Daemon::start(
        DaemonOpts::host("host-b")
            .env("RBDVOL_LOCK__TAKEOVER_WAIT", "30s")
            .env("RBDVOL_METRICS__LISTEN", &listen),
    );
    let name = unique("metrics-takeover");
    a.create(&name, r#"{"size":"64M"}"#);
    a.mount(&name, &mount_id(1));
    // Host A dies: its exporter (the lock holder) is killed outright.
    let pid = a.exporter_state(&name)["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    b.mount(&name, &mount_id(2));
    let text = scrape(port);
    assert_eq!(
        value(&text, "rbdvol_lock_events_total{kind=\"takeover\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "rbdvol_lock_wait_seconds_count"),
        1.0,
        "{text}"
    );
    assert!(value(&text, "rbdvol_lock_wait_seconds_sum") > 1.0, "{text}");
    b.unmount(&name, &mount_id(2));
}
