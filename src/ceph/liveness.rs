//! The liveness signal that lets a dead or cut-off host's volume be taken over in
//! seconds without lowering the cluster-wide `osd_client_watch_timeout` (30 s by
//! default), which governs librbd's watch on the image header.
//!
//! The owner (the exporter process, whose RADOS client also holds the image's
//! exclusive lock) keeps a watch with its own short timeout (`rados_watch3`) on a small
//! object beside the image, `rbdvol_alive.<image>`, and writes into that object a
//! record naming its client (address and global id). The OSD drops the watch when no
//! ping from that client arrived for the timeout; librados pings once a second here
//! (`objecter_tick_interval`), so a live client's watch survives a few lost pings.
//!
//! A host waiting for the lock asks the object's watchers with a notify: an owner
//! whose record is there and whose client no longer holds a watch on the object is
//! declared dead. Anything short of that proof (no record, a record naming another
//! client, an unreadable reply) says nothing, and the old rule applies: the owner's
//! header watch must have timed out. An owner running an older rbdvol, or a kernel
//! mapping, never writes a record, so it is never taken over early.
//!
//! Timing decides only *when* an owner is declared dead, never whether two hosts
//! write: the taker blocklists the owner before the lock changes hands, so a live but
//! slow owner declared dead is fenced (it loses the volume), never doubled.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::images::same_client;
use super::sys::{self, Errno, NotifyReplies, OnNotify, Pool, Rados, Watch};

/// How long a taker waits for the watchers to answer its notify. A live owner answers
/// in milliseconds; one that does not is still counted as watching (it did not answer,
/// but the OSD still holds its watch), so this bounds only the taker's poll. Whole
/// seconds: the OSD takes the timeout in seconds, and 0 means its 30 s default.
pub const NOTIFY_WAIT: Duration = Duration::from_secs(1);
/// How often the owner checks its own watch and re-establishes it after an error.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const MAGIC: &str = "rbdvol liveness 1";

/// The object beside image `image` (same pool) that carries the liveness watch.
pub fn object_name(image: &str) -> String {
    format!("rbdvol_alive.{image}")
}

/// Who opted in: the client that holds (or held) the lock and its watch timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub addr: String,
    pub gid: u64,
    pub timeout_secs: u64,
}

impl Record {
    pub fn encode(&self) -> String {
        format!(
            "{MAGIC}\naddr={}\nclient=client.{}\ntimeout={}\n",
            self.addr, self.gid, self.timeout_secs
        )
    }

    pub fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let (mut addr, mut gid, mut timeout) = (None, None, None);
        for l in lines {
            match l.split_once('=') {
                Some(("addr", v)) => addr = Some(v.to_string()),
                Some(("client", v)) => gid = v.strip_prefix("client.")?.parse().ok(),
                Some(("timeout", v)) => timeout = v.parse().ok(),
                _ => {}
            }
        }
        Some(Record {
            addr: addr.filter(|a| !a.is_empty())?,
            gid: gid?,
            timeout_secs: timeout?,
        })
    }
}

/// What the liveness signal says about a lock owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The owner opted in and still holds its watch.
    Alive,
    /// The owner opted in and its watch is gone: the OSD has not heard from that
    /// client for its timeout. Why, in words.
    Gone(String),
    /// No proof either way; the header-watch rule applies. Why, in words.
    Unknown(String),
}

/// Decides from the object's contents (`None`: no object), the lock owner's address
/// and the notify's answer (only asked for when the record names the owner).
pub fn judge(
    contents: Option<&[u8]>,
    owner: &str,
    ask: impl FnOnce() -> sys::Result<NotifyReplies>,
) -> Liveness {
    let Some(bytes) = contents else {
        return Liveness::Unknown(
            "it published no liveness record (an older rbdvol, or a kernel mapping)".into(),
        );
    };
    let Some(rec) = std::str::from_utf8(bytes).ok().and_then(Record::parse) else {
        return Liveness::Unknown("its liveness record is unreadable".into());
    };
    if !same_client(&rec.addr, owner) {
        return Liveness::Unknown(format!(
            "the liveness record names another client ({}, an earlier owner): this owner did not opt in",
            rec.addr
        ));
    }
    match ask() {
        Err(e) => Liveness::Unknown(format!(
            "asking the liveness object's watchers failed ({})",
            e.describe()
        )),
        Ok(r) if r.watching(rec.gid) => Liveness::Alive,
        Ok(_) => Liveness::Gone(format!(
            "client.{} at {} no longer holds its {} s liveness watch: the OSD has not heard from it for that long",
            rec.gid, rec.addr, rec.timeout_secs
        )),
    }
}

/// Reads the record and asks the watchers of image `image`'s liveness object.
pub fn probe(pool: &Pool<'_>, image: &str, owner: &str) -> Liveness {
    let oid = object_name(image);
    match pool.read_object(&oid, 4096) {
        Err(e) => Liveness::Unknown(format!(
            "reading the liveness record failed ({})",
            e.describe()
        )),
        Ok(contents) => judge(contents.as_deref(), owner, || {
            pool.notify(&oid, &[], NOTIFY_WAIT)
        }),
    }
}

