//! The daemon's side of the userspace mapper: starting one detached `rbdvol export`
//! process per image, waiting until it serves, checking on it, and stopping it by pid.
//! Exporters run in their own session so a daemon restart (or a signal to its process
//! group) never tears a mounted volume down.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::loopdev;
use super::state::{ExportState, IoStats, Phase};
use crate::config::CephSettings;
use crate::error::{Error, Result};
use crate::host::mapper::{Health, MapRequest};

/// A running exporter.
#[derive(Debug, Clone)]
pub(super) struct Started {
    pub pid: u32,
    /// The image, as a file on the exporter's FUSE mount.
    pub file: PathBuf,
}

/// Where and how this host's exporters run: the userspace mapper's settings.
#[derive(Debug, Clone)]
pub struct Exporters {
    /// The rbdvol binary (the exporter is a subcommand of it).
    pub exe: PathBuf,
    pub ceph: CephSettings,
    /// `<state_dir>/exports`: one directory per mapped image.
    pub dir: PathBuf,
    /// `lock.fence_expiry`, handed to every exporter as `--fence-expiry`: how long a
    /// previous owner it takes a volume from stays blocklisted.
    pub fence_expiry: Duration,
    /// `lock.liveness_timeout`, handed to every exporter as `--liveness-timeout`.
    pub liveness_timeout: Duration,
}

const STOP_GRACE: Duration = Duration::from_secs(20);
/// How often a start or stop checks on the exporter: it serves within ~50 ms, so a
/// coarse poll would be most of a re-Mount's time.
const POLL: Duration = Duration::from_millis(5);

impl Exporters {
    fn volume_dir(&self, req: &MapRequest) -> PathBuf {
        self.dir.join(&req.pool).join(&req.image)
    }

    fn fuse_dir(&self, req: &MapRequest) -> PathBuf {
        self.volume_dir(req).join("fuse")
    }

    pub(super) fn image_file(&self, req: &MapRequest) -> PathBuf {
        self.fuse_dir(req).join("image")
    }

    fn state_file(&self, req: &MapRequest) -> PathBuf {
        self.volume_dir(req).join("state.json")
    }

    pub(super) fn read_state(&self, req: &MapRequest) -> Option<ExportState> {
        ExportState::read(&self.state_file(req))
    }

    /// True if `pid` is a live (not zombie) exporter serving this image's state file,
    /// so a recycled pid is never signalled.
    fn is_ours(&self, req: &MapRequest, pid: u32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return false;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let state = self.state_file(req);
        cmdline.contains("export") && cmdline.contains(state.to_string_lossy().as_ref())
    }

