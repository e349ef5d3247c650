//! A volume as rbdvol records it in the cluster, and the rules for what a volume may
//! be: names, create options, and the mkfs/mount options that reach root commands.
//! Shared by the controller (which writes the record at Create) and the node (which
//! reads it at every Mount), so that every `rbdvol.*` key is spelled once, here: the
//! promise never to format twice rests on `formatted` and `first-mapped` meaning the
//! same thing to every host and every version.

pub mod control;
pub mod fsopts;
pub mod names;
pub mod options;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Image-meta keys rbdvol owns all start with this.
pub const META_PREFIX: &str = "rbdvol.";

/// Every `rbdvol.*` key, without the prefix.
pub mod key {
    pub const FSTYPE: &str = "fstype";
    pub const MKFS_OPTIONS: &str = "mkfs-options";
    pub const MOUNT_OPTIONS: &str = "mount-options";
    pub const READ_ONLY: &str = "read-only";
    pub const ALLOW_SUID_DEV: &str = "allow-suid-dev";
    pub const FEATURES: &str = "features";
    pub const SIZE: &str = "size";
    pub const DATA_POOL: &str = "data-pool";
    pub const OBJECT_SIZE: &str = "object-size";
    pub const CREATED_BY: &str = "created-by";
    /// Written last at Create: a volume with it was created completely by rbdvol.
    pub const CREATED_AT: &str = "created-at";
    /// Set after every mkfs, and on every writable mount of a filesystem found on a
    /// volume: from then on a volume without a filesystem is refused, never formatted.
    pub const FORMATTED: &str = "formatted";
    /// Set on the first mount: only before it is an rbdvol-created image known to be zeros.
    pub const FIRST_MAPPED: &str = "first-mapped";
    /// `pool/volume@snapshot` a volume was cloned from (its lineage).
    pub const ORIGIN: &str = "origin";
    /// Set by a resize: the filesystem is grown to the device at the next Mount (or by
    /// the holder at once), then the key is removed.
    pub const GROW_FS: &str = "grow-fs";
    /// The owner record the holder of the exclusive lock writes.
    pub const OWNER_HOST: &str = "owner.host";
    pub const OWNER_ADDR: &str = "owner.addr";
    pub const OWNER_CLIENT: &str = "owner.client";
    pub const OWNER_SINCE: &str = "owner.since";
    pub const OWNER: [&str; 4] = [OWNER_HOST, OWNER_ADDR, OWNER_CLIENT, OWNER_SINCE];
}

/// The full image-meta key for one of [`key`]'s.
pub fn full_key(k: &str) -> String {
    format!("{META_PREFIX}{k}")
}

/// One RBD image feature.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub bit: u64,
    pub name: &'static str,
    /// Users may choose it at Create (the others librbd sets itself).
    pub user: bool,
}

/// Every RBD feature bit by name: the one table.
pub const FEATURES: &[Feature] = &[
    Feature {
        bit: 1,
        name: "layering",
        user: true,
    },
    Feature {
        bit: 2,
        name: "striping",
        user: false,
    },
    Feature {
        bit: 4,
        name: "exclusive-lock",
        user: true,
    },
    Feature {
        bit: 8,
        name: "object-map",
        user: true,
    },
    Feature {
        bit: 16,
        name: "fast-diff",
        user: true,
    },
    Feature {
        bit: 32,
        name: "deep-flatten",
        user: true,
    },
    Feature {
        bit: 64,
        name: "journaling",
        user: true,
    },
    Feature {
        bit: 128,
        name: "data-pool",
        user: false,
    },
    Feature {
        bit: 256,
        name: "operations",
        user: false,
    },
    Feature {
        bit: 512,
        name: "migrating",
        user: false,
    },
    Feature {
        bit: 1024,
        name: "non-primary",
        user: false,
    },
];

/// The bits users choose.
pub const USER_FEATURE_MASK: u64 = 1 | 4 | 8 | 16 | 32 | 64;

