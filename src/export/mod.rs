//! The userspace mapper's exporter process, `rbdvol export`: one per mapped image, started
//! detached by the daemon. It owns the image for as long as it runs: its own RADOS client
//! instance (so a lock break fences only this image), librbd's managed exclusive lock,
//! and a FUSE mount exposing the image as the single file `MOUNTPOINT/image`, which the
//! daemon attaches a loop device to. A program of its own that shares the binary: it uses
//! the cluster layer ([`crate::ceph`], [`crate::lock`]) and nothing of the daemon's but
//! the state file's format.
//!
//! Lifecycle, as the daemon sees it through the state file
//! ([`ExportState`](crate::host::mapper::userspace::state::ExportState)):
//! - `serving`: written once the FUSE file answers; the lock is held and the owner record
//!   (`rbdvol.owner.*` metadata) is written.
//! - `failed` + `error`: startup failed; the process exits non-zero and leaves the file.
//! - `fenced`: the lock was lost (broken by another client, or this client blocklisted).
//!   Every I/O fails with EIO from then on; the process keeps the mount until told to
//!   stop, then exits non-zero and leaves the file saying `fenced`.
//! - no file: a clean stop (SIGTERM/SIGINT/SIGHUP) unmounted, flushed, removed the owner
//!   record, released the lock and exited 0.

mod fs;
mod harden;
mod iostats;
mod lock;
mod ownership;
mod serve;
mod state;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::{SigSet, Signal};

use crate::ceph::sys::{self, ConnectSpec, OwnedImage, Rados};
use crate::ceph::{ceph_err, liveness};
use crate::config::CephSettings;
use crate::error::{Error, Result};
use serve::{Owned, Parts, Serving};
use state::{Phase, StateFile};

/// Arguments of `rbdvol export` (started by the daemon, one process per mapped image).
#[derive(Debug, Args, Clone)]
pub struct ExportArgs {
    /// ceph.conf of the cluster.
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: PathBuf,
    /// Keyring for the cephx user (default: from the ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub keyring: Option<PathBuf>,
    /// cephx user without "client.".
    #[arg(long, value_name = "NAME", default_value = "admin")]
    pub client_id: String,
    /// Ceph cluster name.
    #[arg(long, value_name = "NAME", default_value = "ceph")]
    pub cluster: String,
    #[arg(long)]
    pub pool: String,
    #[arg(long)]
    pub image: String,
    /// Empty directory where the FUSE filesystem is mounted; the image appears as MOUNTPOINT/image.
    #[arg(long, value_name = "DIR")]
    pub mountpoint: PathBuf,
    /// JSON status file, written atomically: serving / fenced / failed.
    #[arg(long, value_name = "FILE")]
    pub state_file: PathBuf,
    /// Host identity recorded as the image's owner.
    #[arg(long, value_name = "ID")]
    pub host_id: String,
    /// How long to wait for the exclusive lock (a dead owner is declared dead, fenced
    /// and taken over once its watch times out; a live owner is waited for).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub lock_wait: u64,
    /// Expose the image read-only (the lock is still taken: one host at a time).
    #[arg(long)]
    pub read_only: bool,
    /// How long a previous owner this exporter takes over from stays on the OSD
    /// blocklist (`lock.fence_expiry`): longer than any cut-off host's queued writes.
    #[arg(long, value_name = "DURATION", default_value = "365days", value_parser = humantime::parse_duration)]
    pub fence_expiry: Duration,
    /// Timeout of the liveness watch this exporter keeps while it holds the lock
    /// (`lock.liveness_timeout`): once its host is dead or cut off for that long,
    /// another host may fence it and take the volume over, without waiting for the
    /// cluster's watch timeout. 0 publishes no liveness (the cluster's rule applies).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub liveness_timeout: u64,
}

