//! Volume names become RBD image names and path components: an accepted name can
//! never escape the mount root, and is plain ASCII of bounded length.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use rbdvol::volume::names::{validate, MAX_NAME_LEN};

fuzz_target!(|name: &str| {
    if validate(name).is_ok() {
        assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
        assert!(name.is_ascii() && !name.contains('/') && !name.contains('\0'));
        let root = Path::new("/var/lib/rbdvol/mounts/rbd");
        let joined = root.join(name);
        assert!(joined.starts_with(root));
        assert_eq!(joined.components().count(), root.components().count() + 1);
        assert!(matches!(joined.components().last(), Some(Component::Normal(_))));
    }
});
