//! RADOS client instances and pool I/O contexts (part of the unsafe `sys` module).

use std::ffi::{c_char, CStr};
use std::ptr;
use std::time::Duration;

use ceph::rados::{self, rados_ioctx_t, rados_t};

use super::*;

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
    pub(super) handle: rados_t,
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
    pub(super) io: rados_ioctx_t,
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
