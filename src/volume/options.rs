//! `docker volume create -o key=value` options: parsing, validation, defaults, and their
//! form in image metadata. Options arrive only at Create, so everything Mount will need
//! later is stored on the image (`rbdvol.<key>`), readable by every host.

use std::collections::BTreeMap;

use crate::ceph::images::ImageFacts;
use crate::ceph::sys::CreateSpec;
use crate::config::VolumeDefaults;
use crate::error::{Error, Result};
use crate::units::{format_size, parse_size};
use crate::volume::fsopts;
use crate::volume::{feature_names, FEATURES, USER_FEATURE_MASK};

pub const ACCEPTED: &[&str] = &[
    "size",
    "pool",
    "data-pool",
    "fstype",
    "mkfs-options",
    "mount-options",
    "features",
    "object-size",
    "read-only",
    "allow-suid-dev",
];

pub const FSTYPES: &[&str] = &["ext4", "xfs"];

const EXCLUSIVE_LOCK: u64 = 4;
const OBJECT_MAP: u64 = 8;
const FAST_DIFF: u64 = 16;
const JOURNALING: u64 = 64;

const MIN_SIZE: u64 = 16 << 20;
/// mkfs.xfs (xfsprogs >= 5.19) refuses filesystems under 300 MiB.
const MIN_XFS_SIZE: u64 = 300 << 20;
const MAX_SIZE: u64 = 1 << 50;

/// The effective settings of a volume: what the user asked for, filled with defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    pub size: u64,
    pub pool: String,
    pub data_pool: Option<String>,
    pub fstype: String,
    pub mkfs_options: String,
    pub mount_options: String,
    pub features: u64,
    pub object_size: Option<u64>,
    pub read_only: bool,
    /// Mount without nosuid,nodev: setuid programs and device files in the volume work
    /// on the host too, for every local user who can reach the mount point.
    pub allow_suid_dev: bool,
    /// The keys the user gave explicitly (only these are compared on a repeated Create).
    pub explicit: Vec<&'static str>,
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The names of the features users choose among `bits`.
pub fn features_to_names(bits: u64) -> String {
    feature_names(bits & USER_FEATURE_MASK)
}

fn parse_features(key: &str, text: &str) -> Result<u64> {
    let mut bits = 0;
    for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let user = FEATURES.iter().filter(|f| f.user);
        let Some(b) = user.clone().find(|f| f.name == name).map(|f| f.bit) else {
            let known: Vec<&str> = user.map(|f| f.name).collect();
            return Err(invalid(
                key,
                text,
                format!("unknown feature {name:?}; known: {}", known.join(", ")),
            ));
        };
        bits |= b;
    }
    let need = |cond: bool, why: &str| {
        if cond {
            Err(invalid(key, text, why))
        } else {
            Ok(())
        }
    };
    need(
        bits & EXCLUSIVE_LOCK == 0,
        "exclusive-lock is required: it is how rbdvol keeps a volume on one host at a time",
    )?;
    need(
        bits & FAST_DIFF != 0 && bits & OBJECT_MAP == 0,
        "fast-diff needs object-map",
    )?;
    need(
        bits & (OBJECT_MAP | JOURNALING) != 0 && bits & EXCLUSIVE_LOCK == 0,
        "object-map and journaling need exclusive-lock",
    )?;
    Ok(bits)
}

fn parse_bool(key: &str, text: &str) -> Result<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        // `-o read-only` with no value arrives as "".
        "" | "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(invalid(key, text, "use true or false")),
    }
}

