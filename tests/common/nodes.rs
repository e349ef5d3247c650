//! Private Docker nodes (`DockerNode`): the machine's dockerd binary run by
//! integration/docker-node in its own network namespace (an address on the test
//! network's bridge, which the throwaway cluster listens on), its own mount namespace
//! (private /run, /run/docker/plugins and /etc/docker) and its own cgroup, with every
//! file under one directory. Tests drive it with the docker CLI through its socket and
//! never touch the machine's own engine, which caches every legacy plugin it ever
//! activated for the rest of its life.
//!
//! The node's mount namespace is a slave of the machine's and its directory is a shared
//! mount, so a plugin started by the test on the machine (in the node's network
//! namespace) mounts volumes below `work()` and the node's dockerd sees them. Dropping
//! the node SIGKILLs every process in its cgroup by pid and removes its namespace,
//! cgroups and directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where nodes keep their files: not /tmp, which a node's dockerd must not shadow.
const NODES_ROOT: &str = "/var/lib/rbdvol-nodes";
/// The base image's tag inside every node (integration/docker-base-image).
pub const BASE: &str = "rbdvol-test-base:1";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("integration")
        .join(name)
}

pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} stdout={:?} stderr={:?}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// Writes past the test harness's output capture, so a skip is never silent.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Why no private node can be started here, if none can (asked once per test binary).
pub fn nodes_missing() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        let runs = |prog: &str, arg: &str| {
            Command::new(prog)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !runs("dockerd", "--version") {
            return Some("no Docker engine: `dockerd --version` fails (no dockerd binary)".into());
        }
        if !runs("docker", "--version") {
            return Some("no Docker engine: no docker CLI".into());
        }
        if !nix::unistd::Uid::effective().is_root() {
            return Some("private Docker nodes need root (namespaces, mounts, cgroups)".into());
        }
        if std::env::var_os("TESTNET_BRIDGE").is_none()
            || std::env::var_os("TESTNET_GATEWAY").is_none()
        {
            return Some(
                "no test network (TESTNET_BRIDGE/TESTNET_GATEWAY; integration/test makes one with integration/testnet)"
                    .into(),
            );
        }
        None
    })
    .as_deref()
}

