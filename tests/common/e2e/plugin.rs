//! A real `rbdvol serve` standing in for one host of the Docker end-to-end tests: run
//! in its Docker node's network namespace and cgroup, its socket where that node's
//! dockerd discovers it (or private, reached by raw requests), its state and mount root
//! in the node's work directory (mounts there reach the node), its log shown when a
//! test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{say, DockerNode};
use crate::common::host::{await_socket, clean_host, leftovers, mounts_under, stop_child};
use crate::common::{ceph_conf, Conn};

/// A real `rbdvol serve` standing in for one host.
pub struct Plugin {
    /// The driver name users give to `docker volume create -d`.
    pub name: String,
    pub host_id: String,
    dir: Option<tempfile::TempDir>,
    pub socket: PathBuf,
    /// The socket is in the node's plugin directory (removed if the daemon leaves it).
    discoverable: bool,
    child: Option<Child>,
}

impl Plugin {
    /// `discoverable`: the socket is the node's /run/docker/plugins/NAME.sock, so its
    /// dockerd uses it; otherwise it lives in the plugin's own directory, reached only
    /// by raw requests (as another host's dockerd would send them).
    pub fn start(
        node: &DockerNode,
        name: &str,
        host_id: &str,
        discoverable: bool,
        env: &[(&str, &str)],
    ) -> Plugin {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir_in(node.work())
            .unwrap();
        let socket = if discoverable {
            node.plugin_dir().join(format!("{name}.sock"))
        } else {
            dir.path().join("rbdvol.sock")
        };
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("rbdvol.toml"), "").unwrap();
        let log = std::fs::File::create(root.join("daemon.log")).unwrap();
        // Only the network namespace is the node's: its mounts stay visible to the test
        // and reach the node's dockerd by propagation.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.netns))
            .arg(env!("CARGO_BIN_EXE_rbdvol"))
            .arg("serve")
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
        node.adopt(child.id());
        let mut p = Plugin {
            name: name.to_string(),
            host_id: host_id.to_string(),
            dir: Some(dir),
            socket,
            discoverable,
            child: Some(child),
        };
        let child = p.child.as_mut().unwrap();
        if let Err(why) = await_socket(&p.socket, child, Duration::from_secs(15)) {
            if why.starts_with("exited") {
                p.child = None;
            }
            panic!("rbdvol {name} {why}: {}", p.log());
        }
        // The first answer comes after start-up reconciling.
        p.call("Plugin.Activate", "");
        p
    }

    pub fn root(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("daemon.log")).unwrap_or_default()
    }

    /// How many requests of `endpoint` (e.g. "VolumeDriver.Create") it answered.
    pub fn answered(&self, endpoint: &str) -> usize {
        let needle = format!("endpoint=/{endpoint}}}");
        self.log()
            .lines()
            .filter(|l| l.contains(&needle) && l.contains("answered"))
            .count()
    }

    /// One raw request, shaped like dockerd's (for the other host's dockerd).
    pub fn call(&self, endpoint: &str, body: &str) -> Value {
        let mut c = Conn::open(&self.socket);
        let (status, v) = c.request(endpoint, body);
        assert_eq!(status, 200, "{endpoint} {body}: {v}\n{}", self.log());
        v
    }

    pub fn ok(&self, endpoint: &str, body: &str) -> Value {
        let v = self.call(endpoint, body);
        assert!(
            v.get("Err").is_none_or(|e| e.as_str() == Some("")),
            "{endpoint} {body} on {}: {v}",
            self.host_id
        );
        v
    }

    /// The Docker mount IDs holding `volume` here, from the daemon's reference table.
    pub fn mount_ids(&self, volume: &str) -> Vec<String> {
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
    pub fn mount_requests(&self) -> Vec<Option<String>> {
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

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Mounts, loop devices and exporter processes this host has. Empty when idle.
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(self.root(), self.pid())
    }

    pub fn assert_idle(&self, why: &str) {
        assert_eq!(
            self.leftovers(),
            Vec::<String>::new(),
            "{}: {why}\n{}",
            self.host_id,
            self.log()
        );
    }

    /// SIGTERM (the daemon removes its socket), SIGKILL after 15 s.
    pub fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        stop_child(child, Duration::from_secs(15));
        // A socket left behind (the daemon was killed) would stall dockerd's scans.
        if self.discoverable {
            let _ = std::fs::remove_file(&self.socket);
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
        clean_host(self.root(), Duration::ZERO);
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
