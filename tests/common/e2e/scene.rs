//! One Docker end-to-end test's world (`Scene`): its private Docker nodes (one per
//! host role), its plugins, and the containers, volume records and managed plugin it
//! made in the nodes, removed in an order that never leaves a dockerd a record whose
//! driver is gone, then the nodes themselves.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::Value;

use super::{say, DockerNode, Out, Plugin, BASE};
use crate::common::nodes::nodes_missing;
use crate::common::{ceph_conf, unique};

/// One test's world. Dropping it removes containers, then volume records, then the
/// managed plugin, then stops the plugins, then the nodes (fields drop in order after
/// `drop` runs).
pub struct Scene {
    pub key: String,
    pub label: String,
    /// Container name -> the role of the node it runs on.
    pub containers: Mutex<BTreeMap<String, String>>,
    /// Volume name -> the role of the node whose dockerd records it now.
    pub recorded: Mutex<BTreeMap<String, String>>,
    /// Driver name -> the role of the node that has it.
    drivers: BTreeMap<String, String>,
    pub plugins: Vec<Plugin>,
    /// A managed (v2) plugin this test installed in node "a".
    pub managed: Option<String>,
    pub scratch: tempfile::TempDir,
    /// (role, node); dropped after the plugins.
    nodes: Vec<(String, DockerNode)>,
}

impl Scene {
    /// None (after saying why) when no private Docker node can be had here.
    pub fn new(key: &str) -> Option<Scene> {
        if let Some(why) = nodes_missing() {
            say(&format!("SKIPPED: {why}"));
            return None;
        }
        Some(Scene {
            key: key.to_string(),
            label: format!("rbdvol-e2e={key}"),
            containers: Mutex::new(BTreeMap::new()),
            recorded: Mutex::new(BTreeMap::new()),
            drivers: BTreeMap::new(),
            plugins: Vec::new(),
            managed: None,
            scratch: tempfile::tempdir().unwrap(),
            nodes: Vec::new(),
        })
    }

    /// The node of host `role`, started on first use.
    pub fn node_of(&mut self, role: &str) -> &DockerNode {
        if !self.nodes.iter().any(|(r, _)| r == role) {
            let node = DockerNode::start(&format!("{}-{role}", self.key));
            self.nodes.push((role.to_string(), node));
        }
        self.node(role)
    }

    pub fn node(&self, role: &str) -> &DockerNode {
        &self
            .nodes
            .iter()
            .find(|(r, _)| r == role)
            .unwrap_or_else(|| panic!("no node {role}"))
            .1
    }

    /// The node that records `volume` now, else host a's.
    fn node_for_volume(&self, volume: &str) -> &DockerNode {
        let role = self.recorded.lock().unwrap().get(volume).cloned();
        self.node(role.as_deref().unwrap_or("a"))
    }

    fn role_of_driver(&self, driver: &str) -> String {
        self.drivers
            .get(driver)
            .cloned()
            .unwrap_or_else(|| "a".into())
    }

    /// Starts host `role` ("a", "b") in a node of its own: host id `host-<role>`,
    /// driver name `rbdvol-e2e-<test>-<role>`. Returns the driver name.
    pub fn host(&mut self, role: &str, env: &[(&str, &str)]) -> String {
        let name = format!("rbdvol-e2e-{}-{role}", self.key);
        let plugin = Plugin::start(
            self.node_of(role),
            &name,
            &format!("host-{role}"),
            true,
            env,
        );
        self.plugins.push(plugin);
        self.drivers.insert(name.clone(), role.to_string());
        name
    }

    /// Another host, in a node of its own, driven by raw requests only (as that node's
    /// dockerd would send them).
    pub fn remote_host(&mut self, role: &str, env: &[(&str, &str)]) {
        let name = format!("rbdvol-e2e-{}-{role}", self.key);
        let plugin = Plugin::start(
            self.node_of(role),
            &name,
            &format!("host-{role}"),
            false,
            env,
        );
        self.plugins.push(plugin);
    }

    pub fn plugin(&self, role: &str) -> &Plugin {
        let id = format!("host-{role}");
        self.plugins.iter().find(|p| p.host_id == id).unwrap()
    }

    /// The docker CLI against host a's node.
    pub fn docker(&self, args: &[&str]) -> Out {
        self.node("a").docker(args)
    }

    pub fn docker_ok(&self, args: &[&str]) -> String {
        self.node("a").docker_ok(args)
    }

    /// A volume name unique to this run.
    pub fn volume_name(&self, what: &str) -> String {
        unique(&format!("e2e-{}-{what}", self.key))
    }

    fn container_name(&self, role: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "rbdvol-e2e-{}-{}-{}",
            self.key,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.containers
            .lock()
            .unwrap()
            .insert(name.clone(), role.to_string());
        name
    }