/// FUSE worker threads: the loop device keeps several requests in flight, and the
/// image handle is thread-safe.
const WORKERS: usize = 16;
/// How often the watchdog asks librbd whether we still own the lock.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);
/// How long a stop waits for requests already inside librbd.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// How long a stop waits for the FUSE session to end after the unmount.
const SESSION_WAIT: Duration = Duration::from_secs(5);
/// A stop that has not finished by then (cluster unreachable) ends the process anyway;
/// the lock then stays until the watch times out and the next owner fences us.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);

/// Messages to the main thread, from the signal thread, the lock thread, the FUSE
/// session thread and the backend.
enum Event {
    Signal(i32),
    Locked(sys::Result<()>),
    Fenced(String),
    SessionEnded(std::io::Result<()>),
}

/// A startup failure.
struct Failure {
    error: Error,
    /// A helper thread is still blocked inside librbd on the image, so the image must
    /// not be closed under it: the process ends without the usual teardown.
    still_blocked: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure {
            error,
            still_blocked: false,
        }
    }
}

pub fn run(args: &ExportArgs) -> Result<()> {
    init_logging();
    // First of all: PR_SET_IO_FLUSHER is per thread, inherited only by threads created
    // after it (the signal thread, librados', FUSE's).
    harden::for_block_io();
    let (tx, rx) = mpsc::channel();
    // Before any other thread exists (librados starts many), so all of them inherit
    // the blocked mask and only the signal thread ever sees a stop signal.
    start_signal_thread(tx.clone())?;
    let label = format!("{}/{}", args.pool, args.image);
    let file = args.mountpoint.join(fs::FILE_NAME);
    let mut state = StateFile::new(&args.state_file, &args.pool, &args.image, &file);
    tracing::info!(
        image = %label,
        mountpoint = %args.mountpoint.display(),
        host_id = %args.host_id,
        read_only = args.read_only,
        pid = std::process::id(),
        "rbdvol export starting"
    );
    let serving = match start(args, &label, &mut state, &tx, &rx) {
        Ok(s) => s,
        Err(f) => {
            let msg = f.error.to_string();
            tracing::error!(image = %label, error = %msg, "export failed");
            if let Err(e) = state.write(Phase::Failed, Some(msg.clone())) {
                tracing::error!(error = %e, "could not write the state file");
            }
            if f.still_blocked {
                // Returning would run C++ static destructors under the blocked thread.
                eprintln!("rbdvol: {msg}");
                sys::exit_now(1);
            }
            return Err(f.error);
        }
    };
    serving.serve_until_stopped(&mut state, &rx)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // try_init: a second export in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

fn start_signal_thread(tx: Sender<Event>) -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| Error::io("blocking stop signals", e.into()))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                if tx.send(Event::Signal(sig as i32)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Error::io("starting the signal thread", e))?;
    Ok(())
}

/// The connection settings: the daemon's, with two changes for the data path.
fn connect_spec(args: &ExportArgs) -> ConnectSpec {
    let settings = CephSettings {
        conf: args.ceph_conf.clone(),
        keyring: args.keyring.clone(),
        client_id: args.client_id.clone(),
        cluster: args.cluster.clone(),
        pools: vec![args.pool.clone()],
        ..CephSettings::default()
    };
    let mut spec = crate::ceph::connect_spec(&settings);
    // No OSD op timeout, as with krbd: an OSD failover takes longer than the daemon's
    // 15 s, and a timed-out write would surface as EIO and abort the filesystem. I/O
    // waits for the cluster instead; stopping has its own limit (SHUTDOWN_LIMIT).
    spec.options.retain(|(k, _)| k != "rados_osd_op_timeout");
    spec.options
        .push(("rados_osd_op_timeout".into(), "0".into()));
    // No librbd cache: a write is acknowledged only once the OSDs have it, so a fenced
    // client's write fails itself instead of being acknowledged and lost at the next
    // flush, and the loop device's flush has nothing left to lose. The kernel above
    // still batches through the filesystem's own page cache. The price, measured on
    // the test cluster: queue-depth-1 4 KiB O_DIRECT writes through ext4 run at ~2.1k/s
    // instead of ~8.5k/s with the (write-around) cache; 4 MiB writes ~430 vs ~630 MB/s.
    spec.options.push(("rbd_cache".into(), "false".into()));
    // librados pings every watch from its tick: once a second keeps the short
    // liveness watch (and the header watch) alive through a few lost pings.
    spec.options
        .push(("objecter_tick_interval".into(), "1".into()));
    spec
}

