//! Docker end to end, day two: `docker volume create -o from=VOL` and `-o from=VOL@SNAP`
//! through the real docker CLI make volumes that containers find with their source's
//! data (never reformatted), lineage shows in `docker volume inspect`, and a running
//! container sees its volume grow in `df` after `rbdvol resize`.
//! The fixtures and how they live with dockerd: tests/common/e2e/mod.rs.

mod common;
#[path = "snapshots/util.rs"]
mod util;

use common::e2e::*;
use util::rbdvol_ok;

/// Total 1K-blocks of /data as `df` in the container reports them.
fn df_blocks(s: &Scene, container: &str) -> u64 {
    let out = s.exec(container, "df -k /data | tail -n 1");
    out.split_whitespace()
        .nth(1)
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("df: {out}"))
}

#[test]
fn volumes_made_from_a_volume_or_its_snapshot_and_grown_under_a_running_container() {
    let Some(mut s) = Scene::new("snap") else {
        return;
    };
    let a = s.host("a", &[]);
    let vol = s.volume_name("src");
    s.create_ok(&a, &vol, &["size=320M", "fstype=xfs"]);
    s.run_ok(
        &vol,
        "dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null \
         && sha256sum /data/blob > /data/blob.sha256 && sync",
    );
    rbdvol_ok(&["snapshot", "create", &vol, "nightly"]);
    s.run_ok(&vol, "echo later > /data/later && sync");

    let restored = s.volume_name("restored");
    s.create_ok(&a, &restored, &[&format!("from={vol}@nightly")]);
    let copy = s.volume_name("copy");
    s.create_ok(&a, &copy, &[&format!("from={vol}")]);
    let st = s.inspect(&restored);
    assert_eq!(st["Status"]["origin"], format!("rbd/{vol}@nightly"), "{st}");
    let st = s.inspect(&vol);
    let snaps = st["Status"]["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(snaps.iter().any(|x| x["name"] == "nightly"), "{st}");

    let out = s.run_ok(&restored, "sha256sum -c /data/blob.sha256 && ls /data");
    assert!(out.starts_with("/data/blob: OK"), "{out}");
    assert!(
        !out.contains("later"),
        "the restore has data from after its snapshot: {out}"
    );
    let out = s.run_ok(&copy, "sha256sum -c /data/blob.sha256 && cat /data/later");
    assert_eq!(out, "/data/blob: OK\nlater\n");
    let log = s.plugin("a").log();
    assert_eq!(
        log.matches("volume is blank: formatting").count(),
        1,
        "a clone was formatted:\n{log}"
    );

    // Grown under a running container, which sees it in df without restarting.
    let c = s.start_container(&vol, &["sleep", "600"]);
    let before = df_blocks(&s, &c);
    // The holder starts answering within a second of the Mount.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let out = rbdvol_ok(&["resize", &vol, "640M"]);
    assert!(out.contains("grown on host-a"), "{out}");
    let after = df_blocks(&s, &c);
    assert!(
        after > before + 200 * 1024,
        "df in the container: {before} -> {after} KiB"
    );
    s.exec(&c, "sha256sum -c /data/blob.sha256");
    let _ = s.docker(&["rm", "-f", &c]);

    // Clones first: the source is kept while they exist.
    let o = s.rm(&vol);
    assert!(!o.ok && o.stderr.contains("cloned from"), "{o}");
    for v in [&restored, &copy, &vol] {
        let o = s.rm(v);
        assert!(o.ok, "{o}");
    }
    s.finish();
}
