//! Ownership of the image: the checks before taking librbd's managed exclusive lock,
//! taking it under a deadline, naming whoever holds it instead, and the owner record
//! (`rbdvol.owner.*` image metadata) that tells other hosts who we are.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Event, Failure};
use crate::ceph::ceph_err;
use crate::ceph::sys::{Image, OwnedImage};
use crate::error::{Error, Result};

pub const OWNER_HOST: &str = "rbdvol.owner.host";
pub const OWNER_ADDR: &str = "rbdvol.owner.addr";
pub const OWNER_CLIENT: &str = "rbdvol.owner.client";
pub const OWNER_SINCE: &str = "rbdvol.owner.since";
const OWNER_KEYS: [&str; 4] = [OWNER_HOST, OWNER_ADDR, OWNER_CLIENT, OWNER_SINCE];

/// RBD_FEATURE_EXCLUSIVE_LOCK.
const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// Refuses images that cannot be owned safely and returns the image size.
///
/// An advisory lock (`rbd lock add`) on an exclusive-lock image makes librbd's lock
/// acquisition and every writer retry forever, so it is refused before any attempt.
pub fn preflight(image: &Image<'_>, label: &str) -> Result<u64> {
    let st = image
        .stat()
        .map_err(|e| ceph_err(format!("reading image {label}"), e))?;
    if st.features & FEATURE_EXCLUSIVE_LOCK == 0 {
        return Err(Error::NotSupported(format!(
            "image {label} does not have the exclusive-lock feature (features {:#x}), which rbdvol \
             needs to keep other hosts out; enable it with `rbd feature enable {label} exclusive-lock`",
            st.features
        )));
    }
    let lockers = image
        .lockers()
        .map_err(|e| ceph_err(format!("listing the locks of {label}"), e))?;
    if let Some(l) = lockers.iter().find(|l| !l.is_managed()) {
        return Err(Error::InUse {
            name: label.to_string(),
            holder: format!(
                "{} holds an advisory lock on it (cookie {:?}, address {}), taken with `rbd lock add`; \
                 rbdvol never takes the exclusive lock while one exists (librbd would retry forever). \
                 Once its holder is gone, remove it with `rbd lock rm {label} {:?} {}`",
                l.client, l.cookie, l.addr, l.cookie, l.client
            ),
        });
    }
    Ok(st.size)
}

/// Takes the managed exclusive lock, waiting at most `wait`.
///
/// `rbd_lock_acquire` returns EROFS at once when a live owner refuses, and blocks while
/// a dead owner is being declared dead (its watch must time out; librbd then blocklists
/// it, which is the fencing). It cannot be cancelled, so it runs on its own thread and
/// the wait here is what is bounded. A stop signal ends the wait too.
pub fn acquire(
    image: &Arc<OwnedImage>,
    label: &str,
    wait: Duration,
    tx: &Sender<Event>,
    rx: &Receiver<Event>,
) -> std::result::Result<(), Failure> {
    // Even --lock-wait 0 lets a free lock's immediate answer arrive.
    let wait = wait.max(Duration::from_millis(500));
    let started = Instant::now();
    let deadline = started + wait;
    let attempt = || {
        let img = image.clone();
        let done = tx.clone();
        std::thread::Builder::new()
            .name("lock-acquire".into())
            .spawn(move || {
                let _ = done.send(Event::Locked(img.lock_acquire_exclusive()));
            })
            .map_err(|e| Failure {
                error: Error::io("starting the lock thread", e),
                still_blocked: false,
            })
    };
    let mut helper = attempt()?;
    let mut said_waiting = false;
    loop {
        let now = Instant::now();
        // Say once, early, that we are waiting: a dead owner takes a watch timeout.
        let tick = if said_waiting {
            deadline.saturating_duration_since(now)
        } else {
            Duration::from_secs(2).min(deadline.saturating_duration_since(now))
        };
        match rx.recv_timeout(tick) {
            Ok(Event::Locked(result)) => {
                // Joined so that its image reference is gone too: the image must be
                // closable by its last owner later.
                let _ = helper.join();
                // A live owner refused. It may release soon (its container stops):
                // ask again until the wait is over, staying responsive to signals.
                let refused = matches!(&result, Err(e) if e.0 == libc::EROFS);
                if refused && Instant::now() + RETRY_PAUSE < deadline {
                    if !said_waiting {
                        said_waiting = true;
                        tracing::info!(image = %label, owner = %describe_owner(image), "a live owner holds the lock; waiting for it to release");
                    }
                    if let Ok(Event::Signal(sig)) = rx.recv_timeout(RETRY_PAUSE) {
                        return Err(stopped_while_waiting(sig, label));
                    }
                    helper = attempt()?;
                    continue;
                }
                return taken(result, image, label, started);
            }
            Ok(Event::Signal(sig)) => return Err(stopped_while_waiting(sig, label)),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                said_waiting = true;
                tracing::info!(image = %label, owner = %describe_owner(image), "waiting for the exclusive lock: the previous owner looks dead and is being declared so");
            }
            Err(_) => {
                return Err(Failure {
                    error: Error::InUse {
                        name: label.to_string(),
                        holder: format!(
                            "still waiting for the lock after {}s: its owner, {}, is being declared dead \
                             (the cluster fences it once its watch times out), or a live owner is not \
                             answering; try again later",
                            wait.as_secs(),
                            describe_owner(image)
                        ),
                    },
                    still_blocked: true,
                });
            }
        }
    }
}