fn check_mountpoint(dir: &Path) -> Result<()> {
    let what = format!("mountpoint {}", dir.display());
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(Error::io(
                what,
                std::io::Error::from_raw_os_error(libc::ENOTEMPTY),
            )),
        },
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(Error::io(
            format!(
                "{what} is a dead FUSE mount (its exporter exited without unmounting); \
                 unmount it first with `umount -l {}`",
                dir.display()
            ),
            e,
        )),
        Err(e) => Err(Error::io(what, e)),
    }
}

fn start(
    args: &ExportArgs,
    label: &str,
    state: &mut StateFile,
    tx: &Sender<Event>,
    rx: &Receiver<Event>,
) -> std::result::Result<Serving, Failure> {
    check_mountpoint(&args.mountpoint)?;
    let rados = Rados::connect(&connect_spec(args)).map_err(|(step, e)| {
        Error::Unavailable(format!(
            "{step}: {} (conf {})",
            e.describe(),
            args.ceph_conf.display()
        ))
    })?;
    let rados = Arc::new(rados);
    let client = format!("client.{}", rados.instance_id());
    let addr = rados
        .addrs()
        .map_err(|e| ceph_err("reading this client's address", e))?;
    tracing::info!(%client, %addr, "connected to the ceph cluster");
    state.set_identity(client.clone(), addr.clone());
    let image = OwnedImage::open(rados.clone(), &args.pool, &args.image).map_err(|e| {
        if e.0 == libc::ENOENT {
            Error::NotFound(label.to_string())
        } else {
            ceph_err(format!("opening image {label}"), e)
        }
    })?;
    let image = Arc::new(image);
    let size = lock::preflight(&image, label)?;
    let taking = lock::Taking {
        rados: &rados,
        image: &image,
        pool: &args.pool,
        name: &args.image,
        label,
        ours: &addr,
        fence_expiry: args.fence_expiry,
    };
    let acquired = lock::acquire(&taking, Duration::from_secs(args.lock_wait), tx, rx)?;
    state.set_lock(acquired.waited, acquired.took_over_from);
    let liveness = publish_liveness(args, &rados, &addr, label);
    // From here on the lock is ours: every failure path releases it.
    let owned = Owned {
        rados,
        image,
        label: label.to_string(),
        mountpoint: args.mountpoint.clone(),
        liveness,
    };
    let mut parts = Parts::default();
    match owned.mount(&mut parts, args, size, &client, &addr, state, tx) {
        Ok(()) => Ok(Serving { owned, parts }),
        Err(error) => {
            owned.teardown(parts, rx);
            Err(error.into())
        }
    }
}

/// Starts the liveness watch ([`crate::ceph::liveness`]) once the lock is ours. Without
/// it the mapping still works; other hosts then wait for the cluster's watch timeout.
fn publish_liveness(
    args: &ExportArgs,
    rados: &Arc<Rados>,
    addr: &str,
    label: &str,
) -> Option<liveness::Keeper> {
    if args.liveness_timeout == 0 {
        return None;
    }
    let record = liveness::Record {
        addr: addr.to_string(),
        gid: rados.instance_id(),
        timeout_secs: args.liveness_timeout,
    };
    match liveness::Keeper::start(rados.clone(), &args.pool, &args.image, record) {
        Ok(k) => {
            tracing::info!(image = %label, object = %liveness::object_name(&args.image), timeout_secs = args.liveness_timeout, "liveness watch published");
            Some(k)
        }
        Err((step, e)) => {
            tracing::warn!(image = %label, error = %e.describe(), "{step} failed: no liveness watch, so another host can take this volume over only after the cluster's watch timeout if this host dies");
            None
        }
    }
}
