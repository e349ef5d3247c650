//! Doctor's Docker checks: can dockerd find the plugin (its socket, a spec or json file
//! in a plugin directory, or an enabled managed plugin), and does dockerd keep stale
//! plugins whose socket is gone (each one costs every volume lookup about 15 s, as
//! dockerd retries it before giving up).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Check, Options};
use crate::config::Settings;

/// What connecting to a unix socket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listening {
    Yes,
    /// The file is there but nothing accepts (a daemon that died without cleaning up).
    Refused,
    Missing,
}

pub fn probe(socket: &Path) -> Listening {
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Listening::Yes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Listening::Missing,
        Err(_) => Listening::Refused,
    }
}

/// The plugin's discovery verdict. `files`: NAME.spec/NAME.json found in plugin dirs;
/// `managed`: an enabled managed plugin of that name exists.
pub fn discovery_verdict(
    name: &str,
    socket: &Path,
    listening: Listening,
    in_plugin_dir: bool,
    files: &[PathBuf],
    managed: bool,
) -> Check {
    let check = "docker: plugin discovery";
    let shown = socket.display();
    match listening {
        Listening::Refused => Check::fail(check, format!("{shown} exists but nothing listens on it: rbdvol serve is not running, and dockerd's volume calls to {name} fail"), "start rbdvol serve (e.g. systemctl start rbdvol); it replaces the stale socket"),
        Listening::Yes if in_plugin_dir || !files.is_empty() => Check::ok(check, format!("rbdvol serves {shown}; dockerd finds it as {name}")),
        Listening::Yes => Check::fail(check, format!("rbdvol serves {shown}, outside dockerd's plugin directories, and no {name}.spec or .json points at it"), format!("set socket to /run/docker/plugins/{name}.sock, or write /etc/docker/plugins/{name}.spec containing unix://{shown}")),
        Listening::Missing if !files.is_empty() => Check::ok(check, format!("dockerd finds {name} through {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "))),
        Listening::Missing if managed => Check::ok(check, format!("the managed plugin {name} is installed and enabled")),
        Listening::Missing => Check::fail(check, format!("dockerd cannot find {name}: no socket at {shown}, no {name}.spec or .json in the plugin directories, and no managed plugin"), "start rbdvol serve (it creates the socket), or install the managed plugin and `docker plugin enable` it"),
    }
}

/// Sockets (and specs naming a unix socket) of plugins that no longer answer.
pub fn stale_plugins(dirs: &[PathBuf], ours: &Path) -> Vec<PathBuf> {
    let mut stale = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p == ours {
                continue; // judged by the discovery check
            }
            let target = match p.extension().and_then(|e| e.to_str()) {
                Some("sock") => p.clone(),
                Some("spec") => match std::fs::read_to_string(&p) {
                    Ok(t) => match t.trim().strip_prefix("unix://") {
                        Some(s) => PathBuf::from(s),
                        None => continue,
                    },
                    Err(_) => continue,
                },
                _ => continue,
            };
            if probe(&target) != Listening::Yes {
                stale.push(p);
            }
        }
    }
    stale
}

pub fn stale_verdict(stale: &[PathBuf]) -> Check {
    let check = "docker: stale plugins";
    if stale.is_empty() {
        return Check::ok(
            check,
            "every plugin socket in the plugin directories answers",
        );
    }
    let list: Vec<String> = stale.iter().map(|p| p.display().to_string()).collect();
    Check::warn(
        check,
        format!("{} plugin(s) whose socket does not answer: {}; dockerd tries each on every volume lookup, about 15 s each", stale.len(), list.join(", ")),
        format!("remove them if those plugins are gone: rm {}", list.join(" ")),
    )
}

/// `docker plugin ls` lines "NAME\tENABLED" naming `name` (as `name` or `name:tag`).
pub fn managed_plugin(ls: &str, name: &str) -> Option<(String, bool)> {
    ls.lines().find_map(|l| {
        let (n, enabled) = l.split_once('\t')?;
        let base = n.rsplit('/').next()?.split(':').next()?;
        (base == name).then(|| (n.to_string(), enabled.trim() == "true"))
    })
}

