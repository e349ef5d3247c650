//! One Docker end-to-end test's world (`Scene`): its plugins, and the containers,
//! volume records and managed plugin it made in dockerd, removed in an order that
//! never leaves dockerd a record whose driver is gone.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::Value;

use super::{base_image, docker, docker_ok, engine_missing, run_lock, say, Out, Plugin, BASE};
use crate::common::{ceph_conf, unique};

/// One test's world: its plugins, and the containers and volume records it made in
/// dockerd. Dropping it removes containers, then volume records, then stops the
/// plugins (fields drop after `drop` runs), so dockerd never keeps a record whose
/// driver is gone.
pub struct Scene {
    pub key: String,
    pub label: String,
    pub containers: Mutex<Vec<String>>,
    /// Volume names dockerd records now (removing an unrecorded name would make
    /// dockerd probe every driver it knows, stale ones included).
    pub recorded: Mutex<BTreeSet<String>>,
    pub plugins: Vec<Plugin>,
    /// A managed (v2) plugin this test installed: disabled and removed after the
    /// volume records, before the legacy plugins stop.
    pub managed: Option<String>,
    pub scratch: tempfile::TempDir,
}

impl Scene {
    /// None (after saying why) when there is no Docker engine.
    pub fn new(key: &str) -> Option<Scene> {
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
    pub fn host(&mut self, role: &str, env: &[(&str, &str)]) -> String {
        let name = format!("rbdvol-e2e-{}-{role}", self.key);
        self.plugins
            .push(Plugin::start(&name, &format!("host-{role}"), true, env));
        name
    }

    /// Another host whose dockerd is not this one: reached by raw requests only.
    pub fn remote_host(&mut self, role: &str, env: &[(&str, &str)]) {
        let name = format!("rbdvol-e2e-{}-{role}", self.key);
        self.plugins
            .push(Plugin::start(&name, &format!("host-{role}"), false, env));
    }

    pub fn plugin(&self, role: &str) -> &Plugin {
        let id = format!("host-{role}");
        self.plugins.iter().find(|p| p.host_id == id).unwrap()
    }

    /// A volume name unique to this run.
    pub fn volume_name(&self, what: &str) -> String {
        unique(&format!("e2e-{}-{what}", self.key))
    }

    pub fn container_name(&self) -> String {
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
    pub fn create(&self, driver: &str, name: &str, opts: &[&str]) -> Out {
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

    pub fn create_ok(&self, driver: &str, name: &str, opts: &[&str]) {
        let o = self.create(driver, name, opts);
        assert!(o.ok, "creating {name} on {driver}: {o}");
        assert_eq!(o.stdout.trim(), name);
    }

    /// `docker volume rm NAME` (the record goes only if it succeeds).
    pub fn rm(&self, name: &str) -> Out {
        let o = docker(&["volume", "rm", name]);
        if o.ok {
            self.recorded.lock().unwrap().remove(name);
        }
        o
    }

    pub fn inspect(&self, name: &str) -> Value {
        let out = docker_ok(&["volume", "inspect", name]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    /// Volume names `docker volume ls` shows for one driver (asks that driver only).
    pub fn ls(&self, driver: &str) -> Vec<(String, String, String)> {
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

    pub fn run_args(&self, name: &str, detach: bool) -> Vec<String> {
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
    pub fn run(&self, volume: &str, script: &str) -> Out {
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

    pub fn run_ok(&self, volume: &str, script: &str) -> String {
        let o = self.run(volume, script);
        assert!(o.ok, "container with {volume} running {script:?}: {o}");
        o.stdout
    }

    /// A detached container holding VOL at /data; returns its name.
    pub fn start_container(&self, volume: &str, cmd: &[&str]) -> String {
        let name = self.container_name();
        let mut args = self.run_args(&name, true);
        args.extend(["-v".into(), format!("{volume}:/data"), BASE.into()]);
        args.extend(cmd.iter().map(|s| s.to_string()));
        docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        name
    }

    pub fn exec(&self, container: &str, script: &str) -> String {
        docker_ok(&["exec", container, "sh", "-c", script])
    }

    /// Removes what this test made in dockerd. Runs again harmlessly from Drop.
    pub fn cleanup_docker(&mut self) {
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
    pub fn remove_managed(name: &str) {
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
    pub fn managed_plugin(&mut self, host_id: &str) -> String {
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
    pub fn finish(mut self) {
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
