//! Filesystems on a mapped device: probing for existing data, formatting (only what is
//! provably blank), checking, mounting and unmounting, and reading the mount table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::command::{failure_text, run, run_ok};
use crate::error::{Error, Result};

const PROBE_DEADLINE: Duration = Duration::from_secs(30);
const MKFS_DEADLINE: Duration = Duration::from_secs(90);
const FSCK_DEADLINE: Duration = Duration::from_secs(90);
const MOUNT_DEADLINE: Duration = Duration::from_secs(60);

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No filesystem, no partition table, no other known signature.
    Blank,
    /// A filesystem (or LUKS, RAID member, swap...) of this TYPE.
    Signature(String),
    /// A partition table of this PTTYPE.
    PartitionTable(String),
    /// Several signatures at once (blkid exit 8): certainly not blank.
    Ambivalent,
}

impl Probe {
    pub fn describe(&self) -> String {
        match self {
            Probe::Blank => "nothing".into(),
            Probe::Signature(t) => format!("a {t} signature"),
            Probe::PartitionTable(t) => format!("a {t} partition table"),
            Probe::Ambivalent => "several conflicting signatures".into(),
        }
    }
}

/// What the first and last MiB of a device hold, read by rbdvol itself: the second,
/// independent signal that a device is blank. `blkid -p` exits 2 both when it finds
/// nothing and when it cannot read the device, so its "nothing" alone proves nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Zeros,
    /// Non-zero bytes: something was written, whatever the probe recognised.
    Data,
    /// A read failed (EIO from a failing disk, a fenced mapping): nothing is known.
    Unreadable(String),
}

/// How much of each end of a device [`sample`] reads: where signatures live.
const SAMPLE: u64 = 1 << 20;

/// Reads the first and last MiB of `device` (blocking; see [`sample`]).
pub fn sample_blocking(device: &Path) -> Content {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<bool> {
        let mut f = std::fs::File::open(device)?;
        let len = f.seek(SeekFrom::End(0))?;
        let mut buf = vec![0u8; SAMPLE.min(len) as usize];
        let mut zeros = true;
        for start in [0, len.saturating_sub(SAMPLE)] {
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut buf)?;
            zeros &= buf.iter().all(|b| *b == 0);
        }
        Ok(zeros)
    };
    match read() {
        Ok(true) => Content::Zeros,
        Ok(false) => Content::Data,
        Err(e) => Content::Unreadable(format!("reading {}: {e}", device.display())),
    }
}

/// [`sample_blocking`] off the runtime, under the probe deadline. A read stuck in the
/// kernel cannot be cancelled; the thread is left to it and the answer is "unreadable".
pub async fn sample(device: &Path) -> Content {
    let d = device.to_path_buf();
    let task = tokio::task::spawn_blocking(move || sample_blocking(&d));
    match tokio::time::timeout(PROBE_DEADLINE, task).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => Content::Unreadable(format!("reading {}: {e}", device.display())),
        Err(_) => Content::Unreadable(format!(
            "reading {} did not finish within {}s",
            device.display(),
            PROBE_DEADLINE.as_secs()
        )),
    }
}

/// Parses `blkid -p -o export` output and exit code into a [`Probe`].
pub fn parse_probe(
    code: Option<i32>,
    stdout: &str,
    stderr: &str,
) -> std::result::Result<Probe, String> {
    match code {
        // Exit 2 is "nothing found" - or a device blkid could not read, which it may
        // or may not say on stderr. Anything said there is not "nothing".
        Some(2) if !stderr.trim().is_empty() => {
            return Err(format!("blkid found nothing but said: {}", stderr.trim()))
        }
        Some(2) => return Ok(Probe::Blank),
        Some(8) => return Ok(Probe::Ambivalent),
        Some(0) => {}
        other => return Err(format!("blkid exited with {other:?}")),
    }
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).map(str::to_string))
    };
    if let Some(t) = field("TYPE=") {
        return Ok(Probe::Signature(t));
    }
    if let Some(t) = field("PTTYPE=") {
        return Ok(Probe::PartitionTable(t));
    }
    // blkid found something it cannot name: still not blank.
    Ok(Probe::Signature("unknown".into()))
}

