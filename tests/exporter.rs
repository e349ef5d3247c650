//! `rbdvol export`, the userspace mapper's exporter, against a real cluster, a real FUSE
//! mount and real loop devices: format and mount through the loop device, a clean stop
//! that releases everything, a second exporter refused while the first serves,
//! advisory locks and missing features refused, a dead owner taken over, and fencing.
//!
//! Needs root (FUSE mount, losetup, mount). Everything a test creates is removed by a
//! guard, by exact path or pid, even when the test fails: other test runs on this
//! machine have their own exporters, loop devices and mounts.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use common::{blocklisted_until, ceph_conf, image_meta, rbd, unique};

const MIB: u64 = 1 << 20;

/// Runs a command under `timeout -k 5 SECS`; returns (success, stdout, stderr).
fn run(secs: u64, program: &str, args: &[&str]) -> (bool, String, String) {
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

fn must(secs: u64, program: &str, args: &[&str]) -> String {
    let (ok, out, err) = run(secs, program, args);
    assert!(ok, "{program} {args:?} failed: {out}{err}");
    out
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_ref()))
}

/// An RBD image, removed on drop (best effort: the cluster is throwaway).
struct TestImage {
    name: String,
}

impl TestImage {
    fn create(prefix: &str, size_mib: u64, features: &str) -> TestImage {
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

    fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    /// `rbd lock ls` as JSON: [{id, locker, address}].
    fn lockers(&self) -> Vec<Value> {
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
struct Exporter {
    child: Option<Child>,
    mountpoint: PathBuf,
    state_file: PathBuf,
    log: PathBuf,
}

impl Exporter {
    fn spawn(dir: &Path, tag: &str, image: &str, host: &str, extra: &[&str]) -> Exporter {
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

    fn file(&self) -> PathBuf {
        self.mountpoint.join("image")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("exporter running").id() as i32
    }

    fn state(&self) -> Option<Value> {
        let text = std::fs::read_to_string(&self.state_file).ok()?;
        Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("state file ({e}): {text}")))
    }

    /// Waits until the state file says `want`; panics on another final state or exit.
    fn wait_state(&mut self, want: &str, within: Duration) -> Value {
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
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
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

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGTERM and wait for the exit.
    fn stop(&mut self) -> ExitStatus {
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
struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
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
struct FsMount {
    dir: PathBuf,
}

impl FsMount {
    fn mount(dev: &str, dir: &Path) -> FsMount {
        std::fs::create_dir_all(dir).unwrap();
        must(60, "mount", &[dev, &dir.to_string_lossy()]);
        FsMount {
            dir: dir.to_path_buf(),
        }
    }

    fn unmount(mut self) {
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
fn owner_record(image: &str) -> Vec<Option<String>> {
    ["host", "client", "addr", "since"]
        .iter()
        .map(|k| image_meta("rbd", image, &format!("rbdvol.owner.{k}")))
        .collect()
}

/// Starts an exporter that must refuse quickly; returns it (exited) and its error.
fn refused(dir: &Path, tag: &str, image: &str, extra: &[&str]) -> (Exporter, String) {
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

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rbdvol-exp")
        .tempdir()
        .unwrap()
}

#[test]
fn export_format_write_stop_release_and_reexport() {
    let dir = tempdir();
    let img = TestImage::create("exp-cycle", 512, "layering,exclusive-lock");
    let started = Instant::now();
    let mut exp = Exporter::spawn(dir.path(), "a", &img.name, "host-a", &[]);
    let st = exp.wait_state("serving", Duration::from_secs(30));
    println!("export serving after {:?}", started.elapsed());
    assert_eq!(st["pid"], exp.pid());
    assert_eq!(
        (&st["pool"], &st["image"]),
        (&"rbd".into(), &img.name.as_str().into())
    );
    assert_eq!(st["file"], exp.file().to_string_lossy().as_ref());
    assert!(st.get("error").is_none(), "{st}");
    let client = st["client"].as_str().unwrap().to_string();
    assert!(client.starts_with("client."), "{st}");

    // The file is the image; the lock and the owner record are ours.
    let meta = std::fs::metadata(exp.file()).unwrap();
    assert_eq!(meta.len(), 512 * MIB);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let lockers = img.lockers();
    assert_eq!(lockers.len(), 1, "{lockers:?}");
    assert_eq!(lockers[0]["locker"], client.as_str());
    assert!(lockers[0]["id"].as_str().unwrap().starts_with("auto "));
    let want: Vec<Option<String>> = [
        "host-a",
        &client,
        st["addr"].as_str().unwrap(),
        st["since"].as_str().unwrap(),
    ]
    .iter()
    .map(|s| Some(s.to_string()))
    .collect();
    assert_eq!(owner_record(&img.name), want);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mp = exp.mountpoint.to_string_lossy().into_owned();
    let line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(mp.as_str()))
        .expect("FUSE mount listed");
    assert!(
        line.starts_with(&format!("rbdvol:rbd/{} {mp} fuse.rbdvol ", img.name)),
        "{line}"
    );

    let payload = b"written through loop + FUSE + librbd\n";
    {
        let lo = LoopDev::attach(&exp.file());
        let t = Instant::now();
        must(120, "mkfs.ext4", &["-q", &lo.dev]);
        println!("mkfs.ext4 on 512 MiB: {:?}", t.elapsed());
        let fs = FsMount::mount(&lo.dev, &dir.path().join("fs"));
        let f = fs.dir.join("hello.txt");
        std::fs::write(&f, payload).unwrap();
        std::fs::File::open(&f).unwrap().sync_all().unwrap();
        must(60, "sync", &["-f", &f.to_string_lossy()]);
        let big = fs.dir.join("big").display().to_string();
        for (args, bytes) in [
            (
                format!("if=/dev/zero of={big} bs=4M count=64 oflag=direct"),
                256 * MIB,
            ),
            (
                format!("if=/dev/zero of={big} bs=4M count=64 conv=fsync"),
                256 * MIB,
            ),
            (
                format!("if={big} of=/dev/null bs=4M iflag=direct"),
                256 * MIB,
            ),
            (
                format!("if=/dev/zero of={big} bs=4k count=2000 oflag=direct"),
                2000 * 4096,
            ),
        ] {
            let t = Instant::now();
            must(120, "dd", &args.split(' ').collect::<Vec<_>>());
            let secs = t.elapsed().as_secs_f64();
            let (mbs, iops) = (bytes as f64 / 1e6 / secs, bytes as f64 / 4096.0 / secs);
            println!("dd {args}: {mbs:.0} MB/s ({iops:.0} x 4 KiB/s)");
        }
        std::fs::remove_file(&big).unwrap();
        fs.unmount();
        // `lo` is detached here, before the exporter is stopped: the daemon's order.
    }

    let t = Instant::now();
    let status = exp.stop();
    println!("SIGTERM to exit: {:?}", t.elapsed());
    assert!(status.success(), "exit {status}:\n{}", exp.log());
    assert!(!exp.state_file.exists(), "state file left behind");
    assert!(!is_mounted(&exp.mountpoint), "FUSE mount left behind");
    assert!(
        img.lockers().is_empty(),
        "lock left behind: {:?}",
        img.lockers()
    );
    assert_eq!(owner_record(&img.name), vec![None; 4]);
    let log = exp.log();
    assert!(
        log.contains("exclusive lock released") && !log.contains("FENCED"),
        "{log}"
    );
    drop(exp);

    // A fresh exporter (another host, even) finds the data.
    let mut exp = Exporter::spawn(dir.path(), "b", &img.name, "host-b", &[]);
    exp.wait_state("serving", Duration::from_secs(30));
    assert_eq!(owner_record(&img.name)[0].as_deref(), Some("host-b"));
    {
        let lo = LoopDev::attach(&exp.file());
        let fs = FsMount::mount(&lo.dev, &dir.path().join("fs2"));
        assert_eq!(std::fs::read(fs.dir.join("hello.txt")).unwrap(), payload);
        fs.unmount();
    }
    assert!(exp.stop().success(), "{}", exp.log());
    assert!(img.lockers().is_empty());
}

#[test]
fn second_exporter_waits_its_lock_wait_then_fails_naming_the_owner() {
    let dir = tempdir();
    let img = TestImage::create("exp-two", 64, "layering,exclusive-lock");
    let mut first = Exporter::spawn(dir.path(), "first", &img.name, "host-one", &[]);
    let owner = first.wait_state("serving", Duration::from_secs(30))["client"]
        .as_str()
        .unwrap()
        .to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(first.file())
        .unwrap();
    file.write_all_at(b"first", 0).unwrap();

    // A live owner is asked again until --lock-wait runs out (it may release meanwhile).
    let started = Instant::now();
    let (_second, err) = refused(dir.path(), "second", &img.name, &["--lock-wait", "2"]);
    let waited = started.elapsed();
    assert!(err.contains(&owner) && err.contains("host-one"), "{err}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "{waited:?}"
    );

    // The first is untouched: still serving, still the owner, still readable/writable.
    assert_eq!(first.state().unwrap()["state"], "serving");
    let lockers = img.lockers();
    assert_eq!(lockers.len(), 1);
    assert_eq!(lockers[0]["locker"], owner.as_str());
    file.write_all_at(b"still", 4096).unwrap();
    file.sync_all().unwrap();
    let mut buf = [0u8; 5];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"first");
    drop(file);
    assert!(first.stop().success(), "{}", first.log());
}

#[test]
fn advisory_locks_missing_features_and_bad_mountpoints_are_refused() {
    let dir = tempdir();
    let img = TestImage::create("exp-adv", 64, "layering,exclusive-lock");
    let (ok, out) = rbd(&["lock", "add", &img.spec(), "someone-elses-cookie"]);
    assert!(ok, "rbd lock add: {out}");
    let (_e, err) = refused(dir.path(), "adv", &img.name, &[]);
    assert!(
        err.contains("advisory lock") && err.contains("someone-elses-cookie"),
        "{err}"
    );
    // Only the advisory lock: no managed lock was attempted.
    let lockers = img.lockers();
    assert_eq!(lockers.len(), 1, "{lockers:?}");
    assert_eq!(lockers[0]["id"], "someone-elses-cookie");
    let locker = lockers[0]["locker"].as_str().unwrap();
    let (ok, out) = rbd(&["lock", "rm", &img.spec(), "someone-elses-cookie", locker]);
    assert!(ok, "rbd lock rm: {out}");

    let plain = TestImage::create("exp-nofeat", 64, "layering");
    let (_e, err) = refused(dir.path(), "nofeat", &plain.name, &[]);
    assert!(err.contains("exclusive-lock"), "{err}");
    assert!(plain.lockers().is_empty());

    let (_e, err) = refused(dir.path(), "missing", "no-such-image-here", &[]);
    assert!(err.contains("does not exist"), "{err}");

    // A mountpoint that is not empty is refused before the cluster is touched.
    let busy = dir.path().join("busy-mnt");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    let (e, err) = refused(dir.path(), "busy", &img.name, &[]);
    assert!(err.contains("not empty"), "{err}");
    assert!(e.state().unwrap().get("client").is_none());
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempdir();
    let img = TestImage::create("exp-ro", 64, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "ro", &img.name, "host-a", &["--read-only"]);
    exp.wait_state("serving", Duration::from_secs(30));
    let meta = std::fs::metadata(exp.file()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    let err = OpenOptions::new().write(true).open(exp.file()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let f = std::fs::File::open(exp.file()).unwrap();
    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    // One host at a time, read-only or not.
    assert_eq!(img.lockers().len(), 1);
    drop(f);
    assert!(exp.stop().success(), "{}", exp.log());
}

#[test]
fn punch_hole_reads_back_zeroes_and_the_end_is_enforced() {
    let dir = tempdir();
    let img = TestImage::create("exp-io", 64, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "io", &img.name, "host-a", &[]);
    exp.wait_state("serving", Duration::from_secs(30));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(exp.file())
        .unwrap();
    f.write_all_at(&vec![0xabu8; 64 * 1024], 0).unwrap();
    // Unaligned edges: plain rbd discard would leave them; a punched hole must not.
    let file = exp.file().to_string_lossy().into_owned();
    must(30, "fallocate", &["-p", "-o", "1000", "-l", "5000", &file]);
    let mut buf = vec![0u8; 8192];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..1000].iter().all(|b| *b == 0xab));
    assert!(buf[1000..6000].iter().all(|b| *b == 0), "hole not zeroed");
    assert!(buf[6000..].iter().all(|b| *b == 0xab));

    // A write crossing the end writes what fits; past the end is ENOSPC.
    let size = 64 * MIB;
    assert_eq!(f.write_at(b"0123456789", size - 4).unwrap(), 4);
    let err = f.write_at(b"x", size).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let mut tail = [0u8; 8];
    assert_eq!(f.read_at(&mut tail, size - 4).unwrap(), 4);
    assert_eq!(&tail[..4], b"0123");
    f.sync_all().unwrap();
    drop(f);
    assert!(exp.stop().success(), "{}", exp.log());
}

/// Breaks the exporter's lock from another client instance, as a host taking over
/// would: the exporter must notice on its own, say "fenced", and never write again.
#[test]
fn breaking_the_lock_fences_the_exporter() {
    use rbdvol::ceph::sys::{ConnectSpec, Rados};

    let dir = tempdir();
    let img = TestImage::create("exp-fence", 64, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "fence", &img.name, "host-a", &[]);
    let st = exp.wait_state("serving", Duration::from_secs(30));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(exp.file())
        .unwrap();
    f.write_all_at(b"before", 0).unwrap();
    f.sync_all().unwrap();

    let taker = Rados::connect(&ConnectSpec {
        cluster: "ceph".into(),
        entity: "client.admin".into(),
        conf: Some(ceph_conf().to_string_lossy().into_owned()),
        keyring: None,
        options: vec![("rados_osd_op_timeout".into(), "30".into())],
    })
    .expect("second client instance");
    let pool = taker.pool("rbd").unwrap();
    let image = pool.open(&img.name).unwrap();
    let t = Instant::now();
    image
        .lock_break(st["addr"].as_str().unwrap())
        .expect("lock break");
    let st = exp.wait_state("fenced", Duration::from_secs(10));
    println!("fenced {:?} after the lock break", t.elapsed());
    assert_eq!(st["pid"], exp.pid());
    assert!(exp.log().contains("FENCED"), "{}", exp.log());

    // Every further I/O fails with EIO, and nothing reaches the image.
    let err = f.write_all_at(b"after!", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = f.read_exact_at(&mut [0u8; 6], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    let mut data = [0u8; 6];
    assert_eq!(image.read(0, &mut data).unwrap(), 6);
    assert_eq!(&data, b"before");
    drop(image);
    drop(pool);
    drop(f);

    // Stopping a fenced exporter: mount gone, non-zero exit, the state file kept.
    assert!(!exp.stop().success(), "{}", exp.log());
    assert!(!is_mounted(&exp.mountpoint));
    assert_eq!(exp.state().unwrap()["state"], "fenced");
}

/// A crashed owner (SIGKILL) is taken over once the cluster declares it dead: a short
/// --lock-wait gives up with the promised explanation; a long one waits, gets the lock,
/// and the old client is blocklisted.
#[test]
fn dead_owner_is_taken_over_after_the_watch_timeout() {
    let dir = tempdir();
    let img = TestImage::create("exp-dead", 64, "layering,exclusive-lock");
    let mut old = Exporter::spawn(dir.path(), "old", &img.name, "host-old", &[]);
    let st = old.wait_state("serving", Duration::from_secs(30));
    let old_client = st["client"].as_str().unwrap().to_string();
    let old_addr = st["addr"].as_str().unwrap().to_string();
    {
        // No truncation: the file's size is the image's.
        let f = OpenOptions::new().write(true).open(old.file()).unwrap();
        f.write_all_at(b"from the old owner", 0).unwrap();
        f.sync_all().unwrap();
    }
    old.signal(nix::sys::signal::Signal::SIGKILL);
    old.wait_exit(Duration::from_secs(10));
    // Its dead FUSE mount is removed by the guard (lazy unmount of its exact path).
    drop(old);

    let t = Instant::now();
    let mut quick = Exporter::spawn(
        dir.path(),
        "quick",
        &img.name,
        "host-new",
        &["--lock-wait", "1"],
    );
    assert!(!quick.wait_exit(Duration::from_secs(20)).success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let err = quick.state().unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("still waiting for the lock"), "{err}");
    assert!(
        err.contains("host-old") && err.contains(&old_client),
        "{err}"
    );
    assert!(!is_mounted(&quick.mountpoint));

    // A stop signal ends the wait at once.
    let mut stopped = Exporter::spawn(dir.path(), "stopped", &img.name, "host-new", &[]);
    std::thread::sleep(Duration::from_millis(500));
    stopped.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(!stopped.wait_exit(Duration::from_secs(5)).success());
    let st = stopped.state().unwrap();
    assert!(st["error"].as_str().unwrap().contains("signal 15"), "{st}");

    let mut new = Exporter::spawn(
        dir.path(),
        "new",
        &img.name,
        "host-new",
        &["--lock-wait", "60"],
    );
    let st = new.wait_state("serving", Duration::from_secs(60));
    println!("dead owner taken over after {:?}", t.elapsed());
    assert_ne!(st["client"], old_client.as_str());
    // Fenced for lock.fence_expiry (365 days by default), not the monitor's 1 hour:
    // a dead-looking owner may only be cut off, with writes queued for its return.
    let until = blocklisted_until(&old_addr);
    assert!(
        until.is_some_and(|t| t > SystemTime::now() + Duration::from_secs(300 * 86400)),
        "old owner {old_addr} blocklisted until {until:?}"
    );
    assert!(
        new.log().contains(&old_client),
        "the wait names the old owner: {}",
        new.log()
    );
    let mut buf = vec![0u8; 18];
    let f = std::fs::File::open(new.file()).unwrap();
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"from the old owner");
    drop(f);
    assert_eq!(
        image_meta("rbd", &img.name, "rbdvol.owner.host").as_deref(),
        Some("host-new")
    );
    assert!(new.stop().success(), "{}", new.log());
}

/// A `/proc/PID/status` field's first word, e.g. `VmRSS` in kB.
fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Whether this (root) test process has a capability, which the exporter it starts inherits.
fn have_capability(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << bit) != 0
}

/// The exporter sits in the block I/O path: memory pressure must neither deadlock it
/// (PF_MEMALLOC_NOIO through PR_SET_IO_FLUSHER) nor let the OOM killer pick it, and its
/// memory is locked, as it is touched only (MCL_ONFAULT: no ballooning). Where this
/// machine withholds CAP_SYS_RESOURCE, the exporter must say what is lost instead.
#[test]
fn the_exporter_is_hardened_for_the_block_io_path() {
    const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
    const CAP_IPC_LOCK: u32 = 14;
    const CAP_SYS_RESOURCE: u32 = 24;
    let dir = tempdir();
    let img = TestImage::create("exp-hard", 128, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "hard", &img.name, "host-a", &[]);
    exp.wait_state("serving", Duration::from_secs(30));
    let pid = exp.pid();
    println!(
        "exporter VmRSS when serving: {} kB",
        status_kb(pid, "VmRSS")
    );
    // Some I/O first, so the measurement includes librbd's working set.
    let f = OpenOptions::new().write(true).open(exp.file()).unwrap();
    let chunk = vec![0x5au8; 4 << 20];
    for i in 0..16u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);

    let rss = status_kb(pid, "VmRSS");
    let locked = status_kb(pid, "VmLck");
    println!("exporter VmRSS after 64 MiB of writes: {rss} kB, VmLck {locked} kB");
    assert!(rss < 200 * 1024, "the exporter's RSS ballooned: {rss} kB");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Field 9 (flags) is the 7th after the parenthesised command name.
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let flags: u64 = after_comm.split(' ').nth(6).unwrap().parse().unwrap();
    let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    let log = exp.log();
    if have_capability(CAP_SYS_RESOURCE) {
        assert_eq!(oom.trim(), "-1000", "{log}");
        assert_ne!(flags & PF_MEMALLOC_NOIO, 0, "flags {flags:#x}\n{log}");
    } else {
        println!("no CAP_SYS_RESOURCE here: checking that the exporter says what is lost");
        assert!(
            log.contains("PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE")
                && log.contains("can deadlock that volume"),
            "{log}"
        );
        assert!(
            log.contains("oom_score_adj") && log.contains("OOM killer may pick this exporter"),
            "{log}"
        );
    }
    if have_capability(CAP_IPC_LOCK) {
        // VmLck counts whole locked mappings (thread stacks included), RSS only what
        // was touched: a small RSS next to a large VmLck is MCL_ONFAULT at work.
        assert!(locked > 0, "no memory locked: VmLck {locked} kB\n{log}");
    } else {
        assert!(log.contains("not locking the exporter's memory"), "{log}");
    }
    assert!(exp.stop().success(), "{}", exp.log());
}

/// `rbdvol lock break` fences the holder for lock.fence_expiry: its client is
/// blocklisted before librbd's break (which would use the monitor's default expiry,
/// and the monitor never extends an entry).
#[test]
fn lock_break_fences_the_owner_for_the_fence_expiry() {
    use rbdvol::ceph::sys::{ConnectSpec, Rados};

    let dir = tempdir();
    let img = TestImage::create("exp-breakx", 64, "layering,exclusive-lock");
    let mut exp = Exporter::spawn(dir.path(), "breakx", &img.name, "host-a", &[]);
    let addr = exp.wait_state("serving", Duration::from_secs(30))["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let rados = Rados::connect(&ConnectSpec {
        cluster: "ceph".into(),
        entity: "client.admin".into(),
        conf: Some(ceph_conf().to_string_lossy().into_owned()),
        keyring: None,
        options: vec![("rados_osd_op_timeout".into(), "30".into())],
    })
    .expect("operator's client instance");
    let expiry = Duration::from_secs(30 * 86400);
    let said = rbdvol::lock::break_lock(&rados, &["rbd".to_string()], &img.name, expiry)
        .expect("lock break");
    assert!(
        said.contains("blocklisted first") && !said.contains("WARNING"),
        "{said}"
    );
    let until = blocklisted_until(&addr).expect("the holder is blocklisted");
    let from_now = until
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    assert!(
        (29 * 86400..31 * 86400).contains(&from_now),
        "blocklisted for {from_now} s, not about {} s",
        expiry.as_secs()
    );
    exp.wait_state("fenced", Duration::from_secs(10));
    assert!(!exp.stop().success(), "{}", exp.log());
    // The exporter has exited: its entry protects nothing now (the daemon would do this).
    rbdvol::ceph::images::unblocklist(&rados, &addr).unwrap();
}
