//! The CSI front end (Swarm cluster volumes, Docker ≥ 28.2): the Identity, Controller
//! and Node services over gRPC on a unix socket, beside Docker's volume plugin protocol.
//! Both front ends drive the same [`Backends`]: a volume is one RBD image whichever API
//! names it, and the exclusive lock keeps it on one host at a time across both.
//!
//! The bindings come from `bpfman-csi` (generated CSI v1 code on tonic 0.11): no protoc
//! and no vendored .proto is needed to build. Volume IDs are the image names, so the
//! legacy API and CSI name a volume alike.

// tonic's handlers return `Status` by value; the helpers that build it do the same.
#![allow(clippy::result_large_err)]

mod controller;
pub mod creds;
mod node;

use std::path::PathBuf;
use std::sync::Arc;

use bpfman_csi::v1 as csi;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::AccessType;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

use super::Backends;
use crate::error::{Error, Result};

pub use controller::CsiController;
pub use node::CsiNode;

/// The CSI driver name Swarm records for each volume.
pub const DRIVER_NAME: &str = "rbdvol";

/// The one place an [`Error`] becomes a gRPC status. Codes follow the CSI spec's
/// meanings, so Swarm retries what may succeed later and reports the rest.
pub fn status(e: Error) -> Status {
    let code = match &e {
        Error::BadRequest(_)
        | Error::InvalidName { .. }
        | Error::InvalidOption { .. }
        | Error::UnknownOption { .. } => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::Conflict { .. } => Code::AlreadyExists,
        // In use here or held by another host: retried by the CO once released.
        Error::InUse { .. } | Error::HeldElsewhere(_) => Code::FailedPrecondition,
        // A volume rbdvol will not format, a mapper this host lacks: not retryable as is.
        Error::NotSupported(_) => Code::FailedPrecondition,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Timeout { .. } => Code::DeadlineExceeded,
        Error::Ceph { .. } | Error::Config(_) | Error::Command { .. } | Error::Io { .. } => {
            Code::Internal
        }
    };
    let message = e.to_string();
    if code == Code::Internal || code == Code::Unavailable {
        tracing::error!(error = %message, "csi request failed");
    } else {
        tracing::warn!(error = %message, "csi request refused");
    }
    Status::new(code, message)
}

fn bad(msg: impl Into<String>) -> Status {
    status(Error::BadRequest(msg.into()))
}

/// How a capability may be served: read-write on one node, read-only on any number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    OneWriter,
    ReadOnly,
}

/// Checks one requested capability: a filesystem (mount) volume in a mode a block
/// filesystem can serve safely. Errors say what to ask for instead.
pub fn check_capability(cap: &csi::VolumeCapability) -> std::result::Result<Sharing, String> {
    match &cap.access_type {
        Some(AccessType::Mount(m)) => {
            if !m.mount_flags.is_empty() {
                return Err(format!(
                    "mount flags {:?} are not accepted here; set mount options when creating the volume (--opt mount-options=...)",
                    m.mount_flags
                ));
            }
        }
        Some(AccessType::Block(_)) => {
            return Err("raw block volumes (--type block) are not supported by rbdvol; create the cluster volume with --type mount".into())
        }
        None => return Err("the volume capability names no access type; use --type mount".into()),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            Ok(Sharing::OneWriter)
        }
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => Ok(Sharing::ReadOnly),
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => Err(format!(
            "access mode {} is refused: an RBD volume carries a block filesystem, which is safe only with one writer and no other node reading it; use --sharing none or onewriter with --scope single (one writer), or --sharing readonly (readers on many nodes)",
            mode.as_str_name()
        )),
        Mode::Unknown => Err("the volume capability names no access mode; use --sharing none, onewriter or readonly".into()),
    }
}

/// Checks every capability of a request; at least one is required.
pub fn check_capabilities(
    caps: &[csi::VolumeCapability],
) -> std::result::Result<Vec<Sharing>, String> {
    if caps.is_empty() {
        return Err("no volume capability given".into());
    }
    caps.iter().map(check_capability).collect()
}

/// The volume ID is the image name; it is checked like a Docker volume name.
fn volume_id(id: &str) -> std::result::Result<&str, Status> {
    if id.is_empty() {
        return Err(bad("volume_id is required"));
    }
    crate::volume::names::validate(id).map_err(status)?;
    Ok(id)
}

