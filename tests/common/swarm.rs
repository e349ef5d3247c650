//! A Docker Swarm of private nodes (`Swarm`): one manager and workers, each a
//! `DockerNode` running its own `rbdvol serve` (driver name `rbdvol` on every node, as
//! an operator installs it), joined over a hub network of their own (bridged traffic
//! between nodes on the test network's bridge meets the machine's FORWARD policy; see
//! integration/docker-node). The test network still carries the Ceph traffic, so
//! cutting a node off (`cut`) takes away both its cluster and its Swarm.
//!
//! Services run an fsync-acknowledged writer (`WRITER`) that appends numbered records
//! to /data/log on the rbdvol volume and, only once a record is on stable storage,
//! appends its number to a file on the machine (`acks`), one file per task. What was
//! acknowledged is therefore known even for a task whose node was killed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::e2e::{say, DockerNode, Plugin, BASE};

/// The writer each service task runs (busybox sh). `W` names the task
/// (`<node hostname>.<task id>`). It continues the numbering from the volume's last
/// record, as a stateful service resumes from its data. A record is acknowledged
/// (its number appended to /acks/$W) only after `dd conv=fsync` succeeded; a failed
/// write is logged as `fail N` and retried. It stops at once when Swarm stops it.
pub const WRITER: &str = r#"trap 'exit 0' TERM
log=/data/log; ack=/acks/$W
n=$(tail -n 1 $log 2>/dev/null | cut -d' ' -f1); n=${n:-0}
echo "start $n" >> $ack
while :; do
  m=$((n+1))
  if printf '%s %s\n' $m $W | dd of=$log oflag=append conv=notrunc,fsync 2>/dev/null; then
    n=$m; echo $n >> $ack
  else
    echo "fail $m" >> $ack; sleep 0.2
  fi
  sleep 0.05
done"#;

/// Swarm's own settings, or the ones docs/docker-nodes-on-one-machine.md measured as
/// fastest: a 1 s dispatcher heartbeat (set at init) and services restarted without
/// delay and stopped with a 1 s grace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tuning {
    Defaults,
    Tuned,
}

/// What one task acknowledged, read from its file on the machine.
#[derive(Debug, Default, Clone)]
pub struct Acks {
    pub acked: Vec<u64>,
    pub fails: usize,
}

pub struct Swarm {
    pub tuning: Tuning,
    pub services: Vec<String>,
    /// Volumes the services made (removed at the end, through a live node).
    pub volumes: Vec<String>,
    /// The plugins, in node order (dropped before the nodes).
    pub plugins: Vec<Plugin>,
    /// Manager first.
    pub nodes: Vec<DockerNode>,
    /// Nodes killed (their processes are gone).
    pub dead: Vec<bool>,
    hub: Hub,
}

impl Swarm {
    /// One manager and `workers` workers, each with rbdvol (activated before joining:
    /// Swarm places a task only on nodes that advertise its volume driver). The plugins
    /// get `env` (e.g. lock settings).
    pub fn start(key: &str, workers: usize, tuning: Tuning, env: &[(&str, &str)]) -> Swarm {
        let started = Instant::now();
        let hub = Hub::new();
        let mut s = Swarm {
            tuning,
            services: Vec::new(),
            volumes: Vec::new(),
            plugins: Vec::new(),
            nodes: Vec::new(),
            dead: Vec::new(),
            hub,
        };
        for i in 0..=workers {
            let node = DockerNode::start(&format!("{key}-{}", if i == 0 { "m" } else { "w" }));
            node.link(&s.hub.name, &format!("{}/24", hub_addr(&node)));
            let plugin = Plugin::start(&node, "rbdvol", &format!("host-{}", node.id), true, env);
            node.docker_ok(&["volume", "ls"]);
            s.plugins.push(plugin);
            s.nodes.push(node);
            s.dead.push(false);
        }
        let m = &s.nodes[0];
        let maddr = hub_addr(m);
        let mut init = vec![
            "swarm".to_string(),
            "init".into(),
            "--advertise-addr".into(),
            maddr.clone(),
            "--listen-addr".into(),
            format!("{maddr}:2377"),
            // Overlay networks stay out of the machine's and the test network's ranges.
            "--default-addr-pool".into(),
            "10.240.0.0/16".into(),
        ];
        if tuning == Tuning::Tuned {
            init.extend(["--dispatcher-heartbeat".into(), "1s".into()]);
        }
        m.docker_ok(&init.iter().map(String::as_str).collect::<Vec<_>>());
        let token = m.docker_ok(&["swarm", "join-token", "-q", "worker"]);
        for w in &s.nodes[1..] {
            let a = hub_addr(w);
            w.docker_ok(&[
                "swarm",
                "join",
                "--token",
                token.trim(),
                "--advertise-addr",
                &a,
                "--listen-addr",
                &format!("{a}:2377"),
                &format!("{maddr}:2377"),
            ]);
        }
        say(&format!(
            "swarm {key}: {} nodes up in {:.1}s",
            s.nodes.len(),
            started.elapsed().as_secs_f64()
        ));
        s
    }

