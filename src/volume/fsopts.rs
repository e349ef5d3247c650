//! Allow-lists for the mkfs and mount options a volume may carry. These strings become
//! arguments of root commands on every host that mounts the volume, and Mount reads them
//! back from image metadata that anyone with write access to the pool can change; so
//! they are checked at Create and again at every Mount. Only options that act inside
//! the volume are allowed: nothing names a host path or device, forces, lets a container
//! panic the host kernel, or silently weakens durability.

use std::collections::BTreeMap;

use super::options::FSTYPES;
use crate::error::{Error, Result};

/// What a flag, sub-option or mount option takes.
#[derive(Clone, Copy)]
enum Val {
    /// Nothing: a bare flag or word.
    Bare,
    /// A whole number in this range.
    Num(u64, u64),
    /// A size: digits with an optional k, m, g or t suffix (4096, 4k, 64m).
    Size,
    /// One of these words.
    Word(&'static [&'static str]),
    /// [A-Za-z0-9_.-], at most this many characters.
    Label(usize),
    /// Comma-separated `key[=value]` sub-options, the value's own word after the flag.
    Subs(&'static [Opt]),
    /// Comma-separated feature names, each optionally turned off with `^`.
    Features(&'static [&'static str]),
    /// `UID:GID`.
    Owner,
}

