//! The only module with `unsafe` code: librados (through the raw declarations of the
//! `ceph` crate) and the handful of librbd C functions rbdvol calls, declared by hand
//! because no maintained crate binds librbd 1.16 (Ceph Pacific, Debian bookworm).
//!
//! Everything exported from here is safe: RAII handles ([`Rados`], [`Pool`], [`Image`])
//! and functions returning `Result<_, Errno>`. Negative return codes from C become
//! [`Errno`]; callers add context in `ceph::mod`.
//!
//! This file declares the C functions and the helpers shared by its two parts:
//! `conn` (client instances, pool contexts, image creation and listing) and `image`
//! (an open image: I/O, locks, metadata, watchers).

use std::ffi::{c_char, c_int, c_void, CString};

use ceph::rados::{rados_ioctx_t, rados_t};

/// A negative errno returned by librados/librbd, kept positive here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub fn describe(self) -> String {
        format!(
            "{} (errno {})",
            std::io::Error::from_raw_os_error(self.0),
            self.0
        )
    }
}

pub type Result<T> = std::result::Result<T, Errno>;

pub(super) fn check(rc: c_int) -> Result<c_int> {
    if rc < 0 {
        Err(Errno(-rc))
    } else {
        Ok(rc)
    }
}

/// Strings from the user never contain NUL (names are validated upstream); a NUL here
/// would be a bug, reported as EINVAL rather than a panic.
pub(super) fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Errno(libc::EINVAL))
}

pub(super) type RbdImage = *mut c_void;
pub(super) type RbdImageOptions = *mut c_void;

#[repr(C)]
pub(super) struct RbdImageSpec {
    pub(super) id: *mut c_char,
    pub(super) name: *mut c_char,
}

#[repr(C)]
pub(super) struct RbdImageInfo {
    pub(super) size: u64,
    pub(super) obj_size: u64,
    pub(super) num_objs: u64,
    pub(super) order: c_int,
    pub(super) block_name_prefix: [c_char; 24],
    pub(super) parent_pool: i64,
    pub(super) parent_name: [c_char; 96],
}

#[repr(C)]
pub(super) struct RbdImageWatcher {
    pub(super) addr: *mut c_char,
    pub(super) id: i64,
    pub(super) cookie: u64,
}

pub const LOCK_MODE_EXCLUSIVE: c_int = 0;

pub(super) const OPT_FEATURES: c_int = 1;
pub(super) const OPT_ORDER: c_int = 2;
pub(super) const OPT_DATA_POOL: c_int = 10;

#[link(name = "rbd")]
extern "C" {
    pub(super) fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    pub(super) fn rbd_image_options_create(opts: *mut RbdImageOptions);
    pub(super) fn rbd_image_options_destroy(opts: RbdImageOptions);
    pub(super) fn rbd_image_options_set_string(
        opts: RbdImageOptions,
        optname: c_int,
        val: *const c_char,
    ) -> c_int;
    pub(super) fn rbd_image_options_set_uint64(
        opts: RbdImageOptions,
        optname: c_int,
        val: u64,
    ) -> c_int;
    pub(super) fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: RbdImageOptions,
    ) -> c_int;
    pub(super) fn rbd_list2(io: rados_ioctx_t, images: *mut RbdImageSpec, max: *mut usize)
        -> c_int;
    pub(super) fn rbd_image_spec_list_cleanup(images: *mut RbdImageSpec, n: usize);
    pub(super) fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub(super) fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
    pub(super) fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut RbdImage,
        snap: *const c_char,
    ) -> c_int;
    pub(super) fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut RbdImage,
        snap: *const c_char,
    ) -> c_int;
    pub(super) fn rbd_close(image: RbdImage) -> c_int;
    pub(super) fn rbd_stat(image: RbdImage, info: *mut RbdImageInfo, infosize: usize) -> c_int;
    pub(super) fn rbd_get_features(image: RbdImage, features: *mut u64) -> c_int;
    pub(super) fn rbd_get_data_pool_id(image: RbdImage) -> i64;
    pub(super) fn rbd_get_create_timestamp(image: RbdImage, ts: *mut libc::timespec) -> c_int;
    pub(super) fn rbd_metadata_get(
        image: RbdImage,
        key: *const c_char,
        value: *mut c_char,
        len: *mut usize,
    ) -> c_int;
    pub(super) fn rbd_metadata_set(
        image: RbdImage,
        key: *const c_char,
        value: *const c_char,
    ) -> c_int;
    pub(super) fn rbd_metadata_remove(image: RbdImage, key: *const c_char) -> c_int;
    pub(super) fn rbd_metadata_list(
        image: RbdImage,
        start: *const c_char,
        max: u64,
        keys: *mut c_char,
        keys_len: *mut usize,
        values: *mut c_char,
        vals_len: *mut usize,
    ) -> c_int;
    pub(super) fn rbd_watchers_list(
        image: RbdImage,
        watchers: *mut RbdImageWatcher,
        max: *mut usize,
    ) -> c_int;
    pub(super) fn rbd_watchers_list_cleanup(watchers: *mut RbdImageWatcher, n: usize);
    pub(super) fn rbd_lock_get_owners(
        image: RbdImage,
        mode: *mut c_int,
        owners: *mut *mut c_char,
        max: *mut usize,
    ) -> c_int;
    pub(super) fn rbd_lock_get_owners_cleanup(owners: *mut *mut c_char, n: usize);
    pub(super) fn rbd_list_lockers(
        image: RbdImage,
        exclusive: *mut c_int,
        tag: *mut c_char,
        tag_len: *mut usize,
        clients: *mut c_char,
        clients_len: *mut usize,
        cookies: *mut c_char,
        cookies_len: *mut usize,
        addrs: *mut c_char,
        addrs_len: *mut usize,
    ) -> isize;
    pub(super) fn rbd_lock_acquire(image: RbdImage, mode: c_int) -> c_int;
    pub(super) fn rbd_lock_release(image: RbdImage) -> c_int;
    pub(super) fn rbd_lock_break(image: RbdImage, mode: c_int, owner: *const c_char) -> c_int;
    pub(super) fn rbd_is_exclusive_lock_owner(image: RbdImage, is_owner: *mut c_int) -> c_int;
    pub(super) fn rbd_read2(
        image: RbdImage,
        ofs: u64,
        len: usize,
        buf: *mut c_char,
        flags: c_int,
    ) -> isize;
    pub(super) fn rbd_write2(
        image: RbdImage,
        ofs: u64,
        len: usize,
        buf: *const c_char,
        flags: c_int,
    ) -> isize;
    pub(super) fn rbd_discard(image: RbdImage, ofs: u64, len: u64) -> c_int;
    pub(super) fn rbd_flush(image: RbdImage) -> c_int;
}

