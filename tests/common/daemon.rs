//! A real `rbdvol serve` process standing in for one test "host": its own temp
//! directory (socket, state, mount root, log), started and stopped by pid, requests
//! shaped like dockerd's, and everything it left behind torn down when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::ceph_conf;
use super::conn::Conn;
use super::host::{await_socket, clean_host, leftovers, stop_child};

/// Options for a daemon instance ("host").
#[derive(Clone)]
pub struct DaemonOpts {
    pub host_id: String,
    pub pools: Vec<String>,
    pub ceph_conf: PathBuf,
    pub env: Vec<(String, String)>,
    /// Network namespace to run in (a host with its own address), if any.
    pub netns: Option<String>,
    /// Make the mount root a mount point of its own (like a managed plugin's
    /// propagatedMount) before the daemon starts.
    pub mount_root_is_a_mount: bool,
    /// Serve this socket path instead of one in the daemon's temp dir.
    pub socket: Option<PathBuf>,
    /// Make the configured mount root a symlink to the real directory (as when
    /// /var/lib lives on another disk).
    pub mount_root_via_symlink: bool,
}

impl DaemonOpts {
    pub fn host(host_id: &str) -> DaemonOpts {
        DaemonOpts {
            host_id: host_id.to_string(),
            pools: vec!["rbd".into(), "fast".into()],
            ceph_conf: ceph_conf(),
            env: Vec::new(),
            netns: None,
            mount_root_is_a_mount: false,
            socket: None,
            mount_root_via_symlink: false,
        }
    }

    /// Runs the daemon (and so its exporters) inside a test-network host namespace.
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// A running `rbdvol serve`, stopped (by pid) when dropped.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    pub opts: DaemonOpts,
}

impl Daemon {
    pub fn start(opts: DaemonOpts) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("rbdvol-t")
            .tempdir()
            .unwrap();
        // tempdir is 0700, so the socket dir is not world-writable.
        let socket = opts
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("rbdvol.sock"));
        if opts.mount_root_via_symlink {
            let real = dir.path().join("real-mounts");
            std::fs::create_dir_all(&real).unwrap();
            std::os::unix::fs::symlink(&real, dir.path().join("mounts")).unwrap();
        }
        if opts.mount_root_is_a_mount {
            let root = dir.path().join("mounts");
            std::fs::create_dir_all(&root).unwrap();
            let st = Command::new("mount")
                .arg("--bind")
                .arg(&root)
                .arg(&root)
                .status()
                .unwrap();
            assert!(st.success(), "bind-mounting the mount root");
        }
        let mut d = Daemon {
            dir,
            socket,
            child: None,
            opts,
        };
        d.spawn();
        d
    }

    pub fn command(&self) -> Command {
        self.command_on(&self.socket)
    }

    /// The daemon's command line, serving `socket` instead of its own.
    pub fn command_on(&self, socket: &Path) -> Command {
        let mut cmd = match &self.opts.netns {
            // Only the network namespace changes: mounts stay visible to the test.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={ns}"))
                    .arg(env!("CARGO_BIN_EXE_rbdvol"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_rbdvol")),
        };
        cmd.arg("serve")
            .arg("--socket")
            .arg(socket)
            .arg("--ceph-conf")
            .arg(&self.opts.ceph_conf)
            .arg("--host-id")
            .arg(&self.opts.host_id)
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--mount-root")
            .arg(self.dir.path().join("mounts"))
            .arg("--log-level")
            .arg("rbdvol=debug,info");
        for p in &self.opts.pools {
            cmd.arg("--pool").arg(p);
        }
        // Isolate from any config on the machine.
        cmd.arg("--config").arg(self.dir.path().join("rbdvol.toml"));
        std::fs::write(self.dir.path().join("rbdvol.toml"), "").unwrap();
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting rbdvol");
        self.child = Some(child);
        let child = self.child.as_mut().unwrap();
        if let Err(why) = await_socket(&self.socket, child, Duration::from_secs(10)) {
            panic!("rbdvol: {why}: {}", self.log());
        }
        // The socket is bound before start-up reconciling; the first answer comes after.
        self.ok("Plugin.Activate", "");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGTERM and wait (SIGKILL after 10 s); returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let child = self.child.take().expect("daemon running");
        stop_child(child, Duration::from_secs(10)).expect("waiting for rbdvol to exit")
    }

    /// SIGKILL, as a crash or an upgrade that kills the process would; the exporters
    /// it started live on. `restart` starts it again.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn();
    }

    /// One request on a fresh connection, exactly as dockerd shapes it.
    pub fn call(&self, endpoint: &str, body: &str) -> Value {
        let mut c = self.connect();
        let (status, v) = c.request(endpoint, body);
        assert_eq!(
            status,
            200,
            "{endpoint} {body}: status {status}, {v}\n{}",
            self.log()
        );
        v
    }

    pub fn connect(&self) -> Conn {
        Conn::open(&self.socket)
    }

    /// Asserts success (no Err) and returns the response.
    pub fn ok(&self, endpoint: &str, body: &str) -> Value {
        let v = self.call(endpoint, body);
        assert!(
            v.get("Err").is_none_or(|e| e.as_str() == Some("")),
            "{endpoint} {body} failed: {v}"
        );
        v
    }

    /// Asserts an Err containing `needle` and returns its text.
    pub fn err(&self, endpoint: &str, body: &str, needle: &str) -> String {
        let v = self.call(endpoint, body);
        let e = v["Err"].as_str().unwrap_or_default().to_string();
        assert!(
            e.contains(needle),
            "{endpoint} {body}: expected an Err containing {needle:?}, got {v}"
        );
        e
    }

    pub fn create(&self, name: &str, opts: &str) {
        self.ok(
            "VolumeDriver.Create",
            &format!("{{\"Name\":\"{name}\",\"Opts\":{opts}}}"),
        );
    }

    pub fn get(&self, name: &str) -> Value {
        self.call("VolumeDriver.Get", &format!("{{\"Name\":\"{name}\"}}"))
    }
}