/// One allowed flag (`-L`), sub-option (`stride`) or mount option (`commit`).
struct Opt(&'static str, Val);

const fn bare(name: &'static str) -> Opt {
    Opt(name, Val::Bare)
}

/// A refused flag, sub-option key or whole option, with the reason given to the user.
struct Refused(&'static str, &'static str);

const BIT: Val = Val::Word(&["0", "1"]);
const BIG: u64 = u32::MAX as u64;
const FORCE: &str = "rbdvol never forces mkfs: it formats only images that are provably blank";
const HOST_PATH: &str = "it names a file or device on the host";
const PANIC: &str = "panic would let a container stop the host's kernel";
const DURABILITY: &str =
    "it weakens durability: writes the filesystem acknowledged can be lost on a crash";

#[rustfmt::skip]
const EXT4_FEATURES: &[&str] = &[
    "64bit", "bigalloc", "casefold", "dir_index", "dir_nlink", "ea_inode",
    "encrypt", "ext_attr", "extent", "extents", "extra_isize", "fast_commit",
    "filetype", "flex_bg", "has_journal", "huge_file", "inline_data", "large_dir",
    "large_file", "metadata_csum", "metadata_csum_seed", "mmp", "orphan_file", "project",
    "quota", "resize_inode", "sparse_super", "sparse_super2", "stable_inodes", "uninit_bg",
    "verity",
];

const EXT4_EXTENDED: &[Opt] = &[
    Opt("stride", Val::Num(1, BIG)),
    Opt("stripe_width", Val::Num(1, BIG)),
    Opt("stripe-width", Val::Num(1, BIG)),
    Opt("resize", Val::Num(1, u64::MAX)),
    Opt("lazy_itable_init", BIT),
    Opt("lazy_journal_init", BIT),
    Opt("packed_meta_blocks", BIT),
    Opt("num_backup_sb", Val::Word(&["0", "1", "2"])),
    bare("root_owner"),
    Opt("root_owner", Val::Owner),
    bare("discard"),
    bare("nodiscard"),
    Opt("encoding", Val::Word(&["utf8"])),
];

const EXT4_MKFS: &[Opt] = &[
    Opt("-L", Val::Label(16)),
    Opt("-b", Val::Word(&["1024", "2048", "4096"])),
    Opt("-i", Val::Num(1024, 1 << 26)),
    Opt("-I", Val::Word(&["128", "256", "512", "1024"])),
    Opt("-N", Val::Num(1, BIG)),
    Opt("-m", Val::Num(0, 50)),
    Opt("-G", Val::Num(1, 1 << 20)),
    Opt("-J", Val::Subs(&[Opt("size", Val::Num(1, 10240))])),
    Opt("-O", Val::Features(EXT4_FEATURES)),
    Opt("-E", Val::Subs(EXT4_EXTENDED)),
    Opt(
        "-T",
        Val::Word(&[
            "default",
            "floppy",
            "small",
            "big",
            "huge",
            "news",
            "largefile",
            "largefile4",
        ]),
    ),
    // No explicit UUID: a copy of a host filesystem's UUID would take over its
    // /dev/disk/by-uuid link while the volume is mapped.
    Opt("-U", Val::Word(&["clear", "random", "time"])),
    Opt("-e", Val::Word(&["continue", "remount-ro"])),
    bare("-j"),
    bare("-q"),
];

const EXT4_MKFS_REFUSED: &[Refused] = &[
    Refused("-F", FORCE),
    Refused("-f", FORCE),
    Refused("--force", FORCE),
    Refused("-d", "it copies files from the host into the volume"),
    Refused("-c", "it runs a bad-block scan over the whole image"),
    Refused("-l", "it reads a bad-block list from a file on the host"),
    Refused("-z", "it writes an undo file on the host"),
    Refused("-S", "it rewrites only the superblocks, over existing data"),
    Refused("-n", "it formats nothing"),
    Refused("-t", "the filesystem type is the fstype option"),
    Refused("offset", "it moves the filesystem inside the image"),
    Refused("test_fs", "it marks the filesystem for test kernels only"),
    Refused("device", HOST_PATH),
    Refused("location", "it places the journal by hand"),
    Refused("panic", PANIC),
];

const XFS_MKFS: &[Opt] = &[
    Opt("-L", Val::Label(12)),
    Opt("-b", Val::Subs(&[Opt("size", Val::Size)])),
    Opt(
        "-m",
        Val::Subs(&[
            Opt("crc", BIT),
            Opt("finobt", BIT),
            Opt("reflink", BIT),
            Opt("bigtime", BIT),
            Opt("rmapbt", BIT),
            Opt("inobtcount", BIT),
        ]),
    ),
    Opt(
        "-i",
        Val::Subs(&[
            Opt("size", Val::Size),
            Opt("maxpct", Val::Num(0, 100)),
            Opt("sparse", BIT),
            Opt("align", BIT),
        ]),
    ),
    Opt(
        "-d",
        Val::Subs(&[
            Opt("su", Val::Size),
            Opt("sw", Val::Num(1, BIG)),
            Opt("sunit", Val::Num(1, BIG)),
            Opt("swidth", Val::Num(1, BIG)),
            Opt("agcount", Val::Num(1, BIG)),
            Opt("agsize", Val::Size),
            Opt("size", Val::Size),
        ]),
    ),
    Opt(
        "-l",
        Val::Subs(&[
            Opt("size", Val::Size),
            Opt("su", Val::Size),
            Opt("sunit", Val::Num(1, BIG)),
            Opt("version", Val::Word(&["2"])),
            Opt("lazy-count", BIT),
        ]),
    ),
    Opt(
        "-n",
        Val::Subs(&[Opt("size", Val::Size), Opt("ftype", BIT)]),
    ),
    Opt("-s", Val::Subs(&[Opt("size", Val::Size)])),
    bare("-q"),
    bare("-K"),
];

const XFS_MKFS_REFUSED: &[Refused] = &[
    Refused("-f", FORCE),
    Refused("-F", FORCE),
    Refused("--force", FORCE),
    Refused("-r", "it puts a realtime section on a device of the host"),
    Refused("-p", "it copies files named by a protofile on the host"),
    Refused("-N", "it formats nothing"),
    Refused("file", HOST_PATH),
    Refused("name", HOST_PATH),
    Refused("logdev", HOST_PATH),
    Refused("rtdev", HOST_PATH),
    Refused("internal", "the log stays inside the volume"),
    Refused(
        "uuid",
        "an explicit UUID could copy a host filesystem's and take over its /dev/disk/by-uuid link",
    ),
];

/// Mount options both filesystems understand the same way.
#[rustfmt::skip]
const COMMON_MOUNT: &[Opt] = &[
    bare("noatime"), bare("relatime"), bare("strictatime"), bare("atime"), bare("nodiratime"),
    bare("diratime"), bare("lazytime"), bare("nolazytime"), bare("discard"), bare("nodiscard"),
    bare("sync"), bare("async"), bare("dirsync"), bare("noexec"), bare("exec"), bare("nosuid"),
    bare("nodev"), bare("quota"), bare("usrquota"), bare("grpquota"), bare("prjquota"),
    bare("noquota"),
];

const EXT4_MOUNT: &[Opt] = &[
    Opt("data", Val::Word(&["ordered", "writeback", "journal"])),
    Opt("commit", Val::Num(0, 300)),
    Opt("errors", Val::Word(&["continue", "remount-ro"])),
    bare("barrier"),
    Opt("barrier", Val::Word(&["1"])),
    bare("journal_checksum"),
    bare("auto_da_alloc"),
    bare("noauto_da_alloc"),
    bare("delalloc"),
    bare("nodelalloc"),
    bare("dioread_nolock"),
    bare("dioread_lock"),
    Opt("inode_readahead_blks", Val::Num(0, 1 << 30)),
    Opt("stripe", Val::Num(1, BIG)),
    Opt("max_batch_time", Val::Num(0, 1_000_000)),
    Opt("min_batch_time", Val::Num(0, 1_000_000)),
    Opt("init_itable", Val::Num(0, 1000)),
    bare("noinit_itable"),
    bare("user_xattr"),
    bare("acl"),
    bare("noacl"),
];

#[rustfmt::skip]
const XFS_MOUNT: &[Opt] = &[
    bare("nouuid"), Opt("logbufs", Val::Num(2, 8)), Opt("logbsize", Val::Size),
    Opt("allocsize", Val::Size), bare("inode64"), bare("inode32"), bare("largeio"),
    bare("nolargeio"), bare("swalloc"), Opt("sunit", Val::Num(1, BIG)),
    Opt("swidth", Val::Num(1, BIG)), bare("noalign"), bare("attr2"), bare("noattr2"),
    bare("grpid"), bare("nogrpid"), bare("filestreams"), bare("uquota"), bare("uqnoenforce"),
    bare("qnoenforce"), bare("gquota"), bare("gqnoenforce"), bare("pquota"),
    bare("pqnoenforce"), bare("wsync"), bare("ikeep"), bare("noikeep"),
];

const MOUNT_REFUSED: &[Refused] = &[
    Refused("ro", "use -o read-only=true instead of ro/rw"),
    Refused("rw", "use -o read-only=true instead of ro/rw"),
    Refused(
        "suid",
        "use -o allow-suid-dev=true to allow setuid programs and device files",
    ),
    Refused(
        "dev",
        "use -o allow-suid-dev=true to allow setuid programs and device files",
    ),
    Refused(
        "defaults",
        "it implies suid and dev; use -o allow-suid-dev=true for those",
    ),
    Refused("remount", "it is managed by rbdvol and cannot be set"),
    Refused("bind", "it is managed by rbdvol and cannot be set"),
    Refused("rbind", "it is managed by rbdvol and cannot be set"),
    Refused("move", "it is managed by rbdvol and cannot be set"),
    Refused("loop", "it is managed by rbdvol and cannot be set"),
    Refused("logdev", HOST_PATH),
    Refused("rtdev", HOST_PATH),
    Refused("journal_path", HOST_PATH),
    Refused("journal_dev", HOST_PATH),
    Refused("errors=panic", PANIC),
    Refused("nobarrier", DURABILITY),
    Refused("barrier=0", DURABILITY),
    Refused("norecovery", DURABILITY),
    Refused("noload", DURABILITY),
];

/// The checked, normalised mkfs options (flags and values joined by single spaces), or
/// why they are refused, naming what is allowed for `fstype`.
pub fn check_mkfs(fstype: &str, text: &str) -> std::result::Result<String, String> {
    let (table, refused) = match fstype {
        "ext4" => (EXT4_MKFS, EXT4_MKFS_REFUSED),
        "xfs" => (XFS_MKFS, XFS_MKFS_REFUSED),
        _ => {
            return Err(format!(
                "unknown fstype {fstype:?}; accepted: {}",
                FSTYPES.join(", ")
            ))
        }
    };
    if text.len() > 512 || text.chars().any(|c| c.is_control() || !c.is_ascii()) {
        return Err("use printable ASCII, at most 512 characters".into());
    }
    let allowed = || format!("allowed for {fstype}: {}", describe_flags(table));
    let mut words = text.split_whitespace();
    let mut out = Vec::new();
    while let Some(word) = words.next() {
        if let Some(why) = reason(refused, word) {
            return Err(format!("{word} is not allowed ({why}); {}", allowed()));
        }
        let Some(opt) = table.iter().find(|o| o.0 == word) else {
            return Err(unknown_flag(word, refused, table, &allowed()));
        };
        out.push(word);
        if matches!(opt.1, Val::Bare) {
            continue;
        }
        let shape = format!("{} {}", opt.0, describe(opt.1));
        let Some(value) = words.next() else {
            return Err(format!("{word} needs a value: {shape}"));
        };
        check_value(opt.1, value, refused)
            .map_err(|why| format!("{word} {value}: {why}; {shape}"))?;
        out.push(value);
    }
    Ok(out.join(" "))
}

/// Explains a word that is no allowed flag: a positional argument, flags run together
/// (`-qF`, `-Ldata`), or an unknown flag.
fn unknown_flag(word: &str, refused: &[Refused], table: &[Opt], allowed: &str) -> String {
    if !word.starts_with('-') {
        return format!("{word} is not a flag: rbdvol supplies the device, so only flags are allowed; {allowed}");
    }
    if !word.starts_with("--") && word.len() > 2 {
        let first = table.iter().find(|o| o.0 == &word[..2]);
        if let Some(opt) = first.filter(|o| !matches!(o.1, Val::Bare)) {
            return format!(
                "{word}: give the flag and its value as separate words ({} {}); {allowed}",
                opt.0,
                &word[2..]
            );
        }
        for c in word[1..].chars() {
            let flag = format!("-{c}");
            if let Some(why) = reason(refused, &flag) {
                return format!("{word} contains {flag}, which is not allowed ({why}); {allowed}");
            }
        }
        return format!("{word}: give each flag as a separate word; {allowed}");
    }
    format!("{word} is not allowed; {allowed}")
}

/// The checked, normalised mount options (comma-joined), or why they are refused, naming
/// what is allowed for `fstype`.
pub fn check_mount(fstype: &str, text: &str) -> std::result::Result<String, String> {
    let own = match fstype {
        "ext4" => EXT4_MOUNT,
        "xfs" => XFS_MOUNT,
        _ => {
            return Err(format!(
                "unknown fstype {fstype:?}; accepted: {}",
                FSTYPES.join(", ")
            ))
        }
    };
    let allowed = || {
        format!(
            "allowed for {fstype}: {}, {}",
            describe_list(COMMON_MOUNT),
            describe_list(own)
        )
    };
    let mut out = Vec::new();
    for opt in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !opt
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=.:/-+".contains(c))
        {
            return Err(format!(
                "mount option {opt:?} has characters outside [A-Za-z0-9_=.:/+-]"
            ));
        }
        if let Some(why) = reason(MOUNT_REFUSED, opt) {
            return Err(format!("{opt} is not allowed ({why}); {}", allowed()));
        }
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let found = COMMON_MOUNT
            .iter()
            .chain(own)
            .find(|o| o.0 == key && matches!(o.1, Val::Bare) == value.is_none());
        let Some(found) = found else {
            return Err(format!("{opt} is not allowed; {}", allowed()));
        };
        if let Some(v) = value {
            check_value(found.1, v, &[])
                .map_err(|why| format!("{opt}: {why}; use {key}={}", describe(found.1)))?;
        }
        out.push(opt);
    }
    let joined = out.join(",");
    if joined.len() > 512 {
        return Err("at most 512 characters".into());
    }
    Ok(joined)
}