impl VolumeOptions {
    /// Validates `opts` against the accepted keys, fills defaults, and checks that the
    /// combination makes sense. Nothing is touched on the cluster.
    pub fn parse(
        opts: &BTreeMap<String, String>,
        defaults: &VolumeDefaults,
        pools: &[String],
    ) -> Result<VolumeOptions> {
        let mut explicit = Vec::new();
        for key in opts.keys() {
            match ACCEPTED.iter().find(|k| **k == key.as_str()) {
                Some(k) => explicit.push(*k),
                None => {
                    return Err(Error::UnknownOption {
                        key: key.clone(),
                        accepted: ACCEPTED.join(", "),
                    })
                }
            }
        }
        let get = |k: &str| opts.get(k).map(String::as_str);

        let size_text = get("size").unwrap_or(&defaults.size);
        let size = parse_size(size_text).map_err(|r| invalid("size", size_text, r))?;
        // Loop devices and filesystems want whole 4 KiB blocks.
        let size = size.div_ceil(4096) * 4096;

        let fstype = get("fstype").unwrap_or(&defaults.fstype).to_string();
        if !FSTYPES.contains(&fstype.as_str()) {
            return Err(invalid(
                "fstype",
                &fstype,
                format!("accepted: {}", FSTYPES.join(", ")),
            ));
        }
        let min = if fstype == "xfs" {
            MIN_XFS_SIZE
        } else {
            MIN_SIZE
        };
        if size < min {
            return Err(invalid(
                "size",
                size_text,
                format!("the smallest {fstype} volume is {}", format_size(min)),
            ));
        }
        if size > MAX_SIZE {
            return Err(invalid(
                "size",
                size_text,
                format!("the largest volume is {}", format_size(MAX_SIZE)),
            ));
        }

        let pool = get("pool").unwrap_or(&pools[0]).to_string();
        if !pools.contains(&pool) {
            return Err(invalid(
                "pool",
                &pool,
                format!(
                    "this plugin serves the pools {}; add the pool to ceph.pools in the config to use it",
                    pools.join(", ")
                ),
            ));
        }
        let data_pool = match get("data-pool") {
            None | Some("") => None,
            Some(dp) => {
                crate::volume::names::validate_pool(dp).map_err(|r| invalid("data-pool", dp, r))?;
                Some(dp.to_string())
            }
        };

        let features_text = get("features").unwrap_or(&defaults.features);
        let features = parse_features("features", features_text)?;

        let object_size = match get("object-size") {
            None => None,
            Some(t) => {
                let v = parse_size(t).map_err(|r| invalid("object-size", t, r))?;
                if !v.is_power_of_two() || !(4096..=(32 << 20)).contains(&v) {
                    return Err(invalid(
                        "object-size",
                        t,
                        "use a power of two from 4K to 32M, e.g. 4M",
                    ));
                }
                Some(v)
            }
        };

        // Checked against the fstype: the allow-lists differ.
        let mkfs_text = get("mkfs-options").unwrap_or(&defaults.mkfs_options);
        let mkfs_options = fsopts::check_mkfs(&fstype, mkfs_text)
            .map_err(|r| invalid("mkfs-options", mkfs_text, r))?;
        let mount_text = get("mount-options").unwrap_or(&defaults.mount_options);
        let mount_options = fsopts::check_mount(&fstype, mount_text)
            .map_err(|r| invalid("mount-options", mount_text, r))?;
        let flag = |key: &str| get(key).map_or(Ok(false), |t| parse_bool(key, t));
        let read_only = flag("read-only")?;
        let allow_suid_dev = flag("allow-suid-dev")?;

        Ok(VolumeOptions {
            size,
            pool,
            data_pool,
            fstype,
            mkfs_options,
            mount_options,
            features,
            object_size,
            read_only,
            allow_suid_dev,
            explicit,
        })
    }

    pub fn create_spec(&self) -> CreateSpec {
        CreateSpec {
            size: self.size,
            features: self.features,
            order: self.object_size.map(|s| s.trailing_zeros() as u8),
            data_pool: self.data_pool.clone(),
        }
    }

    /// The metadata written at Create (keys without the `rbdvol.` prefix).
    pub fn to_meta(&self, host_id: &str, created_at: &str) -> Vec<(String, String)> {
        let mut m = vec![
            ("fstype".to_string(), self.fstype.clone()),
            ("mkfs-options".to_string(), self.mkfs_options.clone()),
            ("mount-options".to_string(), self.mount_options.clone()),
            ("read-only".to_string(), self.read_only.to_string()),
            (
                "allow-suid-dev".to_string(),
                self.allow_suid_dev.to_string(),
            ),
            ("features".to_string(), features_to_names(self.features)),
            ("size".to_string(), self.size.to_string()),
            ("created-by".to_string(), host_id.to_string()),
            // Written last: a volume with created-at was created completely by rbdvol.
            ("created-at".to_string(), created_at.to_string()),
        ];
        if let Some(dp) = &self.data_pool {
            m.insert(0, ("data-pool".to_string(), dp.clone()));
        }
        if let Some(os) = self.object_size {
            m.insert(0, ("object-size".to_string(), os.to_string()));
        }
        m
    }