    pub fn manager(&self) -> &DockerNode {
        &self.nodes[0]
    }

    /// The node whose hostname (its id) is `host`.
    pub fn index_of(&self, host: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == host)
            .unwrap_or_else(|| panic!("no node {host}"))
    }

    /// Where every task writes its acknowledgements: a directory on the machine (below
    /// the manager's, so it goes with it), bound into each task at /acks.
    pub fn acks_dir(&self) -> PathBuf {
        let d = self.manager().work().join("acks");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `docker service create` of the writer with an rbdvol volume, on the manager.
    /// `extra`: more flags (constraints, `--mode global`); `source` may hold templates.
    pub fn create_writer(&mut self, name: &str, source: &str, extra: &[&str], cmd: &str) {
        let acks = self.acks_dir();
        let mut args: Vec<String> = ["service", "create", "-d", "--name", name]
            .map(String::from)
            .into();
        // No registry: the image was imported into every node.
        args.push("--no-resolve-image".into());
        if self.tuning == Tuning::Tuned {
            args.extend(["--restart-delay", "0s", "--stop-grace-period", "1s"].map(String::from));
        }
        args.extend(["--env".into(), "W={{.Node.Hostname}}.{{.Task.ID}}".into()]);
        args.extend([
            "--mount".into(),
            format!("type=volume,source={source},destination=/data,volume-driver=rbdvol,volume-opt=size=64M"),
            "--mount".into(),
            format!("type=bind,source={},destination=/acks", acks.display()),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([BASE.into(), "sh".into(), "-c".into(), cmd.into()]);
        self.services.push(name.to_string());
        self.manager()
            .docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Every task's acknowledgements so far, by task (`<hostname>.<task id>`).
    pub fn acks(&self) -> BTreeMap<String, Acks> {
        let mut all = BTreeMap::new();
        for e in std::fs::read_dir(self.acks_dir()).unwrap().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let mut a = Acks::default();
            // Only whole lines: the writer may be appending right now.
            for l in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                let l = l.trim();
                if l.starts_with("fail ") {
                    a.fails += 1;
                } else if let Ok(n) = l.parse() {
                    a.acked.push(n);
                }
            }
            all.insert(e.file_name().to_string_lossy().into_owned(), a);
        }
        all
    }

    /// Waits (polling every 20 ms) until some task other than `old` has acknowledged
    /// `n` records; returns that task.
    pub fn await_writer(&self, old: Option<&String>, n: usize, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let acks = self.acks();
            if let Some((t, _)) = acks
                .iter()
                .find(|(t, a)| Some(*t) != old && a.acked.len() >= n)
            {
                return t.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no new task acknowledged {n} writes within {within:?}: {acks:?}\n{}",
                self.service_ps()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until task `t` has acknowledged `n` records in all.
    pub fn await_acks(&self, t: &str, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acks().get(t).map_or(0, |a| a.acked.len()) < n {
            assert!(Instant::now() < deadline, "{t} did not reach {n} acks");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn service_ps(&self) -> String {
        let mut out = String::new();
        for s in &self.services {
            let o = self
                .manager()
                .docker_within(&["service", "ps", "--no-trunc", s], 30);
            out += &format!("{}{}", o.stdout, o.stderr);
        }
        out
    }

    /// The logs of the exporters (userspace mapper) node `i`'s plugin runs now, with
    /// its own log: a takeover is logged by the exporter that takes the lock.
    pub fn plugin_logs(&self, i: usize) -> String {
        let p = &self.plugins[i];
        let mut all = p.log();
        let exports = p.root().join("state/exports");
        for pool in std::fs::read_dir(exports).into_iter().flatten().flatten() {
            for vol in std::fs::read_dir(pool.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                all +=
                    &std::fs::read_to_string(vol.path().join("exporter.log")).unwrap_or_default();
            }
        }
        all
    }

    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        self.dead[i] = true;
    }

    pub fn cut(&self, i: usize, up: bool) {
        self.nodes[i].cut(up, &self.hub.name);
    }

    /// Removes a service and waits until no live node runs a container of it any more
    /// (their volumes are then unmounted).
    pub fn remove_service(&mut self, name: &str) {
        self.services.retain(|s| s != name);
        let _ = self.manager().docker(&["service", "rm", name]);
        let deadline = Instant::now() + Duration::from_secs(90);
        for (n, dead) in self.nodes.iter().zip(&self.dead) {
            if *dead {
                continue;
            }
            let filter = format!("label=com.docker.swarm.service.name={name}");
            while !n
                .docker_within(&["ps", "-aq", "--filter", &filter], 30)
                .stdout
                .trim()
                .is_empty()
            {
                assert!(
                    Instant::now() < deadline,
                    "{name}'s tasks outlived its removal on {}",
                    n.name
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The volume's /data/log, read by a container on live node `i`.
    pub fn read_log(&self, i: usize, volume: &str) -> String {
        self.nodes[i].docker_ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &format!("{volume}:/data"),
            "--volume-driver",
            "rbdvol",
            BASE,
            "cat",
            "/data/log",
        ])
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        // (No node at all if the first one failed to start.)
        if self.dead.first() == Some(&false) {
            for s in std::mem::take(&mut self.services) {
                let _ = self.manager().docker_within(&["service", "rm", &s], 30);
            }
        }
        // Give Swarm a moment to stop the tasks (each Unmount releases a volume), then
        // remove the volumes through any live node (rbdvol trashes the image).
        let deadline = Instant::now() + Duration::from_secs(30);
        for (n, dead) in self.nodes.iter().zip(&self.dead) {
            while !*dead
                && Instant::now() < deadline
                && n.docker_within(&["ps", "-q"], 10).stdout.trim() != ""
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for v in std::mem::take(&mut self.volumes) {
            let removed = self
                .nodes
                .iter()
                .zip(&self.dead)
                .filter(|(_, d)| !**d)
                .any(|(n, _)| n.docker_within(&["volume", "rm", "-f", &v], 60).ok);
            if !removed {
                say(&format!("swarm: could not remove volume {v}"));
            }
        }
        // Then the plugins (each cleans its host), the nodes, and the hub.
        self.plugins.clear();
        self.nodes.clear();
    }
}

/// A node's address on the hub: the last byte of its test-network address.
pub fn hub_addr(node: &DockerNode) -> String {
    format!("10.232.0.{}", node.addr.rsplit('.').next().unwrap())
}

/// The hub network (integration/docker-node hub), claimed in the test network's node
/// claims so that `docker-node sweep` removes it if the test process dies.
struct Hub {
    name: String,
    claim: PathBuf,
}

impl Hub {
    fn new() -> Hub {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{:05}{:02}",
            std::process::id() % 100_000,
            50 + N.fetch_add(1, Ordering::Relaxed) % 50
        );
        let gateway = std::env::var("TESTNET_GATEWAY").unwrap();
        let dir = PathBuf::from(format!("/run/rbdvol-testnet/nodes-{gateway}"));
        std::fs::create_dir_all(&dir).unwrap();
        let claim = dir.join(format!("hub-{name}"));
        std::fs::write(&claim, format!("hub {name}\n")).unwrap();
        let st = hub_script(&["up", &name]);
        assert!(st, "docker-node hub up {name}");
        Hub { name, claim }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        hub_script(&["down", &self.name]);
        let _ = std::fs::remove_file(&self.claim);
    }
}

fn hub_script(args: &[&str]) -> bool {
    Command::new("timeout")
        .args(["-k", "5", "60"])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("integration/docker-node"))
        .arg("hub")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}
