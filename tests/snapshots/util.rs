//! Helpers of the snapshot tests: the `rbdvol` CLI, data that can be compared byte
//! for byte, and sizes seen from inside a mounted filesystem.

#![allow(dead_code)] // each test binary uses some of these

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// Runs `rbdvol ARGS` against the test cluster; returns (exit code, stdout, stderr).
pub fn rbdvol(args: &[&str]) -> (i32, String, String) {
    rbdvol_in(None, args)
}

/// Runs `rbdvol ARGS` in the network namespace `ns` (another test host), if given.
pub fn rbdvol_in(ns: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rbdvol.toml");
    std::fs::write(&config, "").unwrap();
    let mut cmd = match ns {
        Some(ns) => {
            let name = ns.rsplit('/').next().unwrap();
            let mut c = Command::new("ip");
            c.args(["netns", "exec", name, "timeout"]);
            c
        }
        None => Command::new("timeout"),
    };
    let out = cmd
        .args(["-k", "5", "90", env!("CARGO_BIN_EXE_rbdvol")])
        .args(args)
        .arg("--ceph-conf")
        .arg(ceph_conf())
        .args([
            "--pool",
            "rbd",
            "--pool",
            "fast",
            "--host-id",
            "operator",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `rbdvol ARGS`, which must succeed; its stdout.
pub fn rbdvol_ok(args: &[&str]) -> String {
    let (code, out, err) = rbdvol(args);
    assert_eq!(code, 0, "rbdvol {args:?}: {out}{err}");
    out
}

/// `rbdvol ARGS`, which must fail with exit code 1 and say `needle` on stderr.
pub fn rbdvol_refused(args: &[&str], needle: &str) -> String {
    let (code, out, err) = rbdvol(args);
    assert_eq!(code, 1, "rbdvol {args:?} should be refused: {out}{err}");
    assert!(
        err.contains(needle),
        "rbdvol {args:?}: {err:?} lacks {needle:?}"
    );
    err
}

/// `len` pseudo-random bytes from `seed`: different per seed, the same every run.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` to `path` and syncs it to the volume.
pub fn write_synced(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// Asserts that `path` holds exactly `data`.
pub fn assert_same(path: &Path, data: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        got == data,
        "{} differs: {} bytes read, {} expected",
        path.display(),
        got.len(),
        data.len()
    );
}

/// Total size of the filesystem mounted at `dir`, in bytes, as `df` sees it.
pub fn fs_size(dir: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// `rbd export`s `pool/image[@snap]` to a file in `dir` and checks its filesystem:
/// one repairing pass (a crash-consistent copy may need its journal replayed), then
/// a read-only pass that must find nothing. Panics with fsck's words otherwise.
pub fn assert_fsck_clean(spec: &str, dir: &Path) -> PathBuf {
    let file = dir.join("export.img");
    let _ = std::fs::remove_file(&file);
    let (ok, out) = rbd(&["export", spec, file.to_str().unwrap()]);
    assert!(ok, "rbd export {spec}: {out}");
    let run = |args: &[&str]| {
        let o = Command::new("timeout")
            .args(["-k", "5", "120", "e2fsck"])
            .args(args)
            .arg(&file)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (code, out) = run(&["-fy"]);
    assert!(code <= 1, "e2fsck -fy on {spec}: exit {code}\n{out}");
    let (code, out) = run(&["-fn"]);
    assert_eq!(code, 0, "e2fsck -fn on {spec} after the first pass:\n{out}");
    file
}

/// Whether `pool/oid` exists, from the `rados` CLI.
pub fn object_exists(pool: &str, oid: &str) -> bool {
    Command::new("timeout")
        .args(["-k", "5", "30", "rados", "-c"])
        .arg(ceph_conf())
        .args(["-p", pool, "stat", oid])
        .output()
        .unwrap()
        .status
        .success()
}
