//! Legacy plugin discovery through a `.spec` file: a private Docker node's dockerd
//! reads the address from its /etc/docker/plugins/NAME.spec (here a unix socket
//! outside /run/docker/plugins) and drives the plugin there. (The `.sock` way is
//! covered by tests/docker_*.rs, the `.json` + mutual TLS way by tests/tls.rs.)

mod common;

use common::nodes::{nodes_missing, say, DockerNode};
use common::*;

const DRIVER: &str = "rbdvol-e2e-spec";

#[test]
fn dockerd_finds_the_plugin_through_a_spec_file() {
    if let Some(why) = nodes_missing() {
        say(&format!("SKIPPED .spec discovery: {why}"));
        return;
    }
    let node = DockerNode::start("spec");
    let docker = |args: &[&str]| {
        let o = node.docker_within(args, 120);
        (o.ok, o.stdout + &o.stderr)
    };
    let socket_dir = node.work().join("spec");
    std::fs::create_dir_all(&socket_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = socket_dir.join("rbdvol.sock");
    let mut opts = DaemonOpts::host("host-spec").in_netns(&node.netns);
    opts.socket = Some(socket.clone());
    let d = Daemon::start(opts);

    let spec = node.spec_dir().join(format!("{DRIVER}.spec"));
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
    assert!(
        ok,
        "docker volume create through the .spec failed: {out}\n{}",
        d.log()
    );
    let (iok, inspect) = docker(&[
        "volume",
        "inspect",
        "--format",
        "{{.Driver}} {{.Status.fstype}}",
        &name,
    ]);
    let (rok, removed) = docker(&["volume", "rm", &name]);
    assert!(
        iok && inspect.contains(&format!("{DRIVER} xfs")),
        "{inspect}"
    );
    assert!(rok, "{removed}");
    assert!(trashed_names("rbd").contains(&name));
}
