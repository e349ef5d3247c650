//! The life of a mapping once the lock is ours: owner record, FUSE mount, watchdog,
//! serving until told to stop, and the teardown that gives everything back in the one
//! safe order (unmount, stop I/O, flush, remove the owner record, release the lock,
//! close the image, shut the connection down).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::fs::{self, Backend, ImageFs};
use super::lock;
use super::state::{Phase, StateFile};
use super::{
    Event, ExportArgs, DRAIN_WAIT, SESSION_WAIT, SHUTDOWN_LIMIT, WATCHDOG_PERIOD, WORKERS,
};
use crate::ceph::sys::{self, OwnedImage, Rados};
use crate::ceph::{ceph_err, liveness};
use crate::error::{Error, Result};

/// The image while we hold its lock.
pub struct Owned {
    pub rados: Arc<Rados>,
    pub image: Arc<OwnedImage>,
    pub label: String,
    pub mountpoint: PathBuf,
    /// Held until the lock is released: without it another host could declare this
    /// one dead and fence it while it still owns the volume.
    pub liveness: Option<liveness::Keeper>,
}

/// What exists of a mapping, for teardown.
#[derive(Default)]
pub struct Parts {
    backend: Option<Arc<Backend>>,
    unmounter: Option<fuser::SessionUnmounter>,
    session_ended: bool,
}

/// A live mapping.
pub struct Serving {
    pub owned: Owned,
    pub parts: Parts,
}

/// How a stop went.
pub struct Outcome {
    pub fenced: bool,
    /// Everything was released cleanly.
    pub clean: bool,
}

