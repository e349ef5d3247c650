//! Fixtures of the Docker end-to-end tests (tests/docker_*.rs): the `docker` CLI talks
//! to the machine's dockerd, which finds a real `rbdvol serve` by its socket in
//! /run/docker/plugins (a legacy v1 plugin) and drives it; the cluster is then checked
//! with the `rbd` CLI.
//! One test does the same through the managed (v2) plugin that
//! integration/build-managed-plugin builds from this build's binary and Debian
//! packages (the first run on a machine builds and caches its root filesystem).
//! Test containers run `rbdvol-test-base:1` (integration/docker-base-image).
//!
//! Without a Docker engine every test prints `SKIPPED: no Docker engine: <reason>`
//! (on the real stderr, past the test harness's capture) and passes.
//!
//! dockerd keeps state per plugin name for its whole lifetime, and that shapes these
//! fixtures:
//! - A v1 driver, once activated, is cached by name forever (moby
//!   `volume/drivers/extpoint.go`: `s.extensions` only grows). When its socket later
//!   disappears, every unfiltered `docker volume ls`, and every lookup of a volume name
//!   dockerd has no record of, retries that driver for ~15 s. So plugin names are
//!   *fixed* per test (`rbdvol-e2e-<test>-<host>`), not per run: a later run serves
//!   the same sockets again instead of adding new stale drivers, and one test binary at
//!   a time on the machine holds them (a lock file, held until the process exits). The tests only use `docker volume ls -f driver=NAME`
//!   (asks that driver alone) and never name a volume dockerd does not know.
//! - dockerd records each volume (name → driver) in its metadata.db. Each test removes
//!   its containers, then the volumes dockerd still records, then stops its plugins,
//!   then cleans the host (mounts, loop devices, exporters), from a guard that also
//!   runs when the test fails.
//! - Every container carries the label `rbdvol-e2e=<test>`; a test first removes
//!   containers with its label that an earlier, killed run left behind.

mod plugin;
mod scene;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{images_in, rbd, trashed_names};

#[allow(unused_imports)]
pub use plugin::Plugin;
#[allow(unused_imports)]
pub use scene::Scene;

/// The image every test container runs (integration/docker-base-image builds it).
pub const BASE: &str = "rbdvol-test-base:1";
/// Where legacy plugins' sockets must be for dockerd to find them.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
/// Plugin state and mount roots. Not /tmp: the mount root must be a path dockerd
/// sees (it shares this mount namespace; a private /tmp elsewhere would hide it).
pub const WORK_ROOT: &str = "/var/lib/rbdvol-e2e";
/// One test run at a time uses the fixed plugin names.
pub const RUN_LOCK: &str = "/run/lock/rbdvol-docker-e2e.lock";

// ------------------------------------------------------------------ docker CLI

pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} stdout={:?} stderr={:?}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// Runs the docker CLI with a deadline (a Mount may wait for another host's lock).
pub fn docker(args: &[&str]) -> Out {
    docker_within(args, 180)
}

/// Runs the docker CLI, killed after `secs` seconds.
pub fn docker_within(args: &[&str], secs: u32) -> Out {
    let out = Command::new("timeout")
        .args(["-k", "5", &secs.to_string(), "docker"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts success; returns stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.ok, "docker {}: {o}", args.join(" "));
    o.stdout
}

/// Writes past the test harness's output capture, so a skip is never silent.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Why there is no usable engine, if there is none (asked once per test binary).
pub fn engine_missing() -> Option<&'static str> {
    static ENGINE: OnceLock<Option<String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let o = docker(&["info", "--format", "{{.ServerVersion}}"]);
            if o.ok && !o.stdout.trim().is_empty() {
                None
            } else {
                let why = format!("{}{}", o.stderr.trim(), o.stdout.trim());
                Some(if why.is_empty() {
                    "`docker info` failed".to_string()
                } else {
                    format!("`docker info` failed: {why}")
                })
            }
        })
        .as_deref()
}

/// Builds (or finds) the base image once per test binary.
pub fn base_image() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/docker-base-image");
        let out = Command::new("timeout")
            .args(["-k", "5", "900"])
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("the Docker engine is up but the base image cannot be built: {e}");
    }
}

/// Held until this test process exits (the kernel drops the lock with the fd).
pub fn run_lock() {
    static LOCK: OnceLock<nix::fcntl::Flock<std::fs::File>> = OnceLock::new();
    LOCK.get_or_init(|| {
        let deadline = Instant::now() + Duration::from_secs(1200);
        std::fs::create_dir_all(Path::new(RUN_LOCK).parent().unwrap()).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(RUN_LOCK)
            .expect("opening the e2e run lock");
        let mut waited = false;
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => return l,
                Err((f, _)) => {
                    file = f;
                    if !waited {
                        say("docker_e2e: another run holds the e2e plugin names; waiting");
                        waited = true;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "another docker e2e run held {RUN_LOCK} for 20 minutes"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    });
}

// ------------------------------------------------------------------ the cluster

pub fn status_of(v: &Value) -> &Value {
    &v["Status"]
}

pub fn rbd_info(pool: &str, name: &str) -> Value {
    let (ok, out) = rbd(&["info", &format!("{pool}/{name}"), "--format", "json"]);
    assert!(ok, "rbd info {pool}/{name}: {out}");
    serde_json::from_str(&out).unwrap()
}

pub fn assert_trashed(pool: &str, name: &str) {
    assert!(
        !images_in(pool).contains(&name.to_string()),
        "{pool}/{name} is still an image"
    );
    assert!(
        trashed_names(pool).contains(&name.to_string()),
        "{pool}/{name} is not in the RBD trash"
    );
}

pub fn assert_present(pool: &str, name: &str) {
    assert!(
        images_in(pool).contains(&name.to_string()),
        "{pool}/{name} should still exist"
    );
    assert!(
        !trashed_names(pool).contains(&name.to_string()),
        "{pool}/{name} should not be in the trash"
    );
}