#[link(name = "rados")]
extern "C" {
    pub(super) fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
}

/// librbd's version, e.g. `(1, 16, 0)` on Pacific.
pub fn librbd_version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: rbd_version only writes the three ints.
    unsafe { rbd_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

#[link(name = "rbd")]
extern "C" {
    pub(super) fn rbd_write_zeroes(
        image: RbdImage,
        ofs: u64,
        len: usize,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> isize;
}

// SAFETY: a librbd image handle is safe to use from several threads at once (ImageCtx
// locks internally; rbd-nbd and qemu share one handle between I/O threads). Only
// rbd_close must not race other calls, and it runs in Drop, which needs ownership.

#[link(name = "rbd")]
extern "C" {
    pub(super) fn rbd_diff_iterate2(
        image: RbdImage,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_int;
}

/// Ends the process at once, without atexit handlers or C++ static destructors: those
/// can hang or crash while another thread is still blocked inside librados/librbd.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it does not return.
    unsafe { libc::_exit(code) }
}

/// Marks the calling thread, and every thread it creates afterwards, as an I/O flusher
/// (`PR_SET_IO_FLUSHER`, Linux 5.6+): its allocations never wait on I/O (the kernel
/// sets PF_MEMALLOC_NOIO), so a process that serves a block device cannot deadlock
/// waiting for memory that only its own I/O would free. Needs CAP_SYS_RESOURCE. Here
/// because nix has no safe wrapper for it and this is the crate's one unsafe module.
pub fn set_io_flusher() -> std::io::Result<()> {
    const PR_SET_IO_FLUSHER: c_int = 57;
    // SAFETY: prctl with integer arguments only; nothing is read or written through them.
    let rc = unsafe {
        libc::prctl(
            PR_SET_IO_FLUSHER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn c_buffer_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Splits librbd's `a\0b\0\0c\0` lists. Empty entries are real (an empty metadata
/// value), so only the final terminator is dropped.
pub(super) fn split_nul_list(bytes: &[u8]) -> Vec<String> {
    let trimmed = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if trimmed.is_empty() {
        return Vec::new();
    }
    trimmed
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Long-lived image handles for the userspace mapper (`rbdvol export`): one image served
// by several FUSE worker threads for as long as it is mapped.

mod conn;
mod image;
mod snap;
mod watch;

pub use conn::*;
pub use image::*;
pub use snap::*;
pub use watch::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_lists_split_into_strings() {
        assert_eq!(split_nul_list(b"a\0bc\0"), vec!["a", "bc"]);
        assert_eq!(split_nul_list(b"a\0\0c\0"), vec!["a", "", "c"]);
        assert!(split_nul_list(b"").is_empty());
    }

    #[test]
    fn image_info_matches_the_c_layout() {
        // 3*u64 + int(+pad to 4) + 24 chars + pad + i64 + 96 chars = 160 on x86_64.
        assert_eq!(std::mem::size_of::<RbdImageInfo>(), 160);
    }
}