impl Owned {
    /// Everything after taking the lock: owner record, FUSE mount, watchdog, and a
    /// check that the file answers. What it creates goes into `parts`, so that a
    /// failure half-way can be torn down.
    #[allow(clippy::too_many_arguments)]
    pub fn mount(
        &self,
        parts: &mut Parts,
        args: &ExportArgs,
        size: u64,
        client: &str,
        addr: &str,
        state: &mut StateFile,
        tx: &Sender<Event>,
    ) -> Result<()> {
        match self.image.is_lock_owner() {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::Command {
                    program: "rbdvol export".into(),
                    detail: format!(
                        "librbd reported the lock of {} as taken but this client is not its owner",
                        self.label
                    ),
                })
            }
            Err(e) => return Err(ceph_err("checking the lock owner", e)),
        }
        let since = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        if let Err(e) = lock::write_owner_record(&self.image, &args.host_id, addr, client, &since) {
            return Err(ceph_err(
                format!("writing the owner record of {}", self.label),
                e,
            ));
        }
        state.set_since(since);

        let backend = Arc::new(Backend::new(
            self.image.clone(),
            size,
            self.label.clone(),
            addr.to_string(),
            tx.clone(),
        ));
        parts.backend = Some(backend.clone());
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("rbdvol:{}", self.label)),
            // As a kernel option (fuser only hands `Subtype` to fusermount): the mount then
            // shows up as type `fuse.rbdvol`, which is how stale ones can be found.
            fuser::MountOption::CUSTOM("subtype=rbdvol".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
            fuser::MountOption::NoAtime,
            if args.read_only {
                fuser::MountOption::RO
            } else {
                fuser::MountOption::RW
            },
        ];
        config.n_threads = Some(WORKERS);
        // One /dev/fuse descriptor per worker: requests are spread between workers
        // instead of all readers contending on one descriptor.
        config.clone_fd = true;
        let fs = ImageFs::new(backend.clone(), args.read_only);
        let mut session = match fuser::Session::new(fs, &self.mountpoint, &config) {
            Ok(s) => s,
            Err(e) => {
                return Err(Error::io(
                    format!("mounting FUSE at {}", self.mountpoint.display()),
                    e,
                ))
            }
        };
        parts.unmounter = Some(session.unmount_callable());
        let ended = tx.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || {
                let _ = ended.send(Event::SessionEnded(session.run()));
            })
        {
            return Err(Error::io("starting the FUSE session", e));
        }
        let watched = backend.clone();
        let io_file = super::iostats::IoStatsFile::beside(&args.state_file);
        if let Err(e) = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                while watched.check() {
                    io_file.write(watched.io.snapshot());
                    std::thread::sleep(WATCHDOG_PERIOD);
                }
                io_file.write(watched.io.snapshot());
            })
        {
            return Err(Error::io("starting the watchdog", e));
        }
        // The daemon runs losetup as soon as we say "serving": prove the file answers.
        let file = self.mountpoint.join(fs::FILE_NAME);
        match std::fs::metadata(&file) {
            Ok(m) if m.is_file() && m.len() == size => {}
            Ok(m) => {
                return Err(Error::Command {
                    program: "rbdvol export".into(),
                    detail: format!(
                        "{} answers with {} bytes, but image {} has {size}",
                        file.display(),
                        m.len(),
                        self.label
                    ),
                })
            }
            Err(e) => return Err(Error::io(format!("checking {}", file.display()), e)),
        }
        Ok(())
    }

    /// Stops a mapping in the only safe order: unmount, stop I/O, flush, remove the
    /// owner record, release the lock, close the image, shut the connection down.
    pub fn teardown(self, mut parts: Parts, rx: &Receiver<Event>) -> Outcome {
        let mut fenced = false;
        if let Some(mut unmounter) = parts.unmounter.take() {
            if !parts.session_ended {
                unmount(&mut unmounter, &self.mountpoint);
                // A plain unmount ends the session at once; after a lazy one it ends
                // when the last user (a still-attached loop device) lets go.
                let deadline = Instant::now() + SESSION_WAIT;
                loop {
                    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(Event::SessionEnded(_)) => break,
                        Ok(Event::Fenced(_)) => fenced = true,
                        Ok(_) => {}
                        Err(RecvTimeoutError::Timeout) => {
                            tracing::warn!(mountpoint = %self.mountpoint.display(), "the FUSE session is still in use after the unmount (a loop device still attached?); its I/O now fails");
                            break;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        let image = match parts.backend.take() {
            Some(backend) => {
                let stopped = backend.stop(DRAIN_WAIT);
                if !stopped.drained {
                    tracing::warn!(
                        "a request is still inside librbd after {}s; stopping anyway",
                        DRAIN_WAIT.as_secs()
                    );
                }
                fenced |= stopped.fenced;
                stopped.image
            }
            None => Some(self.image.clone()),
        };
        let Owned {
            rados,
            image: own_ref,
            label,
            liveness,
            ..
        } = self;
        drop(own_ref);
        let mut clean = !fenced;
        if let Some(image) = image {
            if !fenced {
                match image.flush() {
                    Ok(()) => {}
                    Err(e) => {
                        fenced = e.0 == libc::ESHUTDOWN;
                        tracing::error!(image = %label, error = %e.describe(), "the final flush failed");
                        clean = false;
                    }
                }
            }
            if !fenced {
                if let Err(e) = lock::remove_owner_record(&image) {
                    tracing::warn!(image = %label, error = %e.describe(), "could not remove the owner record");
                }
                match image.lock_release() {
                    Ok(()) => tracing::info!(image = %label, "exclusive lock released"),
                    Err(e) => {
                        tracing::error!(image = %label, error = %e.describe(), "releasing the exclusive lock failed");
                        clean = false;
                    }
                }
            }
            // After the release: the watch is what keeps other hosts from fencing us.
            drop(liveness);
            match Arc::try_unwrap(image) {
                Ok(image) => drop(image),
                Err(_) => {
                    tracing::warn!(
                        "the image is still in use by a stuck request; it closes at exit"
                    );
                    clean = false;
                }
            }
        }
        drop(rados);
        Outcome { fenced, clean }
    }
}

/// Unmounts the FUSE filesystem; lazily if something still uses it.
fn unmount(unmounter: &mut fuser::SessionUnmounter, dir: &Path) {
    match unmounter.unmount() {
        Ok(()) => tracing::info!(mountpoint = %dir.display(), "unmounted"),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            tracing::warn!(mountpoint = %dir.display(), "the FUSE mount is busy (loop device still attached?); unmounting lazily");
            if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
                tracing::error!(mountpoint = %dir.display(), error = %e, "lazy unmount failed");
            }
        }
        Err(e) => tracing::warn!(mountpoint = %dir.display(), error = %e, "unmount failed"),
    }
}

impl Serving {
    pub fn serve_until_stopped(
        mut self,
        state: &mut StateFile,
        rx: &Receiver<Event>,
    ) -> Result<()> {
        if let Err(e) = state.write(Phase::Serving, None) {
            // The daemon can never learn that we serve: give the image back.
            tracing::error!(error = %e, "could not write the state file; stopping");
            self.owned.teardown(self.parts, rx);
            return Err(e);
        }
        tracing::info!(image = %self.owned.label, file = %self.owned.mountpoint.join(fs::FILE_NAME).display(), "serving");
        let mut fenced = false;
        let why = loop {
            match rx.recv() {
                Ok(Event::Signal(sig)) => break format!("signal {sig}"),
                Ok(Event::Fenced(reason)) => {
                    fenced = true;
                    tracing::warn!(%reason, "recording the fencing in the state file");
                    if let Err(e) = state.write(Phase::Fenced, None) {
                        tracing::error!(error = %e, "could not write the state file");
                    }
                }
                Ok(Event::SessionEnded(r)) => {
                    self.parts.session_ended = true;
                    break format!(
                        "the FUSE mount went away (unmounted by someone else?): {}",
                        r.err()
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "session ended".into())
                    );
                }
                Ok(Event::Locked(_)) => {}
                Err(_) => break "event channel closed".into(),
            }
        };
        tracing::info!(image = %self.owned.label, reason = %why, "stopping");
        arm_shutdown_limit(state.clone());
        let label = self.owned.label.clone();
        let session_ended = self.parts.session_ended;
        let outcome = self.owned.teardown(self.parts, rx);
        if outcome.fenced || fenced {
            if let Err(e) = state.write(Phase::Fenced, None) {
                tracing::error!(error = %e, "could not write the state file");
            }
            return Err(Error::Command {
                program: "rbdvol export".into(),
                detail: format!(
                    "image {label} was fenced while mapped (its lock was broken or this client \
                     blocklisted); I/O after that failed with EIO"
                ),
            });
        }
        state.remove();
        if !outcome.clean {
            return Err(Error::Command {
                program: "rbdvol export".into(),
                detail: format!(
                    "stopping the export of {label} did not finish cleanly; see the log"
                ),
            });
        }
        if session_ended {
            return Err(Error::Command {
                program: "rbdvol export".into(),
                detail: format!("{why}; the image {label} was released"),
            });
        }
        tracing::info!(image = %label, "stopped cleanly");
        Ok(())
    }
}

/// Ends the process if a stop hangs (the cluster unreachable while flushing or
/// releasing): the lock then expires with the watch and the next owner fences us.
fn arm_shutdown_limit(state: StateFile) {
    let _ = std::thread::Builder::new()
        .name("shutdown-limit".into())
        .spawn(move || {
            std::thread::sleep(SHUTDOWN_LIMIT);
            let msg = format!(
                "stopping did not finish within {}s (cluster unreachable?); exiting without \
                 releasing the lock, which the next owner takes after the watch timeout",
                SHUTDOWN_LIMIT.as_secs()
            );
            tracing::error!("{msg}");
            let _ = state.write(Phase::Failed, Some(msg));
            sys::exit_now(1);
        });
}
