//! `rbdvol show-config`: the configuration in effect as TOML that `rbdvol serve --config`
//! accepts unchanged, each value commented with the layer it came from (default, file,
//! environment or flag), so an operator can see why a setting has the value it has.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::config::{Settings, DEFAULT_CONFIG_FILE};
use crate::error::{Error, Result};

/// Where one setting's value came from. Later layers win, so the last one that names a
/// key is its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(&'static str),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "environment {v}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Which key (dotted path, e.g. `ceph.pools`) each layer named.
#[derive(Debug, Default)]
pub struct Layers {
    pub file: Option<(PathBuf, Vec<String>)>,
    pub env: Vec<(String, String)>,
    pub flags: Vec<(&'static str, &'static str)>,
}

impl Layers {
    /// Reads which keys the file (the named one, or the default one if it exists) and the
    /// `RBDVOL_*` environment set; `flags` are (key, flag) pairs from the command line.
    pub fn gather(file: Option<&Path>, flags: Vec<(&'static str, &'static str)>) -> Result<Layers> {
        let path = match file {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        let file = match path {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
                let table: toml::Table = text
                    .parse()
                    .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
                let mut keys = Vec::new();
                for (k, v) in &table {
                    match v {
                        toml::Value::Table(t) => {
                            keys.extend(t.keys().map(|k2| format!("{k}.{k2}")))
                        }
                        _ => keys.push(k.clone()),
                    }
                }
                Some((p, keys))
            }
        };
        Ok(Layers {
            file,
            env: env_keys(std::env::vars()),
            flags,
        })
    }

    pub fn source(&self, key: &str) -> Source {
        if let Some((_, flag)) = self.flags.iter().rev().find(|(k, _)| *k == key) {
            return Source::Flag(flag);
        }
        if let Some((_, var)) = self.env.iter().find(|(k, _)| k == key) {
            return Source::Env(var.clone());
        }
        match &self.file {
            Some((p, keys)) if keys.iter().any(|k| k == key) => Source::File(p.clone()),
            _ => Source::Default,
        }
    }
}

/// The keys `RBDVOL_*` variables name, spelled as `Settings::load` reads them:
/// `RBDVOL_HOST_ID` is `host_id`, `RBDVOL_CEPH__POOLS` is `ceph.pools`.
pub fn env_keys(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.filter_map(|(var, _)| {
        let rest = var.strip_prefix("RBDVOL_")?;
        if matches!(rest, "CRASH_AT" | "FAULTS") {
            return None; // test hooks, not settings
        }
        Some((rest.to_lowercase().replace("__", "."), var))
    })
    .collect()
}

/// A key whose value must never be printed. No setting holds a secret today (the keyring
/// and TLS key are paths; their contents are never read here), but a future one might.
fn is_secret(key: &str) -> bool {
    ["password", "secret", "token"]
        .iter()
        .any(|w| key.contains(w))
}

fn toml_value(v: &Json) -> Option<toml::Value> {
    Some(match v {
        Json::Null => return None,
        Json::Bool(b) => toml::Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Json::String(s) => toml::Value::String(s.clone()),
        Json::Array(a) => toml::Value::Array(a.iter().filter_map(toml_value).collect()),
        Json::Object(_) => return None,
    })
}

fn line(out: &mut String, key: &str, short: &str, value: &Json, layers: &Layers) {
    let source = layers.source(key);
    if is_secret(key) {
        out.push_str(&format!(
            "# {short} = (hidden: a secret)  # from: {source}\n"
        ));
        return;
    }
    match toml_value(value) {
        Some(v) => out.push_str(&format!("{short} = {v}  # from: {source}\n")),
        None => out.push_str(&format!("# {short} is not set  # from: {source}\n")),
    }
}

/// The settings as commented TOML.
pub fn render(settings: &Settings, layers: &Layers) -> Result<String> {
    let json = serde_json::to_value(settings)
        .map_err(|e| Error::Config(format!("rendering the settings: {e}")))?;
    let Json::Object(top) = json else {
        return Err(Error::Config("settings did not render as a table".into()));
    };
    let mut out = String::from(
        "# The rbdvol configuration in effect. `rbdvol serve --config FILE` accepts this\n\
         # file unchanged. Each value says where it came from: the default, the file, the\n\
         # environment (RBDVOL_*) or a command-line flag (later ones win).\n",
    );
    let (sections, plain): (BTreeMap<_, _>, BTreeMap<_, _>) =
        top.into_iter().partition(|(_, v)| v.is_object());
    for (k, v) in &plain {
        line(&mut out, k, k, v, layers);
    }
    for (section, v) in &sections {
        out.push_str(&format!("\n[{section}]\n"));
        if let Json::Object(fields) = v {
            for (k, v) in fields {
                line(&mut out, &format!("{section}.{k}"), k, v, layers);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Layers {
        Layers {
            file: Some((
                "/etc/x.toml".into(),
                vec!["ceph.pools".into(), "socket".into()],
            )),
            env: env_keys(
                [
                    ("RBDVOL_CEPH__POOLS".to_string(), "a,b".to_string()),
                    ("RBDVOL_FAULTS".to_string(), "x".to_string()),
                    ("PATH".to_string(), "/bin".to_string()),
                ]
                .into_iter(),
            ),
            flags: vec![("mount_root", "--mount-root")],
        }
    }

    #[test]
    fn the_last_layer_naming_a_key_is_its_source() {
        let l = layers();
        assert_eq!(
            l.env.len(),
            1,
            "test hooks and other variables are not settings"
        );
        assert_eq!(
            l.source("ceph.pools"),
            Source::Env("RBDVOL_CEPH__POOLS".into())
        );
        assert_eq!(l.source("socket"), Source::File("/etc/x.toml".into()));
        assert_eq!(l.source("mount_root"), Source::Flag("--mount-root"));
        assert_eq!(l.source("log.level"), Source::Default);
    }

    #[test]
    fn the_output_parses_back_to_the_same_settings() {
        let mut s = Settings::default();
        s.ceph.pools = vec!["fast".into(), "bulk".into()];
        s.ceph.keyring = Some("/etc/ceph/k".into());
        s.lock.takeover_wait = std::time::Duration::from_secs(42);
        let text = render(&s, &layers()).unwrap();
        assert!(
            text.contains("pools = [\"fast\", \"bulk\"]  # from: environment RBDVOL_CEPH__POOLS"),
            "{text}"
        );
        assert!(
            text.contains("# client_ca is not set  # from: default"),
            "{text}"
        );
        let parsed: Settings = toml::from_str(&text).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{s:?}"));
    }

    #[test]
    fn secrets_are_never_printed() {
        assert!(is_secret("ceph.secret"));
        assert!(!is_secret("ceph.keyring"));
        let mut out = String::new();
        line(
            &mut out,
            "x.secret",
            "secret",
            &Json::String("hunter2".into()),
            &layers(),
        );
        assert!(!out.contains("hunter2"), "{out}");
    }
}
