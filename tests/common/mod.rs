//! Test fixtures shared by every test binary (each includes this module with
//! `mod common;`) and by the benchmark (benches/rbdvol.rs includes it by path):
//! - `daemon`: a real `rbdvol serve` process per test "host";
//! - `conn`: a client that speaks exactly like dockerd (raw HTTP/1.1 over the unix socket);
//! - `cluster`: the `rbd` and `ceph` CLIs, for checking what really happened in the cluster;
//! - `host`: this machine's mounts, loop devices and processes, and cleaning them up;
//! - `net`: the test network's hosts (network namespaces), for multi-host tests;
//! - `nodes`: private Docker nodes (the machine's dockerd binary in namespaces of its own);
//! - `e2e`: the Docker end-to-end fixtures (private nodes' dockerd driving real plugins).
//!
//! The cluster comes from `TEST_CEPH_CONF`, which `integration/test` sets after
//! bringing up a throwaway cluster with `integration/ceph-up`.

// Each test binary uses only some of the fixtures.
#![allow(dead_code)]

pub mod cluster;
pub mod conn;
pub mod daemon;
pub mod e2e;
pub mod guest;
pub mod host;
pub mod net;
pub mod nodes;
pub mod swarm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

// Re-exported for `use common::*;` (each test binary uses some of them).
#[allow(unused_imports)]
pub use cluster::{
    blocklist, blocklisted_until, image_meta, images_in, lock_holders, rbd, trashed_names,
};
#[allow(unused_imports)]
pub use conn::Conn;
#[allow(unused_imports)]
pub use daemon::{mount_id, Daemon, DaemonOpts};
#[allow(unused_imports)]
pub use host::{cmdline, is_mountpoint, loops_under, mounts_under, processes_mentioning};
#[allow(unused_imports)]
pub use net::{set_link, testnet, TestNet};

pub fn ceph_conf() -> PathBuf {
    match std::env::var_os("TEST_CEPH_CONF") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "TEST_CEPH_CONF is not set. Run the tests with `integration/test`, which brings up a throwaway Ceph cluster and sets it."
        ),
    }
}

/// A volume name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
