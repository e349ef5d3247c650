//! `rbdvol doctor`: answers "will volumes work on this host, and if not, why?". Each
//! check is a small function returning a [`Check`] (OK, WARN or FAIL, with the fix in
//! one line); the decisions are pure functions over what was read, unit-tested without
//! root. Groups: [`cluster`] (reachability, keyring, caps, pools, ownership), [`host`]
//! (mapper, kernel, tools, mount root) and [`docker`] (plugin discovery, stale plugins).

pub mod cluster;
pub mod docker;
pub mod host;

use std::path::PathBuf;

use serde::Serialize;

use crate::config::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's verdict. `fix` is empty when there is nothing to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: String,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: String::new(),
        }
    }
    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check::with(Status::Warn, name, detail, fix)
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check::with(Status::Fail, name, detail, fix)
    }

    fn with(
        status: Status,
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

/// Where doctor looks besides the settings (overridable so tests need no real Docker).
#[derive(Debug, Clone)]
pub struct Options {
    /// Directories dockerd discovers plugins in.
    pub plugin_dirs: Vec<PathBuf>,
    /// Ask `docker plugin ls` about a managed plugin (skipped if docker is absent).
    pub docker_cli: bool,
}

pub const DOCKER_PLUGIN_DIRS: &[&str] = &[
    "/run/docker/plugins",
    "/etc/docker/plugins",
    "/usr/lib/docker/plugins",
];

impl Default for Options {
    fn default() -> Self {
        Options {
            plugin_dirs: DOCKER_PLUGIN_DIRS.iter().map(PathBuf::from).collect(),
            docker_cli: true,
        }
    }
}

/// Runs every check, in the order an operator would fix things.
pub async fn run(settings: &Settings, opts: &Options) -> Vec<Check> {
    let mut checks = cluster::checks(settings).await;
    checks.extend(host::checks(settings));
    checks.extend(docker::checks(settings, opts).await);
    checks
}

/// The human report: one line per check, the fix indented under it.
pub fn render_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Ok => "OK  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{tag}  {}: {}\n", c.name, c.detail));
        if !c.fix.is_empty() {
            out.push_str(&format!("      fix: {}\n", c.fix));
        }
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    out.push_str(&format!(
        "\n{} OK, {} WARN, {} FAIL\n",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    ));
    out
}

/// The same for scripts: `{"ok": bool, "checks": [{name, status, detail, fix}]}`.
pub fn render_json(checks: &[Check]) -> String {
    serde_json::json!({ "ok": !failed(checks), "checks": checks }).to_string()
}

pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_fail_fails_the_run_and_the_json_says_so() {
        let checks = vec![Check::ok("a", "fine"), Check::warn("b", "meh", "do x")];
        assert!(!failed(&checks));
        let mut bad = checks.clone();
        bad.push(Check::fail("c", "broken", "do y"));
        assert!(failed(&bad));
        let v: serde_json::Value = serde_json::from_str(&render_json(&bad)).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["checks"][2]["status"], "FAIL");
        assert_eq!(v["checks"][2]["fix"], "do y");
        let text = render_text(&bad);
        assert!(text.contains("FAIL  c: broken\n      fix: do y"), "{text}");
    }
}