/// "layering,exclusive-lock" for the named bits of `bits`.
pub fn feature_names(bits: u64) -> String {
    FEATURES
        .iter()
        .filter(|f| bits & f.bit != 0)
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(",")
}

/// What rbdvol recorded about a volume, read from its metadata (keys without prefix).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeRecord {
    pub fstype: Option<String>,
    pub mkfs_options: String,
    pub mount_options: String,
    pub read_only: bool,
    pub allow_suid_dev: bool,
    pub data_pool: Option<String>,
    pub created_by: Option<String>,
    pub created_at: Option<String>,
    pub formatted: Option<String>,
    pub first_mapped: Option<String>,
    pub origin: Option<String>,
    pub grow_fs: Option<String>,
    pub owner_host: Option<String>,
    pub owner_addr: Option<String>,
    pub owner_since: Option<String>,
}

impl VolumeRecord {
    pub fn from_meta(meta: &BTreeMap<String, String>) -> VolumeRecord {
        let get = |k: &str| meta.get(k).cloned();
        let text = |k: &str| get(k).unwrap_or_default();
        VolumeRecord {
            fstype: get(key::FSTYPE).filter(|s| !s.is_empty()),
            mkfs_options: text(key::MKFS_OPTIONS),
            mount_options: text(key::MOUNT_OPTIONS),
            read_only: text(key::READ_ONLY) == "true",
            allow_suid_dev: text(key::ALLOW_SUID_DEV) == "true",
            data_pool: get(key::DATA_POOL).filter(|s| !s.is_empty()),
            created_by: get(key::CREATED_BY),
            created_at: get(key::CREATED_AT),
            formatted: get(key::FORMATTED),
            first_mapped: get(key::FIRST_MAPPED),
            origin: get(key::ORIGIN),
            grow_fs: get(key::GROW_FS),
            owner_host: get(key::OWNER_HOST),
            owner_addr: get(key::OWNER_ADDR),
            owner_since: get(key::OWNER_SINCE),
        }
    }

    /// Created completely by rbdvol and never mapped since: known to hold only zeros.
    pub fn is_fresh(&self) -> bool {
        self.created_at.is_some() && self.first_mapped.is_none()
    }
}

/// Per-volume async locks: one volume's Create, Remove, Mount and Unmount on this host
/// never interleave, while different volumes proceed in parallel.
#[derive(Default)]
pub struct NameLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl NameLocks {
    pub fn get(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_bits_have_one_name_each() {
        assert_eq!(feature_names(1 | 4), "layering,exclusive-lock");
        assert_eq!(
            feature_names(8 | 16 | 32 | 128),
            "object-map,fast-diff,deep-flatten,data-pool"
        );
        let user: u64 = FEATURES.iter().filter(|f| f.user).map(|f| f.bit).sum();
        assert_eq!(user, USER_FEATURE_MASK);
    }

    #[test]
    fn the_record_reads_what_create_and_mount_wrote() {
        let meta: BTreeMap<String, String> = [
            (key::FSTYPE, "xfs"),
            (key::READ_ONLY, "true"),
            (key::CREATED_AT, "2026-12-01T00:00:00Z"),
            (key::OWNER_HOST, "host-a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = VolumeRecord::from_meta(&meta);
        assert_eq!(r.fstype.as_deref(), Some("xfs"));
        assert!(r.read_only && !r.allow_suid_dev);
        assert!(r.is_fresh(), "created by rbdvol, never mapped");
        assert_eq!(r.owner_host.as_deref(), Some("host-a"));
        let mut mapped = meta.clone();
        mapped.insert(key::FIRST_MAPPED.into(), "t".into());
        assert!(!VolumeRecord::from_meta(&mapped).is_fresh());
        assert!(!VolumeRecord::default().is_fresh(), "not created by rbdvol");
        assert_eq!(full_key(key::FORMATTED), "rbdvol.formatted");
    }
}