async fn docker_plugin_ls() -> Option<Result<String, String>> {
    let present = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("docker").is_file()));
    if !present {
        return None;
    }
    let args = ["plugin", "ls", "--format", "{{.Name}}\t{{.Enabled}}"];
    Some(
        match crate::host::command::run("docker", args, Duration::from_secs(5)).await {
            Ok(out) if out.success() => Ok(out.stdout),
            Ok(out) => Err(out.stderr.trim().to_string()),
            Err(e) => Err(e.to_string()),
        },
    )
}

pub async fn checks(settings: &Settings, opts: &Options) -> Vec<Check> {
    let socket = &settings.socket;
    let name = socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rbdvol".into());
    let mut checks = Vec::new();
    let mut managed = false;
    if opts.docker_cli {
        match docker_plugin_ls().await {
            None => {}
            Some(Err(e)) => checks.push(Check::warn(
                "docker: managed plugin",
                format!("could not ask dockerd: {e}"),
                "is dockerd running? `systemctl status docker`",
            )),
            Some(Ok(ls)) => match managed_plugin(&ls, &name) {
                None => {}
                Some((full, true)) => {
                    managed = true;
                    checks.push(Check::ok(
                        "docker: managed plugin",
                        format!("{full} is enabled"),
                    ));
                }
                Some((full, false)) => checks.push(Check::fail(
                    "docker: managed plugin",
                    format!("{full} is installed but disabled"),
                    format!("docker plugin enable {full}"),
                )),
            },
        }
    }
    let files: Vec<PathBuf> = opts
        .plugin_dirs
        .iter()
        .flat_map(|d| ["spec", "json"].map(|ext| d.join(format!("{name}.{ext}"))))
        .filter(|p| p.exists())
        .collect();
    let in_plugin_dir = socket
        .parent()
        .is_some_and(|p| opts.plugin_dirs.iter().any(|d| d == p));
    checks.insert(
        0,
        discovery_verdict(&name, socket, probe(socket), in_plugin_dir, &files, managed),
    );
    checks.push(stale_verdict(&stale_plugins(&opts.plugin_dirs, socket)));
    checks
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    #[test]
    fn discovery_verdicts() {
        let s = Path::new("/run/docker/plugins/rbdvol.sock");
        let json = [PathBuf::from("/etc/docker/plugins/rbdvol.json")];
        assert_eq!(
            discovery_verdict("rbdvol", s, Listening::Yes, true, &[], false).status,
            Status::Ok
        );
        assert_eq!(
            discovery_verdict("rbdvol", s, Listening::Refused, true, &[], false).status,
            Status::Fail
        );
        assert_eq!(
            discovery_verdict("rbdvol", s, Listening::Missing, true, &json, false).status,
            Status::Ok
        );
        assert_eq!(
            discovery_verdict("rbdvol", s, Listening::Missing, true, &[], true).status,
            Status::Ok
        );
        assert_eq!(
            discovery_verdict("rbdvol", s, Listening::Missing, true, &[], false).status,
            Status::Fail
        );
        assert_eq!(
            discovery_verdict(
                "rbdvol",
                Path::new("/tmp/x.sock"),
                Listening::Yes,
                false,
                &[],
                false
            )
            .status,
            Status::Fail
        );
    }

    #[test]
    fn stale_sockets_and_specs_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.sock");
        let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let dead = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        std::fs::write(
            dir.path().join("gone.spec"),
            "unix:///nonexistent/gone.sock\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("tcp.spec"), "tcp://127.0.0.1:1\n").unwrap();
        let stale = stale_plugins(&[dir.path().to_path_buf()], Path::new("/x"));
        assert_eq!(stale, vec![dead, dir.path().join("gone.spec")]);
        assert!(stale_verdict(&stale).detail.contains("15 s"));
    }

    #[test]
    fn managed_plugins_by_name() {
        let ls = "other:latest\ttrue\nexample/rbdvol:1.0\tfalse\n";
        assert_eq!(
            managed_plugin(ls, "rbdvol"),
            Some(("example/rbdvol:1.0".into(), false))
        );
        assert_eq!(managed_plugin(ls, "nope"), None);
    }
}
