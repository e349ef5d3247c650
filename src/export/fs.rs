//! The FUSE side of the exporter: a root directory holding one regular file,
//! `image`, whose bytes are the RBD image's bytes, plus the [`Backend`] that every
//! I/O passes through. The backend is where ownership is enforced: once this host is
//! fenced, or the exporter is stopping, no request reaches librbd again.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenAccMode,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::ownership::{judge, Verdict};
use super::Event;
use crate::ceph::sys::{self, OwnedImage};

/// The name of the one file in the mount.
pub const FILE_NAME: &str = "image";
const FILE_INO: INodeNo = INodeNo(2);
/// Short, so a resize becomes visible quickly; the size itself comes from the backend.
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u32 = 4096;
/// Largest FUSE write: a loop device request above it is split into several requests,
/// served side by side.
const MAX_REQUEST: u32 = 1 << 20;
/// FUSE requests the kernel keeps in flight (asynchronous direct I/O counts as
/// background): enough for a queue depth of 64.
const MAX_BACKGROUND: u16 = 64;
/// Linux 6.17+: zero a range and keep it allocated (what loop sends for REQ_NOUNMAP).
const FALLOC_FL_WRITE_ZEROES: i32 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    Fenced,
    Stopping,
}

struct Gate {
    phase: Phase,
    /// Requests currently inside librbd; stopping waits for them to drain.
    inflight: usize,
    image: Option<Arc<OwnedImage>>,
}

/// What [`Backend::stop`] hands back to the shutdown sequence.
pub struct Stopped {
    pub image: Option<Arc<OwnedImage>>,
    pub fenced: bool,
    /// False when some request was still inside librbd when the wait ran out.
    pub drained: bool,
}

/// The gate between FUSE requests (and the watchdog) and the image.
pub struct Backend {
    gate: Mutex<Gate>,
    drained: Condvar,
    size: AtomicU64,
    label: String,
    /// This client's address, to tell our own lock (new cookie) from another's.
    ours: String,
    events: Sender<Event>,
    /// Since when librbd has said "not the owner" without anything confirming a loss,
    /// and whether that was already reported as lasting.
    unconfirmed: Mutex<Option<(Instant, bool)>>,
    pub io: super::iostats::IoCounters,
}

/// A "not the owner" state lasting this long without confirmation is logged as a warning.
const UNCONFIRMED_WARN: Duration = Duration::from_secs(10);

/// One request's permission to use the image; leaving the gate on drop.
pub struct Op<'a> {
    backend: &'a Backend,
    pub image: Arc<OwnedImage>,
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        let mut g = self.backend.lock();
        g.inflight -= 1;
        if g.inflight == 0 {
            self.backend.drained.notify_all();
        }
    }
}

