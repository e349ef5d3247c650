//! RADOS watch/notify on one object (part of the unsafe `sys` module), and the small
//! whole-object reads and writes that go with it. Two users:
//! - the liveness signal ([`crate::ceph::liveness`]): a watch with its own short
//!   timeout (`rados_watch3`, which the `ceph` crate does not bind) whose notifies are
//!   acknowledged at once, so a taker asking "who is watching?" hears in milliseconds;
//! - the volume control channel ([`crate::node::control`]): the daemon holding a volume
//!   watches, and a command on any host notifies and reads every watcher's reply, or
//!   learns which watchers did not answer in time. No port of its own.

use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ceph::rados::{self, rados_ioctx_t, rados_watchcb2_t, rados_watcherrcb_t};

use super::*;

#[link(name = "rados")]
extern "C" {
    fn rados_watch3(
        io: rados_ioctx_t,
        o: *const c_char,
        cookie: *mut u64,
        watchcb: rados_watchcb2_t,
        watcherrcb: rados_watcherrcb_t,
        timeout: u32,
        arg: *mut c_void,
    ) -> c_int;
}

/// A message that reached a watch.
#[derive(Debug, Clone)]
pub struct Notification {
    pub notify_id: u64,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

/// What a watch does with the notifies it receives.
pub enum OnNotify {
    /// Acknowledge at once, with no payload.
    Ack,
    /// Hand each one over; the receiver answers with [`Watch::ack`].
    Deliver(Sender<Notification>),
}

/// What the callbacks need: the watch's own pool context and object name, and where
/// notifies go. Boxed so its address stays put while librados holds it.
struct Target {
    io: rados_ioctx_t,
    oid: CString,
    deliver: Option<Mutex<Sender<Notification>>>,
}

extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    cookie: u64,
    _notifier_id: u64,
    data: *mut c_void,
    len: usize,
) {
    // SAFETY: `arg` is the Target boxed in the Watch, which outlives the watch
    // (unwatched and flushed before it is freed).
    let t = unsafe { &*(arg as *const Target) };
    let Some(deliver) = &t.deliver else {
        // SAFETY: valid pool context and object name; no payload.
        unsafe { rados::rados_notify_ack(t.io, t.oid.as_ptr(), notify_id, cookie, ptr::null(), 0) };
        return;
    };
    let payload = if data.is_null() || len == 0 {
        Vec::new()
    } else {
        // SAFETY: librados passes `len` readable bytes at `data` for this call.
        unsafe { std::slice::from_raw_parts(data as *const u8, len) }.to_vec()
    };
    let tx = deliver.lock().unwrap_or_else(|e| e.into_inner());
    let _ = tx.send(Notification {
        notify_id,
        cookie,
        payload,
    });
}

extern "C" fn on_error(_arg: *mut c_void, cookie: u64, err: c_int) {
    // The owner notices through `Watch::check` and watches again.
    tracing::warn!(cookie, error = %Errno(-err).describe(), "a watch was lost");
}

/// A watch on one object, held for as long as this value lives. With a timeout, the
/// OSD drops it when no ping from this client arrived for that long (librados pings
/// every `objecter_tick_interval`); without one, after `osd_client_watch_timeout`.
pub struct Watch {
    // Dropped in this order by hand (see Drop): unwatch, flush callbacks, then the
    // target, the pool context and the connection.
    cookie: u64,
    target: Box<Target>,
    timeout: u32,
    rados: Arc<Rados>,
}

// SAFETY: the pool context is used by librados' callback thread and by this value's
// methods (acks, checks, writes), which librados allows concurrently from any thread;
// it is destroyed only in Drop.
unsafe impl Send for Watch {}
unsafe impl Sync for Watch {}

impl Watch {
    /// Watches `pool/oid`, which must exist. `timeout` is whole seconds; zero means the
    /// cluster's `osd_client_watch_timeout`.
    pub fn start(
        rados: Arc<Rados>,
        pool: &str,
        oid: &str,
        timeout: Duration,
        on: OnNotify,
    ) -> Result<Watch> {
        let p = cstr(pool)?;
        let oid = cstr(oid)?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: valid connected handle, string and out-pointer.
        check(unsafe { rados::rados_ioctx_create(rados.handle, p.as_ptr(), &mut io) })?;
        let deliver = match on {
            OnNotify::Ack => None,
            OnNotify::Deliver(tx) => Some(Mutex::new(tx)),
        };
        let mut w = Watch {
            cookie: 0,
            target: Box::new(Target { io, oid, deliver }),
            timeout: timeout.as_secs().min(u32::MAX as u64) as u32,
            rados,
        };
        w.register()?;
        Ok(w)
    }

