//! `docker volume create -o` options: parsing never panics, and every accepted set is
//! one rbdvol can really create (sane size, exclusive-lock present, known fstype,
//! options that cannot smuggle separators into mount or mkfs, and stored options that
//! pass the check Mount makes again).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rbdvol::config::VolumeDefaults;
use rbdvol::volume::options::{VolumeOptions, FSTYPES};

fuzz_target!(|data: &[u8]| {
    // key=value per line, the way `-o key=value` arrives after the CLI splits them.
    let text = String::from_utf8_lossy(data);
    let opts: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let pools = ["rbd".to_string(), "fast".to_string()];
    if let Ok(v) = VolumeOptions::parse(&opts, &VolumeDefaults::default(), &pools) {
        assert_eq!(v.size % 4096, 0);
        assert!(v.size >= 16 << 20 && v.size <= 1 << 50);
        assert!(v.features & 4 != 0, "exclusive-lock must always be present");
        assert!(FSTYPES.contains(&v.fstype.as_str()));
        assert!(pools.contains(&v.pool));
        assert!(!v.mount_options.contains(|c: char| c.is_whitespace() || c == '\0'));
        assert!(!v.mkfs_options.contains(|c: char| c.is_control()));
        assert!(!v.mkfs_options.split_whitespace().any(|a| a == "-f" || a == "-F"));
        if let Some(o) = v.object_size {
            assert!(o.is_power_of_two());
        }
        // What Create stores passes the check Mount makes again, unchanged.
        let meta: BTreeMap<String, String> = v.to_meta("h", "t").into_iter().collect();
        let stored = rbdvol::volume::fsopts::check_stored(&meta).expect("stored options recheck");
        assert_eq!(stored.mkfs_options, v.mkfs_options);
        assert_eq!(stored.mount_options, v.mount_options);
    }
});
