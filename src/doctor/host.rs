//! Doctor's checks of this host: the mapper `auto` picks, the kernel's RBD features and
//! messenger against the cluster, the devices and tools each mapper and filesystem
//! needs, and the mount root.

use std::path::Path;

use super::cluster::conf_value;
use super::Check;
use crate::config::Settings;
use crate::host::mapper::{self, MapperKind};
use crate::volume::{feature_names, FEATURES};

fn mapper_in_use(settings: &Settings) -> (MapperKind, String) {
    match settings.map.mapper.as_str() {
        "krbd" => (MapperKind::Krbd, "configured (map.mapper)".into()),
        "nbd" => (MapperKind::Nbd, "configured (map.mapper)".into()),
        "userspace" => (MapperKind::Userspace, "configured (map.mapper)".into()),
        _ => mapper::detect(),
    }
}

/// The bits of a features list like "layering,exclusive-lock" (unknown names ignored:
/// the config check refuses them elsewhere).
pub fn feature_bits(list: &str) -> u64 {
    list.split(',')
        .filter_map(|n| FEATURES.iter().find(|f| f.name == n.trim()))
        .fold(0, |acc, f| acc | f.bit)
}

/// Default features against the kernel's (`/sys/bus/rbd/supported_features`, hex).
pub fn features_verdict(defaults: &str, supported_hex: Option<&str>) -> Check {
    let name = "host: kernel RBD features";
    let Some(hex) = supported_hex else {
        return Check::warn(
            name,
            "the kernel does not list its RBD features (/sys/bus/rbd/supported_features)",
            "modprobe rbd, or use map.mapper = \"nbd\" or \"userspace\"",
        );
    };
    let supported = u64::from_str_radix(hex.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    let missing = feature_bits(defaults) & !supported;
    if missing == 0 {
        Check::ok(
            name,
            format!("the kernel maps the default features ({defaults})"),
        )
    } else {
        Check::fail(
            name,
            format!(
                "the kernel cannot map {} (in volume.features)",
                feature_names(missing)
            ),
            format!(
                "remove {} from volume.features, or use map.mapper = \"nbd\" or \"userspace\"",
                feature_names(missing)
            ),
        )
    }
}

pub use crate::host::mapper::msgr::kernel_version;

/// The messenger the monitors speak (from `mon_host`) against the kernel client's:
/// v2-only monitors need `ms_mode` (kernel 5.11 and later), which krbd maps with.
pub fn ms_mode_verdict(mon_host: &str, kernel: Option<(u32, u32)>, krbd: bool) -> Check {
    let name = "host: messenger (ms_mode)";
    let has_v1 = mon_host.contains("v1:")
        || mon_host
            .split([',', ' ', ';'])
            .any(|a| !a.is_empty() && !a.contains("v2:") && !a.contains(":3300"));
    if has_v1 {
        return Check::ok(
            name,
            "the monitors offer the v1 messenger the kernel client uses by default",
        );
    }
    if !krbd {
        return Check::ok(
            name,
            format!("the monitors speak only msgr2 ({mon_host}); fine for librbd-based mappers"),
        );
    }
    match kernel {
        Some(k) if k >= (5, 11) => Check::ok(name, format!("the monitors speak only msgr2 ({mon_host}); this kernel's client can, and krbd maps with ms_mode (map.ms_mode)")),
        _ => Check::fail(name, format!("the monitors speak only msgr2 ({mon_host}) and this kernel is older than 5.11, whose client cannot"), "give the monitors v1 addresses, upgrade the kernel, or use map.mapper = \"nbd\" or \"userspace\""),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// The mkfs and fsck programs rbdvol runs for `fstype`.
pub fn fs_tools(fstype: &str) -> &'static [&'static str] {
    match fstype {
        "ext4" => &["mkfs.ext4", "e2fsck"],
        // XFS replays its log at mount; rbdvol runs no fsck for it.
        "xfs" => &["mkfs.xfs"],
        _ => &[],
    }
}

fn tool_checks(settings: &Settings) -> Vec<Check> {
    crate::volume::options::FSTYPES
        .iter()
        .map(|fs| {
            let missing: Vec<&str> = fs_tools(fs)
                .iter()
                .copied()
                .filter(|t| !on_path(t))
                .collect();
            let name = format!("host: {fs} tools");
            match (missing.is_empty(), *fs == settings.volume.fstype) {
                (true, _) => Check::ok(name, fs_tools(fs).join(", ")),
                (false, default) => {
                    let detail = format!(
                        "{} not found on PATH{}",
                        missing.join(", "),
                        if default { " (the default fstype)" } else { "" }
                    );
                    let fix = format!(
                        "install {}",
                        if *fs == "xfs" {
                            "xfsprogs"
                        } else {
                            "e2fsprogs"
                        }
                    );
                    if default {
                        Check::fail(name, detail, fix)
                    } else {
                        Check::warn(name, detail, fix)
                    }
                }
            }
        })
        .collect()
}

/// A device the userspace mapper needs: missing is a FAIL when that mapper is used.
fn device_check(path: &str, what: &str, needed: bool, fix: &str) -> Check {
    let name = format!("host: {path}");
    if Path::new(path).exists() {
        Check::ok(name, what.to_string())
    } else if needed {
        Check::fail(
            name,
            format!("{path} is missing; the userspace mapper needs it for {what}"),
            fix,
        )
    } else {
        Check::warn(
            name,
            format!("{path} is missing ({what}; only the userspace mapper needs it)"),
            fix,
        )
    }
}

/// What the mount root's metadata and its mount's propagation say. `meta` is from
/// `symlink_metadata`; `shared`: the mount holding it propagates (shared:N).
pub fn mount_root_verdict(
    root: &Path,
    meta: std::io::Result<(bool, u32, u32)>,
    shared: Option<bool>,
) -> Vec<Check> {
    let shown = root.display();
    let name = "mount root";
    let (is_link, uid, mode) = match meta {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![Check::ok(
                name,
                format!("{shown} does not exist yet; rbdvol serve creates it (root, mode 0700)"),
            )]
        }
        Err(e) => {
            return vec![Check::fail(
                name,
                format!("cannot read {shown}: {e}"),
                "choose another mount_root",
            )]
        }
        Ok(m) => m,
    };
    let mut checks = vec![if is_link {
        Check::fail(name, format!("{shown} is a symlink: whoever can change it can redirect volumes' mounts, and mounts show under the real path"), "set mount_root to the real path (`readlink -f`)")
    } else if uid != 0 {
        Check::fail(
            name,
            format!("{shown} is owned by uid {uid}, not root"),
            format!("chown root {shown}"),
        )
    } else if mode & 0o002 != 0 {
        Check::fail(name, format!("{shown} is world-writable (mode {:o}): any local user can swap volumes' mount points", mode & 0o7777), format!("chmod 700 {shown}"))
    } else if mode & 0o077 != 0 {
        Check::warn(
            name,
            format!(
                "{shown} has mode {:o}; rbdvol serve makes it 0700",
                mode & 0o7777
            ),
            format!("chmod 700 {shown}"),
        )
    } else {
        Check::ok(name, format!("{shown}: root, mode 0700"))
    }];
    checks.push(match shared {
        Some(true) => Check::ok("mount root: propagation", "its mount is shared: containers see volumes mounted under it"),
        Some(false) => Check::warn("mount root: propagation", format!("the mount holding {shown} is private: mounts rbdvol makes there are not propagated to other mount namespaces (a managed plugin needs it rshared)"), format!("mount --make-rshared on the mount holding {shown} (or run rbdvol in the host's mount namespace)")),
        None => Check::warn("mount root: propagation", "cannot tell which mount holds it", "check /proc/self/mountinfo"),
    });
    checks
}

fn mount_root_checks(settings: &Settings) -> Vec<Check> {
    use std::os::unix::fs::MetadataExt;
    let root = &settings.mount_root;
    let meta =
        std::fs::symlink_metadata(root).map(|m| (m.file_type().is_symlink(), m.uid(), m.mode()));
    // The longest mount point that is a prefix of the (nearest existing) mount root.
    let shared = crate::host::fs::mounts().ok().and_then(|ms| {
        ms.into_iter()
            .filter(|m| root.starts_with(&m.target))
            .max_by_key(|m| m.target.as_os_str().len())
            .map(|m| m.shared.is_some())
    });
    mount_root_verdict(root, meta, shared)
}

pub fn checks(settings: &Settings) -> Vec<Check> {
    let (kind, why) = mapper_in_use(settings);
    let mut checks = vec![Check::ok("host: mapper", format!("{}: {why}", kind.name()))];
    let krbd = kind == MapperKind::Krbd;
    if krbd {
        let supported = std::fs::read_to_string("/sys/bus/rbd/supported_features").ok();
        checks.push(features_verdict(
            &settings.volume.features,
            supported.as_deref(),
        ));
    }
    let conf = std::fs::read_to_string(&settings.ceph.conf).unwrap_or_default();
    if let Some(mons) = conf_value(&conf, "mon_host") {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        checks.push(ms_mode_verdict(&mons, kernel_version(&release), krbd));
    }
    let userspace = kind == MapperKind::Userspace;
    checks.push(device_check(
        "/dev/loop-control",
        "loop devices",
        userspace,
        "modprobe loop",
    ));
    checks.push(device_check(
        "/dev/fuse",
        "the FUSE exporter",
        userspace,
        "modprobe fuse",
    ));
    checks.extend(tool_checks(settings));
    checks.extend(mount_root_checks(settings));
    checks
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    #[test]
    fn kernel_features() {
        assert_eq!(
            features_verdict("layering,exclusive-lock", Some("0x3d")).status,
            Status::Ok
        );
        let c = features_verdict("layering,exclusive-lock,journaling", Some("3d\n"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("journaling"), "{c:?}");
        assert_eq!(features_verdict("layering", None).status, Status::Warn);
    }

    #[test]
    fn messenger_modes() {
        assert_eq!(kernel_version("6.1.0-13-amd64"), Some((6, 1)));
        let v2 = "v2:10.0.0.1:3300";
        assert_eq!(
            ms_mode_verdict("[v2:10.0.0.1:3300,v1:10.0.0.1:6789]", Some((4, 19)), true).status,
            Status::Ok
        );
        assert_eq!(
            ms_mode_verdict("10.0.0.1:6789", Some((4, 19)), true).status,
            Status::Ok
        );
        assert_eq!(
            ms_mode_verdict(v2, Some((4, 19)), true).status,
            Status::Fail
        );
        assert_eq!(ms_mode_verdict(v2, Some((6, 1)), true).status, Status::Ok);
        assert_eq!(ms_mode_verdict(v2, Some((4, 19)), false).status, Status::Ok);
    }

    #[test]
    fn mount_root_verdicts() {
        let r = Path::new("/m");
        let s = |c: &[Check]| c.iter().map(|c| c.status).collect::<Vec<_>>();
        assert_eq!(
            s(&mount_root_verdict(r, Ok((false, 0, 0o40700)), Some(true))),
            [Status::Ok, Status::Ok]
        );
        assert_eq!(
            s(&mount_root_verdict(r, Ok((true, 0, 0o120777)), Some(true)))[0],
            Status::Fail
        );
        let c = mount_root_verdict(r, Ok((false, 0, 0o40777)), Some(true));
        assert!(c[0].detail.contains("world-writable"), "{c:?}");
        assert_eq!(
            s(&mount_root_verdict(r, Ok((false, 1000, 0o40700)), None))[0],
            Status::Fail
        );
        assert_eq!(
            s(&mount_root_verdict(r, Ok((false, 0, 0o40755)), Some(false))),
            [Status::Warn, Status::Warn]
        );
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(s(&mount_root_verdict(r, Err(gone), None)), [Status::Ok]);
    }
}
