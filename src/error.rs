//! The one error type of rbdvol. Every layer returns [`Error`]; the API layer turns it
//! into Docker's `{"Err": "..."}` in exactly one place (`api::router::respond`).
//! Messages are written for the person at the `docker` prompt: what failed and what to do.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed (bad JSON, wrong types, empty body).
    #[error("bad request: {0}")]
    BadRequest(String),

    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("invalid option {key}={value:?}: {reason}")]
    InvalidOption {
        key: String,
        value: String,
        reason: String,
    },

    #[error("unknown option {key:?}; accepted options are: {accepted}")]
    UnknownOption { key: String, accepted: String },

    #[error("volume {0} does not exist")]
    NotFound(String),

    /// Create of an existing name with settings that do not match.
    #[error("volume {name} already exists with {existing}, which differs from the requested {requested}; choose another name, or remove the volume first")]
    Conflict {
        name: String,
        existing: String,
        requested: String,
    },

    /// The volume is mounted or locked somewhere; `holder` says where, in words.
    #[error("volume {name} is in use: {holder}")]
    InUse { name: String, holder: String },

    /// Another host holds the volume; the text names it and says what happens next.
    #[error("{0}")]
    HeldElsewhere(String),

    /// A librados/librbd call failed.
    #[error("ceph {op} failed: {detail}")]
    Ceph {
        op: String,
        errno: i32,
        detail: String,
    },

    /// The cluster cannot be reached (connect failed, monitors down, connection fenced).
    #[error("ceph cluster unreachable: {0}; check that the monitors in the ceph.conf are up and reachable from this host")]
    Unavailable(String),

    #[error("{op} did not finish within {}s; the cluster may be degraded (check `ceph -s`)", .after.as_secs())]
    Timeout { op: String, after: Duration },

    /// A feature that this host or build cannot offer.
    #[error("{0}")]
    NotSupported(String),

    #[error("configuration: {0}")]
    Config(String),

    /// An external command failed; `stderr` is what it said.
    #[error("{program} failed: {detail}")]
    Command { program: String, detail: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the cluster could not be asked at all, as opposed to answering "no".
    /// Get uses this to avoid telling Docker a volume is absent when it only cannot see.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Timeout { .. })
    }
}