/// The reason `word` (a whole option, or its key before `=`) is refused, if it is.
fn reason(refused: &[Refused], word: &str) -> Option<&'static str> {
    let key = word.split_once('=').map_or(word, |(k, _)| k);
    refused
        .iter()
        .find(|r| r.0 == word)
        .or_else(|| refused.iter().find(|r| r.0 == key))
        .map(|r| r.1)
}

fn check_value(val: Val, text: &str, refused: &[Refused]) -> std::result::Result<(), String> {
    let digits = |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
    match val {
        Val::Bare => Err("takes no value".into()),
        Val::Num(lo, hi) => match text.parse::<u64>() {
            Ok(n) if digits(text) && (lo..=hi).contains(&n) => Ok(()),
            _ => Err(format!("not a whole number from {lo} to {hi}")),
        },
        Val::Size => {
            let num = text.strip_suffix(['k', 'm', 'g', 't', 'K', 'M', 'G', 'T']);
            if digits(num.unwrap_or(text)) {
                Ok(())
            } else {
                Err("not a size like 4096, 4k or 64m".into())
            }
        }
        Val::Word(words) => match words.contains(&text) {
            true => Ok(()),
            false => Err(reason(refused, text).map_or_else(
                || "not an allowed value".into(),
                |why| format!("not allowed ({why})"),
            )),
        },
        Val::Label(max) => {
            let ok = (1..=max).contains(&text.len())
                && !text.starts_with('-')
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            match ok {
                true => Ok(()),
                false => Err(format!(
                    "a label has 1 to {max} of [A-Za-z0-9_.-] and does not start with -"
                )),
            }
        }
        Val::Features(names) => {
            for f in text.split(',') {
                if !names.contains(&f.strip_prefix('^').unwrap_or(f)) {
                    return Err(format!("unknown feature {f:?}"));
                }
            }
            Ok(())
        }
        Val::Owner => match text.split_once(':') {
            Some((u, g)) if digits(u) && digits(g) => Ok(()),
            _ => Err("not UID:GID in numbers".into()),
        },
        Val::Subs(subs) => {
            for sub in text.split(',') {
                let (key, value) = match sub.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (sub, None),
                };
                if let Some(why) = reason(refused, key) {
                    return Err(format!("{key} is not allowed ({why})"));
                }
                let found = subs
                    .iter()
                    .find(|o| o.0 == key && matches!(o.1, Val::Bare) == value.is_none());
                let Some(found) = found else {
                    return Err(format!("{sub:?} is not allowed"));
                };
                if let Some(v) = value {
                    check_value(found.1, v, refused).map_err(|why| format!("{sub}: {why}"))?;
                }
            }
            Ok(())
        }
    }
}

