//! QEMU guests running Debian's kernel (which has rbd.ko and nbd.ko), each an rbdvol
//! host: the guest mounts the host's root read-only over 9p and chroots into it, so
//! it runs this tree's freshly built binary and the host's ceph tools, and it has a
//! writable 9p share of its own. `integration/guest` prepares the kernel, initramfs,
//! network (taps on a private bridge) and cluster, and passes them in `RBDVOL_GUEST_*`.
//!
//! Commands reach the guest through its share: the test drops `cmd/N.sh`, the guest's
//! agent runs it and leaves `out/N.out` and `out/N.rc`. Plugin requests are such
//! commands too (curl on the daemon's unix socket inside the guest, as dockerd would).
//! A guest's serial console goes to the logs directory and stays there if the test
//! fails; every failure names it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::ceph_conf;

/// What `integration/guest` prepared.
#[derive(Clone, Debug)]
pub struct GuestEnv {
    pub kernel: PathBuf,
    pub release: String,
    pub initrd: PathBuf,
    pub modules: PathBuf,
    /// The first three octets of the guests' /24 (the bridge is .1).
    pub net: String,
    pub taps: Vec<String>,
    pub dir: PathBuf,
    pub logs: PathBuf,
}

impl GuestEnv {
    /// None when the tier was not prepared (run it with `integration/guest`).
    pub fn from_env() -> Option<GuestEnv> {
        let v = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
        Some(GuestEnv {
            kernel: v("RBDVOL_GUEST_KERNEL")?.into(),
            release: v("RBDVOL_GUEST_RELEASE")?,
            initrd: v("RBDVOL_GUEST_INITRD")?.into(),
            modules: v("RBDVOL_GUEST_MODULES")?.into(),
            net: v("RBDVOL_GUEST_NET")?,
            taps: v("RBDVOL_GUEST_TAPS")?
                .split(',')
                .map(str::to_string)
                .collect(),
            dir: v("RBDVOL_GUEST_DIR")?.into(),
            logs: v("RBDVOL_GUEST_LOGS")?.into(),
        })
    }

    pub fn gateway(&self) -> String {
        format!("{}.1", self.net)
    }
}

/// The guest side: configure the network, load the modules the host cannot, then
/// run whatever the test drops into the share, each command in the background.
const AGENT: &str = r#"#!/bin/sh
S=/run/share
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. $S/guest.env
# The guest kernel's modules are in the unpacked package on the host (KDIR), not in
# the host's /lib/modules; the initramfs loaded only what reaches the host's root.
for m in $MODULES; do modprobe -d $KDIR $m || echo "GUEST: modprobe $m failed"; done
ip link set lo up
ip addr add $ADDR/24 dev eth0
ip link set eth0 up
mkdir -p $S/cmd $S/out
echo "GUEST: ready, kernel $(uname -r), $ADDR"
touch $S/ready
while :; do
    for f in $S/cmd/*.sh; do
        [ -e "$f" ] || continue
        id=${f##*/}; id=${id%.sh}
        mv "$f" $S/out/$id.sh
        ( sh $S/out/$id.sh >$S/out/$id.out 2>&1 </dev/null; echo $? >$S/out/$id.rc.tmp; mv $S/out/$id.rc.tmp $S/out/$id.rc ) &
    done
    sleep 0.1
done
"#;

/// Where the daemon inside a guest keeps its socket, state and mounts (tmpfs).
pub const SOCKET: &str = "/run/rbdvol/plugin.sock";

pub struct Guest {
    pub name: String,
    pub addr: String,
    pub share: PathBuf,
    pub serial: PathBuf,
    env: GuestEnv,
    index: usize,
    modules: String,
    qemu: Option<Child>,
    seq: AtomicU32,
    boots: u32,
}

