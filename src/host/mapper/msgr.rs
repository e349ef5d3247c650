//! Which messenger mode (`-o ms_mode=`) the kernel RBD client maps with. krbd speaks
//! the v1 messenger ("legacy") unless told otherwise, so against monitors that listen
//! on msgr2 only its map fails with `failed to get mon address (possible ms_mode
//! mismatch)` (measured on a 6.1 guest against the test cluster). msgr2 in the kernel
//! needs Linux 5.11. rbd-nbd and rbdvol's exporter are librbd clients, which pick the
//! messenger from the cluster's configuration themselves.

use crate::error::{Error, Result};

/// What the cluster says about its messengers: the monitors' addresses (from the
/// monmap) and the client-side settings that decide whether encryption is required.
/// The same facts as `crate::ceph::ops::Messenger`, restated so that the host layer
/// does not depend on the ceph layer (the node layer hands them over).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Messenger {
    /// Some monitor listens on a v1 (legacy) address.
    pub mon_v1: bool,
    /// Some monitor listens on a v2 address.
    pub mon_v2: bool,
    /// `ms_client_mode`, e.g. "crc secure" (this client's preference, in order).
    pub client_mode: String,
    /// `ms_mon_client_mode`, `ms_service_mode` and `ms_mon_service_mode`: a list without
    /// "crc" means the cluster accepts only encrypted connections.
    pub other_modes: Vec<String>,
}

/// The `ms_mode` values the kernel accepts; "auto" decides from [`Messenger`].
pub const SETTINGS: [&str; 6] = [
    "auto",
    "legacy",
    "crc",
    "secure",
    "prefer-crc",
    "prefer-secure",
];

fn lacks_crc(modes: &str) -> bool {
    !modes.trim().is_empty() && !modes.split([' ', ',']).any(|m| m == "crc")
}

/// The kernel's `ms_mode` for `setting` ("auto" or an explicit mode) and why, or None
/// when the kernel's default (legacy, v1) is right.
pub fn choose(setting: &str, m: &Messenger) -> (Option<String>, String) {
    if setting != "auto" {
        let mode = (setting != "legacy").then(|| setting.to_string());
        return (mode, format!("map.ms_mode = \"{setting}\" in the config"));
    }
    let required_secure =
        lacks_crc(&m.client_mode) || m.other_modes.iter().any(|modes| lacks_crc(modes));
    if required_secure {
        return (
            Some("secure".into()),
            "the cluster's ms_*_mode settings allow only encrypted (secure) connections".into(),
        );
    }
    if m.mon_v1 || !m.mon_v2 {
        return (
            None,
            "the monitors offer the v1 messenger, which every kernel speaks".into(),
        );
    }
    let mode = if m.client_mode.trim_start().starts_with("secure") {
        "prefer-secure"
    } else {
        "prefer-crc"
    };
    (
        Some(mode.into()),
        format!(
            "the monitors listen on msgr2 only; ms_client_mode is {:?}",
            m.client_mode
        ),
    )
}

/// (major, minor) of a kernel release like "6.1.0-13-amd64".
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Refuses, before anything runs, a mode this kernel's client cannot speak (msgr2
/// arrived in Linux 5.11), naming what to do instead.
pub fn check_kernel(mode: Option<&str>, why: &str, release: &str) -> Result<()> {
    let Some(mode) = mode else { return Ok(()) };
    match kernel_version(release) {
        Some(v) if v >= (5, 11) => Ok(()),
        _ => Err(Error::NotSupported(format!(
            "the kernel RBD client must map with ms_mode={mode} ({why}), but this kernel ({release}) is older than 5.11 and speaks only the v1 messenger. Fix: upgrade the kernel to 5.11 or later, give the monitors v1 addresses too (and allow unencrypted connections), or set map.mapper = \"nbd\" or \"userspace\" in the rbdvol config"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(v1: bool, v2: bool, client: &str, others: &[&str]) -> Messenger {
        Messenger {
            mon_v1: v1,
            mon_v2: v2,
            client_mode: client.into(),
            other_modes: others.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn msgr2_only_monitors_get_a_msgr2_mode() {
        // The defaults: clients prefer crc, mons prefer secure, both accept either.
        let defaults = ["secure crc", "crc secure", "secure crc"];
        let (mode, why) = choose("auto", &cluster(false, true, "crc secure", &defaults));
        assert_eq!(mode.as_deref(), Some("prefer-crc"));
        assert!(why.contains("msgr2 only"), "{why}");
        let (mode, _) = choose("auto", &cluster(false, true, "secure crc", &defaults));
        assert_eq!(mode.as_deref(), Some("prefer-secure"));
    }

    #[test]
    fn v1_monitors_keep_the_kernel_default_unless_encryption_is_required() {
        let (mode, why) = choose("auto", &cluster(true, true, "crc secure", &[]));
        assert_eq!(mode, None);
        assert!(why.contains("v1"), "{why}");
        let (mode, why) = choose("auto", &cluster(true, true, "crc secure", &["secure"]));
        assert_eq!(mode.as_deref(), Some("secure"));
        assert!(why.contains("encrypted"), "{why}");
        let (mode, _) = choose("auto", &cluster(false, true, "secure", &[]));
        assert_eq!(mode.as_deref(), Some("secure"));
    }

    #[test]
    fn the_config_overrides_the_choice() {
        let c = cluster(false, true, "crc secure", &[]);
        assert_eq!(choose("secure", &c).0.as_deref(), Some("secure"));
        assert_eq!(choose("legacy", &c).0, None);
        assert!(choose("crc", &c).1.contains("map.ms_mode"));
    }

    #[test]
    fn an_old_kernel_is_refused_with_the_reason_and_the_fix() {
        assert!(check_kernel(None, "", "4.19.0-21-amd64").is_ok());
        assert!(check_kernel(Some("prefer-crc"), "", "6.1.0-13-amd64").is_ok());
        assert!(check_kernel(Some("secure"), "", "5.11.0").is_ok());
        let err = check_kernel(Some("prefer-crc"), "msgr2 only", "5.10.0-28-amd64")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("older than 5.11")
                && err.contains("ms_mode=prefer-crc")
                && err.contains("5.10.0-28-amd64")
                && err.contains("map.mapper = \"nbd\""),
            "{err}"
        );
    }
}