    /// `docker volume create -d DRIVER [-o k=v]... NAME` on the driver's node.
    pub fn create(&self, driver: &str, name: &str, opts: &[&str]) -> Out {
        let role = self.role_of_driver(driver);
        let mut args = vec!["volume", "create", "-d", driver];
        for o in opts {
            args.extend(["-o", o]);
        }
        args.push(name);
        let o = self.node(&role).docker(&args);
        if o.ok {
            self.recorded.lock().unwrap().insert(name.to_string(), role);
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
        let o = self.node_for_volume(name).docker(&["volume", "rm", name]);
        if o.ok {
            self.recorded.lock().unwrap().remove(name);
        }
        o
    }

    pub fn inspect(&self, name: &str) -> Value {
        let out = self
            .node_for_volume(name)
            .docker_ok(&["volume", "inspect", name]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    /// Volume names `docker volume ls` shows for one driver, on its node.
    pub fn ls(&self, driver: &str) -> Vec<(String, String, String)> {
        self.node(&self.role_of_driver(driver))
            .docker_ok(&[
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

    fn role_for_volume(&self, volume: &str) -> String {
        let role = self.recorded.lock().unwrap().get(volume).cloned();
        role.unwrap_or_else(|| "a".into())
    }

    /// `docker run --rm -v VOL:/data BASE sh -c SCRIPT` on the node recording VOL.
    pub fn run(&self, volume: &str, script: &str) -> Out {
        let role = self.role_for_volume(volume);
        let node = self.node(&role);
        let name = self.container_name(&role);
        let mut args = self.run_args(&name, false);
        args.extend([
            "-v".into(),
            format!("{volume}:/data"),
            BASE.into(),
            "sh".into(),
            "-c".into(),
            script.into(),
        ]);
        let o = node.docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if !o.ok {
            // A container whose start failed stays behind (Created) and would keep
            // referencing the volume; --rm means it should go.
            let _ = node.docker(&["rm", "-f", &name]);
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
        let role = self.role_for_volume(volume);
        let name = self.container_name(&role);
        let mut args = self.run_args(&name, true);
        args.extend(["-v".into(), format!("{volume}:/data"), BASE.into()]);
        args.extend(cmd.iter().map(|s| s.to_string()));
        self.node(&role)
            .docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        name
    }

    pub fn exec(&self, container: &str, script: &str) -> String {
        let role = self.containers.lock().unwrap().get(container).cloned();
        self.node(role.as_deref().unwrap_or("a"))
            .docker_ok(&["exec", container, "sh", "-c", script])
    }

    /// Removes what this test made in its nodes. Runs again harmlessly from Drop.
    pub fn cleanup_docker(&mut self) {
        let containers = std::mem::take(&mut *self.containers.lock().unwrap());
        for (name, role) in containers {
            let _ = self.node(&role).docker(&["rm", "-f", &name]);
        }
        let recorded = std::mem::take(&mut *self.recorded.lock().unwrap());
        for (v, role) in recorded {
            let o = self.node(&role).docker(&["volume", "rm", "-f", &v]);
            if !o.ok {
                say(&format!("docker_e2e: docker volume rm -f {v}: {o}"));
            }
        }
        if let Some(name) = self.managed.take() {
            let node = self.node("a");
            if node.docker(&["plugin", "inspect", &name]).ok {
                let _ = node.docker(&["plugin", "disable", "-f", &name]);
                let o = node.docker(&["plugin", "rm", "-f", &name]);
                if !o.ok {
                    say(&format!("docker_e2e: docker plugin rm -f {name}: {o}"));
                }
            }
        }
    }

    /// Builds and enables the managed plugin `rbdvol-e2e-<test>` with this build's
    /// binary in host a's node (integration/build-managed-plugin with that node's
    /// DOCKER_HOST); returns its name (`NAME:latest`).
    pub fn managed_plugin(&mut self, host_id: &str) -> String {
        let name = format!("rbdvol-e2e-{}:latest", self.key);
        let docker_host = self.node_of("a").docker_host();
        let conf = ceph_conf();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/build-managed-plugin");
        self.managed = Some(name.clone());
        self.drivers.insert(name.clone(), "a".into());
        let out = Command::new("timeout")
            .args(["-k", "10", "1800"])
            .arg(&script)
            .args(["--name", &name, "--binary", env!("CARGO_BIN_EXE_rbdvol")])
            .arg("--ceph-dir")
            .arg(conf.parent().unwrap())
            .args(["--pools", "rbd,fast", "--host-id", host_id])
            .args(["--set", "RBDVOL_LOG__LEVEL=rbdvol=debug,info"])
            .env("DOCKER_HOST", docker_host)
            .env_remove("DOCKER_CONTEXT")
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

    /// The normal end of a test: the nodes cleaned, plugins stopped, nothing leaked.
    pub fn finish(&mut self) {
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
        // self.plugins drop next (each stops its daemon and cleans its host), then
        // self.nodes (each kills what is left in its cgroup and removes itself).
    }
}
