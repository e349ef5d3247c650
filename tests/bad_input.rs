//! Bad input over the real socket, shaped exactly as dockerd sends it: every malformed
//! body, name and option gets a clear error that says what is accepted, and the
//! cluster is checked afterwards to be unchanged.

mod common;

use common::*;

fn daemon() -> Daemon {
    Daemon::start(DaemonOpts::host("host-a"))
}

#[test]
fn bad_input_gets_a_clear_error_and_creates_nothing() {
    let d = daemon();
    let okname = unique("bad-input");
    let long = "x".repeat(300);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "VolumeDriver.Create",
            r#"{"Name":"a/b","Opts":null}"#.into(),
            "invalid volume name",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":"..","Opts":null}"#.into(),
            "invalid volume name",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":"a\u0000b","Opts":null}"#.into(),
            "invalid volume name",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":"with space","Opts":null}"#.into(),
            "invalid volume name",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":"unicodé","Opts":null}"#.into(),
            "invalid volume name",
        ),
        (
            "VolumeDriver.Create",
            format!(r#"{{"Name":"{long}","Opts":null}}"#),
            "limit is 95",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"size":"0"}}"#.into(),
            "smallest",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"size":"-1"}}"#.into(),
            "whole number",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"size":"1e30"}}"#.into(),
            "unknown unit",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"size":"ten"}}"#.into(),
            "whole number",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"size":"10X"}}"#.into(),
            "K, M, G, T or P",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"fstype":"btrfs"}}"#.into(),
            "accepted: ext4, xfs",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"colour":"red"}}"#.into(),
            "accepted options are",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"size":"1G","size":"2G"}}"#.into(),
            "given twice",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"size":1}}"#.into(),
            "malformed",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"features":"layering"}}"#.into(),
            "exclusive-lock is required",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"pool":"nosuchpool"}}"#.into(),
            "serves the pools",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"data-pool":"nosuchpool"}}"#.into(),
            "no such pool",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mkfs-options":"-F"}}"#.into(),
            "never forces",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mkfs-options":"-qF"}}"#.into(),
            "never forces",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mkfs-options":"-d /etc"}}"#.into(),
            "copies files from the host",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mkfs-options":"-E offset=4096"}}"#.into(),
            "offset is not allowed",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mkfs-options":"-e panic"}}"#.into(),
            "stop the host's kernel",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"fstype":"xfs","size":"512M","mkfs-options":"-l logdev=/dev/sda"}}"#.into(),
            "logdev is not allowed",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"fstype":"xfs","size":"512M","mkfs-options":"-r rtdev=/dev/sdb"}}"#.into(),
            "realtime",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mount-options":"errors=panic"}}"#.into(),
            "stop the host's kernel",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mount-options":"nobarrier"}}"#.into(),
            "weakens durability",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"mount-options":"noatime,suid"}}"#.into(),
            "allow-suid-dev=true",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"fstype":"xfs","size":"512M","mount-options":"logdev=/dev/sda"}}"#.into(),
            "file or device on the host",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"fstype":"xfs","size":"512M","mount-options":"rtdev=/dev/sdb"}}"#.into(),
            "file or device on the host",
        ),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname},"Opts":{"allow-suid-dev":"maybe"}}"#.into(),
            "true or false",
        ),
        ("VolumeDriver.Create", r#"{"Name":5}"#.into(), "malformed"),
        (
            "VolumeDriver.Create",
            r#"{"Name":{okname}"#.into(),
            "malformed",
        ),
        ("VolumeDriver.Create", "".into(), "body was empty"),
        ("VolumeDriver.Get", r#"{}"#.into(), "Name"),
        (
            "VolumeDriver.Get",
            r#"{"Name":"../etc"}"#.into(),
            "invalid volume name",
        ),
        (
            "VolumeDriver.Remove",
            r#"{"Name":"a/b"}"#.into(),
            "invalid volume name",
        ),
        (
            "VolumeDriver.Mount",
            r#"{"Name":{okname},"ID":""}"#.into(),
            "mount ID",
        ),
    ];
    for (endpoint, body, needle) in &cases {
        let body = body.replace("{okname}", &format!("\"{okname}\""));
        d.err(endpoint, &body, needle);
    }
    for pool in ["rbd", "fast"] {
        let present = images_in(pool);
        assert!(
            !present.contains(&okname),
            "bad input created {pool}/{okname}"
        );
        assert!(!present
            .iter()
            .any(|n| n.contains('/') || n == ".." || n.contains(' ')));
    }
    // The daemon is still serving.
    d.ok("VolumeDriver.List", "{}");
}
