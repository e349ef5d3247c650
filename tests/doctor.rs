//! `rbdvol doctor` against the throwaway cluster (`TEST_CEPH_CONF`): a healthy setup
//! passes (exit 0, nothing FAILs), and each broken setup FAILs exactly the check that
//! names its cause, with a non-zero exit. Docker is never asked: the plugin directory
//! is a temp dir (`--plugin-dir`) and `--no-docker-cli` skips `docker plugin ls`.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn ceph_conf() -> PathBuf {
    PathBuf::from(std::env::var_os("TEST_CEPH_CONF").expect(
        "TEST_CEPH_CONF is not set. Run the tests with `integration/test`, which brings up a throwaway Ceph cluster and sets it.",
    ))
}

fn ceph(args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "ceph", "-c"])
        .arg(ceph_conf())
        .args(args)
        .output()
        .expect("running ceph");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A healthy host in a temp dir: a listening plugin socket in a private plugin dir and
/// a mount root that does not exist yet.
struct Setup {
    dir: tempfile::TempDir,
    _listener: UnixListener,
    conf: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        let socket = dir.path().join("plugins/rbdvol.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let p = |s: &str| dir.path().join(s).display().to_string();
        let args = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--plugin-dir".into(),
            p("plugins"),
            "--mount-root".into(),
            p("mounts"),
            "--state-dir".into(),
            p("state"),
            "--pool".into(),
            "rbd".into(),
            "--no-docker-cli".into(),
        ];
        Setup {
            dir,
            _listener: listener,
            conf: ceph_conf(),
            args,
            env: vec![("RBDVOL_CEPH__CONNECT_TIMEOUT".into(), "3s".into())],
        }
    }

    fn path(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    /// Sets a flag (replacing its healthy value; `--pool` adds a pool).
    fn arg(mut self, flag: &str, value: impl AsRef<Path>) -> Setup {
        let value = value.as_ref().display().to_string();
        match self.args.iter().position(|a| a == flag) {
            Some(i) if flag != "--pool" => self.args[i + 1] = value,
            _ => self.args.extend([flag.to_string(), value]),
        }
        self
    }

    /// Runs `rbdvol doctor --json`: (exit code, checks).
    fn run(&self) -> (i32, Vec<Value>) {
        let out = Command::new("timeout")
            .args([
                "-k",
                "5",
                "60",
                env!("CARGO_BIN_EXE_rbdvol"),
                "doctor",
                "--json",
            ])
            .arg("--ceph-conf")
            .arg(&self.conf)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "doctor --json printed no JSON ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(v["ok"], out.status.code() == Some(0), "{v}");
        (
            out.status.code().unwrap(),
            v["checks"].as_array().unwrap().clone(),
        )
    }

    /// Asserts a non-zero exit and exactly the `expected` checks FAILing; returns them.
    fn fails(&self, expected: &[&str]) -> Vec<Value> {
        let (code, checks) = self.run();
        let failed: Vec<&Value> = checks.iter().filter(|c| c["status"] == "FAIL").collect();
        let names: Vec<&str> = failed.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, expected, "{checks:#?}");
        assert_eq!(code, 1, "a FAIL exits 1");
        for c in &failed {
            assert!(
                !c["fix"].as_str().unwrap().is_empty(),
                "every FAIL has a fix: {c}"
            );
        }
        failed.into_iter().cloned().collect()
    }
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {checks:#?}"))
}

#[test]
fn a_healthy_host_passes() {
    let s = Setup::new();
    let (code, checks) = s.run();
    assert_eq!(code, 0, "{checks:#?}");
    for c in &checks {
        assert!(c["status"] == "OK" || c["status"] == "WARN", "{c}");
    }
    for name in [
        "cluster: reachable",
        "cluster: keyring",
        "cluster: pool rbd",
        "cluster: caps for pool rbd",
        "docker: plugin discovery",
        "mount root",
    ] {
        assert_eq!(check(&checks, name)["status"], "OK", "{checks:#?}");
    }
    // The text form says the same, one line per check.
    let out = Command::new(env!("CARGO_BIN_EXE_rbdvol"))
        .arg("doctor")
        .arg("--ceph-conf")
        .arg(&s.conf)
        .args(&s.args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("OK    cluster: reachable"), "{text}");
}

