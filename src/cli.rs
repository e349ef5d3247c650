//! The command line: `rbdvol serve` and its flags. Flags override the config file and
//! the environment; `rbdvol serve --help` documents each.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::Settings;
use crate::error::{Error, Result};

#[derive(Debug, Parser)]
#[command(
    name = "rbdvol",
    version,
    about = "Docker volume plugin for Ceph RBD: one host at a time, fenced takeover, data never wiped",
    long_about = None,
    after_help = "Volumes from other volumes, at creation:\n  docker volume create -d rbdvol -o from=pg-data pg-test          a clone of pg-data as it is now\n  docker volume create -d rbdvol -o from=pg-data@nightly pg-old   a clone of its snapshot nightly\nThe clone keeps its source's filesystem, data and settings and is never formatted; `docker volume inspect`\nshows its origin, and a volume's snapshots. A volume with clones cannot be removed until they are."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the plugin daemon: serve Docker's volume plugin protocol on a unix socket.
    Serve(ServeArgs),
    /// Print the configuration in effect as TOML `serve --config` accepts, each value
    /// commented with where it came from (default < file < RBDVOL_* environment < flag).
    ShowConfig(ServeArgs),
    /// Certificates for the HTTPS (remote plugin) listener.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Check whether volumes will work on this host (cluster, kernel, tools, mount root,
    /// Docker, ownership); prints OK, WARN or FAIL with a fix for each. Exit 1 on a FAIL.
    Doctor(DoctorArgs),
    /// Operator commands for volume ownership across hosts.
    #[command(subcommand)]
    Lock(LockCommand),
    /// Snapshots of a volume: create, list, remove, roll back. Exit 0 when done, 1 when
    /// refused or failed (the reason on stderr), 2 on bad usage.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Grow a volume to SIZE (e.g. 20G). Its filesystem grows at once on the host where
    /// it is mounted, or at its next Mount. Shrinking is refused. Exit codes as for
    /// `snapshot`.
    Resize {
        /// The volume.
        volume: String,
        /// The new size: N with K/M/G/T/P (binary units); at least the current size.
        size: String,
        /// Print the result as JSON: {"volume", "old_bytes", "new_bytes"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Freeze the filesystem mounted at MOUNTPOINT until stdin closes or has input, a
    /// signal comes, or --max-secs pass; then thaw it. The daemon runs one per
    /// consistent snapshot; not for humans.
    #[command(hide = true)]
    FreezeGuard {
        mountpoint: PathBuf,
        #[arg(long, default_value_t = 30)]
        max_secs: u64,
    },
    /// Serve one RBD image as a file through FUSE, holding its exclusive lock. The
    /// daemon starts one of these per mapped volume (userspace mapper); not for humans.
    Export(crate::export::ExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a CA, a server certificate for --host names/addresses, a client certificate
    /// for dockerd, and rbdvol.json (copy it to /etc/docker/plugins/) in DIR.
    Init {
        dir: PathBuf,
        /// DNS name or IP address the server certificate is for (repeatable).
        #[arg(long = "host", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
        /// HOST:PORT dockerd connects to (written into rbdvol.json).
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7443")]
        addr: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// List who holds which volume (exclusive locks, with the owner's host, and advisory locks).
    Ls(ServeArgs),
    /// Take a volume away from the host holding it: blocklist (fence) that host's client
    /// for this volume, then break its lock. For a host that is alive but cut off.
    Break {
        /// The volume to free.
        volume: String,
        #[command(flatten)]
        args: ServeArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of VOLUME named NAME (default: snap-<UTC time>). While the volume
    /// is mounted, on this or any other host, the host holding it freezes its filesystem
    /// for the moment of the snapshot (asked through the cluster), so the snapshot is
    /// consistent. If that host does not answer within 10 s, no snapshot is taken and
    /// the error names it; --crash-consistent takes it unfrozen instead.
    Create {
        /// The volume.
        volume: String,
        /// The snapshot's name (letters, digits, '_', '.', '-').
        name: Option<String>,
        /// Print {"volume", "snapshot"} as JSON.
        #[arg(long)]
        json: bool,
        /// When the host holding the volume does not answer, take the snapshot without
        /// freezing its filesystem (like a power cut: journals replay on first use).
        #[arg(long)]
        crash_consistent: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// List VOLUME's snapshots: name, time, size, and the volumes cloned from each.
    Ls {
        /// The volume.
        volume: String,
        /// Print [{"name", "created", "size_bytes", "protected", "clones"}] as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Remove VOLUME@NAME. Refused while volumes cloned from it exist.
    Rm {
        /// VOLUME@NAME
        snapshot: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Roll VOLUME back to its snapshot NAME (VOLUME@NAME): everything written since is
    /// lost. Refused, naming the host, while the volume is mounted anywhere.
    Rollback {
        /// VOLUME@NAME
        snapshot: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
}

#[derive(Debug, Args, Clone)]
pub struct DoctorArgs {
    /// Print the checks as JSON: {"ok": bool, "checks": [{name, status, detail, fix}]}.
    #[arg(long)]
    pub json: bool,
    /// A directory dockerd discovers plugins in (repeatable; default: /run/docker/plugins,
    /// /etc/docker/plugins and /usr/lib/docker/plugins).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Do not run `docker plugin ls` to look for a managed plugin.
    #[arg(long)]
    pub no_docker_cli: bool,
    #[command(flatten)]
    pub args: ServeArgs,
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML). Default: /etc/rbdvol/rbdvol.toml if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket to serve; dockerd finds NAME.sock in /run/docker/plugins.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// ceph.conf of the cluster.
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,
    /// Keyring for the cephx user (default: from the ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub keyring: Option<PathBuf>,
    /// cephx user without the "client." prefix, e.g. admin.
    #[arg(long, value_name = "NAME")]
    pub client_id: Option<String>,
    /// Ceph cluster name.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Pool whose images are volumes; repeat for several (the first is the default).
    #[arg(long = "pool", value_name = "POOL")]
    pub pools: Vec<String>,
    /// This host's stable identity in ownership records (default: hostname).
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Directory for the reference table and mapper state.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Root directory under which volumes are mounted.
    #[arg(long, value_name = "DIR")]
    pub mount_root: Option<PathBuf>,
    /// HTTPS listener address (e.g. 0.0.0.0:7443); certificates come from the [tls] config.
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<String>,
    /// Serve the CSI API (Swarm cluster volumes) on this endpoint, e.g.
    /// unix:///run/docker/plugins/rbdvol/csi.sock.
    #[arg(long, value_name = "ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// Mapper: auto, krbd, nbd or userspace.
    #[arg(long, value_name = "KIND")]
    pub mapper: Option<String>,
    /// Log filter, e.g. info or rbdvol=debug.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

impl ServeArgs {
    /// The settings these flags set, as (dotted key, flag) pairs, for `show-config`.
    pub fn flag_keys(&self) -> Vec<(&'static str, &'static str)> {
        let mut keys = Vec::new();
        let mut add = |set: bool, key, flag| {
            if set {
                keys.push((key, flag));
            }
        };
        add(self.socket.is_some(), "socket", "--socket");
        add(self.ceph_conf.is_some(), "ceph.conf", "--ceph-conf");
        add(self.keyring.is_some(), "ceph.keyring", "--keyring");
        add(self.client_id.is_some(), "ceph.client_id", "--client-id");
        add(self.cluster.is_some(), "ceph.cluster", "--cluster");
        add(!self.pools.is_empty(), "ceph.pools", "--pool");
        add(self.host_id.is_some(), "host_id", "--host-id");
        add(self.state_dir.is_some(), "state_dir", "--state-dir");
        add(self.mount_root.is_some(), "mount_root", "--mount-root");
        add(self.tls_listen.is_some(), "tls.listen", "--tls-listen");
        add(self.mapper.is_some(), "map.mapper", "--mapper");
        add(
            self.csi_endpoint.is_some(),
            "csi.endpoint",
            "--csi-endpoint",
        );
        add(self.log_level.is_some(), "log.level", "--log-level");
        add(self.log_format.is_some(), "log.format", "--log-format");
        keys
    }

    /// Loads the configuration and applies these flags on top.
    pub fn settings(&self) -> Result<Arc<Settings>> {
        let mut s = Settings::load(self.config.as_deref())?;
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(self.socket, s.socket);
        set!(self.ceph_conf, s.ceph.conf);
        set!(self.client_id, s.ceph.client_id);
        set!(self.cluster, s.ceph.cluster);
        set!(self.host_id, s.host_id);
        set!(self.state_dir, s.state_dir);
        set!(self.mount_root, s.mount_root);
        set!(self.mapper, s.map.mapper);
        set!(self.tls_listen, s.tls.listen);
        set!(self.csi_endpoint, s.csi.endpoint);
        set!(self.log_level, s.log.level);
        set!(self.log_format, s.log.format);
        if self.keyring.is_some() {
            s.ceph.keyring = self.keyring.clone();
        }
        if !self.pools.is_empty() {
            s.ceph.pools = self.pools.clone();
        }
        for pool in &s.ceph.pools {
            crate::volume::names::validate_pool(pool)
                .map_err(|r| Error::Config(format!("pool {pool:?}: {r}")))?;
        }
        s.validate()?;
        Ok(Arc::new(s))
    }
}
