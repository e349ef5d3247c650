//! This machine as a test "host" sees it: mount points, loop devices and processes
//! found by path (every host lives below a directory of its own, so nothing of anyone
//! else's is ever touched), and the teardown of whatever a host left behind.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Mount points at or below `dir`, from this process's mount table.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4).map(|s| s.replace("\\040", " ")))
        .filter(|t| Path::new(t).starts_with(dir))
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
    v["loopdevices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["back-file"]
                .as_str()
                .is_some_and(|f| Path::new(f).starts_with(dir))
        })
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Live (not zombie) processes other than this one.
pub fn live_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if !stat.contains(") Z ") && pid != std::process::id() {
            pids.push(pid);
        }
    }
    pids
}

/// Live processes other than this one whose command line mentions a path below
/// `dir` (a host's daemon and exporters).
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let d = format!("{}/", dir.display());
    live_pids()
        .into_iter()
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&d)
        })
        .collect()
}

pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// What a host below `root` still has: mounts, loop devices on its files, processes
/// other than its daemon `spare`. Empty when nothing leaked.
pub fn leftovers(root: &Path, spare: Option<u32>) -> Vec<String> {
    let mut out: Vec<String> = mounts_under(root)
        .into_iter()
        .map(|m| format!("mount {m}"))
        .collect();
    out.extend(loops_under(root).into_iter().map(|l| format!("loop {l}")));
    out.extend(
        processes_mentioning(root)
            .into_iter()
            .filter(|p| Some(*p) != spare)
            .map(|p| format!("process {p}: {}", cmdline(p))),
    );
    out
}

/// Runs a teardown command with a deadline, ignoring how it ends.
fn quietly(args: &[&str], path: &str) {
    let _ = Command::new("timeout")
        .args(["-k", "5", "30"])
        .args(args)
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Tears down whatever a host left below `root` (its daemon already stopped), so
/// tests do not leak into each other: the filesystems on loop devices, then the loop
/// devices (while their FUSE backing files still resolve), then the exporters by pid
/// (SIGTERM and up to `grace` to exit, then SIGKILL), then their FUSE mounts, lazily.
pub fn clean_host(root: &Path, grace: Duration) {
    for m in mounts_under(root).into_iter().rev() {
        if !m.contains("/state/exports/") {
            quietly(&["umount"], &m);
        }
    }
    for l in loops_under(root) {
        quietly(&["losetup", "-d"], &l);
    }
    if !grace.is_zero() {
        for p in processes_mentioning(root) {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGTERM);
        }
        let until = Instant::now() + grace;
        while Instant::now() < until && !processes_mentioning(root).is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for p in processes_mentioning(root) {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(100));
    for m in mounts_under(root).into_iter().rev() {
        quietly(&["umount", "-l"], &m);
    }
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`; its exit status.
pub fn stop_child(mut child: Child, grace: Duration) -> Option<ExitStatus> {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a freshly started daemon's `socket` accepts connections. The error
/// says whether it exited (and how) or never bound the socket within `within`.
pub fn await_socket(socket: &Path, child: &mut Child, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if Instant::now() > deadline {
            return Err("socket never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