fn describe(val: Val) -> String {
    match val {
        Val::Bare => String::new(),
        Val::Num(lo, hi) if hi >= 1 << 20 && lo <= 1 => "N".into(),
        Val::Num(lo, hi) => format!("{lo}..{hi}"),
        Val::Size => "SIZE".into(),
        Val::Word(words) => words.join("|"),
        Val::Label(max) => format!("LABEL(max {max})"),
        Val::Features(_) => "FEATURE,^FEATURE,...".into(),
        Val::Owner => "UID:GID".into(),
        Val::Subs(subs) => format!("{{{}}}", describe_list(subs)),
    }
}

/// `key`, `key=VALUE`, ... for sub-options and mount options.
fn describe_list(opts: &[Opt]) -> String {
    let one = |o: &Opt| match o.1 {
        Val::Bare => o.0.to_string(),
        v => format!("{}={}", o.0, describe(v)),
    };
    opts.iter().map(one).collect::<Vec<_>>().join(", ")
}

/// `-L LABEL, -b 1024|2048|4096, -q` for mkfs flags.
fn describe_flags(opts: &[Opt]) -> String {
    let one = |o: &Opt| match o.1 {
        Val::Bare => o.0.to_string(),
        v => format!("{} {}", o.0, describe(v)),
    };
    opts.iter().map(one).collect::<Vec<_>>().join(", ")
}

