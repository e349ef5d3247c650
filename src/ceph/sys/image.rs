//! Open images: reads, writes, locks, metadata, watchers (part of the unsafe `sys` module).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::time::{Duration, SystemTime};

use ceph::rados::{self, rados_ioctx_t};

use super::*;

/// Facts read from an open image.
#[derive(Debug, Clone)]
pub struct ImageStat {
    pub size: u64,
    pub object_size: u64,
    pub features: u64,
    pub data_pool_id: Option<i64>,
    pub created: Option<SystemTime>,
}

/// A client watching the image header, as Ceph reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    pub addr: String,
    pub id: i64,
    pub cookie: u64,
}

/// A lock on the image header, as `rbd lock ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    pub client: String,
    pub cookie: String,
    pub addr: String,
}

impl Locker {
    /// librbd's managed exclusive lock uses cookies `auto <n>`; anything else was
    /// taken with `rbd lock add` (advisory).
    pub fn is_managed(&self) -> bool {
        self.cookie.starts_with("auto ")
    }
}

/// An open image. Closed on drop.
pub struct Image<'p> {
    pub(super) handle: RbdImage,
    pub(super) _pool: std::marker::PhantomData<&'p ()>,
}

impl Image<'_> {
    pub fn stat(&self) -> Result<ImageStat> {
        // SAFETY: zeroed POD struct filled by librbd; size passed matches.
        let mut info: RbdImageInfo = unsafe { std::mem::zeroed() };
        check(unsafe { rbd_stat(self.handle, &mut info, std::mem::size_of::<RbdImageInfo>()) })?;
        let mut features = 0u64;
        // SAFETY: valid handle and out-pointer.
        check(unsafe { rbd_get_features(self.handle, &mut features) })?;
        // SAFETY: valid handle.
        let dp = unsafe { rbd_get_data_pool_id(self.handle) };
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid handle and out-pointer.
        let created = match check(unsafe { rbd_get_create_timestamp(self.handle, &mut ts) }) {
            Ok(_) if ts.tv_sec > 0 => {
                Some(SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
            }
            _ => None,
        };
        Ok(ImageStat {
            size: info.size,
            object_size: info.obj_size,
            features,
            data_pool_id: (dp >= 0).then_some(dp),
            created,
        })
    }

    pub fn metadata_get(&self, key: &str) -> Result<Option<String>> {
        let k = cstr(key)?;
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            // SAFETY: buffer of `len` bytes; librbd writes at most that.
            let rc = unsafe {
                rbd_metadata_get(self.handle, k.as_ptr(), buf.as_mut_ptr().cast(), &mut len)
            };
            match rc {
                rc if rc == -libc::ENOENT => return Ok(None),
                rc if rc == -libc::ERANGE => buf.resize(len.max(buf.len() * 2), 0),
                rc => {
                    check(rc)?;
                    return Ok(Some(c_buffer_string(&buf[..len])));
                }
            }
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: valid handle and strings.
        check(unsafe { rbd_metadata_set(self.handle, k.as_ptr(), v.as_ptr()) }).map(|_| ())
    }

    pub fn metadata_remove(&self, key: &str) -> Result<()> {
        let k = cstr(key)?;
        // SAFETY: valid handle and string.
        match unsafe { rbd_metadata_remove(self.handle, k.as_ptr()) } {
            rc if rc == -libc::ENOENT => Ok(()),
            rc => check(rc).map(|_| ()),
        }
    }

    /// All metadata pairs whose key starts with `prefix`, in one call.
    pub fn metadata_with_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let start = cstr(prefix)?;
        let (mut kcap, mut vcap) = (4096usize, 16384usize);
        loop {
            let mut keys = vec![0u8; kcap];
            let mut vals = vec![0u8; vcap];
            let (mut klen, mut vlen) = (kcap, vcap);
            // SAFETY: both buffers have the lengths passed; librbd writes NUL-separated lists.
            let rc = unsafe {
                rbd_metadata_list(
                    self.handle,
                    start.as_ptr(),
                    0,
                    keys.as_mut_ptr().cast(),
                    &mut klen,
                    vals.as_mut_ptr().cast(),
                    &mut vlen,
                )
            };
            if rc == -libc::ERANGE {
                kcap = klen.max(kcap * 2);
                vcap = vlen.max(vcap * 2);
                continue;
            }
            check(rc)?;
            let ks = split_nul_list(&keys[..klen]);
            let vs = split_nul_list(&vals[..vlen]);
            // `start` is "list after this key", so keys past the prefix range come too.
            return Ok(ks
                .into_iter()
                .zip(vs)
                .filter(|(k, _)| k.starts_with(prefix))
                .collect());
        }
    }

    pub fn watchers(&self) -> Result<Vec<Watcher>> {
        let mut cap = 8usize;
        loop {
            let mut ws: Vec<RbdImageWatcher> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: buffer of `cap` entries; librbd fills `n`.
            let rc = unsafe { rbd_watchers_list(self.handle, ws.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n + 4;
                continue;
            }
            check(rc)?;
            // SAFETY: librbd initialised `n` entries.
            unsafe { ws.set_len(n) };
            let out = ws
                .iter()
                .map(|w| Watcher {
                    // SAFETY: NUL-terminated string owned by librbd until cleanup.
                    addr: unsafe { CStr::from_ptr(w.addr) }
                        .to_string_lossy()
                        .into_owned(),
                    id: w.id,
                    cookie: w.cookie,
                })
                .collect();
            // SAFETY: frees what librbd allocated for the `n` entries.
            unsafe { rbd_watchers_list_cleanup(ws.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Owners of the managed exclusive lock (client addresses).
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let mut cap = 4usize;
        loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); cap];
            let mut n = cap;
            let mut mode: c_int = 0;
            // SAFETY: array of `cap` pointers; librbd fills `n` and allocates strings.
            let rc =
                unsafe { rbd_lock_get_owners(self.handle, &mut mode, owners.as_mut_ptr(), &mut n) };
            match rc {
                rc if rc == -libc::ENOENT => return Ok(Vec::new()),
                rc if rc == -libc::ERANGE => {
                    cap = n + 4;
                    continue;
                }
                rc => check(rc)?,
            };
            let out = owners[..n]
                .iter()
                // SAFETY: NUL-terminated strings allocated by librbd.
                .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned())
                .collect();
            // SAFETY: frees the `n` strings allocated above.
            unsafe { rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Every lock on the image header: the managed exclusive lock (cookie `auto <n>`)
    /// and advisory `rbd lock add` locks. Works on read-only opens, unlike
    /// `rbd_lock_get_owners`.
    pub fn lockers(&self) -> Result<Vec<Locker>> {
        let mut cap = 1024usize;
        loop {
            let mut exclusive: c_int = 0;
            let (mut tag, mut clients, mut cookies, mut addrs) = (
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
            );
            let (mut tl, mut cl, mut kl, mut al) = (cap, cap, cap, cap);
            // SAFETY: four buffers of `cap` bytes with their lengths.
            let rc = unsafe {
                rbd_list_lockers(
                    self.handle,
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    &mut tl,
                    clients.as_mut_ptr().cast(),
                    &mut cl,
                    cookies.as_mut_ptr().cast(),
                    &mut kl,
                    addrs.as_mut_ptr().cast(),
                    &mut al,
                )
            };
            if rc == -(libc::ERANGE as isize) {
                cap = [tl, cl, kl, al, cap * 2]
                    .into_iter()
                    .max()
                    .unwrap_or(cap * 2);
                continue;
            }
            if rc < 0 {
                return Err(Errno(-rc as i32));
            }
            let c = split_nul_list(&clients[..cl.min(cap)]);
            let k = split_nul_list(&cookies[..kl.min(cap)]);
            let a = split_nul_list(&addrs[..al.min(cap)]);
            return Ok(c
                .into_iter()
                .zip(k)
                .zip(a)
                .take(rc as usize)
                .map(|((client, cookie), addr)| Locker {
                    client,
                    cookie,
                    addr,
                })
                .collect());
        }
    }

    /// Takes the managed exclusive lock. Blocks while a dead owner is being declared
    /// dead (then fences it); returns EROFS at once if a live owner refuses.
    pub fn lock_acquire_exclusive(&self) -> Result<()> {
        // SAFETY: valid handle.
        check(unsafe { rbd_lock_acquire(self.handle, LOCK_MODE_EXCLUSIVE) }).map(|_| ())
    }

    pub fn lock_release(&self) -> Result<()> {
        // SAFETY: valid handle.
        check(unsafe { rbd_lock_release(self.handle) }).map(|_| ())
    }

    /// Breaks `owner`'s managed lock; librbd blocklists the owner first.
    pub fn lock_break(&self, owner: &str) -> Result<()> {
        let o = cstr(owner)?;
        // SAFETY: valid handle and string.
        check(unsafe { rbd_lock_break(self.handle, LOCK_MODE_EXCLUSIVE, o.as_ptr()) }).map(|_| ())
    }

    pub fn is_lock_owner(&self) -> Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: valid handle and out-pointer.
        check(unsafe { rbd_is_exclusive_lock_owner(self.handle, &mut owner) })?;
        Ok(owner != 0)
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        // SAFETY: buffer valid for its length.
        let rc = unsafe { rbd_read2(self.handle, offset, buf.len(), buf.as_mut_ptr().cast(), 0) };
        if rc < 0 {
            Err(Errno(-rc as i32))
        } else {
            Ok(rc as usize)
        }
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<usize> {
        // SAFETY: buffer valid for its length.
        let rc = unsafe { rbd_write2(self.handle, offset, data.len(), data.as_ptr().cast(), 0) };
        if rc < 0 {
            Err(Errno(-rc as i32))
        } else {
            Ok(rc as usize)
        }
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // SAFETY: valid handle.
        check(unsafe { rbd_discard(self.handle, offset, len) }).map(|_| ())
    }

    pub fn flush(&self) -> Result<()> {
        // SAFETY: valid handle.
        check(unsafe { rbd_flush(self.handle) }).map(|_| ())
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, not used after this.
        unsafe { rbd_close(self.handle) };
    }
}

unsafe impl Send for Image<'_> {}
unsafe impl Sync for Image<'_> {}

impl Image<'_> {
    /// Zeroes a range and deallocates whole objects inside it. Unlike [`Image::discard`],
    /// which skips unaligned edges smaller than `rbd_discard_granularity_bytes`, the
    /// whole range reads back as zeroes afterwards (hole-punch semantics).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: valid handle; no buffers involved.
        let rc = unsafe { rbd_write_zeroes(self.handle, offset, len, 0, 0) };
        if rc < 0 {
            Err(Errno(-rc as i32))
        } else {
            Ok(())
        }
    }
}

