//! The only module with `unsafe` code: librados (through the raw declarations of the
//! `ceph` crate) and the handful of librbd C functions rbdvol calls, declared by hand
//! because no maintained crate binds librbd 1.16 (Ceph Pacific, Debian bookworm).
//!
//! Everything exported from here is safe: RAII handles ([`Rados`], [`Pool`], [`Image`])
//! and functions returning `Result<_, Errno>`. Negative return codes from C become
//! [`Errno`]; callers add context in `ceph::mod`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;
use std::time::{Duration, SystemTime};

use ceph::rados::{self, rados_ioctx_t, rados_t};

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

fn check(rc: c_int) -> Result<c_int> {
    if rc < 0 {
        Err(Errno(-rc))
    } else {
        Ok(rc)
    }
}

/// Strings from the user never contain NUL (names are validated upstream); a NUL here
/// would be a bug, reported as EINVAL rather than a panic.
fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Errno(libc::EINVAL))
}

type RbdImage = *mut c_void;
type RbdImageOptions = *mut c_void;

#[repr(C)]
struct RbdImageSpec {
    id: *mut c_char,
    name: *mut c_char,
}

#[repr(C)]
struct RbdImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

#[repr(C)]
struct RbdImageWatcher {
    addr: *mut c_char,
    id: i64,
    cookie: u64,
}

pub const LOCK_MODE_EXCLUSIVE: c_int = 0;

const OPT_FEATURES: c_int = 1;
const OPT_ORDER: c_int = 2;
const OPT_DATA_POOL: c_int = 10;

#[link(name = "rbd")]
extern "C" {
    fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    fn rbd_image_options_create(opts: *mut RbdImageOptions);
    fn rbd_image_options_destroy(opts: RbdImageOptions);
    fn rbd_image_options_set_string(
        opts: RbdImageOptions,
        optname: c_int,
        val: *const c_char,
    ) -> c_int;
    fn rbd_image_options_set_uint64(opts: RbdImageOptions, optname: c_int, val: u64) -> c_int;
    fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: RbdImageOptions,
    ) -> c_int;
    fn rbd_list2(io: rados_ioctx_t, images: *mut RbdImageSpec, max: *mut usize) -> c_int;
    fn rbd_image_spec_list_cleanup(images: *mut RbdImageSpec, n: usize);
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
    fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut RbdImage,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut RbdImage,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_close(image: RbdImage) -> c_int;
    fn rbd_stat(image: RbdImage, info: *mut RbdImageInfo, infosize: usize) -> c_int;
    fn rbd_get_features(image: RbdImage, features: *mut u64) -> c_int;
    fn rbd_get_data_pool_id(image: RbdImage) -> i64;
    fn rbd_get_create_timestamp(image: RbdImage, ts: *mut libc::timespec) -> c_int;
    fn rbd_metadata_get(
        image: RbdImage,
        key: *const c_char,
        value: *mut c_char,
        len: *mut usize,
    ) -> c_int;
    fn rbd_metadata_set(image: RbdImage, key: *const c_char, value: *const c_char) -> c_int;
    fn rbd_metadata_remove(image: RbdImage, key: *const c_char) -> c_int;
    fn rbd_metadata_list(
        image: RbdImage,
        start: *const c_char,
        max: u64,
        keys: *mut c_char,
        keys_len: *mut usize,
        values: *mut c_char,
        vals_len: *mut usize,
    ) -> c_int;
    fn rbd_watchers_list(image: RbdImage, watchers: *mut RbdImageWatcher, max: *mut usize)
        -> c_int;
    fn rbd_watchers_list_cleanup(watchers: *mut RbdImageWatcher, n: usize);
    fn rbd_lock_get_owners(
        image: RbdImage,
        mode: *mut c_int,
        owners: *mut *mut c_char,
        max: *mut usize,
    ) -> c_int;
    fn rbd_lock_get_owners_cleanup(owners: *mut *mut c_char, n: usize);
    fn rbd_list_lockers(
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
    fn rbd_lock_acquire(image: RbdImage, mode: c_int) -> c_int;
    fn rbd_lock_release(image: RbdImage) -> c_int;
    fn rbd_lock_break(image: RbdImage, mode: c_int, owner: *const c_char) -> c_int;
    fn rbd_is_exclusive_lock_owner(image: RbdImage, is_owner: *mut c_int) -> c_int;
    fn rbd_read2(image: RbdImage, ofs: u64, len: usize, buf: *mut c_char, flags: c_int) -> isize;
    fn rbd_write2(image: RbdImage, ofs: u64, len: usize, buf: *const c_char, flags: c_int)
        -> isize;
    fn rbd_discard(image: RbdImage, ofs: u64, len: u64) -> c_int;
    fn rbd_flush(image: RbdImage) -> c_int;
}

#[link(name = "rados")]
extern "C" {
    fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
}

