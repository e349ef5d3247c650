//! The `rbdvol` binary: parses the command line, sets up logging, and runs a command.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use rbdvol::api;
use rbdvol::api::Backends;
use rbdvol::ceph::{self, Cluster};
use rbdvol::cli::{Cli, Command, DoctorArgs, LockCommand, ServeArgs, TlsCommand};
use rbdvol::config::Settings;
use rbdvol::controller::{Controller, ControllerConfig};
use rbdvol::error::Result;
use rbdvol::host::mapper::{self, Exporters, MapperKind};
use rbdvol::host::ops::RealHost;
use rbdvol::node::attach::Mappers;
use rbdvol::node::{Node, NodeConfig};

fn init_logging(settings: &Settings) {
    let filter = EnvFilter::try_new(&settings.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if settings.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// The keyring is the cluster credential: anyone who can read it can do what rbdvol
/// can. Say so loudly when it is world-readable (its contents are never logged).
fn warn_if_keyring_is_readable(settings: &Settings) {
    use std::os::unix::fs::PermissionsExt;
    let from_conf = || {
        let conf = std::fs::read_to_string(&settings.ceph.conf).ok()?;
        conf.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "keyring").then(|| std::path::PathBuf::from(v.trim()))
        })
    };
    let Some(keyring) = settings.ceph.keyring.clone().or_else(from_conf) else {
        return;
    };
    if let Ok(meta) = std::fs::metadata(&keyring) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(keyring = %keyring.display(), "the ceph keyring is world-readable: any local user can act on the cluster with it; chmod 600 it");
        }
    }
}

/// The mapper new mappings use: the configured one, or the first this kernel supports.
fn chosen_mapper(settings: &Settings) -> MapperKind {
    match settings.map.mapper.as_str() {
        "krbd" => MapperKind::Krbd,
        "nbd" => MapperKind::Nbd,
        "userspace" => MapperKind::Userspace,
        _ => {
            let (kind, why) = mapper::detect();
            tracing::info!(mapper = kind.name(), reason = %why, "mapper chosen automatically");
            kind
        }
    }
}

/// The controller and the node over this machine's real effects.
fn backends(settings: &Settings, cluster: Arc<Cluster>) -> Result<Backends> {
    // One cache of what the cluster said, shared by both halves: Get can answer for a
    // volume mounted here even while the cluster cannot be reached.
    let cluster = Arc::new(rbdvol::ceph::ops::Remembering::new(cluster));
    let host_id = settings.effective_host_id();
    let exporters = Exporters {
        exe: std::env::current_exe()
            .map_err(|e| rbdvol::error::Error::io("locating the rbdvol binary", e))?,
        ceph: settings.ceph.clone(),
        dir: settings.state_dir.join("exports"),
        fence_expiry: settings.lock.fence_expiry,
        liveness_timeout: settings.lock.liveness_timeout,
    };
    let mappers = Mappers::real(chosen_mapper(settings), settings.ceph.clone(), exporters);
    let node = Node::new(
        NodeConfig {
            host_id: host_id.clone(),
            mount_root: settings.mount_root.clone(),
            pools: settings.ceph.pools.clone(),
            takeover_wait: settings.lock.takeover_wait,
            orphan_grace: settings.map.orphan_grace,
            state_dir: settings.state_dir.clone(),
            dockerd_pid_file: "/var/run/docker.pid".into(),
            sees_all_processes: rbdvol::node::sees_all_processes(),
            ms_mode: settings.map.ms_mode.clone(),
        },
        cluster.clone(),
        Arc::new(RealHost),
        mappers,
    )?;
    let controller = Controller::new(
        ControllerConfig {
            host_id,
            pools: settings.ceph.pools.clone(),
            defaults: settings.volume.clone(),
            remove: settings.remove.clone(),
        },
        cluster,
    );
    Ok(Backends { controller, node })
}