/// An image opened read-write that owns its pool context and shares ownership of its
/// connection, so it is `'static` and can be shared between threads (an
/// `Arc<OwnedImage>`). Dropping it closes the image, then the pool context; the
/// connection shuts down when its last `Arc` goes.
pub struct OwnedImage {
    // Fields drop in declaration order: rbd_close, then the pool context, then the
    // connection (if this was its last user).
    image: Image<'static>,
    _io: IoCtxGuard,
    _rados: std::sync::Arc<Rados>,
}

/// A pool context owned outright (no borrow of its `Rados`), destroyed on drop.
struct IoCtxGuard(rados_ioctx_t);

// SAFETY: the pool context is only used to open the image (librbd duplicates it) and
// to be destroyed on drop, so it is never used from two threads at once.
unsafe impl Send for IoCtxGuard {}
unsafe impl Sync for IoCtxGuard {}

impl Drop for IoCtxGuard {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; the image using it is already closed.
        unsafe { rados::rados_ioctx_destroy(self.0) };
    }
}

impl OwnedImage {
    pub fn open(rados: std::sync::Arc<Rados>, pool: &str, name: &str) -> Result<OwnedImage> {
        let p = cstr(pool)?;
        let n = cstr(name)?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: valid connected handle, string and out-pointer.
        check(unsafe { rados::rados_ioctx_create(rados.handle, p.as_ptr(), &mut io) })?;
        let io = IoCtxGuard(io);
        let mut handle: RbdImage = ptr::null_mut();
        // SAFETY: valid io context, string and out-pointer; NULL snap = head.
        check(unsafe { rbd_open(io.0, n.as_ptr(), &mut handle, ptr::null()) })?;
        Ok(OwnedImage {
            // The lifetime is nominal: this struct keeps the pool context and the
            // connection alive for as long as the image.
            image: Image {
                handle,
                _pool: std::marker::PhantomData,
            },
            _io: io,
            _rados: rados,
        })
    }
}

impl std::ops::Deref for OwnedImage {
    type Target = Image<'static>;

    fn deref(&self) -> &Image<'static> {
        &self.image
    }
}

/// Stops the iteration at the first allocated extent: "data exists" is all we need.
extern "C" fn stop_at_first_extent(
    _ofs: u64,
    _len: usize,
    exists: c_int,
    _arg: *mut c_void,
) -> c_int {
    if exists != 0 {
        -libc::EEXIST
    } else {
        0
    }
}

impl Image<'_> {
    /// True if any part of the image (or its parent) was ever written: librbd's
    /// allocation map, not the contents. An image with no allocated extent is provably
    /// blank whatever a signature probe says.
    pub fn has_allocated_data(&self) -> Result<bool> {
        let size = self.stat()?.size;
        // SAFETY: valid handle; the callback touches nothing through `arg` (NULL).
        let rc = unsafe {
            rbd_diff_iterate2(
                self.handle,
                ptr::null(),
                0,
                size,
                1,
                1,
                stop_at_first_extent,
                ptr::null_mut(),
            )
        };
        match rc {
            rc if rc == -libc::EEXIST => Ok(true),
            rc => check(rc).map(|_| false),
        }
    }
}
