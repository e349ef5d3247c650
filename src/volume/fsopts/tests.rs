//! The allow-lists decide what reaches root commands: every accepted string, every refused
//! one and its reason, and the re-check of tampered image metadata.

use super::*;

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn what_users_need_is_accepted_and_normalised() {
    let mkfs: &[(&str, &str, &str)] = &[
        ("ext4", "", ""),
        ("ext4", "  -L   data ", "-L data"),
        ("ext4", "-b 4096 -i 16384 -I 256 -N 100000 -m 5 -G 16", "-b 4096 -i 16384 -I 256 -N 100000 -m 5 -G 16"),
        ("ext4", "-J size=64 -j -q", "-J size=64 -j -q"),
        ("ext4", "-O ^has_journal,metadata_csum,64bit", "-O ^has_journal,metadata_csum,64bit"),
        (
            "ext4",
            "-E stride=16,stripe_width=64,lazy_itable_init=0,num_backup_sb=2,root_owner=1000:1000,nodiscard",
            "-E stride=16,stripe_width=64,lazy_itable_init=0,num_backup_sb=2,root_owner=1000:1000,nodiscard",
        ),
        ("ext4", "-E root_owner,stripe-width=8", "-E root_owner,stripe-width=8"),
        ("ext4", "-T largefile -U random -e remount-ro", "-T largefile -U random -e remount-ro"),
        ("xfs", "-L logs.2024 -b size=4k", "-L logs.2024 -b size=4k"),
        ("xfs", "-m crc=1,finobt=1,reflink=0,bigtime=1,rmapbt=0,inobtcount=1", "-m crc=1,finobt=1,reflink=0,bigtime=1,rmapbt=0,inobtcount=1"),
        ("xfs", "-i size=512,maxpct=25,sparse=1,align=1", "-i size=512,maxpct=25,sparse=1,align=1"),
        ("xfs", "-d su=64k,sw=4,agcount=8 -d size=300m", "-d su=64k,sw=4,agcount=8 -d size=300m"),
        ("xfs", "-l size=64m,lazy-count=1,version=2 -n size=8192,ftype=1 -s size=4096 -q -K", "-l size=64m,lazy-count=1,version=2 -n size=8192,ftype=1 -s size=4096 -q -K"),
    ];
    for (fstype, text, want) in mkfs {
        assert_eq!(
            check_mkfs(fstype, text).as_deref(),
            Ok(*want),
            "{fstype} {text:?}"
        );
    }
    let mount: &[(&str, &str, &str)] = &[
        ("ext4", "", ""),
        ("ext4", " noatime , discard ", "noatime,discard"),
        (
            "ext4",
            "data=journal,commit=30,errors=remount-ro,barrier=1,barrier",
            "data=journal,commit=30,errors=remount-ro,barrier=1,barrier",
        ),
        (
            "ext4",
            "nodelalloc,dioread_nolock,inode_readahead_blks=64,stripe=16,noacl,prjquota",
            "nodelalloc,dioread_nolock,inode_readahead_blks=64,stripe=16,noacl,prjquota",
        ),
        (
            "ext4",
            "nosuid,nodev,noexec,lazytime",
            "nosuid,nodev,noexec,lazytime",
        ),
        (
            "xfs",
            "noatime,nouuid,logbufs=8,logbsize=256k,allocsize=64m,inode64",
            "noatime,nouuid,logbufs=8,logbsize=256k,allocsize=64m,inode64",
        ),
        (
            "xfs",
            "uquota,gqnoenforce,pquota,largeio,swalloc,sunit=128,swidth=512",
            "uquota,gqnoenforce,pquota,largeio,swalloc,sunit=128,swidth=512",
        ),
    ];
    for (fstype, text, want) in mount {
        assert_eq!(
            check_mount(fstype, text).as_deref(),
            Ok(*want),
            "{fstype} {text:?}"
        );
    }
}

