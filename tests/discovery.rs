//! Legacy plugin discovery through a `.spec` file: dockerd reads the address from
//! /etc/docker/plugins/NAME.spec (here a unix socket outside /run/docker/plugins) and
//! drives the plugin there. (The `.sock` way is covered by tests/docker_*.rs, the
//! `.json` + mutual TLS way by tests/tls.rs.)

mod common;

use std::path::PathBuf;

use common::*;

/// dockerd caches a legacy plugin's address by name for its whole life: one fixed
/// name and socket path on a machine, one run at a time.
const DRIVER: &str = "rbdvol-e2e-spec";
const SOCKET_DIR: &str = "/run/rbdvol-e2e-spec";

#[test]
fn dockerd_finds_the_plugin_through_a_spec_file() {
    let (up, why) = docker(&["info", "--format", "{{.ServerVersion}}"]);
    if !up {
        eprintln!("SKIPPED .spec discovery: no Docker engine: {}", why.trim());
        return;
    }
    std::fs::create_dir_all("/run/lock").unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/rbdvol-docker-spec.lock")
        .unwrap();
    let _one_run_at_a_time = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    std::fs::create_dir_all(SOCKET_DIR).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(SOCKET_DIR, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = PathBuf::from(SOCKET_DIR).join("rbdvol.sock");
    let mut opts = DaemonOpts::host("host-spec");
    opts.socket = Some(socket.clone());
    let d = Daemon::start(opts);

    std::fs::create_dir_all("/etc/docker/plugins").unwrap();
    let spec = PathBuf::from(format!("/etc/docker/plugins/{DRIVER}.spec"));
    std::fs::write(&spec, format!("unix://{}\n", socket.display())).unwrap();
    let name = unique("specvol");
    let (ok, out) = docker(&[
        "volume",
        "create",
        "-d",
        DRIVER,
        "-o",
        "size=320M",
        "-o",
        "fstype=xfs",
        &name,
    ]);
    if !ok {
        let _ = std::fs::remove_file(&spec);
        // No inspect or rm of a name dockerd does not know: it would probe every driver.
        panic!(
            "docker volume create through the .spec failed: {out}\n{}",
            d.log()
        );
    }
    let (iok, inspect) = docker(&[
        "volume",
        "inspect",
        "--format",
        "{{.Driver}} {{.Status.fstype}}",
        &name,
    ]);
    let (rok, removed) = docker(&["volume", "rm", &name]);
    let _ = std::fs::remove_file(&spec);
    assert!(
        iok && inspect.contains(&format!("{DRIVER} xfs")),
        "{inspect}"
    );
    assert!(rok, "{removed}");
    assert!(trashed_names("rbd").contains(&name));
}