/// The owner's side: the watch, checked every second and re-established after an
/// error, until dropped (which removes the watch).
pub struct Keeper {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Registers the watch, then writes the record: a record only ever names a client
    /// that was watching when it was written.
    pub fn start(
        rados: Arc<Rados>,
        pool: &str,
        image: &str,
        record: Record,
    ) -> Result<Keeper, (&'static str, Errno)> {
        let oid = object_name(image);
        let timeout = Duration::from_secs(record.timeout_secs);
        // The watch needs its object; writing the record creates it.
        let watch = match Watch::start(rados.clone(), pool, &oid, timeout, OnNotify::Ack) {
            Ok(w) => w,
            Err(e) if e.0 == libc::ENOENT => {
                let io = rados.pool(pool).map_err(|e| ("opening the pool", e))?;
                io.write_object(&oid, b"")
                    .map_err(|e| ("creating the liveness object", e))?;
                Watch::start(rados.clone(), pool, &oid, timeout, OnNotify::Ack)
                    .map_err(|e| ("watching the liveness object", e))?
            }
            Err(e) => return Err(("watching the liveness object", e)),
        };
        let text = record.encode();
        watch
            .write_full(text.as_bytes())
            .map_err(|e| ("writing the liveness record", e))?;
        let (tx, rx) = mpsc::channel::<()>();
        let label = format!("{pool}/{image}");
        let thread = std::thread::Builder::new()
            .name("liveness".into())
            .spawn(move || keep(watch, &label, &text, rx))
            .map_err(|_| ("starting the liveness thread", Errno(libc::EAGAIN)))?;
        Ok(Keeper {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

fn keep(mut watch: Watch, label: &str, record: &str, rx: mpsc::Receiver<()>) {
    let mut broken = false;
    loop {
        match rx.recv_timeout(CHECK_EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let err = match watch.check() {
            Ok(_) => continue,
            Err(e) => e,
        };
        if err.0 == libc::ESHUTDOWN {
            tracing::warn!(image = %label, "the liveness watch ended: this client is blocklisted (fenced)");
            return;
        }
        if !broken {
            tracing::warn!(image = %label, error = %err.describe(), "the liveness watch was lost (the OSD did not hear from this client for its timeout); re-establishing it. A host waiting for this volume may have declared this one dead and fenced it meanwhile");
        }
        // The record is rewritten too: if someone else had taken the lock, this
        // client would be blocklisted and both calls fail.
        let rewatched = match watch.rewatch() {
            // The object was removed (its volume too, and a new one of the same name
            // mapped here?): create it again, empty, before watching.
            Err(e) if e.0 == libc::ENOENT => watch.write_full(b"").and_then(|_| watch.rewatch()),
            r => r,
        };
        match rewatched.and_then(|_| watch.write_full(record.as_bytes())) {
            Ok(()) => {
                broken = false;
                tracing::info!(image = %label, "liveness watch re-established");
            }
            Err(e) => {
                broken = true;
                if e.0 == libc::ESHUTDOWN {
                    tracing::warn!(image = %label, "the liveness watch cannot be re-established: this client is blocklisted (fenced)");
                    return;
                }
            }
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "10.0.0.2:0/1001";

    fn record(addr: &str) -> Vec<u8> {
        Record {
            addr: addr.into(),
            gid: 4242,
            timeout_secs: 5,
        }
        .encode()
        .into_bytes()
    }

    fn reply(acked: &[u64], timed_out: &[u64]) -> sys::Result<NotifyReplies> {
        Ok(NotifyReplies {
            acks: acked.iter().map(|g| (*g, Vec::new())).collect(),
            timeouts: timed_out.to_vec(),
        })
    }

    fn never() -> sys::Result<NotifyReplies> {
        panic!("the watchers must not be asked without a record naming the owner")
    }

    #[test]
    fn records_round_trip_and_junk_is_refused() {
        let r = Record {
            addr: OWNER.into(),
            gid: 7,
            timeout_secs: 5,
        };
        assert_eq!(Record::parse(&r.encode()), Some(r));
        assert_eq!(Record::parse(""), None);
        assert_eq!(
            Record::parse("rbdvol liveness 1\naddr=\nclient=client.1\ntimeout=5"),
            None
        );
        assert_eq!(
            Record::parse("something else\naddr=a\nclient=client.1\ntimeout=5"),
            None
        );
    }

    #[test]
    fn an_owner_without_a_record_falls_back_to_the_header_watch_rule() {
        assert!(matches!(judge(None, OWNER, never), Liveness::Unknown(_)));
        assert!(matches!(
            judge(Some(b""), OWNER, never),
            Liveness::Unknown(_)
        ));
    }

    #[test]
    fn a_record_of_another_client_proves_nothing_about_this_owner() {
        // The previous owner's record, left behind; the new owner is an older rbdvol.
        let rec = record("10.0.0.3:0/77");
        assert!(
            matches!(judge(Some(&rec), OWNER, never), Liveness::Unknown(r) if r.contains("another client"))
        );
    }

    #[test]
    fn a_watching_owner_is_alive_whether_or_not_it_answered() {
        let rec = record(&format!("v2:{OWNER}"));
        assert_eq!(
            judge(Some(&rec), OWNER, || reply(&[4242], &[])),
            Liveness::Alive
        );
        assert_eq!(
            judge(Some(&rec), OWNER, || reply(&[1], &[4242])),
            Liveness::Alive
        );
    }

    #[test]
    fn an_owner_whose_watch_is_gone_is_dead() {
        let rec = record(OWNER);
        let v = judge(Some(&rec), OWNER, || reply(&[1, 2], &[3]));
        assert!(
            matches!(&v, Liveness::Gone(r) if r.contains("client.4242")),
            "{v:?}"
        );
    }

    #[test]
    fn an_unanswered_notify_proves_nothing() {
        let rec = record(OWNER);
        let v = judge(Some(&rec), OWNER, || Err(Errno(libc::ETIMEDOUT)));
        assert!(matches!(v, Liveness::Unknown(_)), "{v:?}");
    }
}