/// Parses `unix:///path` (or a bare absolute path) into the socket path.
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(Error::Config(format!(
            "CSI endpoint {endpoint:?} is not a unix socket path; use unix:///run/docker/plugins/rbdvol/csi.sock or an absolute path"
        )));
    }
    Ok(PathBuf::from(path))
}

pub struct CsiIdentity;

#[tonic::async_trait]
impl csi::identity_server::Identity for CsiIdentity {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> std::result::Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service::Type, Service, Type as Cap};
        // No topology: every node reaches the same cluster.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![csi::PluginCapability {
                r#type: Some(Cap::Service(Service {
                    r#type: Type::ControllerService as i32,
                })),
            }],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> std::result::Result<Response<csi::ProbeResponse>, Status> {
        // Serving is ready: every request connects to the cluster on demand and says
        // so when it cannot, so a cluster outage is not a reason to restart the plugin.
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

/// Binds the CSI endpoint with the plugin socket's hygiene (see [`super::bind`]). At
/// start, so a bad endpoint stops the daemon rather than leaving it without CSI.
pub async fn bind(endpoint: &str) -> Result<(tokio::net::UnixListener, PathBuf)> {
    let path = endpoint_path(endpoint)?;
    Ok((super::bind(&path).await?, path))
}

/// Serves the three CSI services on the bound `listener` until `stopped` resolves.
pub async fn serve(
    (listener, path): (tokio::net::UnixListener, PathBuf),
    backends: Arc<Backends>,
    ceph: crate::config::CephSettings,
    stopped: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let _remove_on_exit = super::SocketGuard(path.clone());
    tracing::info!(endpoint = %path.display(), "serving CSI");
    tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(CsiIdentity))
        .add_service(csi::controller_server::ControllerServer::new(
            CsiController::new(backends.clone(), ceph),
        ))
        .add_service(csi::node_server::NodeServer::new(CsiNode::new(backends)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped)
        .await
        .map_err(|e| Error::Config(format!("CSI server on {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: AccessType) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access),
        }
    }
    fn mount() -> AccessType {
        AccessType::Mount(MountVolume::default())
    }

    #[test]
    fn one_writer_or_readers_only() {
        for m in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            assert_eq!(check_capability(&cap(m, mount())), Ok(Sharing::OneWriter));
        }
        for m in [Mode::SingleNodeReaderOnly, Mode::MultiNodeReaderOnly] {
            assert_eq!(check_capability(&cap(m, mount())), Ok(Sharing::ReadOnly));
        }
        for m in [
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
            Mode::Unknown,
        ] {
            let why = check_capability(&cap(m, mount())).unwrap_err();
            assert!(why.contains("--sharing"), "{why}");
        }
        let block = AccessType::Block(BlockVolume {});
        let why = check_capability(&cap(Mode::SingleNodeWriter, block)).unwrap_err();
        assert!(why.contains("--type mount"), "{why}");
        let flags = AccessType::Mount(MountVolume {
            mount_flags: vec!["noexec".into()],
            ..Default::default()
        });
        assert!(check_capability(&cap(Mode::SingleNodeWriter, flags)).is_err());
        assert!(check_capabilities(&[]).is_err());
    }

    #[test]
    fn errors_map_to_the_codes_the_spec_gives() {
        let cases = [
            (Error::NotFound("v".into()), Code::NotFound),
            (
                Error::InvalidOption {
                    key: "pool".into(),
                    value: "x".into(),
                    reason: "no".into(),
                },
                Code::InvalidArgument,
            ),
            (
                Error::Conflict {
                    name: "v".into(),
                    existing: "size=1".into(),
                    requested: "size=2".into(),
                },
                Code::AlreadyExists,
            ),
            (
                Error::HeldElsewhere("in use on b".into()),
                Code::FailedPrecondition,
            ),
            (Error::Unavailable("mons".into()), Code::Unavailable),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let s = status(e);
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), text, "the message is the error's own words");
        }
    }

    #[test]
    fn endpoints_are_unix_socket_paths() {
        assert_eq!(
            endpoint_path("unix:///run/x/csi.sock").unwrap(),
            PathBuf::from("/run/x/csi.sock")
        );
        assert_eq!(
            endpoint_path("/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(endpoint_path("tcp://0.0.0.0:1").is_err());
        assert!(endpoint_path("unix://relative.sock").is_err());
    }
}