/// librbd's version, e.g. `(1, 16, 0)` on Pacific.
pub fn librbd_version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: rbd_version only writes the three ints.
    unsafe { rbd_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

/// How to reach the cluster: everything `rados_create2` and `rados_conf_*` need.
#[derive(Debug, Clone)]
pub struct ConnectSpec {
    pub cluster: String,
    /// Full entity name, `client.<id>`.
    pub entity: String,
    pub conf: Option<String>,
    pub keyring: Option<String>,
    /// `rados_conf_set` pairs applied after the conf file, before connecting.
    pub options: Vec<(String, String)>,
}

/// One RADOS client instance. librados handles are thread-safe, so this is Send + Sync.
pub struct Rados {
    handle: rados_t,
}

// SAFETY: librados documents rados_t as safe to share between threads.
unsafe impl Send for Rados {}
unsafe impl Sync for Rados {}

impl Rados {
    /// Creates, configures and connects a client instance. Blocks up to the
    /// configured `client_mount_timeout`.
    pub fn connect(spec: &ConnectSpec) -> std::result::Result<Rados, (String, Errno)> {
        let cluster = cstr(&spec.cluster).map_err(|e| ("cluster name".to_string(), e))?;
        let entity = cstr(&spec.entity).map_err(|e| ("client name".to_string(), e))?;
        let mut handle: rados_t = ptr::null_mut();
        // SAFETY: out-pointer is valid; strings live across the call.
        let rc = unsafe { rados::rados_create2(&mut handle, cluster.as_ptr(), entity.as_ptr(), 0) };
        check(rc).map_err(|e| ("rados_create2".to_string(), e))?;
        // From here on, Drop shuts the handle down on every error path.
        let rados = Rados { handle };
        if let Some(conf) = &spec.conf {
            let c = cstr(conf).map_err(|e| ("conf path".to_string(), e))?;
            // SAFETY: valid handle and string.
            let rc = unsafe { rados::rados_conf_read_file(rados.handle, c.as_ptr()) };
            check(rc).map_err(|e| (format!("reading {conf}"), e))?;
        }
        if let Some(keyring) = &spec.keyring {
            rados.conf_set("keyring", keyring)?;
        }
        for (k, v) in &spec.options {
            rados.conf_set(k, v)?;
        }
        // SAFETY: valid, configured handle.
        let rc = unsafe { rados::rados_connect(rados.handle) };
        check(rc).map_err(|e| ("rados_connect".to_string(), e))?;
        Ok(rados)
    }

    fn conf_set(&self, key: &str, value: &str) -> std::result::Result<(), (String, Errno)> {
        let k = cstr(key).map_err(|e| (key.to_string(), e))?;
        let v = cstr(value).map_err(|e| (key.to_string(), e))?;
        // SAFETY: valid handle and strings.
        let rc = unsafe { rados::rados_conf_set(self.handle, k.as_ptr(), v.as_ptr()) };
        check(rc)
            .map(|_| ())
            .map_err(|e| (format!("setting {key}"), e))
    }

    /// This client's address as the OSDs see it (what a blocklist entry names).
    pub fn addrs(&self) -> Result<String> {
        let mut out: *mut c_char = ptr::null_mut();
        // SAFETY: out-pointer valid; librados allocates the string, freed below.
        check(unsafe { rados_getaddrs(self.handle, &mut out) })?;
        // SAFETY: on success `out` is a NUL-terminated string from librados.
        let s = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: allocated by librados with malloc-compatible buffer allocator.
        unsafe { rados::rados_buffer_free(out) };
        Ok(s)
    }

    /// Sends one monitor command (JSON) and returns (output, status text).
    pub fn mon_command(
        &self,
        json: &str,
    ) -> std::result::Result<(String, String), (Errno, String)> {
        let cmd = cstr(json).map_err(|e| (e, String::new()))?;
        let mut cmds = [cmd.as_ptr()];
        let (mut out, mut outlen): (*mut c_char, usize) = (ptr::null_mut(), 0);
        let (mut st, mut stlen): (*mut c_char, usize) = (ptr::null_mut(), 0);
        // SAFETY: one valid command string; librados allocates both output buffers,
        // which are copied and freed below.
        let rc = unsafe {
            rados::rados_mon_command(
                self.handle,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut outlen,
                &mut st,
                &mut stlen,
            )
        };
        let take = |p: *mut c_char, len: usize| -> String {
            if p.is_null() {
                return String::new();
            }
            // SAFETY: librados returned `len` bytes at `p`; freed right after copying.
            let s =
                String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p as *const u8, len) })
                    .into_owned();
            unsafe { rados::rados_buffer_free(p) };
            s
        };
        let (out, status) = (take(out, outlen), take(st, stlen));
        if rc < 0 {
            Err((Errno(-rc), status))
        } else {
            Ok((out, status))
        }
    }

    /// This client's global id (`client.N`).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: valid connected handle.
        unsafe { rados::rados_get_instance_id(self.handle) }
    }

    pub fn pool(&self, name: &str) -> Result<Pool<'_>> {
        let n = cstr(name)?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: valid handle, string and out-pointer.
        check(unsafe { rados::rados_ioctx_create(self.handle, n.as_ptr(), &mut io) })?;
        Ok(Pool { io, _rados: self })
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and is not used after this.
        unsafe { rados::rados_shutdown(self.handle) };
    }
}

