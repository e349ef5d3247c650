//! `docker volume ls` must stay fast with thousands of volumes: List is one directory
//! listing per pool, no per-image calls. This checks that every image comes back; the
//! speed itself is measured by the benchmark (`integration/bench`), not asserted here.

mod common;

use common::*;
use rbdvol::ceph::connect_spec;
use rbdvol::ceph::sys::{CreateSpec, Rados};

const IMAGES: usize = 3000;

#[test]
fn list_returns_every_one_of_thousands_of_volumes() {
    let settings = rbdvol::config::CephSettings {
        conf: ceph_conf(),
        ..Default::default()
    };
    let spec = CreateSpec {
        size: 64 << 20,
        features: 1 | 4,
        order: None,
        data_pool: None,
    };
    let prefix = unique("many");
    let names: Vec<String> = (0..IMAGES).map(|i| format!("{prefix}-{i:05}")).collect();
    std::thread::scope(|s| {
        for chunk in names.chunks(IMAGES / 6) {
            let (settings, spec) = (&settings, &spec);
            s.spawn(move || {
                let rados = Rados::connect(&connect_spec(settings)).expect("connect");
                let pool = rados.pool("bulk").expect("pool bulk");
                for n in chunk {
                    pool.create_image(n, spec).expect("create");
                }
            });
        }
    });

    let mut opts = DaemonOpts::host("host-list");
    opts.pools = vec!["bulk".into()];
    let d = Daemon::start(opts);
    let listed = d.ok("VolumeDriver.List", "{}");
    let mut got: Vec<String> = listed["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    got.sort();
    assert_eq!(got.len(), IMAGES);
    assert_eq!(got, names);
    // Every entry has exactly the fields Docker uses from List.
    for v in listed["Volumes"].as_array().unwrap() {
        assert!(v.get("Name").is_some());
        assert!(v.get("Status").is_none() && v.get("CreatedAt").is_none());
    }
}
