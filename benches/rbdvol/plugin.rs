//! Owns the benchmark's "hosts": real `target/release/rbdvol serve` processes, each with
//! its own socket, state dir, mount root and host id under the run's directory, and a
//! keep-alive client for them. Speaking like dockerd, finding what a host left behind
//! and tearing it down (found by path, so nothing of anyone else's is touched) are the
//! test fixtures' own code (tests/common: `conn`, `host`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

pub use crate::common::mount_id;

use crate::common::host::{await_socket, clean_host, stop_child};
use crate::util::{rss_kib, s, Ctx, Env, R};

/// How long a host's exporters get to exit on SIGTERM at teardown before SIGKILL.
pub const EXPORTER_GRACE: Duration = Duration::from_secs(5);

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
        if let Some(child) = p.child.as_mut() {
            if let Err(why) = await_socket(&p.socket, child, Duration::from_secs(15)) {
                return Err(format!("rbdvol serve: {why}: {}", p.log_tail()));
            }
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
        if let Some(child) = self.child.take() {
            stop_child(child, Duration::from_secs(10));
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop();
        clean_host(&self.dir, EXPORTER_GRACE);
    }
}

/// A keep-alive connection to a plugin socket, speaking as dockerd does
/// (tests/common/conn.rs), reconnecting after idling like dockerd's HTTP client.
pub struct Conn {
    socket: PathBuf,
    inner: crate::common::Conn,
    last_used: Instant,
}

/// The daemon closes keep-alive connections idle for 10 s (its header timeout); like
/// dockerd's HTTP client, reconnect rather than write into a closing connection.
const IDLE_RECONNECT: Duration = Duration::from_secs(5);

impl Conn {
    pub fn open(socket: &Path) -> R<Conn> {
        Ok(Conn {
            socket: socket.to_path_buf(),
            inner: crate::common::Conn::try_open(socket)?,
            last_used: Instant::now(),
        })
    }

    /// One request as dockerd shapes it and its answer.
    pub fn request(&mut self, endpoint: &str, body: &str) -> R<(u16, Value)> {
        if self.last_used.elapsed() > IDLE_RECONNECT {
            *self = Conn::open(&self.socket)?;
        }
        let answer = self.inner.try_request(endpoint, body);
        self.last_used = Instant::now();
        answer
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
