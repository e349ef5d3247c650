//! End to end with the real Docker engine: the `docker` CLI talks to the machine's
//! dockerd, which finds a real `rbdvol serve` by its socket in /run/docker/plugins
//! (a legacy v1 plugin) and drives it; the cluster is then checked with the `rbd` CLI.
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
//!   the same sockets again instead of adding new stale drivers, and one run at a time
//!   holds them (a lock file). The tests only use `docker volume ls -f driver=NAME`
//!   (asks that driver alone) and never name a volume dockerd does not know.
//! - dockerd records each volume (name → driver) in its metadata.db. Each test removes
//!   its containers, then the volumes dockerd still records, then stops its plugins,
//!   then cleans the host (mounts, loop devices, exporters), from a guard that also
//!   runs when the test fails.
//! - Every container carries the label `rbdvol-e2e=<test>`; a test first removes
//!   containers with its label that an earlier, killed run left behind.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{
    ceph_conf, cmdline, image_meta, images_in, lock_holders, loops_under, mounts_under,
    processes_mentioning, rbd, trashed_names, unique, Conn,
};

/// The image every test container runs (integration/docker-base-image builds it).
const BASE: &str = "rbdvol-test-base:1";
/// Where legacy plugins' sockets must be for dockerd to find them.
const PLUGIN_DIR: &str = "/run/docker/plugins";
/// Plugin state and mount roots. Not /tmp: the mount root must be a path dockerd
/// sees (it shares this mount namespace; a private /tmp elsewhere would hide it).
const WORK_ROOT: &str = "/var/lib/rbdvol-e2e";
/// One test run at a time uses the fixed plugin names.
const RUN_LOCK: &str = "/run/lock/rbdvol-docker-e2e.lock";

// ------------------------------------------------------------------ docker CLI

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
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
fn docker(args: &[&str]) -> Out {
    let out = Command::new("timeout")
        .args(["-k", "5", "180", "docker"])
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
fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.ok, "docker {}: {o}", args.join(" "));
    o.stdout
}