/// A pool I/O context. It borrows its [`Rados`] so it can never outlive the connection.
pub struct Pool<'r> {
    io: rados_ioctx_t,
    _rados: &'r Rados,
}

/// Options for [`Pool::create_image`].
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub size: u64,
    pub features: u64,
    pub order: Option<u8>,
    pub data_pool: Option<String>,
}

impl Pool<'_> {
    pub fn create_image(&self, name: &str, spec: &CreateSpec) -> Result<()> {
        let n = cstr(name)?;
        let mut opts: RbdImageOptions = ptr::null_mut();
        // SAFETY: out-pointer valid; destroyed below on every path.
        unsafe { rbd_image_options_create(&mut opts) };
        let result = (|| {
            // SAFETY: `opts` is a live options handle for the whole closure.
            unsafe {
                check(rbd_image_options_set_uint64(
                    opts,
                    OPT_FEATURES,
                    spec.features,
                ))?;
                if let Some(order) = spec.order {
                    check(rbd_image_options_set_uint64(opts, OPT_ORDER, order as u64))?;
                }
                if let Some(dp) = &spec.data_pool {
                    let d = cstr(dp)?;
                    check(rbd_image_options_set_string(
                        opts,
                        OPT_DATA_POOL,
                        d.as_ptr(),
                    ))?;
                }
                check(rbd_create4(self.io, n.as_ptr(), spec.size, opts))
            }
        })();
        // SAFETY: created above, not used afterwards.
        unsafe { rbd_image_options_destroy(opts) };
        result.map(|_| ())
    }

    /// Every image name in the pool, in one directory listing.
    pub fn list_images(&self, capacity_hint: usize) -> Result<Vec<String>> {
        let mut cap = capacity_hint.max(64);
        loop {
            let mut specs: Vec<RbdImageSpec> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: the buffer holds `cap` specs; librbd writes at most `n` of them.
            let rc = unsafe { rbd_list2(self.io, specs.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE {
                cap = n + 64;
                continue;
            }
            check(rc)?;
            // SAFETY: librbd initialised `n` entries.
            unsafe { specs.set_len(n) };
            let names = specs
                .iter()
                // SAFETY: each entry's name is a NUL-terminated string owned by librbd.
                .map(|s| {
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees the strings librbd allocated for these `n` entries.
            unsafe { rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    pub fn remove_image(&self, name: &str) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid io context and string.
        check(unsafe { rbd_remove(self.io, n.as_ptr()) }).map(|_| ())
    }

    pub fn trash_image(&self, name: &str, deferment: Duration) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid io context and string.
        check(unsafe { rbd_trash_move(self.io, n.as_ptr(), deferment.as_secs()) }).map(|_| ())
    }

    /// Opens an image for writing. This registers a watch and can take the exclusive
    /// lock; the daemon's shared connection only does this for metadata updates.
    pub fn open(&self, name: &str) -> Result<Image<'_>> {
        self.open_with(name, false)
    }

    /// Opens an image read-only: no watch, never a lock, invisible to other clients.
    pub fn open_read_only(&self, name: &str) -> Result<Image<'_>> {
        self.open_with(name, true)
    }

    fn open_with(&self, name: &str, read_only: bool) -> Result<Image<'_>> {
        let n = cstr(name)?;
        let mut image: RbdImage = ptr::null_mut();
        // SAFETY: valid io context, string and out-pointer; NULL snap = head.
        let rc = unsafe {
            if read_only {
                rbd_open_read_only(self.io, n.as_ptr(), &mut image, ptr::null())
            } else {
                rbd_open(self.io, n.as_ptr(), &mut image, ptr::null())
            }
        };
        check(rc)?;
        Ok(Image {
            handle: image,
            _pool: std::marker::PhantomData,
        })
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; images borrowing it are gone.
        unsafe { rados::rados_ioctx_destroy(self.io) };
    }
}

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
    handle: RbdImage,
    _pool: std::marker::PhantomData<&'p ()>,
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

fn c_buffer_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Splits librbd's `a\0b\0\0c\0` lists. Empty entries are real (an empty metadata
/// value), so only the final terminator is dropped.
fn split_nul_list(bytes: &[u8]) -> Vec<String> {
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

#[link(name = "rbd")]
extern "C" {
    fn rbd_write_zeroes(
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

/// Ends the process at once, without atexit handlers or C++ static destructors: those
/// can hang or crash while another thread is still blocked inside librados/librbd.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it does not return.
    unsafe { libc::_exit(code) }
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_diff_iterate2(
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
