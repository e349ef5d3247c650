//! Owns the "by hand" baseline of the mount path: the steps the daemon takes, run
//! directly with nothing around them. `rbdvol export` started by us (the same argv the
//! daemon uses, see src/host/mapper/userspace/exporters.rs) and waited for through its state file,
//! `losetup --find --show`, `blkid -p`, mkfs with the daemon's own argv
//! (`rbdvol::host::fs::mkfs_argv`) or `e2fsck -p`, and `mount`; and the reverse.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{run, run_ok, s, Ctx, Env, R};

const STEP_DEADLINE: Duration = Duration::from_secs(90);

/// Per-step times of one mapping by hand.
#[derive(Debug, Default, Clone)]
pub struct Steps {
    pub export: Duration,
    pub losetup: Duration,
    pub blkid: Duration,
    /// mkfs on a first mount, `e2fsck -p` on a re-mount.
    pub format_or_check: Duration,
    pub mount: Duration,
}

impl Steps {
    pub fn total(&self) -> Duration {
        self.export + self.losetup + self.blkid + self.format_or_check + self.mount
    }

    /// Without the safety steps (probe, fsck): export + losetup + mount only.
    pub fn bare(&self) -> Duration {
        self.export + self.losetup + self.mount
    }
}

/// An image mapped and mounted by hand.
pub struct Mapped {
    exporter: Option<Child>,
    dir: PathBuf,
    device: String,
    pub mountpoint: PathBuf,
}

fn exporter_state(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(format!(
        "{}{}",
        v["state"].as_str().unwrap_or_default(),
        v["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    ))
}

/// Maps and mounts `pool/image` by hand under `dir`; formats (ext4, the daemon's mkfs
/// options for a fresh image) when `format`, else preens it with `e2fsck -p`.
pub fn mount(env: &Env, dir: &Path, pool: &str, image: &str, format: bool) -> R<(Mapped, Steps)> {
    let fuse = dir.join("fuse");
    let mountpoint = dir.join("mnt");
    let state = dir.join("state.json");
    std::fs::create_dir_all(&fuse).ctx("creating the FUSE dir")?;
    std::fs::create_dir_all(&mountpoint).ctx("creating the mountpoint")?;
    let _ = std::fs::remove_file(&state);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("exporter.log"))
        .ctx("opening the exporter log")?;
    let mut steps = Steps::default();
    let mut mapped = Mapped {
        exporter: None,
        dir: dir.to_path_buf(),
        device: String::new(),
        mountpoint: mountpoint.clone(),
    };

    let t = Instant::now();
    let mut cmd = Command::new(&env.exe);
    cmd.arg("export")
        .args(["--ceph-conf", s(&env.conf)])
        .args(["--client-id", "admin", "--cluster", "ceph"])
        .args([
            "--pool",
            pool,
            "--image",
            image,
            "--host-id",
            "bench-by-hand",
        ])
        .args(["--mountpoint", s(&fuse)])
        .args(["--state-file", s(&state)])
        .args(["--lock-wait", "60"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().ctx("log")?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    mapped.exporter = Some(cmd.spawn().ctx("starting rbdvol export")?);
    let deadline = t + Duration::from_secs(80);
    loop {
        match exporter_state(&state).as_deref() {
            Some("serving") => break,
            Some(other) if !other.is_empty() => {
                return Err(format!("rbdvol export by hand: {other}"));
            }
            _ => {}
        }
        if let Some(c) = mapped.exporter.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!("rbdvol export by hand exited with {st}"));
            }
        }
        if Instant::now() > deadline {
            return Err("rbdvol export by hand never served".into());
        }
        // Polled more finely than the daemon's 5 ms: this is the floor.
        std::thread::sleep(Duration::from_millis(2));
    }
    steps.export = t.elapsed();

    let file = fuse.join("image");
    let t = Instant::now();
    let out = run_ok(&["losetup", "--find", "--show", s(&file)], STEP_DEADLINE)?;
    steps.losetup = t.elapsed();
    mapped.device = out.stdout.trim().to_string();
    if !mapped.device.starts_with("/dev/loop") {
        return Err(format!("losetup printed {:?}", mapped.device));
    }
    let dev = mapped.device.clone();

    let t = Instant::now();
    let probe = run(&["blkid", "-p", "-o", "export", &dev], STEP_DEADLINE)?;
    steps.blkid = t.elapsed();
    let blank = probe.code == Some(2);
    if blank != format {
        return Err(format!(
            "blkid -p {dev}: expected {} but got exit {:?} {}",
            if format { "a blank device" } else { "ext4" },
            probe.code,
            probe.stdout.trim()
        ));
    }

    let t = Instant::now();
    if format {
        let (prog, args) = rbdvol::host::fs::mkfs_argv("ext4", "", true, Path::new(&dev));
        let mut argv = vec![prog.as_str()];
        argv.extend(args.iter().map(String::as_str));
        run_ok(&argv, STEP_DEADLINE)?;
    } else {
        let out = run(&["e2fsck", "-p", &dev], STEP_DEADLINE)?;
        if !matches!(out.code, Some(0..=2)) {
            return Err(format!("e2fsck -p {dev}: {:?} {}", out.code, out.stderr));
        }
    }
    steps.format_or_check = t.elapsed();

    let t = Instant::now();
    let options = rbdvol::host::fs::mount_options("ext4", "", false, false);
    run_ok(
        &["mount", "-t", "ext4", "-o", &options, &dev, s(&mountpoint)],
        STEP_DEADLINE,
    )?;
    steps.mount = t.elapsed();
    Ok((mapped, steps))
}

impl Mapped {
    /// umount, losetup -d, and a clean stop of the exporter (SIGTERM, wait for exit).
    pub fn unmount(mut self) -> R<Duration> {
        let t = Instant::now();
        self.teardown()?;
        Ok(t.elapsed())
    }

    fn teardown(&mut self) -> R<()> {
        let mp = s(&self.mountpoint).to_string();
        if crate::common::is_mountpoint(&self.mountpoint) {
            run_ok(&["umount", &mp], STEP_DEADLINE)?;
        }
        if !self.device.is_empty() {
            run_ok(&["losetup", "-d", &self.device], STEP_DEADLINE)?;
            self.device.clear();
        }
        if let Some(mut child) = self.exporter.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > until {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("the exporter did not stop within 20 s".into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.teardown().is_err() {
            crate::common::host::clean_host(&self.dir, crate::plugin::EXPORTER_GRACE);
        }
    }
}
