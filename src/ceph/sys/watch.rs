//! Plain RADOS objects for the liveness signal (part of the unsafe `sys` module): a
//! watch with its own timeout (`rados_watch3`, which the `ceph` crate does not bind),
//! small whole-object reads and writes, and a notify that says which clients still
//! hold a watch on an object.

use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr;
use std::sync::Arc;
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

/// What the callback needs to acknowledge a notify: the watch's own pool context and
/// object name. Boxed so its address stays put while librados holds it.
struct AckTarget {
    io: rados_ioctx_t,
    oid: CString,
}

/// Acknowledges every notify at once, so a taker asking "who is watching?" gets its
/// answer in milliseconds instead of waiting out its notify timeout.
extern "C" fn ack_notify(
    arg: *mut c_void,
    notify_id: u64,
    cookie: u64,
    _notifier_id: u64,
    _data: *mut c_void,
    _len: usize,
) {
    // SAFETY: `arg` is the AckTarget boxed in the Watch, which outlives the watch
    // (unwatched and flushed before it is freed).
    let t = unsafe { &*(arg as *const AckTarget) };
    // SAFETY: valid pool context and object name; no payload.
    unsafe { rados::rados_notify_ack(t.io, t.oid.as_ptr(), notify_id, cookie, ptr::null(), 0) };
}

/// A watch on one object with its own timeout, held for as long as this value lives.
/// The OSD drops it when no ping from this client arrived for `timeout`; librados pings
/// every `objecter_tick_interval`.
pub struct Watch {
    // Dropped in this order by hand (see Drop): unwatch, flush callbacks, then the
    // callback target, the pool context and the connection.
    cookie: u64,
    target: Box<AckTarget>,
    timeout: u32,
    rados: Arc<Rados>,
}

// SAFETY: the pool context is used by librados' callback thread and by this value's
// methods, which librados allows concurrently; it is destroyed only in Drop.
unsafe impl Send for Watch {}

impl Watch {
    pub fn start(rados: Arc<Rados>, pool: &str, oid: &str, timeout: Duration) -> Result<Watch> {
        let p = cstr(pool)?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: valid connected handle, string and out-pointer.
        check(unsafe { rados::rados_ioctx_create(rados.handle, p.as_ptr(), &mut io) })?;
        let mut w = Watch {
            cookie: 0,
            target: Box::new(AckTarget {
                io,
                oid: cstr(oid)?,
            }),
            timeout: timeout.as_secs().clamp(1, u32::MAX as u64) as u32,
            rados,
        };
        w.register()?;
        Ok(w)
    }

    fn register(&mut self) -> Result<()> {
        let arg = &*self.target as *const AckTarget as *mut c_void;
        let mut cookie = 0u64;
        // SAFETY: valid pool context, name and out-pointer; `arg` lives as long as self.
        check(unsafe {
            rados_watch3(
                self.target.io,
                self.target.oid.as_ptr(),
                &mut cookie,
                Some(ack_notify),
                None,
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

/// Which clients answered a notify (acked) and which hold a watch but did not answer
/// in time: (global id, watch cookie) pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyReply {
    pub acked: Vec<(u64, u64)>,
    pub timed_out: Vec<(u64, u64)>,
}

impl NotifyReply {
    /// librados' reply encoding: le32 count, then (le64 gid, le64 cookie, le32 len,
    /// payload) per ack; le32 count, then (le64 gid, le64 cookie) per timeout.
    pub fn decode(b: &[u8]) -> Option<NotifyReply> {
        let mut c = Cursor(b);
        let mut reply = NotifyReply::default();
        for _ in 0..c.u32()? {
            let (gid, cookie) = (c.u64()?, c.u64()?);
            let len = c.u32()? as usize;
            c.take(len)?;
            reply.acked.push((gid, cookie));
        }
        for _ in 0..c.u32()? {
            reply.timed_out.push((c.u64()?, c.u64()?));
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

    /// Notifies the watchers of `oid` and waits up to `timeout` for their answers.
    /// A watcher that did not answer in time is in `timed_out` (it still holds a
    /// watch); one whose watch the OSD dropped is in neither list.
    pub fn notify(&self, oid: &str, timeout: Duration) -> Result<NotifyReply> {
        let o = cstr(oid)?;
        let (mut out, mut len): (*mut c_char, usize) = (ptr::null_mut(), 0);
        // SAFETY: valid pool context and name; librados allocates the reply, freed below.
        let rc = unsafe {
            rados::rados_notify2(
                self.io,
                o.as_ptr(),
                ptr::null(),
                0,
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
        NotifyReply::decode(&bytes).ok_or(Errno(libc::EBADMSG))
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
        let r = NotifyReply::decode(&b).unwrap();
        assert_eq!(r.acked, vec![(4101, 7), (4102, 9)]);
        assert_eq!(r.timed_out, vec![(4200, 3)]);
        // Truncated replies are refused, not half-read.
        assert_eq!(NotifyReply::decode(&b[..b.len() - 1]), None);
        assert_eq!(NotifyReply::decode(&[]), None);
    }
}