/// The filesystem settings of a volume as read back from its image metadata and
/// checked again, because anyone who can write the pool can change that metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFs {
    /// The declared fstype: what a blank volume is formatted with.
    pub fstype: String,
    pub mkfs_options: String,
    pub mount_options: String,
    pub read_only: bool,
    pub allow_suid_dev: bool,
}

/// Checks the `rbdvol.*` metadata (keys without the prefix) that reaches mkfs and mount.
/// Missing keys take the defaults of an image rbdvol did not create (ext4, no options,
/// writable, nosuid/nodev); a value rbdvol itself would not have written is refused.
pub fn check_stored(meta: &BTreeMap<String, String>) -> Result<StoredFs> {
    let get = |k: &str| meta.get(k).map(String::as_str).unwrap_or("");
    let tampered = |key: &str, why: String| {
        Error::InvalidOption {
        key: format!("rbdvol.{key}"),
        value: get(key).to_string(),
        reason: format!(
            "this image metadata was changed outside rbdvol and is refused: {why}; correct it with `rbd image-meta set POOL/IMAGE rbdvol.{key} VALUE` or remove it with `rbd image-meta remove`"
        ),
    }
    };
    let fstype = match get("fstype") {
        "" => "ext4",
        t => t,
    };
    if !FSTYPES.contains(&fstype) {
        return Err(tampered(
            "fstype",
            format!("accepted: {}", FSTYPES.join(", ")),
        ));
    }
    let mkfs_options =
        check_mkfs(fstype, get("mkfs-options")).map_err(|why| tampered("mkfs-options", why))?;
    let mount_options =
        check_mount(fstype, get("mount-options")).map_err(|why| tampered("mount-options", why))?;
    let flag = |key: &str| match get(key) {
        "" | "false" => Ok(false),
        "true" => Ok(true),
        _ => Err(tampered(key, "use true or false".into())),
    };
    Ok(StoredFs {
        fstype: fstype.to_string(),
        mkfs_options,
        mount_options,
        read_only: flag("read-only")?,
        allow_suid_dev: flag("allow-suid-dev")?,
    })
}

#[cfg(test)]
mod tests;
