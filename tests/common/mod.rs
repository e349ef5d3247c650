//! Test fixtures: a real `rbdvol serve` process per test "host", a client that speaks
//! exactly like dockerd (raw HTTP/1.1 over the unix socket), and the `rbd` CLI for
//! checking what really happened in the cluster.
//!
//! The cluster comes from `TEST_CEPH_CONF`, which `integration/test` sets after
//! bringing up a throwaway cluster with `integration/ceph-up`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn ceph_conf() -> PathBuf {
    match std::env::var_os("TEST_CEPH_CONF") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "TEST_CEPH_CONF is not set. Run the tests with `integration/test`, which brings up a throwaway Ceph cluster and sets it."
        ),
    }
}

/// A volume name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs the rbd CLI against the test cluster with a deadline; returns (ok, stdout+stderr).
pub fn rbd(args: &[&str]) -> (bool, String) {
    let conf = ceph_conf();
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "rbd", "-c"])
        .arg(&conf)
        .args(args)
        .output()
        .expect("running rbd");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Image names in a pool, from the cluster itself.
pub fn images_in(pool: &str) -> Vec<String> {
    let (ok, out) = rbd(&["ls", "-p", pool]);
    assert!(ok, "rbd ls -p {pool}: {out}");
    let mut v: Vec<String> = out.lines().map(str::to_string).collect();
    v.sort();
    v
}

pub fn image_meta(pool: &str, name: &str, key: &str) -> Option<String> {
    let (ok, out) = rbd(&["image-meta", "get", &format!("{pool}/{name}"), key]);
    ok.then(|| out.trim_end_matches('\n').to_string())
}

pub fn trashed_names(pool: &str) -> Vec<String> {
    let (ok, out) = rbd(&["trash", "ls", "-p", pool, "--format", "json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

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
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("rbdvol exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "socket never appeared: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
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

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
        let root = self.dir.path();
        let mut out: Vec<String> = mounts_under(root)
            .into_iter()
            .map(|m| format!("mount {m}"))
            .collect();
        out.extend(loops_under(root).into_iter().map(|l| format!("loop {l}")));
        let daemon = self.child.as_ref().map(|c| c.id());
        out.extend(
            processes_mentioning(root)
                .into_iter()
                .filter(|p| Some(*p) != daemon)
                .map(|p| format!("process {p}: {}", cmdline(p))),
        );
        out
    }

    /// Tears down whatever this host left behind (tests must not leak into each other).
    fn clean_host(&self) {
        let root = self.dir.path();
        // Filesystems on the loop devices, then the loop devices (while their FUSE
        // backing files still resolve), then the exporters and their FUSE mounts.
        for m in mounts_under(root).into_iter().rev() {
            if !m.contains("/state/exports/") {
                let _ = Command::new("umount").arg(&m).status();
            }
        }
        for l in loops_under(root) {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        for pid in processes_mentioning(root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        for m in mounts_under(root).into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.clean_host();
    }
}

/// Mount points at or below `dir`, from this process's mount table.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4).map(|s| s.replace("\\040", " ")))
        .filter(|t| t.starts_with(d.as_ref()))
        .collect()
}

pub fn is_mountpoint(path: &Path) -> bool {
    let p = path.to_string_lossy();
    mounts_under(path).iter().any(|m| *m == p)
}

/// Loop devices whose backing file lies below `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--json", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    let d = dir.to_string_lossy();
    v["loopdevices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["back-file"]
                .as_str()
                .is_some_and(|f| f.starts_with(d.as_ref()))
        })
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Live processes whose command line mentions `dir` (exporters of that host).
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let d = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&d)
            && !stat.contains(") Z ")
            && pid != std::process::id()
        {
            pids.push(pid);
        }
    }
    pids
}

pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// Holders of any lock on the image (managed or advisory), as `rbd lock ls` reports.
pub fn lock_holders(pool: &str, name: &str) -> Vec<String> {
    let (ok, out) = rbd(&["lock", "ls", &format!("{pool}/{name}"), "--format", "json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["locker"].as_str().unwrap_or_default().to_string())
        .collect()
}

pub fn mount_id(n: u32) -> String {
    format!("{n:064x}")
}

/// A keep-alive HTTP/1.1 connection to the plugin socket.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    pub fn open(socket: &Path) -> Conn {
        let s = UnixStream::connect(socket).expect("connecting to the plugin socket");
        s.set_read_timeout(Some(Duration::from_secs(150))).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Sends what dockerd sends: POST, Host plugin.moby.localhost, the v1.2 Accept
    /// header, no Content-Type, compact JSON plus a trailing newline (Activate: empty).
    pub fn send(&mut self, endpoint: &str, body: &str) {
        let body = if body.is_empty() {
            String::new()
        } else {
            format!("{body}\n")
        };
        let req = format!(
            "POST /{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n{body}",
            body.len()
        );
        self.writer.write_all(req.as_bytes()).unwrap();
    }

    /// Sends raw bytes, ignoring a server that stops reading early (it may answer a
    /// request before the body is complete, e.g. 413 for an oversized body).
    pub fn send_raw_lenient(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    /// Reads one response: (status, JSON body). Panics if the plugin closed the connection.
    pub fn receive(&mut self) -> (u16, Value) {
        self.try_receive()
            .expect("the plugin closed the connection without answering")
    }

    /// Like `receive`, but `None` when the connection was closed unanswered.
    pub fn try_receive(&mut self) -> Option<(u16, Value)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).unwrap();
        let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        Some((status, v))
    }

    pub fn request(&mut self, endpoint: &str, body: &str) -> (u16, Value) {
        self.send(endpoint, body);
        self.receive()
    }

    pub fn raw(&mut self) -> &mut UnixStream {
        &mut self.writer
    }
}

/// The test network's hosts, if `integration/test` could make one (network namespaces
/// with their own addresses on a bridge the cluster listens on).
pub struct TestNet {
    pub ns: Vec<String>,
    pub addr: Vec<String>,
    pub link: Vec<String>,
}

pub fn testnet() -> Option<TestNet> {
    let get = |k: &str| std::env::var(k).ok();
    let mut net = TestNet {
        ns: Vec::new(),
        addr: Vec::new(),
        link: Vec::new(),
    };
    for h in ["A", "B"] {
        net.ns.push(get(&format!("TESTNET_NS_{h}"))?);
        net.addr.push(get(&format!("TESTNET_ADDR_{h}"))?);
        net.link.push(get(&format!("TESTNET_LINK_{h}"))?);
    }
    Some(net)
}

/// Sets a host's link on the bridge up or down (a network partition).
pub fn set_link(link: &str, up: bool) {
    let st = Command::new("timeout")
        .args([
            "-k",
            "2",
            "20",
            "ip",
            "link",
            "set",
            link,
            if up { "up" } else { "down" },
        ])
        .status()
        .unwrap();
    assert!(st.success(), "ip link set {link}");
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

/// `ceph osd blocklist ls` of the test cluster.
pub fn blocklist() -> String {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "ceph", "-c"])
        .arg(ceph_conf())
        .args(["osd", "blocklist", "ls"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Until when `addr` is on the blocklist, from `ceph osd blocklist ls`.
pub fn blocklisted_until(addr: &str) -> Option<std::time::SystemTime> {
    blocklist().lines().find_map(|l| {
        let (a, until) = l.split_once(' ')?;
        // `2027-12-02T02:34:16.214411+0000`: the test cluster's clock is this machine's, in UTC.
        (a == addr)
            .then(|| humantime::parse_rfc3339_weak(&format!("{}Z", until.get(..19)?)).ok())?
    })
}

/// Runs the docker CLI with a deadline; returns (ok, stdout+stderr).
pub fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .args(["-k", "5", "120", "docker"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