impl Daemon {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn mount_root(&self) -> PathBuf {
        self.dir.path().join("mounts")
    }

    /// Mount as dockerd does; returns the Mountpoint.
    pub fn mount(&self, name: &str, id: &str) -> PathBuf {
        let v = self.ok(
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
        );
        PathBuf::from(v["Mountpoint"].as_str().expect("Mountpoint"))
    }

    pub fn unmount(&self, name: &str, id: &str) {
        self.ok(
            "VolumeDriver.Unmount",
            &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
        );
    }

    /// One request whose answer may never come (the daemon is expected to die).
    pub fn call_expecting_crash(&mut self, endpoint: &str, body: &str) {
        let mut c = self.connect();
        c.send(endpoint, body);
        assert!(
            c.try_receive().is_none(),
            "{endpoint} answered, but the daemon should have crashed"
        );
        let mut child = self.child.take().expect("daemon running");
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the daemon exited cleanly instead of crashing"
        );
    }

    /// Starts the daemon again with `env` replacing any earlier value of the same keys.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        for (k, v) in env {
            self.opts.env.retain(|(key, _)| key != k);
            if !v.is_empty() {
                self.opts.env.push((k.to_string(), v.to_string()));
            }
        }
        self.restart();
    }

    /// What this "host" still has: mounts under its dir, loop devices on its files,
    /// exporter processes. Empty when nothing leaked.
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(self.dir.path(), self.child.as_ref().map(|c| c.id()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        // Tests must not leak into each other.
        clean_host(self.dir.path(), Duration::ZERO);
    }
}

impl Daemon {
    /// The state file of this host's exporter for `rbd/<name>` (pid, client address, state).
    pub fn exporter_state(&self, name: &str) -> Value {
        let path = self
            .state_dir()
            .join(format!("exports/rbd/{name}/state.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
}

/// A Docker-style mount ID (64 hex digits).
pub fn mount_id(n: impl std::fmt::LowerHex) -> String {
    format!("{n:064x}")
}
