//! The CSI tests' fixtures: a daemon serving both APIs with its CSI client (a "host"),
//! and the request shapes swarmkit sends.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use bpfman_csi::v1 as csi;
pub use csi::controller_client::ControllerClient;
pub use csi::identity_client::IdentityClient;
pub use csi::node_client::NodeClient;
pub use csi::volume_capability::access_mode::Mode;
pub use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
pub use tonic::transport::Channel;
pub use tonic::Code;

pub use crate::common::*;

pub const MIB: i64 = 1 << 20;

/// One "host": a daemon serving both APIs, its CSI client and a scratch directory
/// where the CO's staging and target paths live.
pub struct Host {
    pub d: Daemon,
    pub scratch: tempfile::TempDir,
    pub ch: Channel,
}

impl Host {
    pub async fn start(id: &str, env: &[(&str, &str)]) -> Host {
        let scratch = tempfile::Builder::new().prefix("csi-t").tempdir().unwrap();
        let sock = scratch.path().join("csi.sock");
        let mut opts = DaemonOpts::host(id).env(
            "RBDVOL_CSI__ENDPOINT",
            &format!("unix://{}", sock.display()),
        );
        for (k, v) in env {
            opts = opts.env(k, v);
        }
        let d = Daemon::start(opts);
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let path = sock.clone();
        let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                tokio::net::UnixStream::connect(path.clone())
            }))
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", sock.display(), d.log()));
        Host { d, scratch, ch }
    }

    pub fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.ch.clone())
    }
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.ch.clone())
    }
    /// A flat path under the scratch dir, as swarmkit hands out (the leaf may not exist).
    pub fn path(&self, leaf: &str) -> PathBuf {
        self.scratch.path().join(leaf)
    }

    pub async fn stage(&self, vol: &str, staging: &Path, mode: Mode) -> Result<(), tonic::Status> {
        self.node()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap(mode)),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }
    pub async fn unstage(&self, vol: &str, staging: &Path) {
        self.node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("unstage {vol}: {e}\n{}", self.d.log()));
    }
    pub async fn publish(
        &self,
        vol: &str,
        staging: &Path,
        target: &Path,
        mode: Mode,
    ) -> Result<(), tonic::Status> {
        self.node()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap(mode)),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }
    pub async fn unpublish(&self, vol: &str, target: &Path) {
        self.node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("unpublish {vol}: {e}"));
    }
    pub async fn create(
        &self,
        name: &str,
        bytes: i64,
        params: &[(&str, &str)],
        mode: Mode,
    ) -> Result<csi::Volume, tonic::Status> {
        self.ctl()
            .create_volume(csi::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap(mode)],
                parameters: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }
    pub async fn delete(&self, name: &str) -> Result<(), tonic::Status> {
        self.ctl()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: name.into(),
                secrets: HashMap::new(),
            })
            .await
            .map(|_| ())
    }
}

/// A test that failed half-way leaves its staging and target mounts: unmount them (the
/// innermost first) before the daemon's own teardown releases the devices.
impl Drop for Host {
    fn drop(&mut self) {
        let mut left = mounts_under(self.scratch.path());
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m)
                .status();
        }
    }
}

pub fn cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

pub fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) -> String {
    let e = r.expect_err("expected a refusal");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(needle),
        "expected {needle:?} in: {}",
        e.message()
    );
    e.message().to_string()
}

/// The mapper a daemon chose, from its log.
pub fn mapper_of(h: &Host) -> String {
    let log = h.d.log();
    let at = log
        .find("data path mapper=\"")
        .expect("the daemon logs its mapper")
        + 18;
    log[at..].split('"').next().unwrap().to_string()
}

/// `ceph auth get-or-create-key` for an RBD user of the test cluster.
pub fn cephx_user(name: &str) -> String {
    let out = std::process::Command::new("timeout")
        .args(["-k", "5", "60", "ceph", "-c"])
        .arg(ceph_conf())
        .args(["auth", "get-or-create-key", &format!("client.{name}")])
        .args(["mon", "profile rbd", "osd", "profile rbd"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
