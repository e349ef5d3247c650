//! Configuration: built-in defaults, then the TOML file, then `RBDVOL_*` environment
//! variables, then command-line flags (each layer overrides the one before).
//! `conf/rbdvol.toml` documents every key; keep the two in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/rbdvol/rbdvol.toml";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Unix socket dockerd finds the plugin by (`NAME.sock` in /run/docker/plugins).
    pub socket: PathBuf,
    /// This host's stable name in ownership records and errors. Empty: the hostname.
    pub host_id: String,
    /// Where the reference table and exporter pid files live.
    pub state_dir: PathBuf,
    /// Root under which volumes are mounted: `<mount_root>/<pool>/<name>`.
    pub mount_root: PathBuf,
    pub log: LogSettings,
    pub ceph: CephSettings,
    pub volume: VolumeDefaults,
    pub remove: RemoveSettings,
    pub map: MapSettings,
    pub lock: LockSettings,
    pub tls: TlsSettings,
    pub metrics: MetricsSettings,
    pub csi: CsiSettings,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CsiSettings {
    /// CSI endpoint (Swarm cluster volumes), e.g.
    /// "unix:///run/docker/plugins/rbdvol/csi.sock"; empty: CSI is not served.
    pub endpoint: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address of the Prometheus `/metrics` listener, e.g. "127.0.0.1:9466"; empty: off.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter, e.g. "info" or "rbdvol=debug".
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CephSettings {
    pub conf: PathBuf,
    /// Empty: whatever the ceph.conf says (`keyring =`), else the default search path.
    pub keyring: Option<PathBuf>,
    /// The cephx user without the `client.` prefix.
    pub client_id: String,
    pub cluster: String,
    /// Pools whose images are volumes. The first is where volumes go by default.
    pub pools: Vec<String>,
    /// Per-operation limit handed to librados (`rados_osd_op_timeout`, `rados_mon_op_timeout`).
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
    /// How long one connection attempt may take (`client_mount_timeout`).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeDefaults {
    pub size: String,
    pub fstype: String,
    pub features: String,
    pub mkfs_options: String,
    pub mount_options: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapSettings {
    /// "auto" (krbd if the kernel has it, else nbd, else userspace), "krbd", "nbd" or
    /// "userspace".
    pub mapper: String,
    /// The kernel RBD client's messenger mode (`-o ms_mode=`): "auto" (legacy v1 when
    /// the monitors offer it, else prefer-crc or prefer-secure, or secure when the
    /// cluster's ms_*_mode settings require encryption), or "legacy", "crc",
    /// "secure", "prefer-crc", "prefer-secure". Anything but legacy needs Linux 5.11.
    pub ms_mode: String,
    /// A volume whose remaining references are all at least this old, and whose
    /// filesystem no container's mount namespace holds, is released (references that
    /// Docker will never Unmount: a Mount whose answer it never got, a dockerd crash).
    /// Younger references may belong to a container that is still starting.
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockSettings {
    /// How long a Mount waits for another host to release the volume or be declared
    /// dead (and fenced). Keep it inside Docker's 2-minute Mount limit.
    #[serde(with = "humantime_serde")]
    pub takeover_wait: Duration,
    /// How long a displaced lock owner (taken over or broken) stays on the OSD
    /// blocklist. Far longer than any cut-off host's queued writes can wait: the entry
    /// is removed earlier once that owner's exporter is known to have exited.
    #[serde(with = "humantime_serde")]
    pub fence_expiry: Duration,
    /// Timeout of the liveness watch each userspace mapping keeps on its volume: a
    /// host dead or cut off from the cluster for this long can be fenced and its
    /// volumes taken over, without waiting for the cluster's watch timeout (30 s by
    /// default). A live host that cannot reach the cluster for this long loses its
    /// volumes the same way. 0s: publish none (takeover after the cluster's timeout).
    #[serde(with = "humantime_serde")]
    pub liveness_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// Address of the HTTPS listener (e.g. "0.0.0.0:7443"); empty: none.
    pub listen: String,
    /// Server certificate chain and private key (PEM).
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// Clients must present a certificate this CA signed (mutual TLS). Required with
    /// `listen` unless `insecure_allow_unauthenticated_clients`.
    pub client_ca: Option<std::path::PathBuf>,
    /// Serve any network peer without a client certificate. Anyone who can reach the
    /// port can then create, mount and remove volumes.
    pub insecure_allow_unauthenticated_clients: bool,
    /// Concurrent TLS connections; more are closed at once, so network peers cannot
    /// exhaust the daemon (the unix socket is not counted).
    pub max_connections: usize,
    /// TLS handshakes in progress (the expensive, unauthenticated part); more are
    /// closed at once.
    pub max_handshakes: usize,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            listen: String::new(),
            cert: std::path::PathBuf::new(),
            key: std::path::PathBuf::new(),
            client_ca: None,
            insecure_allow_unauthenticated_clients: false,
            max_connections: 64,
            max_handshakes: 16,
        }
    }
}

impl Default for MapSettings {
    fn default() -> Self {
        MapSettings {
            mapper: "auto".into(),
            ms_mode: "auto".into(),
            orphan_grace: Duration::from_secs(90),
        }
    }
}

impl Default for LockSettings {
    fn default() -> Self {
        LockSettings {
            takeover_wait: Duration::from_secs(60),
            fence_expiry: Duration::from_secs(365 * 24 * 3600),
            liveness_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RemovePolicy {
    /// Move the image to the RBD trash (recoverable with `rbd trash restore`).
    Trash,
    /// Delete the image and its data.
    Delete,
    /// Do nothing to the image; Docker forgets the volume, List shows it again.
    Keep,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoveSettings {
    pub policy: RemovePolicy,
    /// How long a trashed image is protected from `rbd trash purge`.
    #[serde(with = "humantime_serde")]
    pub trash_deferment: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: "/run/docker/plugins/rbdvol.sock".into(),
            host_id: String::new(),
            state_dir: "/var/lib/rbdvol/state".into(),
            mount_root: "/var/lib/rbdvol/mounts".into(),
            log: LogSettings::default(),
            ceph: CephSettings::default(),
            volume: VolumeDefaults::default(),
            remove: RemoveSettings::default(),
            map: MapSettings::default(),
            lock: LockSettings::default(),
            tls: TlsSettings::default(),
            metrics: MetricsSettings::default(),
            csi: CsiSettings::default(),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

impl Default for CephSettings {
    fn default() -> Self {
        CephSettings {
            conf: "/etc/ceph/ceph.conf".into(),
            keyring: None,
            client_id: "admin".into(),
            cluster: "ceph".into(),
            pools: vec!["rbd".into()],
            op_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for VolumeDefaults {
    fn default() -> Self {
        VolumeDefaults {
            size: "10G".into(),
            fstype: "ext4".into(),
            features: "layering,exclusive-lock".into(),
            mkfs_options: String::new(),
            mount_options: String::new(),
        }
    }
}

impl Default for RemoveSettings {
    fn default() -> Self {
        RemoveSettings {
            policy: RemovePolicy::Trash,
            trash_deferment: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Settings {
    /// Loads defaults, then `file` (or the default file if it exists), then the
    /// environment. An explicitly named file that is missing is an error.
    pub fn load(file: Option<&Path>) -> Result<Settings> {
        let mut builder = config::Config::builder();
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(Error::Config(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                builder = builder.add_source(
                    config::File::from(path)
                        .format(config::FileFormat::Toml)
                        .required(true),
                );
            }
            None => {
                builder = builder.add_source(
                    config::File::from(Path::new(DEFAULT_CONFIG_FILE))
                        .format(config::FileFormat::Toml)
                        .required(false),
                );
            }
        }
        // RBDVOL_CRASH_AT and RBDVOL_FAULTS are test hooks (see `failpoint`), not settings.
        let env: std::collections::HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k != "RBDVOL_CRASH_AT" && k != "RBDVOL_FAULTS")
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("RBDVOL")
                .source(Some(env))
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("ceph.pools")
                .try_parsing(true),
        );
        let built = builder.build().map_err(|e| Error::Config(e.to_string()))?;
        let settings: Settings = built
            .try_deserialize()
            .map_err(|e| Error::Config(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<()> {
        if self.ceph.pools.is_empty() {
            return Err(Error::Config(
                "ceph.pools is empty; name at least one pool, e.g. pools = [\"rbd\"]".into(),
            ));
        }
        for dir in [&self.state_dir, &self.mount_root] {
            if !dir.is_absolute() {
                return Err(Error::Config(format!(
                    "{} must be an absolute path",
                    dir.display()
                )));
            }
        }
        if !matches!(
            self.map.mapper.as_str(),
            "auto" | "krbd" | "nbd" | "userspace"
        ) {
            return Err(Error::Config(format!(
                "map.mapper {:?}: use \"auto\", \"krbd\", \"nbd\" or \"userspace\"",
                self.map.mapper
            )));
        }
        if !crate::host::mapper::msgr::SETTINGS.contains(&self.map.ms_mode.as_str()) {
            return Err(Error::Config(format!(
                "map.ms_mode {:?}: use one of {}",
                self.map.ms_mode,
                crate::host::mapper::msgr::SETTINGS.join(", ")
            )));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(100)).contains(&self.map.orphan_grace) {
            return Err(Error::Config(format!(
                "map.orphan_grace {}: use 1s to 100s (default 90s); orphaned volumes must be released within 2 minutes of Docker's last Unmount",
                humantime::format_duration(self.map.orphan_grace)
            )));
        }
        if self.lock.takeover_wait > Duration::from_secs(100) {
            return Err(Error::Config(
                "lock.takeover_wait must stay under 100s: Docker abandons a Mount after 2 minutes"
                    .into(),
            ));
        }
        if self.lock.fence_expiry < Duration::from_secs(3600) {
            return Err(Error::Config(
                "lock.fence_expiry must be at least 1h: a fenced host that comes back after it expires can land its queued writes"
                    .into(),
            ));
        }
        let live = self.lock.liveness_timeout;
        if !live.is_zero() && !(Duration::from_secs(3)..=Duration::from_secs(30)).contains(&live) {
            return Err(Error::Config(format!(
                "lock.liveness_timeout {}: use 0s (off) or 3s to 30s (default 5s); below 3s a live host's watch, pinged once a second, can expire",
                humantime::format_duration(live)
            )));
        }
        if !self.tls.listen.is_empty()
            && (self.tls.cert.as_os_str().is_empty() || self.tls.key.as_os_str().is_empty())
        {
            return Err(Error::Config(
                "tls.listen is set but tls.cert or tls.key is not; `rbdvol tls init DIR` makes them".into(),
            ));
        }
        if !self.tls.listen.is_empty()
            && self.tls.client_ca.is_none()
            && !self.tls.insecure_allow_unauthenticated_clients
        {
            return Err(Error::Config(
                "tls.listen is set but tls.client_ca is not: any network peer could create, mount and remove volumes. Set tls.client_ca to the ca.pem `rbdvol tls init DIR` wrote (it also writes the client certificate dockerd presents), or, only on a network you fully trust, set tls.insecure_allow_unauthenticated_clients = true".into(),
            ));
        }
        if self.tls.max_connections == 0 || self.tls.max_handshakes == 0 {
            return Err(Error::Config(
                "tls.max_connections and tls.max_handshakes must be at least 1".into(),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(Error::Config(format!(
                "log.format {:?}: use \"text\" or \"json\"",
                self.log.format
            )));
        }
        Ok(())
    }

    /// Resolves `state_dir` and `mount_root` to real paths, creating them. Done once at
    /// start: the kernel names mounts and loop devices' backing files by real path, and
    /// a path through a symlink (`/var/lib` on another disk) would make a live mount
    /// look gone, and be torn down under its containers.
    pub fn resolve_paths(&mut self) -> Result<()> {
        for dir in [&mut self.state_dir, &mut self.mount_root] {
            std::fs::create_dir_all(&*dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let real = std::fs::canonicalize(&*dir)
                .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
            if real != *dir {
                tracing::info!(configured = %dir.display(), real = %real.display(), "using the real path of a configured directory");
                *dir = real;
            }
        }
        Ok(())
    }

    /// The host id, defaulting to the hostname.
    pub fn effective_host_id(&self) -> String {
        if !self.host_id.is_empty() {
            return self.host_id.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown-host".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_config_file_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/rbdvol.toml");
        let loaded = Settings::load(Some(&path)).expect("conf/rbdvol.toml must parse");
        let defaults = Settings::default();
        assert_eq!(format!("{loaded:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "sockett = \"/x\"\n").unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("sockett"), "{err}");
    }

    #[test]
    fn map_ms_mode_takes_the_kernel_modes_or_auto() {
        let mut s = Settings::default();
        assert_eq!(s.map.ms_mode, "auto");
        s.map.ms_mode = "secure".into();
        s.validate().unwrap();
        s.map.ms_mode = "v2".into();
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("map.ms_mode") && err.contains("prefer-crc"),
            "{err}"
        );
    }

    fn tls_listening() -> Settings {
        let mut s = Settings::default();
        s.tls.listen = "127.0.0.1:7443".into();
        s.tls.cert = "/etc/rbdvol/tls/server.pem".into();
        s.tls.key = "/etc/rbdvol/tls/server-key.pem".into();
        s
    }

    #[test]
    fn a_tls_listener_without_a_client_ca_is_refused() {
        let err = tls_listening().validate().unwrap_err().to_string();
        assert!(err.contains("tls.client_ca"), "{err}");
        assert!(err.contains("rbdvol tls init"), "{err}");
        assert!(
            err.contains("insecure_allow_unauthenticated_clients"),
            "{err}"
        );
    }

    #[test]
    fn a_tls_listener_is_allowed_with_a_client_ca_or_the_insecure_setting() {
        let mut s = tls_listening();
        s.tls.client_ca = Some("/etc/rbdvol/tls/ca.pem".into());
        s.validate().unwrap();
        let mut s = tls_listening();
        s.tls.insecure_allow_unauthenticated_clients = true;
        s.validate().unwrap();
        // No listener, nothing to authenticate.
        Settings::default().validate().unwrap();
    }

    #[test]
    fn tls_caps_default_and_must_be_positive() {
        let d = TlsSettings::default();
        assert_eq!((d.max_connections, d.max_handshakes), (64, 16));
        assert!(!d.insecure_allow_unauthenticated_clients);
        let mut s = Settings::default();
        s.tls.max_handshakes = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("tls.max_handshakes"), "{err}");
    }

    #[test]
    fn configured_directories_are_resolved_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("disk2");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("lib")).unwrap();
        let mut s = Settings {
            mount_root: dir.path().join("lib/mounts"),
            state_dir: dir.path().join("lib/state"),
            ..Settings::default()
        };
        s.resolve_paths().unwrap();
        let real = real.canonicalize().unwrap();
        assert_eq!(s.mount_root, real.join("mounts"));
        assert_eq!(s.state_dir, real.join("state"));
    }

    #[test]
    fn orphan_grace_stays_inside_dockers_limits() {
        let mut s = Settings::default();
        s.map.orphan_grace = Duration::from_secs(0);
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("orphan_grace"));
        s.map.orphan_grace = Duration::from_secs(101);
        assert!(s.validate().is_err());
        s.map.orphan_grace = Duration::from_secs(5);
        s.validate().unwrap();
    }

    #[test]
    fn the_liveness_timeout_is_off_or_outlasts_a_few_lost_pings() {
        let mut s = Settings::default();
        assert_eq!(s.lock.liveness_timeout, Duration::from_secs(5));
        s.lock.liveness_timeout = Duration::from_secs(2);
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("lock.liveness_timeout"), "{err}");
        s.lock.liveness_timeout = Duration::from_secs(31);
        assert!(s.validate().is_err());
        s.lock.liveness_timeout = Duration::ZERO;
        s.validate().unwrap();
    }

    #[test]
    fn a_missing_named_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/rbdvol.toml"))).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }
}