/// The base image's root filesystem as a tarball, built once per machine.
fn base_tarball() -> &'static Path {
    static TAR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = TAR.get_or_init(|| {
        let out = Command::new("timeout")
            .args(["-k", "5", "900"])
            .arg(script("docker-base-image"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running docker-base-image: {e}"))?;
        if out.status.success() {
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    match r {
        Ok(p) => p,
        Err(e) => panic!("the base image's tarball cannot be built: {e}"),
    }
}

/// One address on the test network, held while a file exists (nodes of every test
/// binary and thread on this network draw from X.100-X.250). The file names the node
/// ("ID DIR"), so that `integration/docker-node sweep` can tear down the nodes of a
/// killed test process.
struct Claim(PathBuf);

impl Claim {
    fn take(gateway: &str, id: &str, node_dir: &Path) -> (Claim, String) {
        let subnet = gateway.rsplit_once('.').unwrap().0;
        let dir = PathBuf::from(format!("/run/rbdvol-testnet/nodes-{gateway}"));
        std::fs::create_dir_all(&dir).unwrap();
        // Round robin from where the last claim on this network left off: an address
        // released a moment ago is not reused at once. (A node that reused the address
        // of one just torn down sometimes could not reach the cluster for ~25 s.)
        let next = dir.join(".next");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .unwrap();
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        let start: u32 = std::fs::read_to_string(&next)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        for k in 0..151 {
            let n = 100 + (start + k) % 151;
            let f = dir.join(n.to_string());
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&f);
            if let Ok(mut file) = made {
                writeln!(file, "{id} {}", node_dir.display()).unwrap();
                std::fs::write(&next, (n - 99).to_string()).unwrap();
                return (Claim(f), format!("{subnet}.{n}"));
            }
        }
        panic!(
            "no free node address on {subnet}.0/24 ({} is full)",
            dir.display()
        );
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // The directory stays (removing it would race another node's claim);
        // integration/test's `docker-node sweep` removes it with the test network.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A private dockerd, torn down when dropped.
pub struct DockerNode {
    pub name: String,
    pub id: String,
    pub addr: String,
    /// /run/netns/rbdvol-node-ID: plugins for this node run in it.
    pub netns: String,
    dir: PathBuf,
    dockerd: Option<Child>,
    _claim: Claim,
}

impl DockerNode {
    /// Starts a node and imports the base image into it. Panics with the node's log
    /// when it does not come up; call `nodes_missing()` first.
    pub fn start(name: &str) -> DockerNode {
        static N: AtomicUsize = AtomicUsize::new(0);
        let started = Instant::now();
        let id = format!(
            "{:05}{:02}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed) % 100
        );
        let gateway = std::env::var("TESTNET_GATEWAY").unwrap();
        let bridge = std::env::var("TESTNET_BRIDGE").unwrap();
        let dir = PathBuf::from(NODES_ROOT).join(&id);
        let (claim, addr) = Claim::take(&gateway, &id, &dir);
        std::fs::create_dir_all(NODES_ROOT).unwrap();
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut node = DockerNode {
            name: name.to_string(),
            id: id.clone(),
            addr: addr.clone(),
            netns: format!("/run/netns/rbdvol-node-{id}"),
            dir: dir.clone(),
            dockerd: None,
            _claim: claim,
        };
        let up = Command::new("timeout")
            .args(["-k", "5", "60"])
            .arg(script("docker-node"))
            .args(["up", &id])
            .arg(&dir)
            .args([&bridge, &format!("{addr}/24")])
            .output()
            .unwrap();
        assert!(
            up.status.success(),
            "docker-node up {name}: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        node.dockerd = Some(
            Command::new(script("docker-node"))
                .args(["exec", &id])
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting docker-node exec"),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = node.docker_within(&["info", "--format", "{{.ServerVersion}}"], 10);
            if o.ok && !o.stdout.trim().is_empty() {
                break;
            }
            if let Ok(Some(st)) = node.dockerd.as_mut().unwrap().try_wait() {
                panic!("node {name}'s dockerd exited ({st}): {}", node.log());
            }
            assert!(
                Instant::now() < deadline,
                "node {name}'s dockerd did not answer in 60 s: {o}\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let o = node.docker_within(
            &[
                "import",
                "--change",
                "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "CMD [\"sh\"]",
                base_tarball().to_str().unwrap(),
                BASE,
            ],
            120,
        );
        assert!(o.ok, "importing the base image into node {name}: {o}");
        say(&format!(
            "docker node {name} ({addr}) up with the base image in {:.2}s",
            started.elapsed().as_secs_f64()
        ));
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `DOCKER_HOST` for this node.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Seen by the node's dockerd as /run/docker/plugins (`NAME.sock` is discovered).
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.join("plugins")
    }

    /// Seen by the node's dockerd as /etc/docker/plugins (`.spec` and `.json` files).
    pub fn spec_dir(&self) -> PathBuf {
        self.dir.join("etc-docker/plugins")
    }

    /// Where plugins keep their state and mount roots: mounts made here on the machine
    /// reach the node's dockerd.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// The node's `--data-root`.
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The node's `--exec-root`.
    pub fn exec_root(&self) -> PathBuf {
        self.dir.join("exec")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Runs the docker CLI against this node, killed after `secs` seconds.
    pub fn docker_within(&self, args: &[&str], secs: u32) -> Out {
        let out = Command::new("timeout")
            .args(["-k", "5", &secs.to_string(), "docker"])
            .args(args)
            .env("DOCKER_HOST", self.docker_host())
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null())
            .output()
            .expect("running docker");
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// With a deadline long enough for a Mount waiting on another host's lock.
    pub fn docker(&self, args: &[&str]) -> Out {
        self.docker_within(args, 180)
    }

    /// Asserts success; returns stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(o.ok, "docker {} on node {}: {o}", args.join(" "), self.name);
        o.stdout
    }

    /// Puts a process started for this node (a plugin) into the node's cgroup, so that
    /// teardown finds it and everything it forks.
    pub fn adopt(&self, pid: u32) {
        let st = Command::new(script("docker-node"))
            .args(["join", &self.id, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "docker-node join {pid}");
    }

    /// Runs `integration/docker-node ARGS...` for this node (ID first), 60 s deadline.
    fn node_script(&self, cmd: &str, args: &[&str]) {
        let out = Command::new("timeout")
            .args(["-k", "5", "60"])
            .arg(script("docker-node"))
            .args([cmd, &self.id])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker-node {cmd} {} {args:?}: {}",
            self.id,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILLs every process of the node (dockerd, containerd, shims, containers and
    /// the plugins it adopted), as if the machine lost power; its files stay.
    pub fn kill(&mut self) {
        self.node_script("kill", &[]);
        if let Some(mut child) = self.dockerd.take() {
            let _ = child.wait();
        }
    }

    /// Gives the node a second address, on hub network `hub` (see tests/common/swarm.rs).
    pub fn link(&self, hub: &str, addr_prefix: &str) {
        self.node_script("link", &[hub, addr_prefix]);
    }

    /// Cuts the node off from the test network and hub `hub` (`up = false`), or
    /// reconnects it; everything on the node keeps running.
    pub fn cut(&self, up: bool, hub: &str) {
        self.node_script("cut", &[if up { "up" } else { "down" }, hub]);
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the node's dockerd alone: its containers
    /// keep running, but its engine (and a Swarm agent in it) does nothing.
    pub fn freeze_engine(&self, frozen: bool) {
        let pid = self.dockerd.as_ref().expect("the node's dockerd").id();
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    }

    /// Mount points at or below `dir` as the node's dockerd sees them.
    pub fn mounts_under(&self, dir: &Path) -> Vec<String> {
        let pid = self.dockerd.as_ref().map(Child::id).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(|s| s.replace("\\040", " ")))
            .filter(|t| Path::new(t).starts_with(dir))
            .collect()
    }
}

impl Drop for DockerNode {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("DOCKER_E2E_SHOW_LOGS").is_some() {
            say(&format!(
                "---- dockerd log of node {} ({}):\n{}",
                self.name,
                self.addr,
                self.log()
            ));
        }
        let down = Command::new("timeout")
            .args(["-k", "5", "120"])
            .arg(script("docker-node"))
            .args(["down", &self.id])
            .arg(&self.dir)
            .output();
        if let Some(mut child) = self.dockerd.take() {
            let _ = child.wait();
        }
        match down {
            Ok(o) if o.status.success() => {}
            o => say(&format!("docker node {}: teardown: {o:?}", self.name)),
        }
        // Never delete recursively through a mount: leave the directory then.
        let mounts = crate::common::host::mounts_under(&self.dir);
        if mounts.is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            say(&format!(
                "docker node {}: mounts remain, leaving {}: {mounts:?}",
                self.name,
                self.dir.display()
            ));
        }
    }
}