/// Writes past the test harness's output capture, so a skip is never silent.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Why there is no usable engine, if there is none (asked once per test binary).
fn engine_missing() -> Option<&'static str> {
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
fn base_image() {
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
fn run_lock() {
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

// ------------------------------------------------------------------ plugin daemon

/// A real `rbdvol serve` standing in for one host.
struct Plugin {
    /// The driver name users give to `docker volume create -d`.
    name: String,
    host_id: String,
    dir: Option<tempfile::TempDir>,
    socket: PathBuf,
    child: Option<Child>,
}

impl Plugin {
    /// `discoverable`: the socket is /run/docker/plugins/NAME.sock, so this dockerd
    /// uses it; otherwise it lives in the plugin's own directory, reached only by raw
    /// requests (another host's dockerd).
    fn start(name: &str, host_id: &str, discoverable: bool, env: &[(&str, &str)]) -> Plugin {
        std::fs::create_dir_all(WORK_ROOT).unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir_in(WORK_ROOT)
            .unwrap();
        let socket = if discoverable {
            std::fs::create_dir_all(PLUGIN_DIR).unwrap();
            Path::new(PLUGIN_DIR).join(format!("{name}.sock"))
        } else {
            dir.path().join("rbdvol.sock")
        };
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("rbdvol.toml"), "").unwrap();
        let log = std::fs::File::create(root.join("daemon.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rbdvol"));
        cmd.arg("serve")
            .arg("--config")
            .arg(root.join("rbdvol.toml"))
            .arg("--socket")
            .arg(&socket)
            .arg("--ceph-conf")
            .arg(ceph_conf())
            .arg("--host-id")
            .arg(host_id)
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--mount-root")
            .arg(root.join("mounts"))
            .args(["--pool", "rbd", "--pool", "fast"])
            .args(["--log-level", "rbdvol=debug,info"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting rbdvol");
        let mut p = Plugin {
            name: name.to_string(),
            host_id: host_id.to_string(),
            dir: Some(dir),
            socket,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(&p.socket).is_err() {
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                p.child = None;
                panic!("rbdvol {name} exited with {status}: {}", p.log());
            }
            assert!(
                Instant::now() < deadline,
                "rbdvol {name}: socket never appeared: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The first answer comes after start-up reconciling.
        p.call("Plugin.Activate", "");
        p
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("daemon.log")).unwrap_or_default()
    }

    /// How many requests of `endpoint` (e.g. "VolumeDriver.Create") it answered.
    fn answered(&self, endpoint: &str) -> usize {
        let needle = format!("endpoint=/{endpoint}}}");
        self.log()
            .lines()
            .filter(|l| l.contains(&needle) && l.contains("answered"))
            .count()
    }

    /// One raw request, shaped like dockerd's (for the other host's dockerd).
    fn call(&self, endpoint: &str, body: &str) -> Value {
        let mut c = Conn::open(&self.socket);
        let (status, v) = c.request(endpoint, body);
        assert_eq!(status, 200, "{endpoint} {body}: {v}\n{}", self.log());
        v
    }

    fn ok(&self, endpoint: &str, body: &str) -> Value {
        let v = self.call(endpoint, body);
        assert!(
            v.get("Err").is_none_or(|e| e.as_str() == Some("")),
            "{endpoint} {body} on {}: {v}",
            self.host_id
        );
        v
    }

    /// The Docker mount IDs holding `volume` here, from the daemon's reference table.
    fn mount_ids(&self, volume: &str) -> Vec<String> {
        let path = self.root().join("state/refs.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        v["volumes"][volume]["refs"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every Mount request it logged, in order, with the Docker mount ID when a log
    /// line of that request names it (a Mount of an already mounted volume does).
    fn mount_requests(&self) -> Vec<Option<String>> {
        let log = self.log();
        let mut reqs: Vec<(String, Option<String>)> = Vec::new();
        for l in log.lines() {
            let Some(rest) = l.split("req{id=").nth(1) else {
                continue;
            };
            let req = rest.split(' ').next().unwrap_or_default();
            if !rest.starts_with(&format!("{req} endpoint=/VolumeDriver.Mount}}")) {
                continue;
            }
            let id = l
                .split(" id=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(str::to_string);
            match reqs.iter_mut().find(|(r, _)| r == req) {
                Some((_, known)) => {
                    if known.is_none() {
                        *known = id;
                    }
                }
                None => reqs.push((req.to_string(), id)),
            }
        }
        reqs.into_iter().map(|(_, id)| id).collect()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Mounts, loop devices and exporter processes this host has. Empty when idle.
    fn leftovers(&self) -> Vec<String> {
        let root = self.root();
        let mut out: Vec<String> = mounts_under(root)
            .into_iter()
            .map(|m| format!("mount {m}"))
            .collect();
        out.extend(loops_under(root).into_iter().map(|l| format!("loop {l}")));
        let me = self.pid();
        out.extend(
            processes_mentioning(root)
                .into_iter()
                .filter(|p| Some(*p) != me)
                .map(|p| format!("process {p}: {}", cmdline(p))),
        );
        out
    }

    fn assert_idle(&self, why: &str) {
        assert_eq!(
            self.leftovers(),
            Vec::<String>::new(),
            "{}: {why}\n{}",
            self.host_id,
            self.log()
        );
    }

    /// SIGTERM (the daemon removes its socket), SIGKILL after 15 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A socket left behind (the daemon was killed) would stall dockerd's scans.
        if self.socket.starts_with(PLUGIN_DIR) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    /// Filesystems on loop devices, then the loop devices (while their FUSE backing
    /// files still resolve), then the exporters by pid, then their FUSE mounts.
    fn clean_host(&self) {
        let root = self.root();
        let run = |args: &[&str], path: &str| {
            let _ = Command::new("timeout")
                .args(["-k", "5", "30"])
                .args(args)
                .arg(path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for m in mounts_under(root).into_iter().rev() {
            if !m.contains("/state/") {
                run(&["umount"], &m);
            }
        }
        for l in loops_under(root) {
            run(&["losetup", "-d"], &l);
        }
        let me = self.pid();
        for pid in processes_mentioning(root) {
            if Some(pid) != me {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for m in mounts_under(root).into_iter().rev() {
            run(&["umount", "-l"], &m);
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop();
        // The daemon's log goes with its directory: show it when it can help.
        if std::thread::panicking() || std::env::var_os("DOCKER_E2E_SHOW_LOGS").is_some() {
            say(&format!(
                "---- log of {} ({}):\n{}",
                self.name,
                self.host_id,
                self.log()
            ));
        }
        self.clean_host();
        if !mounts_under(self.root()).is_empty() {
            // Never delete recursively through a mount; leave the directory.
            let dir = self.dir.take().unwrap();
            say(&format!(
                "docker_e2e: {} still has mounts; leaving {}",
                self.name,
                dir.keep().display()
            ));
        }
    }
}

// ------------------------------------------------------------------ scene

/// One test's world: its plugins, and the containers and volume records it made in
/// dockerd. Dropping it removes containers, then volume records, then stops the
/// plugins (fields drop after `drop` runs), so dockerd never keeps a record whose
/// driver is gone.
struct Scene {
    key: String,
    label: String,
    containers: Mutex<Vec<String>>,
    /// Volume names dockerd records now (removing an unrecorded name would make
    /// dockerd probe every driver it knows, stale ones included).
    recorded: Mutex<BTreeSet<String>>,
    plugins: Vec<Plugin>,
    /// A managed (v2) plugin this test installed: disabled and removed after the
    /// volume records, before the legacy plugins stop.
    managed: Option<String>,
    scratch: tempfile::TempDir,
}

impl Scene {
    /// None (after saying why) when there is no Docker engine.
    fn new(key: &str) -> Option<Scene> {
        if let Some(why) = engine_missing() {
            say(&format!("SKIPPED: no Docker engine: {why}"));
            return None;
        }
        base_image();
        run_lock();
        let label = format!("rbdvol-e2e={key}");
        // Containers an earlier, killed run of this test left behind.
        let old = docker_ok(&["ps", "-aq", "--filter", &format!("label={label}")]);
        let old: Vec<&str> = old.split_whitespace().collect();
        if !old.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(old);
            docker(&args);
        }
        Some(Scene {
            key: key.to_string(),
            label,
            containers: Mutex::new(Vec::new()),
            recorded: Mutex::new(BTreeSet::new()),
            plugins: Vec::new(),
            managed: None,
            scratch: tempfile::tempdir().unwrap(),
        })
    }

    /// Starts host `role` ("a", "b"): host id `host-<role>`, driver name
    /// `rbdvol-e2e-<test>-<role>`. Returns the driver name.
    fn host(&mut self, role: &str, env: &[(&str, &str)]) -> String {
        let name = format!("rbdvol-e2e-{}-{role}", self.key);
        self.plugins
            .push(Plugin::start(&name, &format!("host-{role}"), true, env));
        name
    }

    /// Another host whose dockerd is not this one: reached by raw requests only.
    fn remote_host(&mut self, role: &str, env: &[(&str, &str)]) {
        let name = format!("rbdvol-e2e-{}-{role}", self.key);
        self.plugins
            .push(Plugin::start(&name, &format!("host-{role}"), false, env));
    }

    fn plugin(&self, role: &str) -> &Plugin {
        let id = format!("host-{role}");
        self.plugins.iter().find(|p| p.host_id == id).unwrap()
    }

    /// A volume name unique to this run.
    fn volume_name(&self, what: &str) -> String {
        unique(&format!("e2e-{}-{what}", self.key))
    }

    fn container_name(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "rbdvol-e2e-{}-{}-{}",
            self.key,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.containers.lock().unwrap().push(name.clone());
        name
    }

    /// `docker volume create -d DRIVER [-o k=v]... NAME`.
    fn create(&self, driver: &str, name: &str, opts: &[&str]) -> Out {
        let mut args = vec!["volume", "create", "-d", driver];
        for o in opts {
            args.extend(["-o", o]);
        }
        args.push(name);
        let o = docker(&args);
        if o.ok {
            self.recorded.lock().unwrap().insert(name.to_string());
        }
        o
    }

    fn create_ok(&self, driver: &str, name: &str, opts: &[&str]) {
        let o = self.create(driver, name, opts);
        assert!(o.ok, "creating {name} on {driver}: {o}");
        assert_eq!(o.stdout.trim(), name);
    }

    /// `docker volume rm NAME` (the record goes only if it succeeds).
    fn rm(&self, name: &str) -> Out {
        let o = docker(&["volume", "rm", name]);
        if o.ok {
            self.recorded.lock().unwrap().remove(name);
        }
        o
    }

    fn inspect(&self, name: &str) -> Value {
        let out = docker_ok(&["volume", "inspect", name]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    /// Volume names `docker volume ls` shows for one driver (asks that driver only).
    fn ls(&self, driver: &str) -> Vec<(String, String, String)> {
        docker_ok(&[
            "volume",
            "ls",
            "--filter",
            &format!("driver={driver}"),
            "--format",
            "{{.Driver}}|{{.Name}}|{{.Scope}}",
        ])
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect()
    }

    fn run_args(&self, name: &str, detach: bool) -> Vec<String> {
        let mut v: Vec<String> = vec!["run".into()];
        if detach {
            v.push("-d".into());
        } else {
            v.push("--rm".into());
        }
        v.extend([
            "--name".into(),
            name.into(),
            "--label".into(),
            self.label.clone(),
            "--network".into(),
            "none".into(),
        ]);
        v
    }

    /// `docker run --rm -v VOL:/data BASE sh -c SCRIPT`.
    fn run(&self, volume: &str, script: &str) -> Out {
        let name = self.container_name();
        let mut args = self.run_args(&name, false);
        args.extend([
            "-v".into(),
            format!("{volume}:/data"),
            BASE.into(),
            "sh".into(),
            "-c".into(),
            script.into(),
        ]);
        let o = docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if !o.ok {
            // A container whose start failed stays behind (Created) and would keep
            // referencing the volume; --rm means it should go.
            let _ = docker(&["rm", "-f", &name]);
        }
        o
    }

    fn run_ok(&self, volume: &str, script: &str) -> String {
        let o = self.run(volume, script);
        assert!(o.ok, "container with {volume} running {script:?}: {o}");
        o.stdout
    }

    /// A detached container holding VOL at /data; returns its name.
    fn start_container(&self, volume: &str, cmd: &[&str]) -> String {
        let name = self.container_name();
        let mut args = self.run_args(&name, true);
        args.extend(["-v".into(), format!("{volume}:/data"), BASE.into()]);
        args.extend(cmd.iter().map(|s| s.to_string()));
        docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        name
    }

    fn exec(&self, container: &str, script: &str) -> String {
        docker_ok(&["exec", container, "sh", "-c", script])
    }

    /// Removes what this test made in dockerd. Runs again harmlessly from Drop.
    fn cleanup_docker(&mut self) {
        let containers: Vec<String> = std::mem::take(&mut *self.containers.lock().unwrap());
        for chunk in containers.chunks(20) {
            let mut args = vec!["rm", "-f"];
            args.extend(chunk.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let recorded: Vec<String> = std::mem::take(&mut *self.recorded.lock().unwrap())
            .into_iter()
            .collect();
        for v in recorded {
            let o = docker(&["volume", "rm", "-f", &v]);
            if !o.ok {
                say(&format!("docker_e2e: docker volume rm -f {v}: {o}"));
            }
        }
        if let Some(name) = self.managed.take() {
            Self::remove_managed(&name);
        }
    }

    /// Removes the managed plugin `name` if it is installed (from this or a killed run).
    fn remove_managed(name: &str) {
        if docker(&["plugin", "inspect", name]).ok {
            let _ = docker(&["plugin", "disable", "-f", name]);
            let o = docker(&["plugin", "rm", "-f", name]);
            if !o.ok {
                say(&format!("docker_e2e: docker plugin rm -f {name}: {o}"));
            }
        }
    }

    /// Builds and enables the managed plugin `rbdvol-e2e-<test>` with this build's
    /// binary (integration/build-managed-plugin); returns its name (`NAME:latest`).
    fn managed_plugin(&mut self, host_id: &str) -> String {
        let name = format!("rbdvol-e2e-{}:latest", self.key);
        Self::remove_managed(&name);
        let conf = ceph_conf();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/build-managed-plugin");
        self.managed = Some(name.clone());
        let out = Command::new("timeout")
            .args(["-k", "10", "1800"])
            .arg(&script)
            .args(["--name", &name, "--binary", env!("CARGO_BIN_EXE_rbdvol")])
            .arg("--ceph-dir")
            .arg(conf.parent().unwrap())
            .args(["--pools", "rbd,fast", "--host-id", host_id])
            .args(["--set", "RBDVOL_LOG__LEVEL=rbdvol=debug,info"])
            .stdin(Stdio::null())
            .output()
            .expect("running build-managed-plugin");
        assert!(
            out.status.success(),
            "build-managed-plugin failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
        name
    }

    /// The normal end of a test: dockerd cleaned, plugins stopped, nothing leaked.
    fn finish(mut self) {
        self.cleanup_docker();
        for p in &self.plugins {
            p.assert_idle("leaked at the end of the test");
        }
        for p in &mut self.plugins {
            p.stop();
            assert!(
                !p.socket.exists(),
                "{}: the socket outlived the daemon",
                p.name
            );
        }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.cleanup_docker();
        // self.plugins drop next: each stops its daemon and cleans its host.
    }
}

fn status_of(v: &Value) -> &Value {
    &v["Status"]
}

fn rbd_info(pool: &str, name: &str) -> Value {
    let (ok, out) = rbd(&["info", &format!("{pool}/{name}"), "--format", "json"]);
    assert!(ok, "rbd info {pool}/{name}: {out}");
    serde_json::from_str(&out).unwrap()
}

fn assert_trashed(pool: &str, name: &str) {
    assert!(
        !images_in(pool).contains(&name.to_string()),
        "{pool}/{name} is still an image"
    );
    assert!(
        trashed_names(pool).contains(&name.to_string()),
        "{pool}/{name} is not in the RBD trash"
    );
}

fn assert_present(pool: &str, name: &str) {
    assert!(
        images_in(pool).contains(&name.to_string()),
        "{pool}/{name} should still exist"
    );
    assert!(
        !trashed_names(pool).contains(&name.to_string()),
        "{pool}/{name} should not be in the trash"
    );
}

// ------------------------------------------------------------------ tests

/// `docker volume create/ls/inspect/rm` with options; bad options are refused with the
/// plugin's words shown by the CLI, and nothing is created, in dockerd or the cluster.
#[test]
fn create_ls_inspect_rm_and_bad_options_through_dockerd() {
    let Some(mut s) = Scene::new("cli") else {
        return;
    };
    let a = s.host("a", &[]);
    let small = s.volume_name("ext4");
    let big = s.volume_name("xfs");
    s.create_ok(
        &a,
        &small,
        &[
            "size=64M",
            "fstype=ext4",
            "pool=fast",
            "mount-options=noatime",
            "features=layering,exclusive-lock,object-map,fast-diff",
        ],
    );
    s.create_ok(&a, &big, &["size=320M", "fstype=xfs"]);

    // The cluster has what was asked for.
    let info = rbd_info("fast", &small);
    assert_eq!(info["size"], 64 << 20, "{info}");
    let features: Vec<&str> = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for f in ["layering", "exclusive-lock", "object-map", "fast-diff"] {
        assert!(features.contains(&f), "{f} missing: {info}");
    }
    assert_eq!(
        image_meta("fast", &small, "rbdvol.fstype").as_deref(),
        Some("ext4")
    );
    assert_eq!(
        image_meta("fast", &small, "rbdvol.mount-options").as_deref(),
        Some("noatime")
    );
    assert_eq!(rbd_info("rbd", &big)["size"], 320 << 20);
    assert_eq!(
        image_meta("rbd", &big, "rbdvol.fstype").as_deref(),
        Some("xfs")
    );

    // docker volume ls (this driver only), with the plugin's global scope.
    let ls = s.ls(&a);
    for n in [&small, &big] {
        assert!(
            ls.contains(&(a.clone(), n.clone(), "global".into())),
            "{n} not listed: {ls:?}"
        );
    }

    // docker volume inspect shows the plugin's Status.
    let v = s.inspect(&small);
    assert_eq!(v["Name"], small.as_str());
    assert_eq!(v["Driver"], a.as_str());
    assert_eq!(v["Scope"], "global");
    let st = status_of(&v);
    assert_eq!(st["pool"], "fast", "{v}");
    assert_eq!(st["size_bytes"], 64 << 20, "{v}");
    assert_eq!(st["fstype"], "ext4", "{v}");
    assert_eq!(st["mount_options"], "noatime", "{v}");
    assert_eq!(st["formatted"], "no", "{v}");
    assert_eq!(st["in_use"], "no", "{v}");
    assert!(
        st["created_by"]
            .as_str()
            .unwrap_or_default()
            .contains("host-a"),
        "{v}"
    );
    assert!(
        v["CreatedAt"].as_str().is_some_and(|t| t.len() >= 20),
        "CreatedAt: {v}"
    );
    assert_eq!(s.inspect(&big)["Status"]["fstype"], "xfs");

    // Bad input: the CLI shows the plugin's error; nothing is created anywhere.
    let bad: &[(&[&str], &str, &str)] = &[
        (&["size=10X"], "size", "a bad size"),
        (&["fstype=btrfs"], "ext4", "an unknown fstype"),
        (&["colour=blue"], "unknown option", "an unknown option"),
        (&["pool=nope"], "pool", "an unconfigured pool"),
        (&["mkfs-options=-F"], "mkfs-options", "forced mkfs"),
        (&["size=1M"], "size", "a too-small size"),
    ];
    for (i, (opts, needle, what)) in bad.iter().enumerate() {
        let name = s.volume_name(&format!("bad{i}"));
        let o = s.create(&a, &name, opts);
        assert!(!o.ok, "{what} was accepted: {o}");
        assert!(o.stderr.contains(needle), "{what}: {o}");
        assert!(
            o.stderr.contains(&name),
            "{what}: the error names the volume: {o}"
        );
        for pool in ["rbd", "fast"] {
            assert!(
                !images_in(pool).contains(&name),
                "{what}: {pool}/{name} exists"
            );
        }
        assert!(
            !s.ls(&a).iter().any(|(_, n, _)| *n == name),
            "{what}: dockerd lists {name}"
        );
    }
    let o = s.create(&a, "bad name", &[]);
    assert!(!o.ok && o.stderr.contains("invalid volume name"), "{o}");

    // Re-creating with other options through the same dockerd: Docker answers from
    // its own record and never sends Create, so the volume is left as it was.
    let creates = s.plugin("a").answered("VolumeDriver.Create");
    let _ = s.create(&a, &small, &["size=128M"]);
    assert_eq!(s.plugin("a").answered("VolumeDriver.Create"), creates);
    assert_eq!(rbd_info("fast", &small)["size"], 64 << 20);

    // docker volume rm: into the RBD trash.
    for n in [&small, &big] {
        let o = s.rm(n);
        assert!(o.ok, "{o}");
    }
    assert_trashed("fast", &small);
    assert_trashed("rbd", &big);
    assert!(!s.ls(&a).iter().any(|(_, n, _)| *n == small || *n == big));
    s.finish();
}

/// Data written by one container is read back by the next, on ext4 and xfs; between
/// containers nothing is mounted or mapped and no lock is held.
#[test]
fn data_written_by_one_container_is_read_by_the_next() {
    let Some(mut s) = Scene::new("data") else {
        return;
    };
    let a = s.host("a", &[]);
    for (fstype, size) in [("ext4", "64M"), ("xfs", "320M")] {
        let vol = s.volume_name(fstype);
        s.create_ok(
            &a,
            &vol,
            &[&format!("size={size}"), &format!("fstype={fstype}")],
        );
        let out = s.run_ok(
            &vol,
            "echo hi > /data/f && dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null \
             && sha256sum /data/blob > /data/blob.sha256 && sync && cat /proc/mounts",
        );
        let line = out
            .lines()
            .find(|l| l.split(' ').nth(1) == Some("/data"))
            .unwrap_or_else(|| panic!("/data is not a mount in the container: {out}"));
        assert_eq!(line.split(' ').nth(2), Some(fstype), "{line}");
        s.plugin("a")
            .assert_idle("the container exited: its volume must be released");
        assert_eq!(lock_holders("rbd", &vol), Vec::<String>::new());
        let marker = image_meta("rbd", &vol, "rbdvol.formatted").expect("formatted marker");
        assert!(
            marker.starts_with(fstype) && marker.contains("host-a"),
            "{marker}"
        );

        let out = s.run_ok(&vol, "cat /data/f && sha256sum -c /data/blob.sha256");
        assert_eq!(out, "hi\n/data/blob: OK\n");
        s.plugin("a").assert_idle("the second container exited");
        assert!(s.rm(&vol).ok);
        assert_trashed("rbd", &vol);
    }
    s.finish();
}

/// Two containers hold one volume at once and see each other's files; `docker cp`
/// into and out of the running one mounts its mount ID a second time and must leave
/// its mount in place; `docker volume rm` is refused while any container (running or
/// stopped) references the volume, and trashes it afterwards.
#[test]
fn shared_volume_docker_cp_and_rm_while_in_use() {
    let Some(mut s) = Scene::new("share") else {
        return;
    };
    let a = s.host("a", &[]);
    let vol = s.volume_name("shared");
    s.create_ok(&a, &vol, &["size=64M"]);

    let holder = s.start_container(&vol, &["sleep", "600"]);
    s.exec(&holder, "echo from-first > /data/first && sync");
    let st = s.inspect(&vol);
    let mountpoint = st["Mountpoint"].as_str().unwrap_or_default().to_string();
    assert!(
        mountpoint.starts_with(s.plugin("a").root().to_str().unwrap()),
        "Mountpoint {mountpoint:?} is not under the plugin's mount root: {st}"
    );
    assert_eq!(st["Status"]["mounted_here"]["container_mounts"], 1, "{st}");
    assert_eq!(lock_holders("rbd", &vol).len(), 1);

    // A second container on the same volume, at the same time.
    let out = s.run_ok(
        &vol,
        "cat /data/first && echo from-second > /data/second && sync",
    );
    assert_eq!(out, "from-first\n");
    assert_eq!(s.exec(&holder, "cat /data/second"), "from-second\n");
    assert_eq!(
        s.inspect(&vol)["Status"]["mounted_here"]["container_mounts"],
        1,
        "the second container's mount was released"
    );

    // docker cp into the running container: Mount(same ID) + Unmount(same ID).
    let holder_ids = s.plugin("a").mount_ids(&vol);
    assert_eq!(holder_ids.len(), 1, "{holder_ids:?}");
    let mounts_before = s.plugin("a").mount_requests().len();
    let src = s.scratch.path().join("copied.txt");
    std::fs::write(&src, "copied in\n").unwrap();
    docker_ok(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{holder}:/data/copied.txt"),
    ]);
    let out = docker_ok(&["cp", &format!("{holder}:/data/second"), "-"]);
    assert!(out.contains("from-second"), "copy out: {out:?}");
    let cp_mounts = s.plugin("a").mount_requests().split_off(mounts_before);
    assert!(!cp_mounts.is_empty(), "docker cp did not mount the volume");
    assert!(
        cp_mounts
            .iter()
            .all(|id| id.as_ref() == Some(&holder_ids[0])),
        "docker cp on a running container mounts with the container's own ID {}: {cp_mounts:?}",
        holder_ids[0]
    );
    assert_eq!(s.plugin("a").mount_ids(&vol), holder_ids);
    // The running container still has its volume, with everything in it.
    assert_eq!(
        s.exec(&holder, "cat /data/copied.txt /data/first /data/second"),
        "copied in\nfrom-first\nfrom-second\n"
    );
    s.exec(&holder, "echo after-cp > /data/after && sync");
    assert!(
        mounts_under(Path::new(&mountpoint)).contains(&mountpoint),
        "the host mount went away under the running container"
    );
    assert_eq!(
        s.inspect(&vol)["Status"]["mounted_here"]["container_mounts"],
        1
    );

    // rm while a running container uses it: Docker refuses without asking the plugin.
    let removes = s.plugin("a").answered("VolumeDriver.Remove");
    let e = s.rm(&vol);
    assert!(!e.ok && e.stderr.contains("in use"), "{e}");
    docker_ok(&["stop", "-t", "1", &holder]);
    s.plugin("a")
        .assert_idle("the container stopped: its volume must be released");
    assert_eq!(lock_holders("rbd", &vol), Vec::<String>::new());
    // ... and while a stopped container still references it.
    let e = s.rm(&vol);
    assert!(!e.ok && e.stderr.contains("in use"), "{e}");
    assert_eq!(s.plugin("a").answered("VolumeDriver.Remove"), removes);
    assert_present("rbd", &vol);

    // The stopped container's files are all there for the next one.
    assert_eq!(
        s.run_ok(
            &vol,
            "cat /data/first /data/second /data/copied.txt /data/after"
        ),
        "from-first\nfrom-second\ncopied in\nafter-cp\n"
    );
    docker_ok(&["rm", &holder]);
    assert!(s.rm(&vol).ok);
    assert_trashed("rbd", &vol);
    s.finish();
}

/// While another host holds the volume, `docker volume rm` and `docker run` here are
/// refused with the holder named; once it lets go, this host uses the volume.
#[test]
fn rm_and_run_refused_while_another_host_holds_the_volume() {
    let Some(mut s) = Scene::new("held") else {
        return;
    };
    let a = s.host("a", &[("RBDVOL_LOCK__TAKEOVER_WAIT", "3s")]);
    s.remote_host("b", &[]);
    let vol = s.volume_name("held");
    s.create_ok(&a, &vol, &["size=64M"]);

    // Host B's dockerd mounts it (raw requests, as that dockerd would send them).
    let b = s.plugin("b");
    let id = format!("{:064x}", 0xb0b);
    let mp = b.ok(
        "VolumeDriver.Mount",
        &format!(r#"{{"Name":"{vol}","ID":"{id}"}}"#),
    )["Mountpoint"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(Path::new(&mp).join("from-b"), "hello from b\n").unwrap();
    std::fs::File::open(Path::new(&mp).join("from-b"))
        .unwrap()
        .sync_all()
        .unwrap();

    let e = s.rm(&vol);
    assert!(!e.ok, "removed while host-b holds it: {e}");
    assert!(
        e.stderr.contains("host-b"),
        "the error must name the holder: {e}"
    );
    assert_present("rbd", &vol);

    let started = Instant::now();
    let e = s.run(&vol, "cat /data/from-b");
    assert!(!e.ok, "host-a mounted a volume host-b holds: {e}");
    assert!(
        e.stderr.contains("host-b"),
        "the error must name the holder: {e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the refusal took {:?}; host-a waits 3 s for a live holder",
        started.elapsed()
    );
    s.plugin("a")
        .assert_idle("a refused Mount must leave nothing behind");

    let b = s.plugin("b");
    b.ok(
        "VolumeDriver.Unmount",
        &format!(r#"{{"Name":"{vol}","ID":"{id}"}}"#),
    );
    b.assert_idle("host-b unmounted");

    assert_eq!(s.run_ok(&vol, "cat /data/from-b"), "hello from b\n");
    assert!(s.rm(&vol).ok);
    assert_trashed("rbd", &vol);
    s.finish();
}

/// A volume created with options through host A's plugin is listed, inspected (with
/// those options) and used with its data through host B's plugin, in the same dockerd.
/// dockerd records one driver per volume name, so host A's plugin runs with
/// `remove.policy = keep`: `docker volume rm` there makes dockerd forget the volume
/// while the image stays, as if host A were another machine.
#[test]
fn a_volume_created_on_host_a_is_seen_and_used_on_host_b() {
    let Some(mut s) = Scene::new("hosts") else {
        return;
    };
    let a = s.host("a", &[("RBDVOL_REMOVE__POLICY", "keep")]);
    let b = s.host("b", &[]);
    let vol = s.volume_name("moved");
    s.create_ok(
        &a,
        &vol,
        &[
            "size=320M",
            "fstype=xfs",
            "mount-options=noatime",
            "pool=fast",
        ],
    );
    s.run_ok(&vol, "echo written-on-a > /data/f && sync");
    s.plugin("a").assert_idle("released on host-a");

    // dockerd forgets it (host A keeps the image).
    assert!(s.rm(&vol).ok);
    assert_present("fast", &vol);

    // Host B lists it, and adopts it without a Create.
    assert!(
        s.ls(&b).iter().any(|(d, n, _)| *d == b && *n == vol),
        "{vol} not listed by host-b"
    );
    s.create_ok(&b, &vol, &[]);
    assert_eq!(
        s.plugin("b").answered("VolumeDriver.Create"),
        0,
        "Docker found the volume with Get and must not have created it"
    );
    let v = s.inspect(&vol);
    assert_eq!(v["Driver"], b.as_str());
    let st = status_of(&v);
    assert_eq!(st["fstype"], "xfs", "{v}");
    assert_eq!(st["mount_options"], "noatime", "{v}");
    assert_eq!(st["size_bytes"], 320 << 20, "{v}");
    assert_eq!(st["pool"], "fast", "{v}");
    assert_eq!(st["formatted"], "yes", "{v}");
    assert!(
        st["created_by"]
            .as_str()
            .unwrap_or_default()
            .contains("host-a"),
        "{v}"
    );

    // Host B mounts host A's filesystem with its data, without formatting it again.
    let out = s.run_ok(&vol, "cat /data/f && grep ' /data ' /proc/mounts");
    assert!(out.starts_with("written-on-a\n"), "{out}");
    assert!(out.contains(" xfs ") && out.contains("noatime"), "{out}");
    let marker = image_meta("fast", &vol, "rbdvol.formatted").unwrap();
    assert!(marker.contains("host-a"), "reformatted on host-b? {marker}");
    s.plugin("b").assert_idle("released on host-b");

    assert!(s.rm(&vol).ok);
    assert_trashed("fast", &vol);
    s.finish();
}

/// Mounts strictly below `dir` (Docker's propagated mount is itself a mount point).
fn mounts_below(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    mounts_under(dir).into_iter().filter(|m| *m != d).collect()
}

/// Processes in the managed plugin `id`'s cgroup: its daemon plus one exporter per
/// mapped volume.
fn managed_processes(id: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if cg.contains(id) && !stat.contains(") Z ") {
            out.push(format!("{pid}: {}", cmdline(pid)));
        }
    }
    out
}

/// The managed (v2) plugin, built without a registry by integration/build-managed-plugin
/// and enabled in this dockerd: create/ls/inspect, data across containers, two
/// containers at once, docker cp, rm into the trash; Mount's in-plugin path reaches
/// the host through the propagated mount; disable and rm leave nothing behind.
#[test]
fn managed_plugin_end_to_end() {
    let Some(mut s) = Scene::new("managed") else {
        return;
    };
    let started = Instant::now();
    let name = s.managed_plugin("host-managed");
    say(&format!(
        "docker_e2e: managed plugin {name} built and enabled in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let id = docker_ok(&["plugin", "inspect", "-f", "{{.Id}}", &name])
        .trim()
        .to_string();
    let propagated = PathBuf::from(format!("/var/lib/docker/plugins/{id}/propagated-mount"));
    assert_eq!(
        managed_processes(&id).len(),
        1,
        "the plugin runs one process: {:?}",
        managed_processes(&id)
    );

    let vol = s.volume_name("v2");
    s.create_ok(
        &name,
        &vol,
        &[
            "size=64M",
            "fstype=ext4",
            "mount-options=noatime",
            "pool=fast",
        ],
    );
    assert!(images_in("fast").contains(&vol));
    assert!(
        s.ls(&name)
            .contains(&(name.clone(), vol.clone(), "global".into())),
        "not listed: {:?}",
        s.ls(&name)
    );
    let v = s.inspect(&vol);
    assert_eq!(v["Driver"], name.as_str());
    let st = status_of(&v);
    assert_eq!(st["fstype"], "ext4", "{v}");
    assert_eq!(st["size_bytes"], 64 << 20, "{v}");
    assert_eq!(st["mount_options"], "noatime", "{v}");
    assert!(
        st["created_by"]
            .as_str()
            .unwrap_or_default()
            .contains("host-managed"),
        "{v}"
    );

    let out = s.run_ok(
        &vol,
        "echo managed > /data/f && sync && grep ' /data ' /proc/mounts",
    );
    assert!(out.contains(" ext4 ") && out.contains("noatime"), "{out}");
    assert!(
        mounts_below(&propagated).is_empty(),
        "still mounted on the host"
    );
    assert_eq!(
        managed_processes(&id).len(),
        1,
        "an exporter outlived its volume"
    );
    assert_eq!(lock_holders("fast", &vol), Vec::<String>::new());

    // A container holding it, a second one at the same time, docker cp into the first.
    let holder = s.start_container(&vol, &["sleep", "600"]);
    let host_mp = propagated.join(format!("rbdvol/fast/{vol}"));
    assert!(
        mounts_below(&propagated).contains(&host_mp.display().to_string()),
        "Mount's in-plugin path must reach the host at {}: {:?}",
        host_mp.display(),
        mounts_below(&propagated)
    );
    let v = s.inspect(&vol);
    // Docker scopes Mount's answer but shows Get's Mountpoint as the plugin said it.
    assert_eq!(
        v["Mountpoint"],
        format!("/mnt/volumes/rbdvol/fast/{vol}").as_str(),
        "{v}"
    );
    assert_eq!(v["Status"]["mounted_here"]["container_mounts"], 1, "{v}");
    assert_eq!(managed_processes(&id).len(), 2, "daemon + one exporter");
    assert_eq!(
        s.run_ok(&vol, "cat /data/f && echo second > /data/g && sync"),
        "managed\n"
    );
    assert_eq!(s.exec(&holder, "cat /data/g"), "second\n");
    let src = s.scratch.path().join("in.txt");
    std::fs::write(&src, "copied\n").unwrap();
    docker_ok(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{holder}:/data/in.txt"),
    ]);
    assert_eq!(
        s.exec(&holder, "cat /data/in.txt /data/f"),
        "copied\nmanaged\n"
    );
    assert_eq!(
        s.inspect(&vol)["Status"]["mounted_here"]["container_mounts"],
        1
    );
    let e = s.rm(&vol);
    assert!(!e.ok && e.stderr.contains("in use"), "{e}");
    docker_ok(&["rm", "-f", &holder]);
    assert!(
        mounts_below(&propagated).is_empty(),
        "still mounted on the host"
    );
    assert_eq!(
        managed_processes(&id).len(),
        1,
        "an exporter outlived its volume"
    );

    assert!(s.rm(&vol).ok);
    assert_trashed("fast", &vol);
    s.finish();
    assert!(
        !docker(&["plugin", "inspect", &name]).ok,
        "the plugin is still installed"
    );
    assert!(managed_processes(&id).is_empty(), "the plugin still runs");
    assert!(
        !Path::new(PLUGIN_DIR).join(&id).exists(),
        "the plugin's socket directory is still there"
    );
}
