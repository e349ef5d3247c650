//! RADOS watch/notify on one object (part of the unsafe `sys` module): how a command on
//! any host reaches the daemon holding a volume, through the cluster itself (no port
//! of its own). The holder watches; a requester notifies and reads every watcher's
//! reply, or learns which watchers did not answer in time.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use ceph::rados::{self, rados_ioctx_t};

use super::*;

#[repr(C)]
struct NotifyAck {
    notifier_id: u64,
    cookie: u64,
    payload: *mut c_char,
    payload_len: u64,
}

#[repr(C)]
struct NotifyTimeout {
    notifier_id: u64,
    cookie: u64,
}

#[link(name = "rados")]
extern "C" {
    fn rados_decode_notify_response(
        buf: *mut c_char,
        len: usize,
        acks: *mut *mut NotifyAck,
        nr_acks: *mut usize,
        timeouts: *mut *mut NotifyTimeout,
        nr_timeouts: *mut usize,
    ) -> c_int;
    fn rados_free_notify_response(acks: *mut NotifyAck, nr: usize, timeouts: *mut NotifyTimeout);
}

/// A message that reached a watch.
#[derive(Debug, Clone)]
pub struct Notification {
    pub notify_id: u64,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

/// The answers to one notify.
#[derive(Debug, Clone, Default)]
pub struct NotifyReplies {
    /// (client id of the watcher, its reply).
    pub acks: Vec<(u64, Vec<u8>)>,
    /// Client ids of watchers that did not answer in time.
    pub timeouts: Vec<u64>,
}

struct Callback {
    tx: std::sync::Mutex<Sender<Notification>>,
}

extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    cookie: u64,
    _notifier: u64,
    data: *mut c_void,
    len: usize,
) {
    // SAFETY: `arg` is the Callback boxed in Watch, alive until after rados_watch_flush.
    let cb = unsafe { &*(arg as *const Callback) };
    let payload = if data.is_null() || len == 0 {
        Vec::new()
    } else {
        // SAFETY: librados passes `len` readable bytes at `data` for this call.
        unsafe { std::slice::from_raw_parts(data as *const u8, len) }.to_vec()
    };
    let tx = cb.tx.lock().unwrap_or_else(|e| e.into_inner());
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

/// A watch on one object, with its own pool context; unwatched on drop.
pub struct Watch {
    io: rados_ioctx_t,
    oid: std::ffi::CString,
    cookie: u64,
    callback: *mut Callback,
    rados: Arc<Rados>,
}

// SAFETY: the pool context is used for acks and checks, which librados allows from
// any thread; the callback box is only freed in Drop.
unsafe impl Send for Watch {}
unsafe impl Sync for Watch {}

impl Watch {
    /// Watches `pool/oid` (created empty if missing); every notification is sent to `tx`.
    pub fn start(
        rados: Arc<Rados>,
        pool: &str,
        oid: &str,
        tx: Sender<Notification>,
    ) -> Result<Watch> {
        let p = cstr(pool)?;
        let o = cstr(oid)?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: valid connected handle, string and out-pointer.
        check(unsafe { rados::rados_ioctx_create(rados.handle, p.as_ptr(), &mut io) })?;
        let callback = Box::into_raw(Box::new(Callback {
            tx: std::sync::Mutex::new(tx),
        }));
        let mut w = Watch {
            io,
            oid: o,
            cookie: 0,
            callback,
            rados,
        };
        // SAFETY: valid io context and string; an empty write creates the object.
        let rc = unsafe { rados::rados_write(w.io, w.oid.as_ptr(), ptr::null(), 0, 0) };
        check(rc)?;
        // SAFETY: valid io context, string, out-pointer; `callback` outlives the watch
        // (freed in Drop after unwatch and flush).
        check(unsafe {
            rados::rados_watch2(
                w.io,
                w.oid.as_ptr(),
                &mut w.cookie,
                Some(on_notify),
                Some(on_error),
                w.callback as *mut c_void,
            )
        })?;
        Ok(w)
    }

    /// Answers one notification; the notifier sees `reply` as this watcher's ack.
    pub fn ack(&self, n: &Notification, reply: &[u8]) -> Result<()> {
        // SAFETY: valid io context and string; `reply` is readable for its length.
        check(unsafe {
            rados::rados_notify_ack(
                self.io,
                self.oid.as_ptr(),
                n.notify_id,
                n.cookie,
                reply.as_ptr() as *const c_char,
                reply.len() as c_int,
            )
        })
        .map(|_| ())
    }

    /// Ok while the watch is registered; an error means watch again.
    pub fn check(&self) -> Result<()> {
        // SAFETY: valid io context and cookie.
        check(unsafe { rados::rados_watch_check(self.io, self.cookie) }).map(|_| ())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: the watch (if registered) is removed, then callbacks still running are
        // waited for, so the callback box and the pool context can go.
        unsafe {
            if self.cookie != 0 {
                rados::rados_unwatch2(self.io, self.cookie);
            }
            rados::rados_watch_flush(self.rados.handle);
            drop(Box::from_raw(self.callback));
            rados::rados_ioctx_destroy(self.io);
        }
    }
}

impl Rados {
    /// Notifies every watcher of `pool/oid` and waits up to `timeout` for their replies.
    /// A missing object has no watchers (empty replies).
    pub fn notify(
        &self,
        pool: &str,
        oid: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<NotifyReplies> {
        let io = self.pool(pool)?;
        let o = cstr(oid)?;
        let (mut buf, mut len): (*mut c_char, usize) = (ptr::null_mut(), 0);
        // SAFETY: valid io context, string and payload; librados allocates the reply
        // buffer, freed below.
        let rc = unsafe {
            rados::rados_notify2(
                io.io,
                o.as_ptr(),
                payload.as_ptr() as *const c_char,
                payload.len() as c_int,
                timeout.as_millis() as u64,
                &mut buf,
                &mut len,
            )
        };
        if rc == -libc::ENOENT {
            return Ok(NotifyReplies::default());
        }
        if rc < 0 && rc != -libc::ETIMEDOUT {
            if !buf.is_null() {
                // SAFETY: allocated by librados.
                unsafe { rados::rados_buffer_free(buf) };
            }
            return Err(Errno(-rc));
        }
        if buf.is_null() {
            return Err(Errno(-rc.min(-libc::EIO)));
        }
        let mut out = NotifyReplies::default();
        let (mut acks, mut nacks): (*mut NotifyAck, usize) = (ptr::null_mut(), 0);
        let (mut tos, mut ntos): (*mut NotifyTimeout, usize) = (ptr::null_mut(), 0);
        // SAFETY: the buffer and its length came from rados_notify2; librados allocates
        // the two arrays, freed below with their own call.
        let drc = unsafe {
            rados_decode_notify_response(buf, len, &mut acks, &mut nacks, &mut tos, &mut ntos)
        };
        if drc >= 0 {
            for i in 0..nacks {
                // SAFETY: `nacks` entries at `acks`, each payload readable for its length.
                let a = unsafe { &*acks.add(i) };
                let payload = if a.payload.is_null() {
                    Vec::new()
                } else {
                    unsafe {
                        std::slice::from_raw_parts(a.payload as *const u8, a.payload_len as usize)
                    }
                    .to_vec()
                };
                out.acks.push((a.notifier_id, payload));
            }
            for i in 0..ntos {
                // SAFETY: `ntos` entries at `tos`.
                out.timeouts.push(unsafe { &*tos.add(i) }.notifier_id);
            }
            // SAFETY: frees what rados_decode_notify_response allocated.
            unsafe { rados_free_notify_response(acks, nacks, tos) };
        }
        // SAFETY: allocated by librados in rados_notify2.
        unsafe { rados::rados_buffer_free(buf) };
        check(drc)?;
        Ok(out)
    }
}

impl Pool<'_> {
    /// Removes an object; a missing one counts as removed.
    pub fn remove_object(&self, oid: &str) -> Result<()> {
        let o = cstr(oid)?;
        // SAFETY: valid io context and string.
        match unsafe { rados::rados_remove(self.io, o.as_ptr()) } {
            rc if rc == -libc::ENOENT => Ok(()),
            rc => check(rc).map(|_| ()),
        }
    }
}