    /// The explicitly requested settings that an existing volume does not match, as
    /// `(key, existing, requested)`.
    pub fn mismatches(&self, facts: &ImageFacts) -> Vec<(String, String, String)> {
        let meta = |k: &str| facts.meta.get(k).cloned().unwrap_or_default();
        let mut out = Vec::new();
        let mut cmp = |key: &str, existing: String, requested: String| {
            if existing != requested {
                out.push((key.to_string(), existing, requested));
            }
        };
        for key in &self.explicit {
            match *key {
                "size" => cmp(key, format_size(facts.stat.size), format_size(self.size)),
                "pool" => cmp(key, facts.pool.clone(), self.pool.clone()),
                "fstype" => cmp(key, meta("fstype"), self.fstype.clone()),
                "features" => cmp(
                    key,
                    features_to_names(facts.stat.features & USER_FEATURE_MASK),
                    features_to_names(self.features),
                ),
                "object-size" => cmp(
                    key,
                    format_size(facts.stat.object_size),
                    self.object_size.map(format_size).unwrap_or_default(),
                ),
                "data-pool" => cmp(
                    key,
                    meta("data-pool"),
                    self.data_pool.clone().unwrap_or_default(),
                ),
                "mkfs-options" => cmp(key, meta("mkfs-options"), self.mkfs_options.clone()),
                "mount-options" => cmp(key, meta("mount-options"), self.mount_options.clone()),
                "read-only" => cmp(key, meta("read-only"), self.read_only.to_string()),
                // Volumes from before the option have no key: they are mounted without.
                "allow-suid-dev" => cmp(
                    key,
                    Some(meta(key))
                        .filter(|v| !v.is_empty())
                        .unwrap_or("false".into()),
                    self.allow_suid_dev.to_string(),
                ),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<VolumeOptions> {
        VolumeOptions::parse(
            &opts(pairs),
            &VolumeDefaults::default(),
            &["rbd".to_string(), "fast".to_string()],
        )
    }

    #[test]
    fn defaults_fill_what_the_user_left_out() {
        let v = parse(&[]).unwrap();
        assert_eq!(v.size, 10 << 30);
        assert_eq!(v.pool, "rbd");
        assert_eq!(v.fstype, "ext4");
        assert_eq!(features_to_names(v.features), "layering,exclusive-lock");
        assert!(!v.read_only && !v.allow_suid_dev);
        assert!(v.explicit.is_empty());
    }

    #[test]
    fn every_accepted_option_is_understood() {
        let v = parse(&[
            ("size", "1G"),
            ("pool", "fast"),
            ("data-pool", "ec-data"),
            ("fstype", "xfs"),
            ("mkfs-options", "-m crc=1"),
            ("mount-options", "noatime,nouuid"),
            ("features", "layering,exclusive-lock,object-map,fast-diff"),
            ("object-size", "8M"),
            ("read-only", ""),
            ("allow-suid-dev", "true"),
        ])
        .unwrap();
        assert_eq!(v.size, 1 << 30);
        assert_eq!(v.pool, "fast");
        assert_eq!(v.data_pool.as_deref(), Some("ec-data"));
        assert_eq!(v.create_spec().order, Some(23));
        assert!(v.read_only && v.allow_suid_dev);
        assert_eq!(v.explicit.len(), 10);
    }

    #[test]
    fn bad_options_name_what_is_accepted() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("color", "red")], "accepted options are: size, pool"),
            (&[("size", "ten")], "whole number"),
            (&[("size", "10X")], "K, M, G, T or P"),
            (&[("size", "0")], "smallest"),
            (&[("size", "-1")], "whole number"),
            (&[("size", "1e30")], "unknown unit"),
            (&[("size", "100M"), ("fstype", "xfs")], "smallest xfs"),
            (&[("size", "2P")], "largest"),
            (&[("fstype", "btrfs")], "accepted: ext4, xfs"),
            (&[("pool", "other")], "serves the pools rbd, fast"),
            (&[("features", "layering")], "exclusive-lock is required"),
            (
                &[("features", "exclusive-lock,fast-diff")],
                "fast-diff needs object-map",
            ),
            (&[("features", "exclusive-lock,warp")], "unknown feature"),
            (&[("object-size", "3M")], "power of two"),
            (&[("read-only", "maybe")], "true or false"),
            (&[("mkfs-options", "-F")], "never forces"),
            (&[("mkfs-options", "-qF")], "never forces"),
            (&[("mkfs-options", "-d /etc")], "copies files from the host"),
            (
                &[("fstype", "xfs"), ("mkfs-options", "-l logdev=/dev/sda")],
                "-l {size=SIZE",
            ),
            // An ext4 flag on an xfs volume: checked against the volume's fstype.
            (
                &[("fstype", "xfs"), ("mkfs-options", "-j")],
                "allowed for xfs",
            ),
            (&[("mount-options", "errors=panic")], "kernel"),
            (&[("mount-options", "suid")], "allow-suid-dev=true"),
            (&[("allow-suid-dev", "perhaps")], "true or false"),
            (&[("mount-options", "ro")], "read-only=true"),
            (&[("mount-options", "a;b")], "characters outside"),
            (&[("data-pool", "../x")], "pool name"),
        ];
        for (pairs, expect) in cases {
            let err = parse(pairs).unwrap_err().to_string();
            assert!(err.contains(expect), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn what_create_stores_passes_the_mount_time_check() {
        let v = parse(&[
            ("fstype", "xfs"),
            ("mkfs-options", " -m  crc=1 "),
            ("mount-options", "noatime"),
            ("allow-suid-dev", ""),
        ])
        .unwrap();
        let meta: BTreeMap<String, String> = v.to_meta("h", "t").into_iter().collect();
        let stored = fsopts::check_stored(&meta).unwrap();
        assert_eq!(stored.fstype, "xfs");
        assert_eq!(stored.mkfs_options, "-m crc=1");
        assert_eq!(stored.mount_options, "noatime");
        assert!(stored.allow_suid_dev && !stored.read_only);
    }

    #[test]
    fn sizes_round_up_to_whole_blocks() {
        assert_eq!(parse(&[("size", "20000001")]).unwrap().size, 20_000_768);
    }
}