/// Low-level probe (`-p`: bypass the cache, read the device) for filesystems and
/// partition tables alike.
pub async fn probe(device: &Path) -> Result<Probe> {
    let out = run(
        "blkid",
        [
            Path::new("-p"),
            Path::new("-o"),
            Path::new("export"),
            device,
        ],
        PROBE_DEADLINE,
    )
    .await?;
    parse_probe(out.code, &out.stdout, &out.stderr).map_err(|why| Error::Command {
        program: "blkid".into(),
        detail: format!(
            "{why}: {}",
            failure_text(&format!("blkid -p {}", device.display()), &out)
        ),
    })
}

/// The mkfs argv for `fstype`. `fresh`: the image was created by rbdvol and never
/// mapped before, so its journal area is known to be zeros and need not be written.
pub fn mkfs_argv(
    fstype: &str,
    user_options: &str,
    fresh: bool,
    device: &Path,
) -> (String, Vec<String>) {
    let mut args: Vec<String> = Vec::new();
    let mut user: Vec<String> = user_options.split_whitespace().map(String::from).collect();
    match fstype {
        "xfs" => {
            // -K: do not discard (slow on thin RBD images and pointless when fresh).
            args.extend(["-q", "-K"].map(String::from));
        }
        _ => {
            let mut ext = "nodiscard,lazy_itable_init=1".to_string();
            if fresh {
                ext.push_str(",lazy_journal_init=1");
            }
            // mke2fs keeps only the last -E: fold the user's into ours, after ours so
            // that theirs win where both set a key.
            while let Some(i) = user.iter().position(|a| a == "-E") {
                if i + 1 < user.len() {
                    ext = format!("{ext},{}", user[i + 1]);
                }
                user.drain(i..(i + 2).min(user.len()));
            }
            args.extend(["-q".into(), "-m0".into(), "-E".into(), ext]);
        }
    }
    args.extend(user);
    args.push(device.display().to_string());
    (format!("mkfs.{fstype}"), args)
}

pub async fn mkfs(fstype: &str, user_options: &str, fresh: bool, device: &Path) -> Result<()> {
    let (prog, args) = mkfs_argv(fstype, user_options, fresh, device);
    run_ok(&prog, &args, MKFS_DEADLINE).await.map(|_| ())
}

/// Preen-mode check for ext4 (replays the journal, fixes what is safe to fix, and
/// returns at once for a clean filesystem). Refuses to mount when it finds damage
/// that needs a person.
pub async fn preen(fstype: &str, device: &Path) -> Result<()> {
    if fstype != "ext4" {
        // xfs replays its log at mount time and has no preen mode.
        return Ok(());
    }
    let out = run("e2fsck", [Path::new("-p"), device], FSCK_DEADLINE).await?;
    match out.code {
        // 0 clean, 1 errors corrected, 2 corrected (reboot advised: not for us).
        Some(0..=2) => Ok(()),
        _ => Err(Error::Command {
            program: "e2fsck".into(),
            detail: format!(
                "{}; the filesystem needs a manual repair: map the image and run `e2fsck -f` on it",
                failure_text(&format!("e2fsck -p {}", device.display()), &out)
            ),
        }),
    }
}

/// Mount options for a volume: the user's, plus what rbdvol needs. Unless the volume
/// allows them, setuid programs and device files in it do nothing on the host: a root
/// container could otherwise leave a setuid-root shell for any local user.
pub fn mount_options(fstype: &str, user: &str, read_only: bool, allow_suid_dev: bool) -> String {
    let mut opts: Vec<String> = user
        .split(',')
        .filter(|o| !o.is_empty())
        .map(String::from)
        .collect();
    let mut add = |opt: &str| {
        if !opts.iter().any(|o| o == opt) {
            opts.push(opt.into());
        }
    };
    // Snapshots and clones of one image share an xfs UUID; let them mount side by side.
    if fstype == "xfs" {
        add("nouuid");
    }
    if !allow_suid_dev {
        add("nosuid");
        add("nodev");
    }
    add(if read_only { "ro" } else { "rw" });
    opts.join(",")
}

