//! `rbdvol export`, the userspace mapper's exporter, against a real cluster, a real FUSE
//! mount and real loop devices: format and mount through the loop device, a clean stop
//! that releases everything, advisory locks and missing features refused, read-only
//! exports and the image's end. Ownership (lock waits, takeover, fencing) is in
//! `tests/exporter_lock.rs`.
//!
//! Needs root (FUSE mount, losetup, mount). Everything a test creates is removed by a
//! guard, by exact path or pid, even when the test fails: other test runs on this
//! machine have their own exporters, loop devices and mounts.
#![allow(unused_imports)]

mod common;
#[path = "exporter/fixtures.rs"]
mod fixtures;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{blocklisted_until, ceph_conf, image_meta, rbd, unique};
use fixtures::*;

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