    fn log_tail(&self, req: &MapRequest) -> String {
        let log =
            std::fs::read_to_string(self.volume_dir(req).join("exporter.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }

    /// Starts an exporter for the image (or adopts one already serving it) and waits
    /// until its file is usable.
    pub(super) async fn start(&self, req: &MapRequest) -> Result<Started> {
        if let Some(st) = self.read_state(req) {
            if let Some(pid) = st
                .pid
                .filter(|p| st.phase == Phase::Serving && self.is_ours(req, *p))
            {
                tracing::info!(pool = %req.pool, image = %req.image, pid, "adopting a running exporter");
                return Ok(Started {
                    pid,
                    file: self.image_file(req),
                });
            }
        }
        self.clear_leftovers(req).await;
        let vdir = self.volume_dir(req);
        let fuse = self.fuse_dir(req);
        std::fs::create_dir_all(&fuse)
            .map_err(|e| Error::io(format!("creating {}", fuse.display()), e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(vdir.join("exporter.log"))
            .map_err(|e| Error::io("opening the exporter log", e))?;
        let log2 = log.try_clone().map_err(|e| Error::io("exporter log", e))?;

        // setsid(1): a new session, so the exporter outlives the daemon and its signals.
        let mut cmd = tokio::process::Command::new("setsid");
        cmd.arg(&self.exe)
            .arg("export")
            .arg("--ceph-conf")
            .arg(&self.ceph.conf)
            .args([
                "--client-id",
                &self.ceph.client_id,
                "--cluster",
                &self.ceph.cluster,
            ])
            .args([
                "--pool",
                &req.pool,
                "--image",
                &req.image,
                "--host-id",
                &req.host_id,
            ])
            .arg("--mountpoint")
            .arg(&fuse)
            .arg("--state-file")
            .arg(self.state_file(req))
            .args(["--lock-wait", &req.lock_wait.as_secs().max(1).to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(k) = &self.ceph.keyring {
            cmd.arg("--keyring").arg(k);
        }
        if req.read_only {
            cmd.arg("--read-only");
        }
        cmd.args([
            "--fence-expiry",
            &humantime::format_duration(self.fence_expiry).to_string(),
            "--liveness-timeout",
            &self.liveness_timeout.as_secs().to_string(),
        ]);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io("starting the rbdvol exporter", e))?;
        let pid = child.id().unwrap_or_default();
        let deadline = Instant::now() + req.lock_wait + Duration::from_secs(20);
        loop {
            if let Some(st) = self.read_state(req) {
                match st.phase {
                    Phase::Serving => {
                        tracing::info!(pool = %req.pool, image = %req.image, pid, "exporter serving");
                        crate::metrics::lock_taken(
                            st.lock_wait_ms.unwrap_or(0) as f64 / 1000.0,
                            !st.took_over_from.is_empty(),
                        );
                        return Ok(Started {
                            pid,
                            file: self.image_file(req),
                        });
                    }
                    Phase::Failed | Phase::Fenced => {
                        let _ = child.wait().await;
                        let _ = std::fs::remove_file(self.state_file(req));
                        return Err(Error::Command {
                            program: format!("mapping {}/{}", req.pool, req.image),
                            detail: st.error.unwrap_or_else(|| self.log_tail(req)),
                        });
                    }
                    Phase::Unknown => {}
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Command {
                    program: format!("mapping {}/{}", req.pool, req.image),
                    detail: format!("the exporter exited ({status}): {}", self.log_tail(req)),
                });
            }
            if Instant::now() > deadline {
                self.stop(req, Some(pid)).await;
                return Err(Error::Timeout {
                    op: format!("mapping {}/{}", req.pool, req.image),
                    after: req.lock_wait + Duration::from_secs(20),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the exporter (SIGTERM, then SIGKILL after a grace period) and clears its
    /// FUSE mount and state file.
    pub(super) async fn stop(&self, req: &MapRequest, pid: Option<u32>) {
        let pid = pid.or_else(|| self.read_state(req).and_then(|s| s.pid));
        if let Some(pid) = pid.filter(|p| self.is_ours(req, *p)) {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
            let until = Instant::now() + STOP_GRACE;
            while self.is_ours(req, pid) && Instant::now() < until {
                tokio::time::sleep(POLL).await;
            }
            if self.is_ours(req, pid) {
                tracing::warn!(pid, image = %req.image, "exporter did not stop in time; killing it");
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        self.clear_leftovers(req).await;
    }

    /// A dead exporter leaves its FUSE mount ("transport endpoint is not connected")
    /// and state file behind; both go before a new start.
    async fn clear_leftovers(&self, req: &MapRequest) {
        let fuse = self.fuse_dir(req);
        // Nothing can be left on an image file whose FUSE mount is gone: the common,
        // clean case costs one read of the mount table.
        if matches!(crate::host::fs::mounted_at(&fuse), Ok(Some(_))) {
            // Loop devices first: once the FUSE mount is lazily detached, their backing
            // path no longer resolves and they could not be found any more.
            if let Ok(devices) = loopdev::backing(&self.image_file(req)).await {
                for d in devices {
                    let r = loopdev::detach(&d).await;
                    tracing::info!(device = %d.display(), result = ?r, "detached a leftover loop device");
                }
            }
            let r = crate::host::command::run(
                "umount",
                ["-l".as_ref(), fuse.as_os_str()],
                Duration::from_secs(30),
            )
            .await;
            tracing::info!(dir = %fuse.display(), result = ?r.map(|o| o.code), "lazily unmounted a leftover exporter mount");
        }
        let _ = std::fs::remove_file(self.state_file(req));
        let _ = std::fs::remove_file(IoStats::path_for(&self.state_file(req)));
    }

    /// The exporter's I/O counters, as it last wrote them.
    pub(super) fn io_stats(&self, req: &MapRequest) -> Option<IoStats> {
        IoStats::read(&IoStats::path_for(&self.state_file(req)))
    }

    pub(super) fn health(&self, req: &MapRequest, pid: Option<u32>) -> Health {
        let st = self.read_state(req);
        let pid = pid.or_else(|| st.as_ref().and_then(|s| s.pid));
        match (st, pid) {
            (Some(s), _) if s.phase == Phase::Fenced => Health::Fenced,
            (Some(s), Some(p)) if s.phase == Phase::Serving && self.is_ours(req, p) => {
                Health::Serving
            }
            _ => Health::Gone,
        }
    }

    /// (pool, image) of every exporter directory on this host, for reconciling.
    pub(super) fn known(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(pools) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for pool in pools.flatten() {
            let Ok(images) = std::fs::read_dir(pool.path()) else {
                continue;
            };
            for image in images.flatten() {
                out.push((
                    pool.file_name().to_string_lossy().into_owned(),
                    image.file_name().to_string_lossy().into_owned(),
                ));
            }
        }
        out
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}
