//! Fixtures for the exporter tests (`tests/exporter.rs`, `tests/exporter_lock.rs`): a
//! throwaway image, an `rbdvol export` process, a loop device and a filesystem mount,
//! each removed by a guard (by exact path or pid) even when a test fails.

#![allow(dead_code, unused_imports)]

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use super::common::{blocklisted_until, ceph_conf, image_meta, rbd, unique};

pub const MIB: u64 = 1 << 20;

/// Runs a command under `timeout -k 5 SECS`; returns (success, stdout, stderr).
pub fn run(secs: u64, program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("timeout")
        .args(["-k", "5", &secs.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn must(secs: u64, program: &str, args: &[&str]) -> String {
    let (ok, out, err) = run(secs, program, args);
    assert!(ok, "{program} {args:?} failed: {out}{err}");
    out
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_ref()))
}

/// An RBD image, removed on drop (best effort: the cluster is throwaway).
pub struct TestImage {
    pub name: String,
}

impl TestImage {
    pub fn create(prefix: &str, size_mib: u64, features: &str) -> TestImage {
        let name = unique(prefix);
        let (ok, out) = rbd(&[
            "create",
            "--size",
            &format!("{size_mib}M"),
            "--image-feature",
            features,
            &format!("rbd/{name}"),
        ]);
        assert!(ok, "rbd create {name}: {out}");
        TestImage { name }
    }

    pub fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    /// `rbd lock ls` as JSON: [{id, locker, address}].
    pub fn lockers(&self) -> Vec<Value> {
        let (ok, out) = rbd(&["lock", "ls", "--format", "json", &self.spec()]);
        assert!(ok, "rbd lock ls: {out}");
        serde_json::from_str::<Value>(&out)
            .unwrap_or_else(|e| panic!("rbd lock ls output ({e}): {out}"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = rbd(&["rm", "--no-progress", &self.spec()]);
    }
}

/// A running `rbdvol export`; on drop: SIGTERM, then SIGKILL, then a lazy unmount of
/// its exact mountpoint if it left one behind.
pub struct Exporter {
    pub child: Option<Child>,
    pub mountpoint: PathBuf,
    pub state_file: PathBuf,
    pub log: PathBuf,
}

impl Exporter {
    pub fn spawn(dir: &Path, tag: &str, image: &str, host: &str, extra: &[&str]) -> Exporter {
        let mountpoint = dir.join(format!("{tag}-mnt"));
        std::fs::create_dir_all(&mountpoint).unwrap();
        let state_file = dir.join(format!("{tag}.state.json"));
        let log = dir.join(format!("{tag}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_rbdvol"))
            .arg("export")
            .arg("--ceph-conf")
            .arg(ceph_conf())
            .args(["--pool", "rbd", "--image", image, "--host-id", host])
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--state-file")
            .arg(&state_file)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .expect("starting rbdvol export");
        Exporter {
            child: Some(child),
            mountpoint,
            state_file,
            log,
        }
    }

    pub fn file(&self) -> PathBuf {
        self.mountpoint.join("image")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("exporter running").id() as i32
    }

    pub fn state(&self) -> Option<Value> {
        let text = std::fs::read_to_string(&self.state_file).ok()?;
        Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("state file ({e}): {text}")))
    }

    /// Waits until the state file says `want`; panics on another final state or exit.
    pub fn wait_state(&mut self, want: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.state() {
                if v["state"] == want {
                    return v;
                }
                assert!(
                    v["state"] != "failed",
                    "exporter failed instead of {want}: {v}\n{}",
                    self.log()
                );
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("exporter exited ({status}) before {want}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no {want} state within {within:?}: {:?}\n{}",
                self.state(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("exporter running");
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "exporter still running after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = run(20, "umount", &["-l", &self.mountpoint.to_string_lossy()]);
        }
    }
}

/// A loop device attached to a file, detached (by its exact path) on drop.
pub struct LoopDev {
    pub dev: String,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let file = file.to_string_lossy().into_owned();
        // Another test run may grab the same free device between find and attach.
        for attempt in 0..5 {
            let (ok, out, err) = run(60, "losetup", &["-f", "--show", &file]);
            if ok {
                return LoopDev {
                    dev: out.trim().to_string(),
                };
            }
            assert!(attempt < 4, "losetup -f --show {file}: {err}");
            std::thread::sleep(Duration::from_millis(200));
        }
        unreachable!()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = run(30, "losetup", &["-d", &self.dev]);
    }
}

/// A filesystem mount, unmounted (by its exact path) on drop.
pub struct FsMount {
    pub dir: PathBuf,
}

impl FsMount {
    pub fn mount(dev: &str, dir: &Path) -> FsMount {
        std::fs::create_dir_all(dir).unwrap();
        must(60, "mount", &[dev, &dir.to_string_lossy()]);
        FsMount {
            dir: dir.to_path_buf(),
        }
    }

    pub fn unmount(mut self) {
        must(60, "umount", &[&self.dir.to_string_lossy()]);
        self.dir = PathBuf::new();
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() && is_mounted(&self.dir) {
            let d = self.dir.to_string_lossy().into_owned();
            if !run(30, "umount", &[&d]).0 {
                let _ = run(30, "umount", &["-l", &d]);
            }
        }
    }
}

/// The `rbdvol.owner.*` record, in the order host, client, addr, since.
pub fn owner_record(image: &str) -> Vec<Option<String>> {
    ["host", "client", "addr", "since"]
        .iter()
        .map(|k| image_meta("rbd", image, &format!("rbdvol.owner.{k}")))
        .collect()
}

/// Starts an exporter that must refuse quickly; returns it (exited) and its error.
pub fn refused(dir: &Path, tag: &str, image: &str, extra: &[&str]) -> (Exporter, String) {
    let t = Instant::now();
    let mut exp = Exporter::spawn(dir, tag, image, "host-x", extra);
    let status = exp.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "{tag} should fail:\n{}", exp.log());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "{tag}: {:?}",
        t.elapsed()
    );
    let st = exp
        .state()
        .unwrap_or_else(|| panic!("{tag}: no state file\n{}", exp.log()));
    assert_eq!(st["state"], "failed", "{st}");
    let err = st["error"].as_str().unwrap().to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(exp.log().contains(&err), "{}", exp.log());
    assert!(!is_mounted(&exp.mountpoint));
    (exp, err)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rbdvol-exp")
        .tempdir()
        .unwrap()
}