    fn register(&mut self) -> Result<()> {
        let arg = &*self.target as *const Target as *mut c_void;
        let mut cookie = 0u64;
        // SAFETY: valid pool context, name and out-pointer; `arg` lives as long as self.
        check(unsafe {
            rados_watch3(
                self.target.io,
                self.target.oid.as_ptr(),
                &mut cookie,
                Some(on_notify),
                Some(on_error),
                self.timeout,
                arg,
            )
        })?;
        self.cookie = cookie;
        Ok(())
    }

    /// Time since the OSD last confirmed the watch, or the error that ended it.
    pub fn check(&self) -> Result<Duration> {
        // SAFETY: valid pool context and cookie.
        let rc = check(unsafe { rados::rados_watch_check(self.target.io, self.cookie) })?;
        Ok(Duration::from_millis(rc as u64))
    }

    /// Replaces a watch that failed (the OSD dropped it) with a new one.
    pub fn rewatch(&mut self) -> Result<()> {
        self.unwatch();
        self.register()
    }

    fn unwatch(&mut self) {
        if self.cookie != 0 {
            // SAFETY: valid pool context; the cookie came from rados_watch3.
            unsafe { rados::rados_unwatch2(self.target.io, self.cookie) };
            self.cookie = 0;
        }
    }

    /// Answers one delivered notification; the notifier sees `reply` as this watcher's
    /// answer.
    pub fn ack(&self, n: &Notification, reply: &[u8]) -> Result<()> {
        // SAFETY: valid pool context and name; `reply` is readable for its length.
        check(unsafe {
            rados::rados_notify_ack(
                self.target.io,
                self.target.oid.as_ptr(),
                n.notify_id,
                n.cookie,
                reply.as_ptr() as *const c_char,
                reply.len() as c_int,
            )
        })
        .map(|_| ())
    }

    /// Replaces the object's contents (the watch's own pool context).
    pub fn write_full(&self, data: &[u8]) -> Result<()> {
        // SAFETY: valid pool context, name and buffer.
        check(unsafe {
            rados::rados_write_full(
                self.target.io,
                self.target.oid.as_ptr(),
                data.as_ptr().cast(),
                data.len(),
            )
        })
        .map(|_| ())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.unwatch();
        // SAFETY: valid handle; waits until no callback runs any more, so the target
        // and the pool context can go.
        unsafe { rados::rados_watch_flush(self.rados.handle) };
        // SAFETY: created in start; no watch or callback uses it any more.
        unsafe { rados::rados_ioctx_destroy(self.target.io) };
    }
}

/// The answers to one notify.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyReplies {
    /// (global id of the watcher's client, its reply).
    pub acks: Vec<(u64, Vec<u8>)>,
    /// Global ids of the clients that hold a watch but did not answer in time.
    pub timeouts: Vec<u64>,
}

impl NotifyReplies {
    /// Whether client `gid` still holds a watch on the object (answered or not).
    pub fn watching(&self, gid: u64) -> bool {
        self.acks.iter().any(|(g, _)| *g == gid) || self.timeouts.contains(&gid)
    }

    /// librados' reply encoding: le32 count, then (le64 gid, le64 cookie, le32 len,
    /// payload) per ack; le32 count, then (le64 gid, le64 cookie) per timeout.
    pub fn decode(b: &[u8]) -> Option<NotifyReplies> {
        let mut c = Cursor(b);
        let mut reply = NotifyReplies::default();
        for _ in 0..c.u32()? {
            let (gid, _cookie) = (c.u64()?, c.u64()?);
            let len = c.u32()? as usize;
            reply.acks.push((gid, c.take(len)?.to_vec()));
        }
        for _ in 0..c.u32()? {
            let (gid, _cookie) = (c.u64()?, c.u64()?);
            reply.timeouts.push(gid);
        }
        Some(reply)
    }
}

/// Little-endian reads off the front of a buffer.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