async fn serve(args: &ServeArgs) -> Result<()> {
    let settings = args.settings()?;
    init_logging(&settings);
    let settings = {
        let mut s = (*settings).clone();
        s.resolve_paths()?;
        Arc::new(s)
    };
    let (major, minor, extra) = ceph::sys::librbd_version();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        librbd = %format!("{major}.{minor}.{extra}"),
        host_id = %settings.effective_host_id(),
        socket = %settings.socket.display(),
        pools = ?settings.ceph.pools,
        "rbdvol starting"
    );
    warn_if_keyring_is_readable(&settings);
    rbdvol::host::fs::prepare_mount_root(&settings.mount_root)?;
    // Bind first: a managed plugin must listen within ~9.5 s, before slow Ceph work.
    let listener = api::bind(&settings.socket).await?;
    let _remove_socket_on_exit = api::SocketGuard(settings.socket.clone());
    let csi_listener = match settings.csi.endpoint.as_str() {
        "" => None,
        e => Some(api::csi::bind(e).await?),
    };

    let cluster = Arc::new(Cluster::new(ceph::connect_spec(&settings.ceph)));
    let driver = Arc::new(backends(&settings, cluster.clone())?);
    // Before reconcile and the first connection, so their events are counted.
    let metrics_listener = if settings.metrics.listen.is_empty() {
        None
    } else {
        let node = driver.clone();
        rbdvol::metrics::install(move || node.node.stats());
        Some(rbdvol::metrics::bind(&settings.metrics.listen).await?)
    };
    tracing::info!(mapper = driver.node.mapper().name(), "data path");
    // Before answering Docker: adopt or release what a crash or restart left behind.
    driver.node.reconcile().await;
    // Connect in the background so the first request usually finds a live connection.
    let warm = cluster.clone();
    tokio::spawn(async move {
        if let Err(e) = warm.connection(rbdvol::ceph::SHORT_DEADLINE).await {
            tracing::warn!(error = %e, "initial connection to the cluster failed; retrying on the next request");
        }
    });
    let watcher = driver.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            watcher.node.check_fencing(None).await;
        }
    });
    // Answer snapshot (freeze/thaw) and resize requests for the volumes mounted here.
    let control = rbdvol::node::control::Control::new(
        settings.effective_host_id(),
        ceph::connect_spec(&settings.ceph),
        std::env::current_exe()
            .map_err(|e| rbdvol::error::Error::io("locating the rbdvol binary", e))?,
        tokio::runtime::Handle::current(),
    );
    let holder = driver.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let targets = holder.node.control_targets();
            let c = control.clone();
            let _ = tokio::task::spawn_blocking(move || c.sync(targets)).await;
        }
    });
    let sweeper = driver.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweeper.node.orphan_sweep_period());
        loop {
            tick.tick().await;
            sweeper.node.release_orphans().await;
        }
    });
    // One shutdown signal for every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let tls_server = if settings.tls.listen.is_empty() {
        None
    } else {
        let config = api::tls::server_config(&settings.tls)?;
        let tcp = api::tls::bind(&settings.tls.listen).await?;
        tracing::info!(
            addr = %tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            mutual = settings.tls.client_ca.is_some(),
            max_connections = settings.tls.max_connections,
            max_handshakes = settings.tls.max_handshakes,
            "serving HTTPS"
        );
        if settings.tls.client_ca.is_none() {
            tracing::error!(
                listen = %settings.tls.listen,
                "INSECURE: tls.insecure_allow_unauthenticated_clients is set and tls.client_ca is not: ANY network peer that reaches this port can create, mount and remove volumes. Set tls.client_ca (`rbdvol tls init` writes ca.pem and client certificates) and remove the insecure setting"
            );
        }
        Some(tokio::spawn(api::tls::serve(
            tcp,
            config,
            api::tls::Limits::new(&settings.tls),
            driver.clone(),
            stopped(),
        )))
    };
    let csi_server = csi_listener.map(|l| {
        tokio::spawn(api::csi::serve(
            l,
            driver.clone(),
            settings.ceph.clone(),
            stopped(),
        ))
    });
    if let Some(tcp) = metrics_listener {
        tokio::spawn(rbdvol::metrics::serve(tcp, stopped()));
    }
    tracing::info!(socket = %settings.socket.display(), "serving");
    let unix_server = tokio::spawn(api::serve(listener, driver, stopped()));
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = unix_server.await;
    if let Some(t) = tls_server {
        let _ = t.await;
    }
    if let Some(t) = csi_server {
        if let Ok(Err(e)) = t.await {
            tracing::error!(error = %e, "the CSI server failed");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// `rbdvol lock ls|break`: operator commands on their own cluster connection.
fn lock_command(cmd: &LockCommand) -> Result<()> {
    let args = match cmd {
        LockCommand::Ls(a) | LockCommand::Break { args: a, .. } => a,
    };
    let settings = args.settings()?;
    let rados =
        ceph::sys::Rados::connect(&ceph::connect_spec(&settings.ceph)).map_err(|(step, e)| {
            rbdvol::error::Error::Unavailable(format!("{step}: {}", e.describe()))
        })?;
    match cmd {
        LockCommand::Ls(_) => {
            let rows = rbdvol::lock::list(&rados, &settings.ceph.pools)?;
            println!("{:<10} {:<32} {:<10} HOLDER", "POOL", "VOLUME", "LOCK");
            for r in &rows {
                println!(
                    "{:<10} {:<32} {:<10} {}",
                    r.pool, r.volume, r.kind, r.holder
                );
            }
            if rows.is_empty() {
                println!("(no volume is locked)");
            }
        }
        LockCommand::Break { volume, .. } => {
            rbdvol::volume::names::validate(volume)?;
            println!(
                "{}",
                rbdvol::lock::break_lock(
                    &rados,
                    &settings.ceph.pools,
                    volume,
                    settings.lock.fence_expiry
                )?
            );
        }
    }
    Ok(())
}

/// `rbdvol show-config`: the settings in effect, as TOML, each value with its source.
fn show_config(args: &ServeArgs) -> Result<()> {
    use rbdvol::show_config::{render, Layers};
    let settings = args.settings()?;
    let layers = Layers::gather(args.config.as_deref(), args.flag_keys())?;
    print!("{}", render(&settings, &layers)?);
    Ok(())
}

/// `rbdvol doctor`: every check, as text or JSON; `Ok(false)` when one FAILed.
fn doctor(cmd: &DoctorArgs) -> Result<bool> {
    let settings = cmd.args.settings()?;
    let mut opts = rbdvol::doctor::Options::default();
    if !cmd.plugin_dirs.is_empty() {
        opts.plugin_dirs = cmd.plugin_dirs.clone();
    }
    opts.docker_cli = !cmd.no_docker_cli;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| rbdvol::error::Error::io("starting the runtime", e))?;
    let checks = rt.block_on(rbdvol::doctor::run(&settings, &opts));
    if cmd.json {
        println!("{}", rbdvol::doctor::render_json(&checks));
    } else {
        print!("{}", rbdvol::doctor::render_text(&checks));
    }
    Ok(!rbdvol::doctor::failed(&checks))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Doctor(cmd) = &cli.command {
        return match doctor(cmd) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("rbdvol: {e}");
                ExitCode::from(2)
            }
        };
    }
    let result = match &cli.command {
        Command::Doctor(_) => unreachable!("handled above"),
        Command::ShowConfig(args) => show_config(args),
        Command::Export(args) => rbdvol::export::run(args),
        Command::Lock(cmd) => lock_command(cmd),
        Command::FreezeGuard {
            mountpoint,
            max_secs,
        } => rbdvol::host::freeze::guard(mountpoint, std::time::Duration::from_secs(*max_secs)),
        Command::Snapshot(_) | Command::Resize { .. } => {
            rbdvol::daytwo_cli::run(&cli.command).map(|out| println!("{out}"))
        }
        Command::Tls(TlsCommand::Init { dir, hosts, addr }) => rbdvol::certs::init(dir, hosts, addr).map(|_| {
            println!(
                "wrote ca.pem, server.pem, server-key.pem, client.pem, client-key.pem and rbdvol.json to {}.\nServer: set tls.listen, tls.cert, tls.key and tls.client_ca (ca.pem) in the rbdvol config.\nDocker: copy rbdvol.json to /etc/docker/plugins/ (and remove any rbdvol.sock/.spec, which take precedence).",
                dir.display()
            )
        }),
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| rbdvol::error::Error::io("starting the runtime", e))
            .and_then(|rt| {
                let result = rt.block_on(serve(args));
                // A librados call stuck on a dead cluster must not hold up the exit;
                // its own timeouts end it, and nothing it does matters any more.
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
                result
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdvol: {e}");
            ExitCode::FAILURE
        }
    }
}
