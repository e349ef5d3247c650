//! The CSI front end (Swarm cluster volumes) against the real cluster, without Docker:
//! a tonic client speaks to `rbdvol serve --csi-endpoint` over its unix socket, as
//! swarmkit does. Each RPC's success and refusal, idempotency (the CO repeats calls),
//! real stage/publish mounts, one writer across hosts, readers on several hosts, and
//! the Docker API and CSI on one volume excluding each other through the lock.

#![allow(clippy::result_large_err)]

mod common;

#[path = "csi/fixtures.rs"]
mod fixtures;

use std::collections::HashMap;
use std::path::Path;

use fixtures::*;

#[tokio::test(flavor = "multi_thread")]
async fn identity_and_capabilities_say_only_what_works() {
    let h = Host::start("csi-id", &[]).await;
    let mut id = IdentityClient::new(h.ch.clone());
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "rbdvol");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.capabilities.len(),
        1,
        "only the controller service, no topology: {caps:?}"
    );

    use csi::controller_service_capability::{rpc::Type as C, Type as CT};
    let ctl = h
        .ctl()
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut got: Vec<i32> = ctl
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(CT::Rpc(r)) => r.r#type,
            None => 0,
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            C::CreateDeleteVolume as i32,
            C::PublishUnpublishVolume as i32,
            C::ListVolumes as i32
        ]
    );
    // What is not advertised says so rather than pretending.
    let e = h
        .ctl()
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);

    use csi::node_service_capability::{rpc::Type as N, Type as NT};
    let node = h
        .node()
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let got: Vec<i32> = node
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(NT::Rpc(r)) => r.r#type,
            None => 0,
        })
        .collect();
    assert_eq!(got, vec![N::StageUnstageVolume as i32]);
    let ni = h
        .node()
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ni.node_id, "csi-id",
        "the node ID is the host id the lock owner record shows"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn create_validate_list_and_delete_to_the_trash() {
    let h = Host::start("csi-ctl", &[]).await;
    let name = unique("csic");
    let v = h
        .create(&name, 64 * MIB, &[("pool", "fast")], Mode::SingleNodeWriter)
        .await
        .unwrap();
    assert_eq!(v.volume_id, name);
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert!(images_in("fast").contains(&name));
    let (ok, out) = rbd(&["info", &format!("fast/{name}"), "--format", "json"]);
    assert!(
        ok && out.contains(&format!("\"size\":{}", 64 * MIB)),
        "{out}"
    );

    // Repeated: the same volume. Different capacity: AlreadyExists, nothing changed.
    let again = h
        .create(&name, 64 * MIB, &[("pool", "fast")], Mode::SingleNodeWriter)
        .await
        .unwrap();
    assert_eq!(again.volume_id, name);
    refused(
        h.create(
            &name,
            128 * MIB,
            &[("pool", "fast")],
            Mode::SingleNodeWriter,
        )
        .await,
        Code::AlreadyExists,
        "size",
    );
    let (_, out) = rbd(&["info", &format!("fast/{name}"), "--format", "json"]);
    assert!(out.contains(&format!("\"size\":{}", 64 * MIB)), "{out}");

    let validate = |caps: Vec<csi::VolumeCapability>| {
        let mut c = h.ctl();
        let id = name.clone();
        async move {
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id,
                volume_capabilities: caps,
                ..Default::default()
            })
            .await
        }
    };
    let ok = validate(vec![cap(Mode::SingleNodeWriter)])
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let ro = validate(vec![cap(Mode::MultiNodeReaderOnly)])
        .await
        .unwrap()
        .into_inner();
    assert!(ro.confirmed.is_some(), "{ro:?}");
    let mw = validate(vec![cap(Mode::MultiNodeMultiWriter)])
        .await
        .unwrap()
        .into_inner();
    assert!(
        mw.confirmed.is_none() && mw.message.contains("refused"),
        "{mw:?}"
    );

    let all = h
        .ctl()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all
        .entries
        .iter()
        .any(|e| e.volume.as_ref().unwrap().volume_id == name));
    let page = h
        .ctl()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 1,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 1);
    if all.entries.len() > 1 {
        assert_eq!(page.next_token, "1");
    }
    let bad_token = h
        .ctl()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: "zz".into(),
        })
        .await;
    refused(bad_token, Code::Aborted, "starting_token");

    h.delete(&name).await.unwrap();
    assert!(!images_in("fast").contains(&name));
    assert!(
        trashed_names("fast").contains(&name),
        "the default policy moves it to the RBD trash"
    );
    h.delete(&name)
        .await
        .expect("deleting a deleted volume succeeds (CSI idempotency)");
    refused(
        h.ctl()
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: name.clone(),
                volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "does not exist",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_parameters_are_invalid_arguments_that_change_nothing() {
    let h = Host::start("csi-bad", &[]).await;
    let name = unique("csib");
    let w = Mode::SingleNodeWriter;
    refused(
        h.create(&name, 64 * MIB, &[("colour", "red")], w).await,
        Code::InvalidArgument,
        "colour",
    );
    refused(
        h.create(&name, 64 * MIB, &[("pool", "nosuch")], w).await,
        Code::InvalidArgument,
        "nosuch",
    );
    refused(
        h.create(&name, 64 * MIB, &[("fstype", "ntfs")], w).await,
        Code::InvalidArgument,
        "fstype",
    );
    refused(
        h.create(&name, 64 * MIB, &[("size", "1G")], w).await,
        Code::InvalidArgument,
        "--required-bytes",
    );
    refused(
        h.create(&name, 64 * MIB, &[], Mode::MultiNodeMultiWriter)
            .await,
        Code::InvalidArgument,
        "MULTI_NODE_MULTI_WRITER",
    );
    refused(
        h.create(&name, 64 * MIB, &[], Mode::MultiNodeSingleWriter)
            .await,
        Code::InvalidArgument,
        "readonly",
    );
    refused(
        h.create(&name, -1, &[], w).await,
        Code::InvalidArgument,
        "negative",
    );
    let block = h
        .ctl()
        .create_volume(csi::CreateVolumeRequest {
            name: name.clone(),
            volume_capabilities: vec![csi::VolumeCapability {
                access_mode: Some(AccessMode { mode: w as i32 }),
                access_type: Some(AccessType::Block(BlockVolume {})),
            }],
            ..Default::default()
        })
        .await;
    refused(block, Code::InvalidArgument, "--type block");
    refused(
        h.create("bad/name", 64 * MIB, &[], w).await,
        Code::InvalidArgument,
        "invalid volume name",
    );
    for pool in ["rbd", "fast"] {
        assert!(
            !images_in(pool).contains(&name),
            "a refused create left an image in {pool}"
        );
    }
    // Node calls with missing or malformed fields.
    refused(
        h.stage(&name, Path::new("relative/path"), w).await,
        Code::InvalidArgument,
        "absolute",
    );
    refused(
        h.stage(&name, Path::new(""), w).await,
        Code::InvalidArgument,
        "staging_target_path is required",
    );
    refused(
        h.stage(&name, &h.path("st"), w).await,
        Code::NotFound,
        "does not exist",
    );
    assert!(!h.path("st").exists() || std::fs::read_dir(h.path("st")).unwrap().next().is_none());
    let no_parent = h.path("missing-parent/st");
    let e = h.create(&name, 64 * MIB, &[], w).await.unwrap();
    refused(
        h.stage(&e.volume_id, &no_parent, w).await,
        Code::Internal,
        "creates nothing above it",
    );
    assert!(
        !h.path("missing-parent").exists(),
        "a parent of the staging path was created"
    );
    assert!(
        lock_holders("rbd", &name).is_empty(),
        "a refused stage kept the lock"
    );
    h.delete(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn stage_publish_write_unpublish_unstage_and_stage_again() {
    let h = Host::start("csi-node", &[]).await;
    let name = unique("csin");
    let w = Mode::SingleNodeWriter;
    h.create(&name, 64 * MIB, &[], w).await.unwrap();
    let (staging, target) = (h.path("staging-flat"), h.path("target"));
    refused(
        h.publish(&name, &staging, &target, w).await,
        Code::FailedPrecondition,
        "NodeStageVolume must come first",
    );
    h.stage(&name, &staging, w)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", h.d.log()));
    h.stage(&name, &staging, w)
        .await
        .expect("a repeated stage succeeds");
    assert!(is_mountpoint(&staging));
    let holders = lock_holders("rbd", &name);
    assert_eq!(
        holders.len(),
        1,
        "staging takes the exclusive lock: {holders:?}"
    );
    assert_eq!(
        image_meta("rbd", &name, "rbdvol.owner.host").as_deref(),
        Some("csi-node")
    );
    h.publish(&name, &staging, &target, w).await.unwrap();
    h.publish(&name, &staging, &target, w)
        .await
        .expect("a repeated publish succeeds");
    std::fs::write(target.join("hello"), b"from csi").unwrap();
    refused(h.delete(&name).await, Code::FailedPrecondition, "in use");
    assert!(
        images_in("rbd").contains(&name),
        "an in-use volume was removed"
    );

    h.unpublish(&name, &target).await;
    h.unpublish(&name, &target).await;
    assert!(!target.exists(), "unpublish removes the target it created");
    h.unstage(&name, &staging).await;
    h.unstage(&name, &staging).await;
    assert!(!is_mountpoint(&staging));
    assert!(
        lock_holders("rbd", &name).is_empty(),
        "unstage released the lock"
    );
    assert!(h.d.leftovers().is_empty(), "{:?}", h.d.leftovers());

    // Staged again: the data is there (found, not formatted again).
    h.stage(&name, &staging, w).await.unwrap();
    h.publish(&name, &staging, &target, w).await.unwrap();
    assert_eq!(std::fs::read(target.join("hello")).unwrap(), b"from csi");
    h.unpublish(&name, &target).await;
    h.unstage(&name, &staging).await;
    h.delete(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_writer_across_hosts_and_across_the_two_apis() {
    // Long enough that a lock just released is found free on a loaded machine.
    let wait = [("RBDVOL_LOCK__TAKEOVER_WAIT", "5s")];
    let a = Host::start("csi-a", &wait).await;
    let b = Host::start("csi-b", &wait).await;
    let name = unique("csiw");
    let w = Mode::SingleNodeWriter;
    a.create(&name, 64 * MIB, &[], w).await.unwrap();
    let sa = a.path("stage");
    a.stage(&name, &sa, w).await.unwrap();

    // A second node's CSI stage, and the Docker API on that node, are refused.
    let msg = refused(
        b.stage(&name, &b.path("stage"), w).await,
        Code::FailedPrecondition,
        "csi-a",
    );
    assert!(msg.contains("in use"), "{msg}");
    assert!(!is_mountpoint(&b.path("stage")));
    let mount = format!(r#"{{"Name":"{name}","ID":"{}"}}"#, mount_id(7));
    b.d.err("VolumeDriver.Mount", &mount, "csi-a");

    // Released by CSI: the Docker API takes it, and then CSI on the other host waits.
    a.unstage(&name, &sa).await;
    b.d.ok("VolumeDriver.Mount", &mount);
    refused(
        a.stage(&name, &sa, w).await,
        Code::FailedPrecondition,
        "csi-b",
    );
    assert!(!is_mountpoint(&sa));
    b.d.ok("VolumeDriver.Unmount", &mount);
    a.stage(&name, &sa, w).await.unwrap();
    a.unstage(&name, &sa).await;
    a.delete(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_are_read_only_and_share_where_the_mapper_allows() {
    let wait = [("RBDVOL_LOCK__TAKEOVER_WAIT", "3s")];
    let a = Host::start("csi-ra", &wait).await;
    let b = Host::start("csi-rb", &wait).await;
    let name = unique("csir");
    let w = Mode::SingleNodeWriter;
    let r = Mode::MultiNodeReaderOnly;
    a.create(&name, 64 * MIB, &[], w).await.unwrap();
    // A blank volume cannot be formatted by a reader: refused, saying why.
    refused(
        a.stage(&name, &a.path("s0"), r).await,
        Code::FailedPrecondition,
        "read-only",
    );
    assert!(lock_holders("rbd", &name).is_empty());
    let (s, t) = (a.path("s"), a.path("t"));
    a.stage(&name, &s, w).await.unwrap();
    a.publish(&name, &s, &t, w).await.unwrap();
    std::fs::write(t.join("shared"), b"for readers").unwrap();
    a.unpublish(&name, &t).await;
    a.unstage(&name, &s).await;

    let (rs, rt) = (a.path("rs"), a.path("rt"));
    a.stage(&name, &rs, r)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", a.d.log()));
    a.publish(&name, &rs, &rt, r).await.unwrap();
    assert_eq!(std::fs::read(rt.join("shared")).unwrap(), b"for readers");
    let e = std::fs::write(rt.join("nope"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // A writer on the host that reads it is refused while the reader is staged.
    refused(
        a.stage(&name, &a.path("ws"), w).await,
        Code::FailedPrecondition,
        "read-only",
    );

    // krbd maps read-only without the exclusive lock, so readers share the volume;
    // the FUSE (userspace) exporter always holds the lock: one reader at a time.
    let (bs, bt) = (b.path("rs"), b.path("rt"));
    if mapper_of(&b) == "krbd" {
        b.stage(&name, &bs, r).await.unwrap();
        b.publish(&name, &bs, &bt, r).await.unwrap();
        assert_eq!(std::fs::read(bt.join("shared")).unwrap(), b"for readers");
        b.unpublish(&name, &bt).await;
        b.unstage(&name, &bs).await;
    } else {
        refused(
            b.stage(&name, &bs, r).await,
            Code::FailedPrecondition,
            "csi-ra",
        );
        eprintln!(
            "readers on two hosts need krbd; this kernel has mapper {}",
            mapper_of(&b)
        );
    }
    a.unpublish(&name, &rt).await;
    a.unstage(&name, &rs).await;
    for h in [&a, &b] {
        assert!(h.d.leftovers().is_empty(), "{:?}", h.d.leftovers());
    }
    a.delete(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn swarm_secrets_carry_the_cephx_user() {
    let h = Host::start("csi-sec", &[]).await;
    let key = cephx_user("csi-secrets");
    let create = |name: String, secrets: &[(&str, &str)]| {
        let mut c = h.ctl();
        let secrets: HashMap<String, String> = secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        async move {
            c.create_volume(csi::CreateVolumeRequest {
                name,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 64 * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
                secrets,
                ..Default::default()
            })
            .await
        }
    };
    let name = unique("csis");
    create(
        name.clone(),
        &[("userID", "csi-secrets"), ("userKey", &key)],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", h.d.log()));
    assert!(images_in("rbd").contains(&name));

    // A wrong key is the user's, not the keyring's: refused, nothing created.
    let wrong = unique("csis");
    let bad_key = "AQBqYWRqb2tlcnlrZXlrZXlrZXlrZXlrZXlrZXk9PQ==";
    let e = create(
        wrong.clone(),
        &[("userID", "csi-secrets"), ("userKey", bad_key)],
    )
    .await
    .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    assert!(
        !images_in("rbd").contains(&wrong),
        "created with a wrong key: {e:?}"
    );
    refused(
        create(wrong.clone(), &[("userID", "csi-secrets")]).await,
        Code::InvalidArgument,
        "go together",
    );
    refused(
        create(wrong.clone(), &[("password", "x")]).await,
        Code::InvalidArgument,
        "userKey",
    );
    assert!(!images_in("rbd").contains(&wrong));

    let mut c = h.ctl();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: name.clone(),
        secrets: HashMap::from([
            ("userID".into(), "csi-secrets".into()),
            ("userKey".into(), key.clone()),
        ]),
    })
    .await
    .unwrap();
    assert!(trashed_names("rbd").contains(&name));
}