impl Pool<'_> {
    /// Replaces an object's contents, creating it if need be.
    pub fn write_object(&self, oid: &str, data: &[u8]) -> Result<()> {
        let o = cstr(oid)?;
        // SAFETY: valid pool context, name and buffer.
        check(unsafe {
            rados::rados_write_full(self.io, o.as_ptr(), data.as_ptr().cast(), data.len())
        })
        .map(|_| ())
    }

    /// Creates an object if it does not exist, leaving any contents as they are.
    pub fn touch_object(&self, oid: &str) -> Result<()> {
        let o = cstr(oid)?;
        // SAFETY: valid pool context and name; an empty write only creates.
        check(unsafe { rados::rados_write(self.io, o.as_ptr(), ptr::null(), 0, 0) }).map(|_| ())
    }

    /// Removes an object; one that does not exist counts as removed.
    pub fn remove_object(&self, oid: &str) -> Result<()> {
        let o = cstr(oid)?;
        // SAFETY: valid pool context and name.
        match unsafe { rados::rados_remove(self.io, o.as_ptr()) } {
            rc if rc == -libc::ENOENT => Ok(()),
            rc => check(rc).map(|_| ()),
        }
    }

    /// Reads up to `max` bytes of an object; `None` if it does not exist.
    pub fn read_object(&self, oid: &str, max: usize) -> Result<Option<Vec<u8>>> {
        let o = cstr(oid)?;
        let mut buf = vec![0u8; max];
        // SAFETY: buffer of `max` bytes.
        let rc = unsafe { rados::rados_read(self.io, o.as_ptr(), buf.as_mut_ptr().cast(), max, 0) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        buf.truncate(check(rc)? as usize);
        Ok(Some(buf))
    }

    /// Notifies the watchers of `oid` and waits up to `timeout` for their answers. A
    /// watcher that did not answer in time is in `timeouts` (it still holds a watch);
    /// one whose watch the OSD dropped is in neither list. A missing object is ENOENT.
    pub fn notify(&self, oid: &str, payload: &[u8], timeout: Duration) -> Result<NotifyReplies> {
        let o = cstr(oid)?;
        let (mut out, mut len): (*mut c_char, usize) = (ptr::null_mut(), 0);
        // SAFETY: valid pool context, name and payload; librados allocates the reply,
        // freed below.
        let rc = unsafe {
            rados::rados_notify2(
                self.io,
                o.as_ptr(),
                payload.as_ptr() as *const c_char,
                payload.len() as c_int,
                timeout.as_millis() as u64,
                &mut out,
                &mut len,
            )
        };
        let bytes = if out.is_null() {
            Vec::new()
        } else {
            // SAFETY: librados returned `len` bytes at `out`; freed right after copying.
            let v = unsafe { std::slice::from_raw_parts(out as *const u8, len) }.to_vec();
            unsafe { rados::rados_buffer_free(out) };
            v
        };
        // ETIMEDOUT: some watcher did not answer; the reply still says who.
        let answered = rc >= 0 || (rc == -libc::ETIMEDOUT && !bytes.is_empty());
        if !answered {
            return Err(Errno(-rc));
        }
        NotifyReplies::decode(&bytes).ok_or(Errno(libc::EBADMSG))
    }
}

impl Rados {
    /// [`Pool::notify`] by pool name; a missing object has no watchers (no replies).
    pub fn notify(
        &self,
        pool: &str,
        oid: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<NotifyReplies> {
        match self.pool(pool)?.notify(oid, payload, timeout) {
            Err(e) if e.0 == libc::ENOENT => Ok(NotifyReplies::default()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_replies_decode_acks_and_timeouts() {
        let mut b = Vec::new();
        b.extend(2u32.to_le_bytes());
        for (gid, cookie, payload) in [(4101u64, 7u64, &b""[..]), (4102, 9, &b"hi"[..])] {
            b.extend(gid.to_le_bytes());
            b.extend(cookie.to_le_bytes());
            b.extend((payload.len() as u32).to_le_bytes());
            b.extend(payload);
        }
        b.extend(1u32.to_le_bytes());
        b.extend(4200u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        let r = NotifyReplies::decode(&b).unwrap();
        assert_eq!(r.acks, vec![(4101, vec![]), (4102, b"hi".to_vec())]);
        assert_eq!(r.timeouts, vec![4200]);
        assert!(r.watching(4102) && r.watching(4200) && !r.watching(4103));
        // Truncated replies are refused, not half-read.
        assert_eq!(NotifyReplies::decode(&b[..b.len() - 1]), None);
        assert_eq!(NotifyReplies::decode(&[]), None);
    }
}