#[test]
fn what_reaches_the_host_is_refused_with_the_reason_and_the_allowed_list() {
    // (fstype, mkfs options, words the error must contain)
    let mkfs: &[(&str, &str, &[&str])] = &[
        (
            "ext4",
            "-F",
            &["never forces", "allowed for ext4: -L LABEL"],
        ),
        ("ext4", "-f", &["never forces"]),
        ("ext4", "--force", &["never forces"]),
        ("ext4", "-qF", &["-qF contains -F", "never forces"]),
        ("ext4", "-Fq", &["never forces"]),
        ("xfs", "-qf", &["never forces"]),
        (
            "ext4",
            "-d /etc",
            &[
                "-d is not allowed",
                "copies files from the host",
                "allowed for ext4",
            ],
        ),
        ("ext4", "-Ldata", &["separate words", "(-L data)"]),
        ("ext4", "-qj", &["each flag as a separate word"]),
        ("ext4", "-c", &["bad-block scan"]),
        ("ext4", "-l /etc/shadow", &["file on the host"]),
        ("ext4", "-z /tmp/undo", &["undo file"]),
        ("ext4", "-S", &["superblocks"]),
        ("ext4", "-n", &["formats nothing"]),
        ("ext4", "-t ext2", &["fstype option"]),
        ("ext4", "-D", &["-D is not allowed", "allowed for ext4"]),
        (
            "ext4",
            "-E offset=4096",
            &[
                "offset is not allowed",
                "moves the filesystem",
                "-E {stride=N",
            ],
        ),
        ("ext4", "-E test_fs", &["test kernels"]),
        (
            "ext4",
            "-E quotatype=usrquota",
            &["\"quotatype=usrquota\" is not allowed"],
        ),
        ("ext4", "-E root_owner=root:0", &["UID:GID"]),
        (
            "ext4",
            "-J device=/dev/sda",
            &["file or device on the host"],
        ),
        (
            "ext4",
            "-e panic",
            &["-e panic", "stop the host's kernel", "continue|remount-ro"],
        ),
        (
            "ext4",
            "-O journal_dev",
            &["unknown feature \"journal_dev\""],
        ),
        (
            "ext4",
            "-U 0a3c5b8e-1111-2222-3333-444455556666",
            &["clear|random|time"],
        ),
        ("ext4", "-b 8192", &["1024|2048|4096"]),
        ("ext4", "-m 90", &["0 to 50"]),
        ("ext4", "-m -1", &["0 to 50"]),
        ("ext4", "-L", &["needs a value", "-L LABEL"]),
        ("ext4", "-L has/slash", &["[A-Za-z0-9_.-]"]),
        ("ext4", "-L -q", &["does not start with -"]),
        (
            "ext4",
            "/dev/sda",
            &["not a flag", "rbdvol supplies the device"],
        ),
        ("ext4", "-L a\u{7}b", &["printable ASCII"]),
        (
            "xfs",
            "-l logdev=/dev/sda",
            &[
                "logdev is not allowed",
                "file or device on the host",
                "-l {size=SIZE",
            ],
        ),
        ("xfs", "-l internal=0", &["internal is not allowed"]),
        (
            "xfs",
            "-d file=1,name=/etc/passwd",
            &["file is not allowed"],
        ),
        ("xfs", "-d name=/dev/sda", &["name is not allowed"]),
        ("xfs", "-r rtdev=/dev/sdb", &["realtime", "allowed for xfs"]),
        ("xfs", "-p /etc/proto", &["protofile"]),
        ("xfs", "-N", &["formats nothing"]),
        (
            "xfs",
            "-m uuid=0a3c5b8e-1111-2222-3333-444455556666",
            &["by-uuid"],
        ),
        ("xfs", "-L thirteen_char", &["1 to 12"]),
        ("xfs", "-m crc=2", &["crc=2", "not an allowed value"]),
        ("xfs", "-d su=lots", &["size like 4096"]),
        ("ext4", "-E stride=1e9", &["whole number"]),
        ("btrfs", "", &["unknown fstype"]),
    ];
    for (fstype, text, needles) in mkfs {
        let err = check_mkfs(fstype, text).expect_err(text);
        for n in *needles {
            assert!(err.contains(n), "{fstype} {text:?}: {err:?} lacks {n:?}");
        }
        assert!(!err.contains('\n'), "{err}");
    }
    let mount: &[(&str, &str, &[&str])] = &[
        (
            "ext4",
            "errors=panic",
            &["stop the host's kernel", "allowed for ext4: noatime"],
        ),
        ("ext4", "nobarrier", &["weakens durability"]),
        ("ext4", "barrier=0", &["weakens durability"]),
        ("ext4", "barrier=2", &["barrier=1"]),
        (
            "ext4",
            "journal_path=/dev/sda",
            &["file or device on the host"],
        ),
        ("ext4", "journal_dev=2049", &["file or device on the host"]),
        ("ext4", "noatime,suid", &["allow-suid-dev=true"]),
        ("ext4", "dev", &["allow-suid-dev=true"]),
        ("ext4", "defaults", &["allow-suid-dev=true"]),
        ("ext4", "ro", &["read-only=true"]),
        ("xfs", "rw", &["read-only=true"]),
        ("ext4", "remount", &["managed by rbdvol"]),
        ("ext4", "bind", &["managed by rbdvol"]),
        (
            "xfs",
            "logdev=/dev/sda",
            &["file or device on the host", "allowed for xfs"],
        ),
        ("xfs", "rtdev=/dev/sdb", &["file or device on the host"]),
        ("xfs", "norecovery", &["weakens durability"]),
        (
            "ext4",
            "context=system_u:object_r:tmp_t:s0",
            &["context=system_u:object_r:tmp_t:s0 is not allowed"],
        ),
        ("ext4", "commit=forever", &["whole number", "commit=0..300"]),
        ("ext4", "data=unsafe", &["ordered|writeback|journal"]),
        (
            "ext4",
            "nouuid",
            &["nouuid is not allowed", "allowed for ext4"],
        ),
        (
            "xfs",
            "data=journal",
            &["is not allowed", "allowed for xfs"],
        ),
        ("xfs", "logbufs=100", &["2 to 8"]),
        ("ext4", "noatime=1", &["noatime=1 is not allowed"]),
        ("ext4", "a;b", &["characters outside"]),
        ("ext4", "a b", &["characters outside"]),
    ];
    for (fstype, text, needles) in mount {
        let err = check_mount(fstype, text).expect_err(text);
        for n in *needles {
            assert!(err.contains(n), "{fstype} {text:?}: {err:?} lacks {n:?}");
        }
    }
}