impl Guest {
    /// Boots guest `index` (0-based: its tap and address), with the kernel modules
    /// `modules` loaded (e.g. "rbd ext4 xfs"), and waits for its agent.
    pub fn boot(env: &GuestEnv, index: usize, modules: &str) -> Guest {
        let name = format!("guest{}", index + 1);
        let mut g = Guest {
            addr: format!("{}.{}", env.net, 11 + index),
            share: env.dir.join(&name).join("share"),
            serial: PathBuf::new(),
            name,
            env: env.clone(),
            index,
            modules: modules.to_string(),
            qemu: None,
            seq: AtomicU32::new(0),
            boots: 0,
        };
        g.start();
        g
    }

    fn start(&mut self) {
        self.boots += 1;
        let dir = self.env.dir.join(&self.name);
        let _ = std::fs::remove_dir_all(&self.share);
        std::fs::create_dir_all(self.share.join("ceph")).unwrap();
        std::fs::create_dir_all(&self.env.logs).unwrap();
        // The cluster's conf with the keyring where the guest sees it.
        let conf = std::fs::read_to_string(ceph_conf()).unwrap();
        let mut keyring = None;
        let mut out = String::new();
        for line in conf.lines() {
            let l = line.trim();
            if let Some(k) = l.strip_prefix("keyring = ") {
                keyring = Some(k.to_string());
                out.push_str("keyring = /run/share/ceph/keyring\n");
            } else if l.starts_with("run dir = ") {
                // The cluster's directory is not in the guest (its /tmp is its own);
                // rbd-nbd aborts when it cannot make its run dir.
                out.push_str("run dir = /run/ceph\ncrash dir = /run/ceph/crash\n");
            } else if l.starts_with("crash dir = ") {
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        std::fs::write(self.share.join("ceph/ceph.conf"), out).unwrap();
        std::fs::copy(
            keyring.expect("keyring in the cluster's conf"),
            self.share.join("ceph/keyring"),
        )
        .unwrap();
        std::fs::write(self.share.join("agent.sh"), AGENT).unwrap();
        std::fs::write(
            self.share.join("guest.env"),
            format!(
                "ADDR={}\nGATEWAY={}\nMODULES='{}'\nKDIR={}\n",
                self.addr,
                self.env.gateway(),
                self.modules,
                self.env
                    .modules
                    .parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .display()
            ),
        )
        .unwrap();
        self.serial = self
            .env
            .logs
            .join(format!("{}-boot{}.serial.log", self.name, self.boots));
        let pidfile = dir.join("qemu.pid");
        let child = Command::new("nice")
            .args(["-n", "10", "qemu-system-x86_64"])
            .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "1024"])
            .args(["-smp", "2", "-display", "none", "-monitor", "none"])
            .args(["-nodefaults", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", self.serial.display()))
            .args(["-bios", "/usr/share/qemu/qboot.rom", "-kernel"])
            .arg(&self.env.kernel)
            .arg("-initrd")
            .arg(&self.env.initrd)
            .arg("-append")
            .arg("console=ttyS0 panic=-1 loglevel=4")
            .arg("-virtfs")
            .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=share,security_model=none,multidevs=remap",
                self.share.display()
            ))
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                self.env.taps[self.index]
            ))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac=52:54:00:15:00:{:02x}",
                self.index + 1
            ))
            .arg("-pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.env.logs.join(format!("{}.qemu.log", self.name)))
                    .unwrap(),
            )
            .spawn()
            .expect("starting qemu-system-x86_64");
        self.qemu = Some(child);
        let started = Instant::now();
        while !self.share.join("ready").exists() {
            if let Some(st) = self.qemu.as_mut().unwrap().try_wait().unwrap() {
                self.fail(&format!("QEMU exited ({st}) before the guest was ready"));
            }
            if started.elapsed() > Duration::from_secs(180) {
                self.fail("the guest was not ready within 180 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "{}: booted in {:.1} s ({})",
            self.name,
            started.elapsed().as_secs_f64(),
            self.addr
        );
    }

    /// Boots this guest again (after it was killed).
    pub fn reboot(&mut self) {
        self.kill();
        self.start();
    }

    /// Panics with `msg`, the serial console's tail and where the whole log is kept.
    pub fn fail(&self, msg: &str) -> ! {
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let tail: Vec<&str> = serial.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{}: {msg}\n--- daemon log (tail) ---\n{}\n--- serial console (tail; whole log kept at {}) ---\n{}",
            self.name,
            tail_of(&self.daemon_log(), 40),
            self.serial.display(),
            tail.join("\n")
        );
    }

    /// Runs a shell script in the guest; (exit code, output). None if it did not end
    /// within `deadline`.
    pub fn try_sh(&self, script: &str, deadline: Duration) -> Option<(i32, String)> {
        let id = format!("{:06}", self.seq.fetch_add(1, Ordering::Relaxed));
        let cmd = self.share.join("cmd");
        std::fs::write(cmd.join(format!("{id}.tmp")), script).unwrap();
        std::fs::rename(cmd.join(format!("{id}.tmp")), cmd.join(format!("{id}.sh"))).unwrap();
        let rc = self.share.join("out").join(format!("{id}.rc"));
        let started = Instant::now();
        while started.elapsed() < deadline {
            if let Ok(code) = std::fs::read_to_string(&rc) {
                let out = std::fs::read_to_string(self.share.join("out").join(format!("{id}.out")))
                    .unwrap_or_default();
                return Some((code.trim().parse().unwrap_or(-1), out));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Runs a script that must succeed within 3 minutes; returns its output.
    pub fn sh(&self, script: &str) -> String {
        match self.sh_rc(script) {
            (0, out) => out,
            (rc, out) => self.fail(&format!("`{script}` failed ({rc}): {out}")),
        }
    }

    /// Runs a script within 3 minutes; (exit code, output).
    pub fn sh_rc(&self, script: &str) -> (i32, String) {
        self.try_sh(script, Duration::from_secs(180))
            .unwrap_or_else(|| self.fail(&format!("`{script}` did not finish within 180 s")))
    }

    /// Starts `rbdvol serve` in the guest (host id = the guest's name) with
    /// `map.mapper = mapper` ("auto": not set) and further `RBDVOL_*` settings.
    pub fn start_daemon(&self, mapper: &str, env: &[(&str, &str)]) {
        let mut vars = String::new();
        for (k, v) in env {
            vars.push_str(&format!("{k}='{v}' "));
        }
        let mapper = if mapper == "auto" {
            String::new()
        } else {
            format!("--mapper {mapper}")
        };
        let script = format!(
            r#"mkdir -p /run/rbdvol/state /run/rbdvol/mounts
: >/run/rbdvol/rbdvol.toml
# A killed daemon's socket stays behind: wait for the new one, not for that.
rm -f {sock}
echo "=== start $(date -u +%T) mapper={mapper_arg}" >>/run/share/daemon.log
env {vars} RUST_BACKTRACE=1 setsid {bin} serve --socket {sock} --ceph-conf /run/share/ceph/ceph.conf \
  --host-id {name} --state-dir /run/rbdvol/state --mount-root /run/rbdvol/mounts \
  --log-level rbdvol=debug,info --pool rbd --pool fast --config /run/rbdvol/rbdvol.toml {mapper} \
  >>/run/share/daemon.log 2>&1 </dev/null &
echo $! >/run/share/daemon.pid
for i in $(seq 300); do [ -S {sock} ] && exit 0; kill -0 $! 2>/dev/null || exit 1; sleep 0.1; done
exit 1
"#,
            mapper_arg = if mapper.is_empty() { "auto" } else { &mapper },
            bin = env!("CARGO_BIN_EXE_rbdvol"),
            sock = SOCKET,
            name = self.name,
        );
        self.sh(&script);
        self.ok("Plugin.Activate", "");
    }

    /// Sends `signal` to the guest's daemon and waits for it to exit.
    pub fn kill_daemon(&self, signal: &str) {
        self.sh(&format!(
            "p=$(cat /run/share/daemon.pid); kill -{signal} $p; for i in $(seq 300); do kill -0 $p 2>/dev/null || exit 0; sleep 0.1; done; exit 1"
        ));
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.share.join("daemon.log")).unwrap_or_default()
    }

    /// One plugin request, as dockerd shapes it, on the daemon's socket in the guest.
    pub fn call(&self, endpoint: &str, body: &str) -> Value {
        let id = self.seq.fetch_add(1, Ordering::Relaxed);
        let req = self.share.join(format!("req-{id}.json"));
        std::fs::write(&req, format!("{body}\n")).unwrap();
        let (rc, out) = self.sh_rc(&format!(
            "curl -sS --max-time 150 --unix-socket {SOCKET} -H 'Accept: application/vnd.docker.plugins.v1.2+json' --data-binary @/run/share/req-{id}.json http://plugin/{endpoint}"
        ));
        if rc != 0 {
            self.fail(&format!("{endpoint} {body}: curl failed ({rc}): {out}"));
        }
        serde_json::from_str(&out)
            .unwrap_or_else(|e| self.fail(&format!("{endpoint}: not JSON ({e}): {out}")))
    }

    /// Asserts success (no Err) and returns the response.
    pub fn ok(&self, endpoint: &str, body: &str) -> Value {
        let v = self.call(endpoint, body);
        if v.get("Err").is_some_and(|e| e.as_str() != Some("")) {
            self.fail(&format!("{endpoint} {body} failed: {v}"));
        }
        v
    }

    /// The Err of a request that must fail.
    pub fn err(&self, endpoint: &str, body: &str) -> String {
        let v = self.call(endpoint, body);
        match v["Err"].as_str() {
            Some(e) if !e.is_empty() => e.to_string(),
            _ => self.fail(&format!("{endpoint} {body}: expected an Err, got {v}")),
        }
    }

    pub fn create(&self, name: &str, opts: &str) {
        self.ok(
            "VolumeDriver.Create",
            &format!("{{\"Name\":\"{name}\",\"Opts\":{opts}}}"),
        );
    }

    pub fn mount_body(name: &str, id: &str) -> String {
        format!(r#"{{"Name":"{name}","ID":"{id}"}}"#)
    }

    /// Mount as dockerd does; returns the Mountpoint.
    pub fn mount(&self, name: &str, id: &str) -> String {
        let v = self.ok("VolumeDriver.Mount", &Self::mount_body(name, id));
        v["Mountpoint"].as_str().expect("Mountpoint").to_string()
    }

    pub fn unmount(&self, name: &str, id: &str) {
        self.ok("VolumeDriver.Unmount", &Self::mount_body(name, id));
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.qemu {
            let st = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success(), "kill {sig} qemu");
        }
    }

    /// Freezes the whole guest (QEMU stopped), as a host that stalls.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Kills QEMU (by pid): the guest dies without a word to anyone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The kernel's mappings in the guest: krbd devices and connected nbd devices.
    pub fn kernel_mappings(&self) -> String {
        self.sh("for d in /sys/bus/rbd/devices/*; do [ -e $d/name ] && echo rbd $(cat $d/pool)/$(cat $d/name); done; for p in /sys/block/nbd*/pid; do [ -e $p ] && echo nbd $p; done; true")
    }

    /// Mounts below the daemon's mount root in the guest.
    pub fn mounts(&self) -> String {
        self.sh("grep ' /run/rbdvol/mounts' /proc/mounts || true")
    }
}

fn tail_of(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let keep = self.env.logs.join(format!("{}.daemon.log", self.name));
            let _ = std::fs::copy(self.share.join("daemon.log"), &keep);
            eprintln!(
                "{}: serial console kept at {}, daemon log at {}",
                self.name,
                self.serial.display(),
                keep.display()
            );
        } else {
            for b in 1..=self.boots {
                let _ = std::fs::remove_file(
                    self.env
                        .logs
                        .join(format!("{}-boot{b}.serial.log", self.name)),
                );
            }
            let _ = std::fs::remove_file(self.env.logs.join(format!("{}.qemu.log", self.name)));
        }
    }
}