/// Between two attempts on a lock a live owner refused.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

fn stopped_while_waiting(sig: impl std::fmt::Display, label: &str) -> Failure {
    Failure {
        error: Error::Command {
            program: "rbdvol export".into(),
            detail: format!("stopped by signal {sig} while waiting for the lock of {label}"),
        },
        still_blocked: true,
    }
}

fn taken(
    result: crate::ceph::sys::Result<()>,
    image: &Image<'_>,
    label: &str,
    started: Instant,
) -> std::result::Result<(), Failure> {
    match result {
        Ok(()) => {
            tracing::info!(image = %label, waited_ms = started.elapsed().as_millis() as u64, "exclusive lock acquired");
            Ok(())
        }
        Err(e) if e.0 == libc::EROFS => Err(Error::InUse {
            name: label.to_string(),
            holder: format!(
                "its exclusive lock is held by {}, a live owner that refused to hand it over; \
                 unmap it there first",
                describe_owner(image)
            ),
        }
        .into()),
        Err(e) => Err(ceph_err(format!("taking the exclusive lock of {label}"), e).into()),
    }
}

/// Who holds the managed lock, in words: `client.N at ADDR (host H, since S)`.
pub fn describe_owner(image: &Image<'_>) -> String {
    let holders: Vec<String> = match image.lockers() {
        Ok(ls) => ls
            .iter()
            .filter(|l| l.is_managed())
            .map(|l| format!("{} at {}", l.client, l.addr))
            .collect(),
        Err(e) => vec![format!(
            "an unknown client (listing locks failed: {})",
            e.describe()
        )],
    };
    let who = if holders.is_empty() {
        "nobody right now (it was just released)".to_string()
    } else {
        holders.join(", ")
    };
    let host = image.metadata_get(OWNER_HOST).ok().flatten();
    let since = image.metadata_get(OWNER_SINCE).ok().flatten();
    match (host, since) {
        (Some(h), Some(s)) => format!("{who} (host {h}, since {s})"),
        (Some(h), None) => format!("{who} (host {h})"),
        _ => who,
    }
}

/// Records this host as the owner, for `docker volume inspect` and for the error a
/// refused taker reports.
pub fn write_owner_record(
    image: &Image<'_>,
    host: &str,
    addr: &str,
    client: &str,
    since: &str,
) -> std::result::Result<(), crate::ceph::Errno> {
    for (k, v) in [
        (OWNER_HOST, host),
        (OWNER_ADDR, addr),
        (OWNER_CLIENT, client),
        (OWNER_SINCE, since),
    ] {
        image.metadata_set(k, v)?;
    }
    Ok(())
}

/// Removes the owner record; only while still holding the lock, so it never erases
/// a newer owner's record.
pub fn remove_owner_record(image: &Image<'_>) -> std::result::Result<(), crate::ceph::Errno> {
    for k in OWNER_KEYS {
        image.metadata_remove(k)?;
    }
    Ok(())
}