impl Backend {
    pub fn new(
        image: Arc<OwnedImage>,
        size: u64,
        label: String,
        ours: String,
        events: Sender<Event>,
    ) -> Backend {
        Backend {
            ours,
            unconfirmed: Mutex::new(None),
            gate: Mutex::new(Gate {
                phase: Phase::Serving,
                inflight: 0,
                image: Some(image),
            }),
            drained: Condvar::new(),
            size: AtomicU64::new(size),
            label,
            events,
            io: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Lets a request through while serving; `None` once fenced or stopping.
    pub fn begin(&self) -> Option<Op<'_>> {
        let mut g = self.lock();
        if g.phase != Phase::Serving {
            return None;
        }
        let image = g.image.clone()?;
        g.inflight += 1;
        Some(Op {
            backend: self,
            image,
        })
    }

    pub fn is_fenced(&self) -> bool {
        self.lock().phase == Phase::Fenced
    }

    /// This host no longer owns the image: from now on nothing reaches librbd. Said
    /// loudly, once; the main thread records it in the state file.
    pub fn fence(&self, reason: &str) {
        {
            let mut g = self.lock();
            if g.phase != Phase::Serving {
                return;
            }
            g.phase = Phase::Fenced;
        }
        tracing::error!(
            image = %self.label,
            reason,
            "FENCED: this host lost ownership of the image (lock broken or client blocklisted); \
             every further read and write fails with EIO and nothing is written again"
        );
        let _ = self.events.send(Event::Fenced(reason.to_string()));
    }

    /// Asks librbd whether the lock is still ours and, if not, whether that is fencing
    /// ([`judge`]); fences only when it is.
    fn verify(&self, op: &Op<'_>, context: &str) -> Verdict {
        let verdict = judge(
            op.image.is_lock_owner(),
            || op.image.lock_owners(),
            &self.ours,
        );
        match &verdict {
            Verdict::Owner => {
                if let Some((since, _)) = self.unconfirmed_state().take() {
                    tracing::info!(image = %self.label, after_ms = since.elapsed().as_millis() as u64, "the exclusive lock is this client's again");
                }
            }
            Verdict::Fenced(reason) => self.fence(&format!("{context}{reason}")),
            Verdict::Transient(reason) => self.not_confirmed(reason),
        }
        verdict
    }

    fn unconfirmed_state(&self) -> MutexGuard<'_, Option<(Instant, bool)>> {
        self.unconfirmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Not the owner, but not fenced either: said once, then again as a warning if it
    /// lasts. Writes meanwhile fail (EIO for that request) without ending the mapping.
    fn not_confirmed(&self, reason: &str) {
        let mut u = self.unconfirmed_state();
        match u.as_mut() {
            None => {
                *u = Some((Instant::now(), false));
                tracing::info!(image = %self.label, reason, "not the lock owner at the moment, but nothing shows another owner or a blocklisting: not fenced; checking again");
            }
            Some((since, warned)) if !*warned && since.elapsed() >= UNCONFIRMED_WARN => {
                *warned = true;
                tracing::warn!(image = %self.label, reason, secs = since.elapsed().as_secs(), "still not the lock owner, with no other owner and no blocklisting seen; writes fail with EIO meanwhile");
            }
            Some(_) => tracing::debug!(image = %self.label, reason, "still not the lock owner"),
        }
    }

    /// Turns a librbd error into the errno for the kernel, fencing when the error means
    /// the lock is gone: ESHUTDOWN is a blocklisted client; EROFS on a write means the
    /// managed lock is not ours at this moment, which is fencing only if confirmed.
    fn failed(&self, op: &Op<'_>, what: &str, err: sys::Errno, write: bool) -> Errno {
        self.io.failed(write);
        if err.0 == libc::ESHUTDOWN {
            self.fence(&format!("{what}: {}", err.describe()));
        } else if write && err.0 == libc::EROFS {
            self.verify(op, &format!("{what}: EROFS; "));
        }
        if !self.is_fenced() {
            tracing::warn!(image = %self.label, error = %err.describe(), "{what} failed");
        }
        Errno::EIO
    }

    /// The watchdog's periodic check: notices a broken lock even while no I/O happens,
    /// and picks up a new image size. False once there is nothing left to watch.
    pub fn check(&self) -> bool {
        let Some(op) = self.begin() else {
            return false;
        };
        match self.verify(&op, "") {
            Verdict::Owner => {}
            Verdict::Transient(_) => return true,
            Verdict::Fenced(_) => return false,
        }
        if let Ok(st) = op.image.stat() {
            let old = self.size.swap(st.size, Ordering::Relaxed);
            if old != st.size {
                tracing::info!(image = %self.label, old, new = st.size, "image size changed");
            }
        }
        true
    }

    /// Closes the gate for good and waits (up to `wait`) for requests already inside
    /// librbd. Afterwards the caller owns the image handle.
    pub fn stop(&self, wait: Duration) -> Stopped {
        let deadline = Instant::now() + wait;
        let mut g = self.lock();
        let fenced = g.phase == Phase::Fenced;
        g.phase = Phase::Stopping;
        while g.inflight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self
                .drained
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Stopped {
            image: g.image.take(),
            fenced,
            drained: g.inflight == 0,
        }
    }
}

/// The FUSE filesystem: inode 1 is the root directory, inode 2 the image file.
pub struct ImageFs {
    backend: Arc<Backend>,
    read_only: bool,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl ImageFs {
    pub fn new(backend: Arc<Backend>, read_only: bool) -> ImageFs {
        ImageFs {
            backend,
            read_only,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            started: SystemTime::now(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o700, 0, 2),
            FILE_INO => (
                FileType::RegularFile,
                if self.read_only { 0o400 } else { 0o600 },
                self.backend.size(),
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    fn flush_image(&self) -> Result<(), Errno> {
        if self.read_only {
            return Ok(());
        }
        let op = self.backend.begin().ok_or(Errno::EIO)?;
        op.image
            .flush()
            .map_err(|e| self.backend.failed(&op, "flush", e, true))
    }

    /// Zeroes `[offset, offset+len)` clamped to the image: both hole punching and
    /// zero-range must read back as zeroes, which plain rbd_discard does not promise.
    fn zero(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let size = self.backend.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        let op = self.backend.begin().ok_or(Errno::EIO)?;
        op.image
            .write_zeroes(offset, end - offset)
            .map_err(|e| self.backend.failed(&op, "discard", e, true))
    }
}

impl Filesystem for ImageFs {
    /// Asks the kernel for asynchronous direct I/O: the loop device (attached with
    /// direct I/O) then keeps many requests in flight at once instead of one, and the
    /// workers serve them side by side. Nothing is cached here: every request is answered
    /// only after librbd has answered it.
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        if config
            .add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO)
            .is_err()
        {
            tracing::warn!("this kernel's FUSE has no asynchronous direct I/O; requests are served one at a time");
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        // Each worker's request buffer is touched up to this size, so it bounds the RSS.
        let _ = config.set_max_write(MAX_REQUEST);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == FILE_NAME => {
                reply.entry(&TTL, &attr, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Only no-op changes are accepted (touch); the size belongs to the image, and the
    /// owner and mode are fixed.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm))
            || uid.is_some_and(|u| u != attr.uid)
            || gid.is_some_and(|g| g != attr.gid)
            || size.is_some_and(|s| s != attr.size)
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: the kernel page cache never holds bytes we have not seen, so the
        // loop device's flush reaches us as fsync. Parallel direct writes: the loop
        // device's concurrent requests are not serialised on the inode lock.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let Some(op) = self.backend.begin() else {
            return reply.error(Errno::EIO);
        };
        if crate::failpoint::fault("export:read-eio") {
            return reply.error(Errno::EIO);
        }
        let end = self.backend.size();
        if offset >= end {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(end - offset) as usize;
        let mut buf = vec![0u8; len];
        match op.image.read(offset, &mut buf) {
            Ok(n) => {
                self.backend.io.done(false, n.min(len));
                reply.data(&buf[..n.min(len)])
            }
            Err(e) => reply.error(self.backend.failed(&op, "read", e, false)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let Some(op) = self.backend.begin() else {
            return reply.error(Errno::EIO);
        };
        let end = self.backend.size();
        if data.is_empty() {
            return reply.written(0);
        }
        // Like a block device: the part that fits is written, past the end is ENOSPC.
        if offset >= end {
            return reply.error(Errno::ENOSPC);
        }
        let len = (data.len() as u64).min(end - offset) as usize;
        match op.image.write(offset, &data[..len]) {
            Ok(n) => {
                self.backend.io.done(true, n);
                reply.written(n as u32)
            }
            Err(e) => reply.error(self.backend.failed(&op, "write", e, true)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.flush_image() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_image() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let result = match mode & !keep {
            libc::FALLOC_FL_PUNCH_HOLE if mode & keep != 0 => self.zero(offset, length),
            libc::FALLOC_FL_ZERO_RANGE | FALLOC_FL_WRITE_ZEROES => self
                .within(offset, length, mode & keep != 0)
                .and_then(|()| self.zero(offset, length)),
            // Plain allocation: an RBD image is thin, so there is nothing to reserve.
            0 => self.within(offset, length, mode & keep != 0),
            _ => Err(Errno::EOPNOTSUPP),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The loop driver takes f_bsize as its discard granularity: 4 KiB lets every
        // filesystem-block discard through.
        let blocks = self.backend.size() / u64::from(BLOCK);
        reply.statfs(blocks, 0, 0, 1, 0, BLOCK, 255, BLOCK)
    }

    // ENOSYS once makes the kernel stop asking (and keeps fuser's "not implemented"
    // warnings out of the log).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }
}

impl ImageFs {
    /// A size-changing fallocate cannot grow the image; inside it, it is a no-op.
    fn within(&self, offset: u64, length: u64, keep_size: bool) -> Result<(), Errno> {
        if keep_size || offset.saturating_add(length) <= self.backend.size() {
            Ok(())
        } else {
            Err(Errno::EFBIG)
        }
    }
}
