//! The HTTPS listener for remote plugins: TLS 1.2+ only, and with a client CA
//! configured, no request is served without a valid client certificate. Checked with
//! curl, and with a private Docker node's dockerd reaching the plugin through a `.json`
//! spec.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nodes::{nodes_missing, say, DockerNode};
use common::*;
use rbdvol::certs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct TlsHost {
    daemon: Daemon,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    certs: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn tls_host(host: &str) -> TlsHost {
    tls_host_with(host, true, &[])
}

/// A daemon with an HTTPS listener on a free port; `client_ca`: require client
/// certificates from the CA `rbdvol tls init` made; `env`: more settings.
fn tls_host_with(host: &str, client_ca: bool, env: &[(&str, &str)]) -> TlsHost {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    let port = free_port();
    let ca = certs::init(
        &certs_dir,
        &["localhost".into(), "127.0.0.1".into()],
        &format!("127.0.0.1:{port}"),
    )
    .unwrap();
    let c = |f: &str| certs_dir.join(f).display().to_string();
    let mut opts = DaemonOpts::host(host)
        .env("RBDVOL_TLS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("RBDVOL_TLS__CERT", &c("server.pem"))
        .env("RBDVOL_TLS__KEY", &c("server-key.pem"));
    if client_ca {
        opts = opts.env("RBDVOL_TLS__CLIENT_CA", &c("ca.pem"));
    }
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    let daemon = Daemon::start(opts);
    TlsHost {
        daemon,
        ca,
        certs: certs_dir,
        port,
        _dir: dir,
    }
}

/// POSTs to the HTTPS listener with curl; returns (curl exit code, body).
fn curl(port: u16, endpoint: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("timeout")
        .args([
            "-k",
            "5",
            "30",
            "curl",
            "-sS",
            "-X",
            "POST",
            "--data-binary",
            "{}",
        ])
        .args(args)
        .arg(format!("https://127.0.0.1:{port}/{endpoint}"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn path(p: &Path, f: &str) -> String {
    p.join(f).display().to_string()
}

#[test]
fn only_clients_with_a_certificate_from_the_ca_are_served() {
    let h = tls_host("host-tls");
    let (ca, cert, key) = (
        path(&h.certs, "ca.pem"),
        path(&h.certs, "client.pem"),
        path(&h.certs, "client-key.pem"),
    );

    let (rc, body) = curl(
        h.port,
        "Plugin.Activate",
        &["--cacert", &ca, "--cert", &cert, "--key", &key],
    );
    assert_eq!(rc, 0, "{body}");
    assert!(body.contains("VolumeDriver"), "{body}");
    let (rc, body) = curl(
        h.port,
        "VolumeDriver.List",
        &["--cacert", &ca, "--cert", &cert, "--key", &key],
    );
    assert_eq!(rc, 0, "{body}");
    assert!(body.contains("Volumes"), "{body}");

    // No certificate.
    let (rc, body) = curl(h.port, "VolumeDriver.List", &["--cacert", &ca]);
    assert_ne!(rc, 0, "served without a client certificate: {body}");
    assert!(!body.contains("Volumes"));

    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    certs::init(other.path(), &["localhost".into()], "127.0.0.1:1").unwrap();
    let (rc, body) = curl(
        h.port,
        "VolumeDriver.List",
        &[
            "--cacert",
            &ca,
            "--cert",
            &path(other.path(), "client.pem"),
            "--key",
            &path(other.path(), "client-key.pem"),
        ],
    );
    assert_ne!(rc, 0, "served a client from the wrong CA: {body}");

    // An expired certificate from the right CA.
    let (exp_cert, exp_key) = certs::leaf(
        &["dockerd".into()],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        -2,
        &h.ca,
    )
    .unwrap();
    std::fs::write(other.path().join("expired.pem"), exp_cert).unwrap();
    std::fs::write(other.path().join("expired-key.pem"), exp_key).unwrap();
    let (rc, body) = curl(
        h.port,
        "VolumeDriver.List",
        &[
            "--cacert",
            &ca,
            "--cert",
            &path(other.path(), "expired.pem"),
            "--key",
            &path(other.path(), "expired-key.pem"),
        ],
    );
    assert_ne!(rc, 0, "served an expired client certificate: {body}");

    // TLS 1.1 and older are refused.
    let (rc, body) = curl(
        h.port,
        "Plugin.Activate",
        &[
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--tls-max",
            "1.1",
        ],
    );
    assert_ne!(rc, 0, "accepted TLS 1.1: {body}");

    // The unix socket keeps working throughout.
    h.daemon.ok("VolumeDriver.Capabilities", "{}");
}

#[test]
fn a_listener_without_a_client_ca_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    let port = free_port();
    certs::init(
        &certs_dir,
        &["127.0.0.1".into()],
        &format!("127.0.0.1:{port}"),
    )
    .unwrap();
    let config = dir.path().join("rbdvol.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            path(&certs_dir, "server.pem"),
            path(&certs_dir, "server-key.pem")
        ),
    )
    .unwrap();
    let socket = dir.path().join("rbdvol.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbdvol"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--ceph-conf")
        .arg(ceph_conf())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--mount-root")
        .arg(dir.path().join("mounts"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let served = TcpStream::connect(("127.0.0.1", port)).is_ok();
            let _ = child.kill();
            let _ = child.wait();
            panic!("rbdvol serve kept running without a client CA (HTTPS port open: {served})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    for needle in [
        "tls.client_ca",
        "rbdvol tls init",
        "insecure_allow_unauthenticated_clients",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
    assert!(!socket.exists(), "the plugin socket was created");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn the_insecure_setting_serves_clients_without_a_certificate_and_says_so_loudly() {
    let h = tls_host_with(
        "host-tls-insecure",
        false,
        &[("RBDVOL_TLS__INSECURE_ALLOW_UNAUTHENTICATED_CLIENTS", "true")],
    );
    let (rc, body) = curl(
        h.port,
        "VolumeDriver.List",
        &["--cacert", &path(&h.certs, "ca.pem")],
    );
    assert_eq!(rc, 0, "{body}");
    assert!(body.contains("Volumes"), "{body}");
    let log = h.daemon.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("INSECURE")
            && l.contains("ANY network peer")),
        "no loud warning in the log:\n{log}"
    );
}

/// True when the server closed `s` within `within` (EOF or reset); false when the
/// read timed out with the connection still open.
fn closed_within(s: &mut impl Read, sock: &TcpStream, within: Duration) -> bool {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn client_config(certs_dir: &Path) -> Arc<rustls::ClientConfig> {
    let pems = |f: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(certs_dir.join(f))
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in pems("ca.pem") {
        roots.add(c).unwrap();
    }
    let key = PrivateKeyDer::from_pem_file(certs_dir.join("client-key.pem")).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(pems("client.pem"), key)
        .unwrap(),
    )
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A completed mutual-TLS handshake. Retried for a moment: peers that just went away
/// free their slots only once the server has noticed.
fn mtls(port: u16, config: &Arc<rustls::ClientConfig>) -> Tls {
    let attempt = || -> std::io::Result<Tls> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(rustls::StreamOwned::new(conn, tcp))
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match attempt() {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("mutual TLS handshake: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("mutual TLS handshake: {e}"),
        }
    }
}

#[test]
fn connections_over_the_caps_are_closed_at_once_and_idle_ones_in_time() {
    let h = tls_host_with(
        "host-tls-caps",
        true,
        &[
            ("RBDVOL_TLS__MAX_HANDSHAKES", "2"),
            ("RBDVOL_TLS__MAX_CONNECTIONS", "4"),
        ],
    );
    let raw = || TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    let prompt = Duration::from_millis(1500);

    // Silent peers: two hold the handshake slots, the rest are closed at once.
    let held: Vec<TcpStream> = (0..2).map(|_| raw()).collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let s = raw();
        let started = Instant::now();
        assert!(
            closed_within(&mut &s, &s, prompt),
            "a connection over tls.max_handshakes was kept open\n{}",
            h.daemon.log()
        );
        assert!(started.elapsed() < prompt);
    }
    // The unix socket is not starved meanwhile.
    h.daemon.ok("Plugin.Activate", "");
    for s in &held {
        assert!(
            !closed_within(&mut &*s, s, Duration::from_millis(300)),
            "a handshake within the cap was cut short"
        );
    }
    let log = h.daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("tls.max_handshakes")),
        "{log}"
    );
    drop(held);

    // Connections past their handshake hold connection slots, not handshake slots.
    let config = client_config(&h.certs);
    let mut kept_alive = mtls(h.port, &config);
    kept_alive
        .write_all(b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("VolumeDriver") {
        let n = kept_alive.read(&mut buf).unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    let mut fresh = mtls(h.port, &config);
    let idle_since = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let _two_more: Vec<TcpStream> = (0..2).map(|_| raw()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let s = raw();
    assert!(
        closed_within(&mut &s, &s, prompt),
        "a connection over tls.max_connections was kept open\n{}",
        h.daemon.log()
    );
    h.daemon.ok("Plugin.Activate", "");

    // A silent peer does not keep its slot: hyper's header read timeout (10 s) closes
    // both an idle kept-alive connection and one that never sent a request.
    let limit = Duration::from_secs(14);
    for (what, s) in [("kept-alive", &mut kept_alive), ("fresh", &mut fresh)] {
        let sock = s.sock.try_clone().unwrap();
        let left = limit.saturating_sub(idle_since.elapsed());
        assert!(
            closed_within(s, &sock, left),
            "an idle {what} TLS connection was still open after {limit:?}"
        );
    }
    drop(_two_more);

    // With the silent peers gone, a real client is served again.
    let (ca, cert, key) = (
        path(&h.certs, "ca.pem"),
        path(&h.certs, "client.pem"),
        path(&h.certs, "client-key.pem"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (rc, body) = curl(
            h.port,
            "VolumeDriver.List",
            &["--cacert", &ca, "--cert", &cert, "--key", &key],
        );
        if rc == 0 && body.contains("Volumes") {
            break;
        }
        assert!(Instant::now() < deadline, "not served again: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes the volumes this test created, so the plugin never vanishes under a
/// record the node's dockerd still holds.
/// Only the test's own volumes: List shows the whole pool, other tests' volumes too.
struct SpecGuard<'a> {
    node: &'a DockerNode,
    volumes: Vec<String>,
}

impl Drop for SpecGuard<'_> {
    fn drop(&mut self) {
        for v in &self.volumes {
            let _ = self.node.docker_within(&["volume", "rm", "-f", v], 120);
        }
    }
}

/// The listener's port inside the node's own network namespace (nothing else uses it).
const DOCKER_TLS_PORT: u16 = 17443;
const DOCKER_TLS_DRIVER: &str = "rbdvol-e2e-tls";

#[test]
fn dockerd_reaches_the_plugin_through_a_json_spec_with_mutual_tls() {
    if let Some(why) = nodes_missing() {
        say(&format!("SKIPPED dockerd over mutual TLS: {why}"));
        return;
    }
    let node = DockerNode::start("tls");
    let docker = |args: &[&str]| {
        let o = node.docker_within(args, 120);
        (o.ok, o.stdout + &o.stderr)
    };
    let certs_tmp = tempfile::tempdir().unwrap();
    let certs_dir = certs_tmp.path().join("certs");
    certs::init(
        &certs_dir,
        &["localhost".into(), "127.0.0.1".into()],
        &format!("127.0.0.1:{DOCKER_TLS_PORT}"),
    )
    .unwrap();
    let c = |f: &str| certs_dir.join(f).display().to_string();
    let d = Daemon::start(
        DaemonOpts::host("host-tls-docker")
            .in_netns(&node.netns)
            .env(
                "RBDVOL_TLS__LISTEN",
                &format!("127.0.0.1:{DOCKER_TLS_PORT}"),
            )
            .env("RBDVOL_TLS__CERT", &c("server.pem"))
            .env("RBDVOL_TLS__KEY", &c("server-key.pem"))
            .env("RBDVOL_TLS__CLIENT_CA", &c("ca.pem")),
    );
    let spec = node.spec_dir().join(format!("{DOCKER_TLS_DRIVER}.json"));
    std::fs::copy(certs_dir.join("rbdvol.json"), &spec).unwrap();
    let name = unique("tlsvol");
    let mut guard = SpecGuard {
        node: &node,
        volumes: vec![name.clone()],
    };
    let (ok, out) = docker(&[
        "volume",
        "create",
        "-d",
        DOCKER_TLS_DRIVER,
        "-o",
        "size=64M",
        &name,
    ]);
    assert!(
        ok,
        "docker volume create over mutual TLS failed: {out}\n{}",
        d.log()
    );
    assert!(images_in("rbd").contains(&name));
    let (ok, out) = docker(&[
        "volume",
        "inspect",
        "--format",
        "{{.Status.pool}} {{.Status.size}}",
        &name,
    ]);
    assert!(ok && out.contains("rbd 64 MiB"), "{out}");
    let (ok, out) = docker(&["volume", "rm", &name]);
    assert!(ok, "{out}");
    guard.volumes.clear();
    assert!(trashed_names("rbd").contains(&name));

    // Without its client certificate dockerd is refused: nothing is created.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec).unwrap()).unwrap();
    json["TLSConfig"]
        .as_object_mut()
        .unwrap()
        .remove("CertFile");
    json["TLSConfig"].as_object_mut().unwrap().remove("KeyFile");
    let driver2 = format!("{DOCKER_TLS_DRIVER}-nocert");
    let spec2 = node.spec_dir().join(format!("{driver2}.json"));
    std::fs::write(&spec2, json.to_string()).unwrap();
    let refused = unique("tlsno");
    let (ok, out) = docker(&["volume", "create", "-d", &driver2, &refused]);
    assert!(
        !ok,
        "dockerd without a client certificate was served: {out}"
    );
    assert!(out.contains("certificate"), "{out}");
    assert!(!images_in("rbd").contains(&refused));
}