/// Creates the directory volumes are mounted under and closes it to other users (as
/// Docker's own volume directory is): a volume's files keep their owners and modes, so
/// an open path would let any local user reach into every mounted volume.
pub fn prepare_mount_root(root: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let shown = root.display();
    std::fs::create_dir_all(root)
        .map_err(|e| Error::io(format!("creating mount_root {shown}"), e))?;
    let meta =
        std::fs::metadata(root).map_err(|e| Error::io(format!("reading mount_root {shown}"), e))?;
    if meta.uid() != 0 {
        return Err(Error::Config(format!(
            "mount_root {shown} is owned by uid {}, not root, so its owner could swap volumes' mount points; `chown root {shown}` or choose another mount_root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            Error::io(
                format!("making mount_root {shown} private (mode 0700); `chmod 700 {shown}` or choose another mount_root"),
                e,
            )
        })?;
    }
    Ok(())
}

pub async fn mount(device: &Path, target: &Path, fstype: &str, options: &str) -> Result<()> {
    run_ok(
        "mount",
        [
            "-t".as_ref(),
            fstype.as_ref(),
            "-o".as_ref(),
            options.as_ref(),
            device.as_os_str(),
            target.as_os_str(),
        ],
        MOUNT_DEADLINE,
    )
    .await
    .map(|_| ())
}

/// Bind-mounts `source` on `target`, read-only when asked (util-linux applies the
/// read-only remount of the bind itself).
pub async fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    use std::ffi::OsStr;
    let mut args: Vec<&OsStr> = vec![OsStr::new("--bind")];
    if read_only {
        args.extend([OsStr::new("-o"), OsStr::new("ro")]);
    }
    args.extend([source.as_os_str(), target.as_os_str()]);
    run_ok("mount", args, MOUNT_DEADLINE).await.map(|_| ())
}

pub async fn umount(target: &Path) -> Result<()> {
    let out = run("umount", [target], MOUNT_DEADLINE).await?;
    if out.success() {
        return Ok(());
    }
    if out.stderr.contains("not mounted") {
        return Ok(());
    }
    if out.stderr.contains("busy") {
        return Err(Error::InUse {
            name: target.display().to_string(),
            holder: "processes on this host still use files in it (see `fuser -vm`)".into(),
        });
    }
    Err(Error::Command {
        program: "umount".into(),
        detail: failure_text(&format!("umount {}", target.display()), &out),
    })
}

/// One line of /proc/self/mountinfo that matters to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The filesystem's device, "major:minor" (field 3): the same in every namespace.
    pub dev: String,
    /// Peer group this mount shares propagation with (`shared:N`), if any.
    pub shared: Option<u64>,
    /// Peer group this mount receives propagation from (`master:N`), if any.
    pub master: Option<u64>,
}

/// Parses mountinfo: fields 3 (device) and 5 (mount point), the optional propagation
/// fields, and after the " - " separator the filesystem type and source. Octal escapes
/// (`\040` for space) are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let dev = fields.get(2)?;
            let target = fields.get(4)?;
            let tagged = |prefix: &str| {
                fields
                    .iter()
                    .skip(6)
                    .find_map(|f| f.strip_prefix(prefix)?.parse().ok())
            };
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                target: PathBuf::from(unescape(target)),
                fstype: fstype.to_string(),
                source: unescape(source),
                dev: dev.to_string(),
                shared: tagged("shared:"),
                master: tagged("master:"),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The entry mounted at `target`, if any (the last one wins when stacked).
