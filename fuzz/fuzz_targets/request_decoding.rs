//! Any bytes dockerd (or anyone with the socket) sends as a request body: decoding
//! never panics, and what decodes keeps its promises (no duplicate option keys).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbdvol::api::protocol::{decode, CreateRequest, MountRequest, NameRequest};

fuzz_target!(|body: &[u8]| {
    if let Ok(req) = decode::<CreateRequest>("Create", body) {
        if let Some(opts) = req.opts {
            // A BTreeMap cannot hold a key twice; decoding must have refused repeats.
            let keys: Vec<&String> = opts.0.keys().collect();
            assert!(keys.windows(2).all(|w| w[0] < w[1]));
        }
    }
    let _ = decode::<NameRequest>("Get", body);
    let _ = decode::<MountRequest>("Mount", body);
});
