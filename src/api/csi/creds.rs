//! Cephx credentials from Swarm secrets (`docker volume create --secret userID=... --secret
//! userKey=...`, the keys ceph-csi uses). Controller requests that carry them run on a
//! cluster connection of that user; requests without them use the plugin's keyring.
//! Node requests map with the plugin's keyring (see README).

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use crate::ceph::ops::Remembering;
use crate::ceph::{connect_spec, Cluster};
use crate::config::CephSettings;
use crate::controller::Controller;
use crate::error::{Error, Result};

pub const USER_ID: &str = "userID";
pub const USER_KEY: &str = "userKey";

/// Either the daemon's own controller or one on a user's own connection.
pub enum Picked<'a> {
    Shared(&'a Controller),
    Own(Arc<Controller>),
}

impl Deref for Picked<'_> {
    type Target = Controller;
    fn deref(&self) -> &Controller {
        match self {
            Picked::Shared(c) => c,
            Picked::Own(c) => c,
        }
    }
}

/// One connection per (user, key) seen, kept for the daemon's life: Swarm sends the same
/// secrets with every request of a volume, and connecting costs a round trip to the mons.
pub struct Credentials {
    ceph: CephSettings,
    by_user: Mutex<HashMap<(String, String), Arc<Controller>>>,
}

/// The user and key in `secrets`, if any; both or neither.
pub fn parse(secrets: &HashMap<String, String>) -> Result<Option<(String, String)>> {
    if let Some(k) = secrets.keys().find(|k| *k != USER_ID && *k != USER_KEY) {
        return Err(Error::BadRequest(format!(
            "unknown secret {k:?}: rbdvol accepts the secrets {USER_ID} (a cephx user, without \"client.\") and {USER_KEY} (its key)"
        )));
    }
    match (secrets.get(USER_ID), secrets.get(USER_KEY)) {
        (None, None) => Ok(None),
        (Some(u), Some(k)) if !u.is_empty() && !k.is_empty() => {
            let user = u.strip_prefix("client.").unwrap_or(u);
            if !user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(Error::BadRequest(format!(
                    "secret {USER_ID} {u:?} is not a cephx user name"
                )));
            }
            Ok(Some((user.to_string(), k.clone())))
        }
        _ => Err(Error::BadRequest(format!(
            "the secrets {USER_ID} and {USER_KEY} go together; give both, or neither to use the plugin's keyring"
        ))),
    }
}

impl Credentials {
    pub fn new(ceph: CephSettings) -> Credentials {
        Credentials {
            ceph,
            by_user: Mutex::new(HashMap::new()),
        }
    }

    /// The controller to serve a request carrying `secrets`.
    pub fn pick<'a>(
        &self,
        shared: &'a Controller,
        secrets: &HashMap<String, String>,
    ) -> Result<Picked<'a>> {
        let Some((user, key)) = parse(secrets)? else {
            return Ok(Picked::Shared(shared));
        };
        let mut map = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        let own = map
            .entry((user.clone(), key.clone()))
            .or_insert_with(|| {
                let mut spec = connect_spec(&self.ceph);
                spec.entity = format!("client.{user}");
                // The key replaces the keyring: the plugin's keyring is not this user's.
                spec.keyring = None;
                spec.options.push(("key".into(), key));
                let cluster = Arc::new(Remembering::new(Arc::new(Cluster::new(spec))));
                Arc::new(shared.with_cluster(cluster))
            })
            .clone();
        Ok(Picked::Own(own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secrets_are_both_or_neither_and_nothing_else() {
        assert_eq!(parse(&s(&[])).unwrap(), None);
        assert_eq!(
            parse(&s(&[("userID", "client.vol"), ("userKey", "K")])).unwrap(),
            Some(("vol".into(), "K".into()))
        );
        for bad in [
            &[("userID", "vol")][..],
            &[("userKey", "K")],
            &[("userID", ""), ("userKey", "K")],
            &[("userID", "a b"), ("userKey", "K")],
            &[("adminKey", "K")],
        ] {
            assert!(parse(&s(bad)).is_err(), "{bad:?}");
        }
    }
}