pub fn mounted_at(target: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.target == target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_results_are_read_conservatively() {
        assert_eq!(parse_probe(Some(2), "", ""), Ok(Probe::Blank));
        assert_eq!(
            parse_probe(
                Some(0),
                "DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n",
                ""
            ),
            Ok(Probe::Signature("ext4".into()))
        );
        assert_eq!(
            parse_probe(Some(0), "DEVNAME=/dev/loop0\nPTUUID=x\nPTTYPE=gpt\n", ""),
            Ok(Probe::PartitionTable("gpt".into()))
        );
        assert_eq!(
            parse_probe(Some(0), "TYPE=crypto_LUKS\n", ""),
            Ok(Probe::Signature("crypto_LUKS".into()))
        );
        assert_eq!(
            parse_probe(Some(0), "DEVNAME=/dev/x\n", ""),
            Ok(Probe::Signature("unknown".into()))
        );
        assert_eq!(parse_probe(Some(8), "", ""), Ok(Probe::Ambivalent));
        assert!(
            parse_probe(Some(4), "", "").is_err(),
            "a usage error must never read as blank"
        );
        assert!(parse_probe(None, "", "").is_err());
        assert!(
            parse_probe(Some(2), "", "error: /dev/loop0: Input/output error").is_err(),
            "a probe that complains found nothing it can vouch for"
        );
    }

    #[test]
    fn sampling_tells_zeros_from_data_and_reports_read_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dev");
        std::fs::write(&f, vec![0u8; 3 << 20]).unwrap();
        assert_eq!(sample_blocking(&f), Content::Zeros);
        let mut bytes = vec![0u8; 3 << 20];
        bytes[(3 << 20) - 10] = 1; // only the tail (a backup GPT, an md superblock)
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(sample_blocking(&f), Content::Data);
        std::fs::write(&f, [0u8; 100]).unwrap(); // smaller than a sample
        assert_eq!(sample_blocking(&f), Content::Zeros);
        assert!(matches!(
            sample_blocking(&dir.path().join("missing")),
            Content::Unreadable(_)
        ));
    }

    #[test]
    fn mkfs_defaults_follow_the_volume() {
        let dev = Path::new("/dev/loop7");
        let (p, a) = mkfs_argv("ext4", "", true, dev);
        assert_eq!(p, "mkfs.ext4");
        assert_eq!(
            a,
            [
                "-q",
                "-m0",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                "/dev/loop7"
            ]
        );
        let (_, a) = mkfs_argv("ext4", "-L data", false, dev);
        assert_eq!(
            a,
            [
                "-q",
                "-m0",
                "-E",
                "nodiscard,lazy_itable_init=1",
                "-L",
                "data",
                "/dev/loop7"
            ]
        );
        let (_, a) = mkfs_argv("ext4", "-E stride=16 -L x -E discard", true, dev);
        assert_eq!(
            a,
            [
                "-q",
                "-m0",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1,stride=16,discard",
                "-L",
                "x",
                "/dev/loop7"
            ]
        );
        let (p, a) = mkfs_argv("xfs", "-m crc=1", true, dev);
        assert_eq!(p, "mkfs.xfs");
        assert_eq!(a, ["-q", "-K", "-m", "crc=1", "/dev/loop7"]);
    }

    #[test]
    fn mount_options_add_what_rbdvol_needs() {
        assert_eq!(mount_options("ext4", "", false, false), "nosuid,nodev,rw");
        assert_eq!(
            mount_options("ext4", "noatime,discard", true, false),
            "noatime,discard,nosuid,nodev,ro"
        );
        assert_eq!(
            mount_options("xfs", "noatime", false, false),
            "noatime,nouuid,nosuid,nodev,rw"
        );
        assert_eq!(
            mount_options("xfs", "nouuid,nodev", false, false),
            "nouuid,nodev,nosuid,rw"
        );
        // The operator's opt-out: neither is added (and the allow-list refuses suid/dev).
        assert_eq!(mount_options("ext4", "", false, true), "rw");
        assert_eq!(mount_options("xfs", "", true, true), "nouuid,ro");
    }

    #[test]
    fn the_mount_root_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rbdvol-root-{}", std::process::id()));
        let root = dir.join("mounts");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let owned_by_root = std::fs::metadata(&root).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        });
        let result = prepare_mount_root(&root);
        if owned_by_root.unwrap() {
            result.unwrap();
            let mode = std::fs::metadata(&root).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o700);
        } else {
            let err = result.unwrap_err().to_string();
            assert!(err.contains("not root") && err.contains("chown"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/loop3 rw\n\
                    37 35 0:44 / /var/lib/x rw shared:2 - fuse.rbdvol rbdvol:rbd/v rw,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, PathBuf::from("/mnt/a b"));
        assert_eq!(
            (m[0].fstype.as_str(), m[0].source.as_str()),
            ("ext4", "/dev/loop3")
        );
        assert_eq!(m[1].fstype, "fuse.rbdvol");
        assert_eq!(m[0].dev, "98:0");
        assert_eq!((m[0].shared, m[0].master), (None, Some(1)));
        assert_eq!((m[1].shared, m[1].master), (Some(2), None));
    }
}
