//! Owns what every figure of the benchmark shares: the run's settings (from the
//! environment `integration/bench` sets), timing statistics (median, p99), number
//! formatting, and running external commands with a deadline (own process group, killed
//! whole at the deadline by a watchdog thread).

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub type R<T> = Result<T, String>;

/// Adds what was being done to an error.
pub trait Ctx<T> {
    fn ctx(self, what: impl Display) -> R<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl Display) -> R<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// The run: which cluster, where the "hosts" live, quick or full.
pub struct Env {
    pub conf: PathBuf,
    /// Every daemon, exporter, mount and state file of the run lives below this.
    pub dir: PathBuf,
    pub quick: bool,
    /// The cluster's `osd client watch timeout`, in seconds.
    pub watch_timeout: u64,
    /// `target/release/rbdvol`.
    pub exe: PathBuf,
}

impl Env {
    /// Picks the quick or the full value.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    pub fn ceph_settings(&self, pools: &[&str]) -> rbdvol::config::CephSettings {
        rbdvol::config::CephSettings {
            conf: self.conf.clone(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A librbd connection made the way the daemon makes its own.
    pub fn connect(&self) -> R<rbdvol::ceph::sys::Rados> {
        let spec = rbdvol::ceph::connect_spec(&self.ceph_settings(&["rbd"]));
        rbdvol::ceph::sys::Rados::connect(&spec)
            .map_err(|(step, e)| format!("connecting to the cluster: {step}: {}", e.describe()))
    }
}

/// Values of one measured quantity (seconds for latencies).
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    pub fn push_dur(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    /// The median (mean of the two middle values for an even count); NaN when empty.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// Nearest-rank percentile: with fewer than 100 samples p99 is the maximum.
    pub fn pct(&self, p: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn p99(&self) -> f64 {
        self.pct(99.0)
    }
}

/// A duration in seconds, in the unit that reads best.
pub fn fmt_s(secs: f64) -> String {
    if secs.is_nan() {
        "–".into()
    } else if secs < 0.001 {
        format!("{:.0} µs", secs * 1e6)
    } else if secs < 0.01 {
        format!("{:.2} ms", secs * 1e3)
    } else if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else {
        format!("{:.2} s", secs)
    }
}

/// "median / p99" of latencies.
pub fn fmt_mp(s: &Samples) -> String {
    format!("{} / {}", fmt_s(s.median()), fmt_s(s.p99()))
}

pub fn fmt_ratio(r: f64) -> String {
    if r.is_nan() {
        "–".into()
    } else if r >= 10.0 {
        format!("{r:.0}×")
    } else {
        format!("{r:.2}×")
    }
}

pub fn fmt_mib_s(bytes_per_s: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_s / (1024.0 * 1024.0))
}

pub fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

/// What a finished program left behind.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `argv` to completion or until `deadline`, at which its whole process group is
/// SIGKILLed. No shell, no `timeout` wrapper (so the CLI and by-hand timings carry no
/// extra process). A non-zero exit is not an error here.
pub fn run(argv: &[&str], deadline: Duration) -> R<Out> {
    let shown = argv.join(" ");
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().ctx(format!("starting {shown}"))?;
    let pid = child.id() as i32;
    let (done, wait) = mpsc::channel::<()>();
    let dog = std::thread::spawn(move || match wait.recv_timeout(deadline) {
        Err(RecvTimeoutError::Timeout) => {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            true
        }
        _ => false,
    });
    let out = child.wait_with_output();
    let _ = done.send(());
    let fired = dog.join().unwrap_or(false);
    let out = out.ctx(format!("waiting for {shown}"))?;
    if fired {
        return Err(format!(
            "{shown} did not finish within {} s and was killed",
            deadline.as_secs()
        ));
    }
    Ok(Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Like [`run`], but a non-zero exit is an error with the program's stderr.
pub fn run_ok(argv: &[&str], deadline: Duration) -> R<Out> {
    let out = run(argv, deadline)?;
    if !out.ok() {
        return Err(format!(
            "{} exited with {:?}: {}",
            argv.join(" "),
            out.code,
            out.stderr.trim()
        ));
    }
    Ok(out)
}

/// `rbd -c CONF args…` as an argv.
pub fn rbd_argv<'a>(env: &'a Env, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["rbd", "-c", env.conf.to_str().unwrap_or_default()];
    v.extend_from_slice(args);
    v
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: u32) -> R<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ctx(format!("reading /proc/{pid}/status"))?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("no {k} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The path as a &str (every path of the run is ASCII, under a mktemp directory).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A stand-in for a container using a mounted volume: a process in a mount namespace
/// of its own holding a bind mount of it, as runc makes one. Without it the daemon
/// would, rightly, release a volume that Docker no longer references and no namespace
/// uses once `map.orphan_grace` has passed, in the middle of a long figure.
pub struct Holder(std::process::Child);

impl Holder {
    /// Binds `mountpoint` at `at` (created; under the run's directory, so a leaked
    /// holder is found and killed by `integration/bench`'s cleanup).
    pub fn new(mountpoint: &Path, at: &Path) -> R<Holder> {
        use std::io::BufRead;
        std::fs::create_dir_all(at).ctx(format!("creating {}", at.display()))?;
        let script = format!(
            "mount --bind '{}' '{}' && echo held && exec sleep 86400",
            s(mountpoint),
            s(at)
        );
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .ctx("starting a holder of the volume")?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| std::io::BufReader::new(out).read_line(&mut line));
        if line.trim() != "held" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "could not hold {} at {}: {read:?}",
                s(mountpoint),
                s(at)
            ));
        }
        Ok(Holder(child))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
