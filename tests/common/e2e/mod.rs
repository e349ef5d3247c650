//! Fixtures of the Docker end-to-end tests (tests/docker_*.rs): the `docker` CLI talks
//! to private Docker nodes (tests/common/nodes.rs: the machine's dockerd binary in its
//! own namespaces, one node per host), each of which finds a real `rbdvol serve` by
//! its socket in the node's /run/docker/plugins (a legacy v1 plugin) and drives it; the
//! cluster is then checked with the `rbd` CLI. The machine's own Docker engine is never
//! used.
//! One test does the same through the managed (v2) plugin that
//! integration/build-managed-plugin builds from this build's binary and Debian
//! packages (the first run on a machine builds and caches its root filesystem) and
//! installs into a node.
//! Test containers run `rbdvol-test-base:1`, imported into each node from the tarball
//! integration/docker-base-image builds.
//!
//! Where no node can be had (no dockerd, no test network, not root) every test prints
//! `SKIPPED: <reason>` (on the real stderr, past the test harness's capture) and passes.
//!
//! Each test gets fresh nodes, so dockerd's per-name plugin cache (a v1 driver, once
//! activated, is kept by name for dockerd's whole life) only lives as long as the test.
//! Each test still removes its containers, then the volumes dockerd records, then stops
//! its plugins, then cleans the host (mounts, loop devices, exporters), then stops its
//! nodes, from a guard that also runs when the test fails.

mod plugin;
mod scene;

use serde_json::Value;

use super::{images_in, rbd, trashed_names};

#[allow(unused_imports)]
pub use super::nodes::{say, DockerNode, Out, BASE};
#[allow(unused_imports)]
pub use plugin::Plugin;
#[allow(unused_imports)]
pub use scene::Scene;

// ------------------------------------------------------------------ the cluster

pub fn status_of(v: &Value) -> &Value {
    &v["Status"]
}

pub fn rbd_info(pool: &str, name: &str) -> Value {
    let (ok, out) = rbd(&["info", &format!("{pool}/{name}"), "--format", "json"]);
    assert!(ok, "rbd info {pool}/{name}: {out}");
    serde_json::from_str(&out).unwrap()
}

pub fn assert_trashed(pool: &str, name: &str) {
    assert!(
        !images_in(pool).contains(&name.to_string()),
        "{pool}/{name} is still an image"
    );
    assert!(
        trashed_names(pool).contains(&name.to_string()),
        "{pool}/{name} is not in the RBD trash"
    );
}

pub fn assert_present(pool: &str, name: &str) {
    assert!(
        images_in(pool).contains(&name.to_string()),
        "{pool}/{name} should still exist"
    );
    assert!(
        !trashed_names(pool).contains(&name.to_string()),
        "{pool}/{name} should not be in the trash"
    );
}