#[test]
fn unreachable_monitors_fail_the_connection() {
    let mut s = Setup::new();
    let conf = std::fs::read_to_string(&s.conf).unwrap();
    let dead: String = conf
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("mon host") || l.trim_start().starts_with("mon_host") {
                "mon host = v2:127.0.0.1:1".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = s.path("dead.conf");
    std::fs::write(&path, dead).unwrap();
    s.conf = path;
    let failed = s.fails(&["cluster: reachable"]);
    assert!(failed[0]["fix"].as_str().unwrap().contains("monitors"));
}

#[test]
fn a_missing_pool_fails_that_pool() {
    let s = Setup::new().arg("--pool", "doctor-no-such-pool");
    let failed = s.fails(&["cluster: pool doctor-no-such-pool"]);
    assert!(failed[0]["detail"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
}

#[test]
fn a_pool_without_the_rbd_application_fails() {
    let pool = format!("doctor-noapp-{}", std::process::id());
    let (ok, out) = ceph(&["osd", "pool", "create", &pool, "8"]);
    assert!(ok, "{out}");
    let s = Setup::new().arg("--pool", &pool);
    let result = std::panic::catch_unwind(|| {
        let failed = s.fails(&[&format!("cluster: pool {pool}")]);
        assert_eq!(failed[0]["fix"], format!("rbd pool init {pool}"));
    });
    ceph(&["config", "set", "mon", "mon_allow_pool_delete", "true"]);
    ceph(&[
        "osd",
        "pool",
        "rm",
        &pool,
        &pool,
        "--yes-i-really-really-mean-it",
    ]);
    result.unwrap();
}

fn keyring_of(conf: &Path) -> PathBuf {
    let text = std::fs::read_to_string(conf).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("keyring"))
        .expect("the test ceph.conf names its keyring");
    PathBuf::from(line.split_once('=').unwrap().1.trim())
}

#[test]
fn a_world_readable_keyring_fails() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let copy = s.path("keyring");
    std::fs::copy(keyring_of(&s.conf), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = s.arg("--keyring", &copy);
    let failed = s.fails(&["cluster: keyring"]);
    assert_eq!(failed[0]["fix"], format!("chmod 600 {}", copy.display()));
    let key = std::fs::read_to_string(&copy).unwrap();
    let secret = key
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .unwrap();
    assert!(
        !failed[0].to_string().contains(secret),
        "the key is never shown"
    );
}

#[test]
fn a_missing_keyring_fails_the_keyring_and_the_connection() {
    let s = Setup::new();
    let missing = s.path("no-keyring");
    let s = s.arg("--keyring", &missing);
    let failed = s.fails(&["cluster: keyring", "cluster: reachable"]);
    assert!(failed[0]["detail"]
        .as_str()
        .unwrap()
        .contains("cannot read keyring"));
}

#[test]
fn a_symlinked_or_world_writable_mount_root_fails() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let real = s.path("real-mounts");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, s.path("link")).unwrap();
    let link = s.path("link");
    let failed = s.arg("--mount-root", &link).fails(&["mount root"]);
    assert!(failed[0]["detail"].as_str().unwrap().contains("symlink"));

    let s = Setup::new();
    let open = s.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let failed = s.arg("--mount-root", &open).fails(&["mount root"]);
    assert!(failed[0]["fix"].as_str().unwrap().starts_with("chmod 700"));
}

#[test]
fn a_dead_plugin_socket_fails_discovery_and_stale_ones_warn() {
    let s = Setup::new();
    // Another plugin that died without removing its socket: a WARN with its cost.
    drop(UnixListener::bind(s.path("plugins/gone.sock")).unwrap());
    let (code, checks) = s.run();
    assert_eq!(code, 0, "{checks:#?}");
    let stale = check(&checks, "docker: stale plugins");
    assert_eq!(stale["status"], "WARN");
    assert!(stale["detail"].as_str().unwrap().contains("gone.sock"));
    assert!(stale["detail"].as_str().unwrap().contains("15 s"));

    // rbdvol's own socket with nothing listening: dockerd's calls fail.
    let dead = s.path("plugins/dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    let failed = s
        .arg("--socket", &dead)
        .fails(&["docker: plugin discovery"]);
    assert!(failed[0]["detail"]
        .as_str()
        .unwrap()
        .contains("nothing listens"));
}