#[test]
fn stored_metadata_is_checked_again() {
    let ok = check_stored(&meta(&[
        ("fstype", "xfs"),
        ("mkfs-options", "-m crc=1"),
        ("mount-options", "noatime"),
        ("read-only", "true"),
        ("allow-suid-dev", "false"),
        ("created-at", "whenever"),
    ]))
    .unwrap();
    assert_eq!(
        ok,
        StoredFs {
            fstype: "xfs".into(),
            mkfs_options: "-m crc=1".into(),
            mount_options: "noatime".into(),
            read_only: true,
            allow_suid_dev: false,
        }
    );
    // An image rbdvol did not create carries no metadata.
    let bare = check_stored(&BTreeMap::new()).unwrap();
    assert_eq!(
        (bare.fstype.as_str(), bare.read_only, bare.allow_suid_dev),
        ("ext4", false, false)
    );

    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let tampered: &[Case] = &[
        (
            &[("fstype", "../x")],
            &[
                "rbdvol.fstype=\"../x\"",
                "changed outside rbdvol",
                "accepted: ext4, xfs",
            ],
        ),
        (&[("fstype", "ext4;reboot")], &["rbdvol.fstype"]),
        (
            &[("mkfs-options", "-d /etc")],
            &[
                "rbdvol.mkfs-options=\"-d /etc\"",
                "changed outside rbdvol",
                "copies files from the host",
                "allowed for ext4",
                "rbd image-meta set",
            ],
        ),
        (
            &[("fstype", "xfs"), ("mkfs-options", "-l logdev=/dev/sda")],
            &[
                "rbdvol.mkfs-options",
                "logdev is not allowed",
                "-l {size=SIZE",
            ],
        ),
        // Valid for ext4, but the metadata says xfs.
        (
            &[("fstype", "xfs"), ("mkfs-options", "-E nodiscard")],
            &["rbdvol.mkfs-options", "-E is not allowed"],
        ),
        (
            &[("mount-options", "errors=panic")],
            &["rbdvol.mount-options", "stop the host's kernel"],
        ),
        (
            &[("mount-options", "suid,dev")],
            &["rbdvol.mount-options", "allow-suid-dev"],
        ),
        (
            &[("read-only", "yes")],
            &["rbdvol.read-only", "true or false"],
        ),
        (
            &[("allow-suid-dev", "1")],
            &["rbdvol.allow-suid-dev", "true or false"],
        ),
    ];
    for (pairs, needles) in tampered {
        let err = check_stored(&meta(pairs)).unwrap_err().to_string();
        for n in *needles {
            assert!(err.contains(n), "{pairs:?}: {err:?} lacks {n:?}");
        }
        assert!(!err.contains('\n'), "{err}");
    }
}
