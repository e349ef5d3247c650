//! Snapshots, clones and resize of an image (part of the unsafe `sys` module).

use std::ffi::{c_char, c_int, CStr};
use std::ptr;
use std::time::{Duration, SystemTime};

use ceph::rados::rados_ioctx_t;

use super::*;

#[repr(C)]
struct RbdSnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

#[repr(C)]
struct RbdLinkedImageSpec {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_snap_list(image: RbdImage, snaps: *mut RbdSnapInfo, max: *mut c_int) -> c_int;
    fn rbd_snap_list_end(snaps: *mut RbdSnapInfo);
    fn rbd_snap_create(image: RbdImage, name: *const c_char) -> c_int;
    fn rbd_snap_remove(image: RbdImage, name: *const c_char) -> c_int;
    fn rbd_snap_rollback(image: RbdImage, name: *const c_char) -> c_int;
    fn rbd_snap_protect(image: RbdImage, name: *const c_char) -> c_int;
    fn rbd_snap_unprotect(image: RbdImage, name: *const c_char) -> c_int;
    fn rbd_snap_is_protected(image: RbdImage, name: *const c_char, out: *mut c_int) -> c_int;
    fn rbd_snap_get_timestamp(image: RbdImage, id: u64, ts: *mut libc::timespec) -> c_int;
    fn rbd_resize(image: RbdImage, size: u64) -> c_int;
    fn rbd_list_children3(
        image: RbdImage,
        images: *mut RbdLinkedImageSpec,
        max: *mut usize,
    ) -> c_int;
    fn rbd_linked_image_spec_list_cleanup(images: *mut RbdLinkedImageSpec, n: usize);
    fn rbd_clone3(
        p_io: rados_ioctx_t,
        p_name: *const c_char,
        p_snap: *const c_char,
        c_io: rados_ioctx_t,
        c_name: *const c_char,
        opts: RbdImageOptions,
    ) -> c_int;
}

/// One snapshot of an image, as librbd lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    /// The image size when the snapshot was taken.
    pub size: u64,
    pub created: Option<SystemTime>,
}

/// A clone of a snapshot: `pool/image` (or in the trash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub pool: String,
    pub image: String,
    pub trash: bool,
}

fn opt_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: a NUL-terminated string owned by librbd until its cleanup call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Image<'_> {
    /// The image's snapshots (user snapshots; librbd's own are not listed).
    pub fn snapshots(&self) -> Result<Vec<SnapInfo>> {
        let mut cap: c_int = 16;
        loop {
            // librbd writes `max` entries plus a terminating one.
            let mut snaps: Vec<RbdSnapInfo> = Vec::with_capacity(cap as usize + 1);
            let mut max = cap;
            // SAFETY: a buffer of `cap + 1` entries; librbd fills the returned count.
            let rc = unsafe { rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                cap = max.max(cap * 2);
                continue;
            }
            let n = check(rc)? as usize;
            // SAFETY: librbd initialised `n` entries (and the terminator).
            unsafe { snaps.set_len(n) };
            let mut out: Vec<SnapInfo> = snaps
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    name: opt_str(s.name),
                    size: s.size,
                    created: None,
                })
                .collect();
            // SAFETY: frees the names librbd allocated for this list.
            unsafe { rbd_snap_list_end(snaps.as_mut_ptr()) };
            for s in &mut out {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: valid handle and out-pointer.
                if check(unsafe { rbd_snap_get_timestamp(self.handle, s.id, &mut ts) }).is_ok()
                    && ts.tv_sec > 0
                {
                    s.created = Some(
                        SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
                    );
                }
            }
            return Ok(out);
        }
    }

    pub fn snap_create(&self, name: &str) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid handle and string.
        check(unsafe { rbd_snap_create(self.handle, n.as_ptr()) }).map(|_| ())
    }

    pub fn snap_remove(&self, name: &str) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid handle and string.
        check(unsafe { rbd_snap_remove(self.handle, n.as_ptr()) }).map(|_| ())
    }

    pub fn snap_rollback(&self, name: &str) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid handle and string.
        check(unsafe { rbd_snap_rollback(self.handle, n.as_ptr()) }).map(|_| ())
    }

    pub fn snap_is_protected(&self, name: &str) -> Result<bool> {
        let n = cstr(name)?;
        let mut out: c_int = 0;
        // SAFETY: valid handle, string and out-pointer.
        check(unsafe { rbd_snap_is_protected(self.handle, n.as_ptr(), &mut out) })?;
        Ok(out != 0)
    }

    pub fn snap_protect(&self, name: &str) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid handle and string.
        match unsafe { rbd_snap_protect(self.handle, n.as_ptr()) } {
            rc if rc == -libc::EBUSY => Ok(()), // already protected
            rc => check(rc).map(|_| ()),
        }
    }

    pub fn snap_unprotect(&self, name: &str) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid handle and string.
        match unsafe { rbd_snap_unprotect(self.handle, n.as_ptr()) } {
            rc if rc == -libc::EINVAL => Ok(()), // not protected
            rc => check(rc).map(|_| ()),
        }
    }

    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: valid handle.
        check(unsafe { rbd_resize(self.handle, size) }).map(|_| ())
    }

    /// Clones of the snapshot this handle was opened at.
    pub fn children(&self) -> Result<Vec<Child>> {
        let mut cap = 8usize;
        loop {
            let mut specs: Vec<RbdLinkedImageSpec> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: a buffer of `cap` entries; librbd fills `n`.
            let rc = unsafe { rbd_list_children3(self.handle, specs.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(rc)?;
            // SAFETY: librbd initialised `n` entries.
            unsafe { specs.set_len(n) };
            let out = specs
                .iter()
                .map(|s| Child {
                    pool: opt_str(s.pool_name),
                    image: opt_str(s.image_name),
                    trash: s.trash,
                })
                .collect();
            // SAFETY: frees the strings librbd allocated for these `n` entries.
            unsafe { rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(out);
        }
    }
}

impl Pool<'_> {
    /// Opens an image read-only at one of its snapshots.
    pub fn open_snapshot(&self, name: &str, snap: &str) -> Result<Image<'_>> {
        let (n, s) = (cstr(name)?, cstr(snap)?);
        let mut image: RbdImage = ptr::null_mut();
        // SAFETY: valid io context, strings and out-pointer.
        check(unsafe { rbd_open_read_only(self.io, n.as_ptr(), &mut image, s.as_ptr()) })?;
        Ok(Image {
            handle: image,
            _pool: std::marker::PhantomData,
        })
    }

    /// Clones `parent@snap` (a protected snapshot) into `child` in `into`, with the
    /// parent's features unless `features` says otherwise.
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        into: &Pool<'_>,
        child: &str,
        features: u64,
    ) -> Result<()> {
        let (p, s, c) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
        let mut opts: RbdImageOptions = ptr::null_mut();
        // SAFETY: out-pointer valid; destroyed below on every path.
        unsafe { rbd_image_options_create(&mut opts) };
        // SAFETY: live options handle, valid io contexts and strings.
        let rc = unsafe {
            check(rbd_image_options_set_uint64(opts, OPT_FEATURES, features)).and_then(|_| {
                check(rbd_clone3(
                    self.io,
                    p.as_ptr(),
                    s.as_ptr(),
                    into.io,
                    c.as_ptr(),
                    opts,
                ))
            })
        };
        // SAFETY: created above, not used afterwards.
        unsafe { rbd_image_options_destroy(opts) };
        rc.map(|_| ())
    }
}
