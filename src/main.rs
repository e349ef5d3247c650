//! The `rbdvol` binary: parses the command line, sets up logging, and runs a command.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use rbdvol::api;
use rbdvol::ceph::{self, Cluster};
use rbdvol::cli::{Cli, Command, ServeArgs};
use rbdvol::config::Settings;
use rbdvol::driver::Driver;
use rbdvol::error::Result;

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

async fn serve(args: &ServeArgs) -> Result<()> {
    let settings = args.settings()?;
    init_logging(&settings);
    let (major, minor, extra) = ceph::sys::librbd_version();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        librbd = %format!("{major}.{minor}.{extra}"),
        host_id = %settings.effective_host_id(),
        socket = %settings.socket.display(),
        pools = ?settings.ceph.pools,
        "rbdvol starting"
    );
    // Bind first: a managed plugin must listen within ~9.5 s, before slow Ceph work.
    let listener = api::bind(&settings.socket).await?;
    let _remove_socket_on_exit = api::SocketGuard(settings.socket.clone());

    let cluster = Arc::new(Cluster::new(ceph::connect_spec(&settings.ceph)));
    let driver = Arc::new(Driver::new(settings.clone(), cluster.clone()));
    // Connect in the background so the first request usually finds a live connection.
    let warm = cluster.clone();
    tokio::spawn(async move {
        if let Err(e) = warm.connection(rbdvol::driver::SHORT_DEADLINE).await {
            tracing::warn!(error = %e, "initial connection to the cluster failed; retrying on the next request");
        }
    });
    tracing::info!(socket = %settings.socket.display(), "serving");
    api::serve(listener, driver, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::ShowConfig(args) => args.settings().map(|s| println!("{s:#?}")),
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| rbdvol::error::Error::io("starting the runtime", e))
            .and_then(|rt| rt.block_on(serve(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdvol: {e}");
            ExitCode::FAILURE
        }
    }
}
