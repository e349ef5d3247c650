//! The test cluster through its own CLIs (`rbd`, `ceph`), so tests check what really
//! happened in the cluster rather than what the daemon says happened.

use std::process::Command;

use serde_json::Value;

use super::ceph_conf;

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
