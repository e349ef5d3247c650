//! Ownership of the image: the checks before taking librbd's managed exclusive lock,
//! taking it under a deadline (declaring a dead owner dead and fencing it for good
//! first), naming whoever holds it instead, and the owner record
//! (`rbdvol.owner.*` image metadata) that tells other hosts who we are.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Event, Failure};
use crate::ceph::ceph_err;
use crate::ceph::images::same_client;
use crate::ceph::liveness::{self, Liveness};
use crate::ceph::sys::{Image, OwnedImage, Rados};
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
/// rbdvol declares a previous owner dead itself and fences it
/// ([`crate::lock::fence_owner`]) *before* breaking its lock. Dead means either of:
/// - its liveness watch is gone ([`crate::ceph::liveness`]): it opted in, and the OSD
///   has not heard from its client for its short liveness timeout (5 s by default);
/// - its client address has no watch on the image header any more (librbd's own test:
///   the cluster dropped it after `osd_client_watch_timeout`, 30 s by default). This is
///   the only rule for an owner that published no liveness (an older rbdvol).
///
/// librbd's automatic takeover would blocklist it with the monitor's default expiry (1
/// hour), and the monitor never extends an existing entry: a host cut off for longer
/// would then land its queued writes. So `rbd_lock_acquire` is only called on a lock
/// nobody holds, and returns at once; while a holder is not proven dead this waits,
/// polling, until it releases or is. A stop signal ends the wait too.
pub fn acquire(
    take: &Taking<'_>,
    wait: Duration,
    tx: &Sender<Event>,
    rx: &Receiver<Event>,
) -> std::result::Result<Acquired, Failure> {
    let (image, label) = (take.image, take.label);
    // Even --lock-wait 0 lets a free lock's immediate answer arrive.
    let wait = wait.max(Duration::from_millis(500));
    let started = Instant::now();
    let deadline = started + wait;
    let mut said_waiting = false;
    let mut broke = Vec::new();
    let pool = take
        .rados
        .pool(take.pool)
        .map_err(|e| ceph_err(format!("opening pool {}", take.pool), e))?;
    loop {
        // Live from the image header: the handle's lock list (`lockers`) is a cache
        // that a break by this very client does not refresh.
        let holders: Vec<String> = image
            .lock_owners()
            .map_err(|e| ceph_err(format!("reading the lock owner of {label}"), e))?
            .into_iter()
            .filter(|a| !same_client(a, take.ours))
            .collect();
        if holders.is_empty() {
            // False: someone else took it between the look and the attempt.
            if attempt(image, label, deadline, tx, rx)? {
                return Ok(taken(started, label, broke));
            }
        } else {
            let watchers = image
                .watchers()
                .map_err(|e| ceph_err(format!("listing the watchers of {label}"), e))?;
            let mut dead = Vec::new();
            let mut alive = Vec::new();
            for addr in &holders {
                if !watchers.iter().any(|w| same_client(&w.addr, addr)) {
                    dead.push((
                        addr,
                        "its watch on the image header has timed out".to_string(),
                    ));
                    continue;
                }
                match liveness::probe(&pool, take.name, addr) {
                    Liveness::Gone(why) => dead.push((addr, why)),
                    Liveness::Alive => alive.push(format!("{addr}: its liveness watch is held")),
                    Liveness::Unknown(why) => alive.push(format!(
                        "{addr}: {why}; waiting for its watch on the image header to time out \
                         (osd_client_watch_timeout, 30 s by default)"
                    )),
                }
            }
            let mut broke_now = false;
            for (addr, why) in &dead {
                tracing::warn!(image = %label, owner = %owner_words(image, addr), reason = %why, "declaring the lock owner dead, fencing it and taking the lock over");
                crate::lock::fence_owner(take.rados, addr, take.fence_expiry);
                match image.lock_break(addr) {
                    Ok(()) => {
                        tracing::info!(image = %label, owner = %addr, "broke the dead owner's lock");
                        broke.push(addr.to_string());
                        broke_now = true;
                    }
                    // Released or changed hands meanwhile: look again.
                    Err(e) if e.0 == libc::ENOENT || e.0 == libc::EBUSY => {}
                    Err(e) => {
                        return Err(ceph_err(
                            format!("breaking the lock of {label} held by a dead owner, {addr}"),
                            e,
                        )
                        .into())
                    }
                }
            }
            if broke_now {
                // Take it now, even past the deadline: its owner is already fenced.
                continue;
            }
            if dead.is_empty() && !said_waiting {
                said_waiting = true;
                tracing::info!(image = %label, owner = %describe_owner(image), why = %alive.join("; "), "waiting for the exclusive lock: its owner is live, or dead and not yet declared so");
            }
        }
        if Instant::now() + POLL >= deadline {
            return Err(Error::InUse {
                name: label.to_string(),
                holder: format!(
                    "still waiting for the lock after {}s: its owner, {}, is live and did not release it, \
                     or it died and has not been declared dead yet (after its liveness watch times out, \
                     5 s by default, or for an owner without one, after its watch on the image times out: \
                     osd_client_watch_timeout, 30 s by default); try again later",
                    wait.as_secs(),
                    describe_owner(image)
                ),
            }
            .into());
        }
        if let Ok(Event::Signal(sig)) = rx.recv_timeout(POLL) {
            return Err(stopped_while_waiting(sig, label, false));
        }
    }
}

