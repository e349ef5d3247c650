//! The HTTPS listener for remote plugins: TLS 1.2+ only, and with a client CA
//! configured, no request is served without a valid client certificate. Checked with
//! curl, and with the real dockerd reaching the plugin through a `.json` spec.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rbdvol::certs;

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
    let daemon = Daemon::start(
        DaemonOpts::host(host)
            .env("RBDVOL_TLS__LISTEN", &format!("127.0.0.1:{port}"))
            .env("RBDVOL_TLS__CERT", &c("server.pem"))
            .env("RBDVOL_TLS__KEY", &c("server-key.pem"))
            .env("RBDVOL_TLS__CLIENT_CA", &c("ca.pem")),
    );
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

fn docker_available() -> Result<(), String> {
    let out = Command::new("timeout")
        .args([
            "-k",
            "5",
            "30",
            "docker",
            "info",
            "--format",
            "{{.ServerVersion}}",
        ])
        .output()
        .map_err(|e| format!("docker CLI: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Removes the volumes this test created and the plugin spec, so a vanished plugin
/// never leaves Docker records behind (they would stall later `docker volume ls`).
/// Only the test's own volumes: List shows the whole pool, other tests' volumes too.
struct SpecGuard {
    spec: PathBuf,
    volumes: Vec<String>,
}

impl Drop for SpecGuard {
    fn drop(&mut self) {
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let _ = std::fs::remove_file(&self.spec);
    }
}

/// dockerd caches a legacy plugin by name for its whole life, with the address and TLS
/// files it read at activation. So this test uses one fixed driver name, port and
/// certificate directory on a machine, and one run at a time (a lock file): a later run
/// serves exactly what dockerd cached, and no stale drivers pile up in dockerd.
const DOCKER_TLS_DRIVER: &str = "rbdvol-e2e-tls";
const DOCKER_TLS_PORT: u16 = 17443;
const DOCKER_TLS_DIR: &str = "/var/lib/rbdvol-e2e/tls";

fn docker_tls_lock() -> nix::fcntl::Flock<std::fs::File> {
    std::fs::create_dir_all("/run/lock").unwrap();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/rbdvol-docker-tls.lock")
        .unwrap();
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap()
}

#[test]
fn dockerd_reaches_the_plugin_through_a_json_spec_with_mutual_tls() {
    if let Err(why) = docker_available() {
        eprintln!("SKIPPED dockerd over mutual TLS: no Docker engine: {why}");
        return;
    }
    let _one_run_at_a_time = docker_tls_lock();
    let certs_dir = PathBuf::from(DOCKER_TLS_DIR);
    if !certs_dir.join("rbdvol.json").exists() {
        certs::init(
            &certs_dir,
            &["localhost".into(), "127.0.0.1".into()],
            &format!("127.0.0.1:{DOCKER_TLS_PORT}"),
        )
        .unwrap();
    }
    if std::net::TcpListener::bind(("127.0.0.1", DOCKER_TLS_PORT)).is_err() {
        panic!("port {DOCKER_TLS_PORT} (this test's fixed port, which dockerd caches) is taken by another process");
    }
    let c = |f: &str| certs_dir.join(f).display().to_string();
    let d = Daemon::start(
        DaemonOpts::host("host-tls-docker")
            .env(
                "RBDVOL_TLS__LISTEN",
                &format!("127.0.0.1:{DOCKER_TLS_PORT}"),
            )
            .env("RBDVOL_TLS__CERT", &c("server.pem"))
            .env("RBDVOL_TLS__KEY", &c("server-key.pem"))
            .env("RBDVOL_TLS__CLIENT_CA", &c("ca.pem")),
    );
    std::fs::create_dir_all("/etc/docker/plugins").unwrap();
    let spec = PathBuf::from(format!("/etc/docker/plugins/{DOCKER_TLS_DRIVER}.json"));
    std::fs::copy(certs_dir.join("rbdvol.json"), &spec).unwrap();
    let name = unique("tlsvol");
    let mut guard = SpecGuard {
        spec: spec.clone(),
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
    // Removed: removing it again would make dockerd probe every driver it knows.
    guard.volumes.clear();
    assert!(trashed_names("rbd").contains(&name));

    // Without its client certificate dockerd is refused: nothing is created. A refused
    // activation is not cached by dockerd, so this name leaves nothing behind.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec).unwrap()).unwrap();
    json["TLSConfig"]
        .as_object_mut()
        .unwrap()
        .remove("CertFile");
    json["TLSConfig"].as_object_mut().unwrap().remove("KeyFile");
    let driver2 = format!("{DOCKER_TLS_DRIVER}-nocert");
    let spec2 = PathBuf::from(format!("/etc/docker/plugins/{driver2}.json"));
    std::fs::write(&spec2, json.to_string()).unwrap();
    let _guard2 = SpecGuard {
        spec: spec2,
        volumes: Vec::new(),
    };
    let refused = unique("tlsno");
    let (ok, out) = docker(&["volume", "create", "-d", &driver2, &refused]);
    assert!(
        !ok,
        "dockerd without a client certificate was served: {out}"
    );
    assert!(out.contains("certificate"), "{out}");
    assert!(!images_in("rbd").contains(&refused));
}
