//! The test network's hosts: network namespaces with their own addresses on a bridge
//! the cluster listens on (`integration/testnet`), and cutting a host off it.

use std::process::Command;

/// The test network's hosts, if `integration/test` could make one (network namespaces
/// with their own addresses on a bridge the cluster listens on).
pub struct TestNet {
    pub ns: Vec<String>,
    pub addr: Vec<String>,
    pub link: Vec<String>,
}

pub fn testnet() -> Option<TestNet> {
    let get = |k: &str| std::env::var(k).ok();
    let mut net = TestNet {
        ns: Vec::new(),
        addr: Vec::new(),
        link: Vec::new(),
    };
    for h in ["A", "B"] {
        net.ns.push(get(&format!("TESTNET_NS_{h}"))?);
        net.addr.push(get(&format!("TESTNET_ADDR_{h}"))?);
        net.link.push(get(&format!("TESTNET_LINK_{h}"))?);
    }
    Some(net)
}

/// Sets a host's link on the bridge up or down (a network partition).
pub fn set_link(link: &str, up: bool) {
    let st = Command::new("timeout")
        .args([
            "-k",
            "2",
            "20",
            "ip",
            "link",
            "set",
            link,
            if up { "up" } else { "down" },
        ])
        .status()
        .unwrap();
    assert!(st.success(), "ip link set {link}");
}