/// What [`acquire`] needs besides the image.
pub struct Taking<'a> {
    pub rados: &'a Rados,
    pub image: &'a Arc<OwnedImage>,
    /// Pool and image name: where the owner's liveness object is.
    pub pool: &'a str,
    pub name: &'a str,
    pub label: &'a str,
    /// This client's address: a lock it holds (after a reconnect) is not someone else's.
    pub ours: &'a str,
    pub fence_expiry: Duration,
}

/// Between two looks at who holds the lock.
const POLL: Duration = Duration::from_millis(250);

/// One `rbd_lock_acquire` on a lock nobody held a moment ago: true once ours, false
/// if someone else was faster (EROFS). It cannot be cancelled, so it runs on its own
/// thread and only the wait is bounded; it blocks only if the new holder dies at once.
fn attempt(
    image: &Arc<OwnedImage>,
    label: &str,
    deadline: Instant,
    tx: &Sender<Event>,
    rx: &Receiver<Event>,
) -> std::result::Result<bool, Failure> {
    let img = image.clone();
    let done = tx.clone();
    let helper = std::thread::Builder::new()
        .name("lock-acquire".into())
        .spawn(move || {
            let _ = done.send(Event::Locked(img.lock_acquire_exclusive()));
        })
        .map_err(|e| Error::io("starting the lock thread", e))?;
    // At least a few seconds: a free lock answers within milliseconds.
    let until = deadline.max(Instant::now() + Duration::from_secs(5));
    loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(Event::Locked(result)) => {
                // Joined so that its image reference is gone too: the image must be
                // closable by its last owner later.
                let _ = helper.join();
                return match result {
                    Ok(()) => Ok(true),
                    Err(e) if e.0 == libc::EROFS => Ok(false),
                    Err(e) => {
                        Err(ceph_err(format!("taking the exclusive lock of {label}"), e).into())
                    }
                };
            }
            Ok(Event::Signal(sig)) => return Err(stopped_while_waiting(sig, label, true)),
            Ok(_) => {}
            Err(_) => {
                return Err(Failure {
                    error: Error::InUse {
                        name: label.to_string(),
                        holder: format!(
                        "the lock was free but taking it did not finish: another client took it \
                             first, {}; try again later",
                        describe_owner(image)
                    ),
                    },
                    still_blocked: true,
                })
            }
        }
    }
}

fn stopped_while_waiting(sig: impl std::fmt::Display, label: &str, blocked: bool) -> Failure {
    Failure {
        error: Error::Command {
            program: "rbdvol export".into(),
            detail: format!("stopped by signal {sig} while waiting for the lock of {label}"),
        },
        still_blocked: blocked,
    }
}

/// How the lock was taken: after how long, and from which dead owners.
#[derive(Debug, Clone, Default)]
pub struct Acquired {
    pub waited: Duration,
    pub took_over_from: Vec<String>,
}

fn taken(started: Instant, label: &str, broke: Vec<String>) -> Acquired {
    tracing::info!(image = %label, waited_ms = started.elapsed().as_millis() as u64, took_over_from = ?broke, "exclusive lock acquired");
    Acquired {
        waited: started.elapsed(),
        took_over_from: broke,
    }
}

/// `client.N at ADDR`: the name comes from the handle's lock list (a cache), the
/// address from the live owner query.
fn client_at(image: &Image<'_>, addr: &str) -> String {
    match image
        .lockers()
        .ok()
        .and_then(|ls| ls.into_iter().find(|l| same_client(&l.addr, addr)))
    {
        Some(l) => format!("{} at {addr}", l.client),
        None => addr.to_string(),
    }
}

/// One holder, with the owner record's host when the record is that holder's.
fn owner_words(image: &Image<'_>, addr: &str) -> String {
    let recorded = image.metadata_get(OWNER_ADDR).ok().flatten();
    match image.metadata_get(OWNER_HOST).ok().flatten() {
        Some(h) if recorded.as_deref() == Some(addr) => {
            format!("{} (host {h})", client_at(image, addr))
        }
        _ => client_at(image, addr),
    }
}

/// Who holds the managed lock, in words: `client.N at ADDR (host H, since S)`.
pub fn describe_owner(image: &Image<'_>) -> String {
    let who = match image.lock_owners() {
        Ok(addrs) if addrs.is_empty() => "nobody right now (it was just released)".to_string(),
        Ok(addrs) => addrs
            .iter()
            .map(|a| client_at(image, a))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!(
            "an unknown client (reading the lock owner failed: {})",
            e.describe()
        ),
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
