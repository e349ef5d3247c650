//! Owns the benchmark's "hosts": real `target/release/rbdvol serve` processes, each with
//! its own socket, state dir, mount root and host id under the run's directory; a
//! client that speaks to them exactly as dockerd does (HTTP/1.1 over the unix socket,
//! keep-alive); and the teardown of everything a host left behind (its mounts, loop
//! devices and exporter processes), found by path so nothing of anyone else's is touched.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::util::{rss_kib, run, s, Ctx, Env, R};

/// A running `rbdvol serve`, stopped by pid and cleaned up when dropped.
pub struct Plugin {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Plugin {
    /// Starts a daemon serving `pools`, with extra `RBDVOL_*` variables, and waits
    /// until it answers Activate.
    pub fn start(env: &Env, host: &str, pools: &[&str], vars: &[(&str, &str)]) -> R<Plugin> {
        let dir = env.dir.join(host);
        std::fs::create_dir_all(&dir).ctx(format!("creating {}", dir.display()))?;
        let config = dir.join("rbdvol.toml");
        // An empty config file isolates the daemon from any /etc/rbdvol on the machine.
        std::fs::write(&config, "").ctx("writing the empty config")?;
        let socket = dir.join("rbdvol.sock");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .ctx("opening the daemon log")?;
        let mut cmd = Command::new(&env.exe);
        cmd.arg("serve")
            .args(["--socket", s(&socket)])
            .args(["--ceph-conf", s(&env.conf)])
            .args(["--host-id", host])
            .args(["--state-dir", s(&dir.join("state"))])
            .args(["--mount-root", s(&dir.join("mounts"))])
            .args(["--mapper", "userspace"])
            .args(["--log-level", "info"])
            .args(["--config", s(&config)]);
        for p in pools {
            cmd.args(["--pool", p]);
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .ctx("starting rbdvol serve")?;
        let mut p = Plugin {
            dir,
            socket,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while UnixStream::connect(&p.socket).is_err() {
            if let Ok(Some(st)) = p.child.as_mut().map_or(Ok(None), |c| c.try_wait()) {
                return Err(format!("rbdvol serve exited with {st}: {}", p.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("socket never appeared: {}", p.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        p.conn()?.call("Plugin.Activate", "")?;
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn conn(&self) -> R<Conn> {
        Conn::open(&self.socket)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn rss(&self) -> R<(u64, u64)> {
        rss_kib(self.pid())
    }

    /// The pid of the exporter serving `pool/name` for this host, from its state file.
    pub fn exporter_pid(&self, pool: &str, name: &str) -> R<u32> {
        let path = self
            .state_dir()
            .join(format!("exports/{pool}/{name}/state.json"));
        let text = std::fs::read_to_string(&path).ctx(format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).ctx("parsing the exporter state")?;
        v["pid"]
            .as_u64()
            .map(|p| p as u32)
            .ok_or_else(|| format!("no pid in {text}"))
    }

    /// When this daemon logged each of `marks` (message texts) for `volume` within
    /// [from, to]: the first matching line of each, in the order given.
    pub fn log_marks(
        &self,
        volume: &str,
        marks: &[&str],
        from: SystemTime,
        to: SystemTime,
    ) -> Vec<Option<SystemTime>> {
        let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        let ours = [format!("volume=\"{volume}\""), format!("image={volume} ")];
        let events: Vec<(SystemTime, &str)> = log
            .lines()
            .filter(|l| ours.iter().any(|o| l.contains(o.as_str())))
            .filter_map(|l| {
                let ts = humantime::parse_rfc3339(l.split(' ').next()?).ok()?;
                (ts >= from && ts <= to).then_some((ts, l))
            })
            .collect();
        marks
            .iter()
            .map(|m| events.iter().find(|(_, l)| l.contains(m)).map(|(t, _)| *t))
            .collect()
    }

    /// SIGTERM, then SIGKILL if it has not exited after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop();
        clean_host(&self.dir);
    }
}

/// Tears down whatever lives below `dir`: filesystems first, then the loop devices
/// (while their FUSE backing files still resolve), then the processes whose command
/// line names `dir` (exporters: SIGTERM, SIGKILL after 5 s), then whatever FUSE mounts
/// are left, lazily.
pub fn clean_host(dir: &Path) {
    let deadline = Duration::from_secs(30);
    for m in mounts_under(dir).into_iter().rev() {
        if !s(&m).contains("/exports/") {
            let _ = run(&["umount", s(&m)], deadline);
        }
    }
    for l in loops_under(dir) {
        let _ = run(&["losetup", "-d", &l], deadline);
    }
    let pids = processes_mentioning(dir);
    for &p in &pids {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGTERM);
    }
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && !processes_mentioning(dir).is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in processes_mentioning(dir) {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(100));
    for m in mounts_under(dir).into_iter().rev() {
        let _ = run(&["umount", "-l", s(&m)], deadline);
    }
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4).map(|t| t.replace("\\040", " ")))
        .map(PathBuf::from)
        .filter(|t| t.starts_with(dir))
        .collect()
}

/// Loop devices whose backing file lies below `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let Ok(out) = run(
        &["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"],
        Duration::from_secs(30),
    ) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<Value>(&out.stdout) else {
        return Vec::new();
    };
    v["loopdevices"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| {
                    e["back-file"]
                        .as_str()
                        .is_some_and(|f| Path::new(f).starts_with(dir))
                })
                .filter_map(|e| e["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Live (not zombie) processes whose command line mentions `dir`: only ever ours,
/// because `dir` is unique to this run.
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let d = format!("{}/", dir.display());
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&d) && !stat.contains(") Z ") {
            pids.push(pid);
        }
    }
    pids
}

/// A keep-alive HTTP/1.1 connection to a plugin socket.
pub struct Conn {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    last_used: Instant,
}

/// The daemon closes keep-alive connections idle for 10 s (its header timeout); like
/// dockerd's HTTP client, reconnect rather than write into a closing connection.
const IDLE_RECONNECT: Duration = Duration::from_secs(5);

impl Conn {
    pub fn open(socket: &Path) -> R<Conn> {
        let s = UnixStream::connect(socket).ctx(format!("connecting to {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(150)))
            .ctx("setting the read timeout")?;
        Ok(Conn {
            socket: socket.to_path_buf(),
            reader: BufReader::new(s.try_clone().ctx("cloning the socket")?),
            writer: s,
            last_used: Instant::now(),
        })
    }

    /// One request as dockerd shapes it (POST, Host plugin.moby.localhost, the v1.2
    /// Accept header, no Content-Type, compact JSON plus a newline) and its answer.
    pub fn request(&mut self, endpoint: &str, body: &str) -> R<(u16, Value)> {
        if self.last_used.elapsed() > IDLE_RECONNECT {
            *self = Conn::open(&self.socket)?;
        }
        let answer = self.exchange(endpoint, body);
        self.last_used = Instant::now();
        answer
    }

    fn exchange(&mut self, endpoint: &str, body: &str) -> R<(u16, Value)> {
        let body = if body.is_empty() {
            String::new()
        } else {
            format!("{body}\n")
        };
        let req = format!(
            "POST /{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
            body.len()
        );
        self.writer
            .write_all(req.as_bytes())
            .ctx(format!("sending {endpoint}"))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .ctx(format!("reading the answer to {endpoint}"))?;
        if n == 0 {
            return Err(format!("{endpoint}: the plugin closed the connection"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{endpoint}: bad status line {line:?}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).ctx("reading headers")?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ctx("content-length")?;
                }
            }
        }
        let mut buf = vec![0u8; len];
        self.reader.read_exact(&mut buf).ctx("reading the body")?;
        let v = serde_json::from_slice(&buf).ctx(format!(
            "{endpoint}: answer is not JSON: {}",
            String::from_utf8_lossy(&buf)
        ))?;
        Ok((status, v))
    }

    /// A request that must succeed: status 200 and no (or an empty) Err.
    pub fn call(&mut self, endpoint: &str, body: &str) -> R<Value> {
        let (status, v) = self.request(endpoint, body)?;
        let err = v.get("Err").and_then(Value::as_str).unwrap_or_default();
        if status != 200 || !err.is_empty() {
            return Err(format!("{endpoint} {body}: status {status}: {v}"));
        }
        Ok(v)
    }

    pub fn create(&mut self, name: &str, size: &str) -> R<()> {
        let body = json!({"Name": name, "Opts": {"size": size}}).to_string();
        self.call("VolumeDriver.Create", &body).map(drop)
    }

    pub fn get(&mut self, name: &str) -> R<Value> {
        self.call("VolumeDriver.Get", &json!({ "Name": name }).to_string())
    }

    pub fn list(&mut self) -> R<Vec<String>> {
        let v = self.call("VolumeDriver.List", "{}")?;
        Ok(v["Volumes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["Name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn remove(&mut self, name: &str) -> R<()> {
        self.call("VolumeDriver.Remove", &json!({ "Name": name }).to_string())
            .map(drop)
    }

    pub fn mount(&mut self, name: &str, id: &str) -> R<PathBuf> {
        let v = self.call(
            "VolumeDriver.Mount",
            &json!({"Name": name, "ID": id}).to_string(),
        )?;
        v["Mountpoint"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| format!("Mount answered without a Mountpoint: {v}"))
    }

    pub fn unmount(&mut self, name: &str, id: &str) -> R<()> {
        self.call(
            "VolumeDriver.Unmount",
            &json!({"Name": name, "ID": id}).to_string(),
        )
        .map(drop)
    }
}

/// A Docker-style mount ID (64 hex digits).
pub fn mount_id(n: u64) -> String {
    format!("{n:064x}")
}
