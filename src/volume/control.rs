//! The messages a command on any host sends to the daemon holding a volume, through
//! RADOS watch/notify on one object per volume in its pool (no port of its own): freeze
//! the filesystem for a snapshot, thaw it, grow it after a resize. Shared by the
//! controller (which asks) and the node (which watches and answers).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The object the holding daemon watches for `volume`.
pub fn object(volume: &str) -> String {
    format!("rbdvol.ctl.{volume}")
}

/// How long a requester waits for the holder's answer to a freeze or a thaw.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long a filesystem may stay frozen at most; the guard thaws by itself then.
pub const MAX_FREEZE: Duration = Duration::from_secs(30);
/// How long a requester waits for an online grow.
pub const GROW_WITHIN: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Freeze the filesystem until `Thaw { id }`, for at most `max_secs`.
    Freeze {
        volume: String,
        id: String,
        max_secs: u64,
    },
    Thaw {
        volume: String,
        id: String,
    },
    /// The image is now `size` bytes: grow the mounted filesystem to it.
    Grow {
        volume: String,
        size: u64,
    },
}

impl Request {
    pub fn volume(&self) -> &str {
        match self {
            Request::Freeze { volume, .. }
            | Request::Thaw { volume, .. }
            | Request::Grow { volume, .. } => volume,
        }
    }
}

/// A holder's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub host: String,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

impl Reply {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = Request::Freeze {
            volume: "pg".into(),
            id: "1".into(),
            max_secs: 30,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""op":"freeze""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(object("pg"), "rbdvol.ctl.pg");
    }
}
