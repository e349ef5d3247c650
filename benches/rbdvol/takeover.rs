//! Owns figure 5, takeover after a dead host: host A mounts a volume and writes to it,
//! A's exporter (the process holding the image's lock) is SIGKILLed, and host B's Mount
//! is timed from the kill to its answer (B waits up to 60 s for the lock). Compared
//! with the cluster's watch timeout and with B's Mount of the same volume when free.
//! A is torn down after every trial: its filesystem, its loop devices, then its dead
//! FUSE mount.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::plugin::{mount_id, Plugin};
use crate::report::Section;
use crate::util::{fmt_mp, fmt_s, Ctx, Env, Samples, R};

pub fn run(env: &Env, sec: &mut Section) -> R<()> {
    let trials = env.pick(3, 10);
    let b = Plugin::start(
        env,
        "tk-b",
        &["rbd"],
        &[("RBDVOL_LOCK__TAKEOVER_WAIT", "60s")],
    )?;
    let mut bc = b.conn()?;
    let mut takeover = Samples::default();
    let mut free = Samples::default();
    for t in 0..trials {
        let ctx = format!("trial {t}");
        let name = format!("tk-{t}");
        bc.create(&name, "256M").ctx(&ctx)?;
        let a = Plugin::start(env, &format!("tk-a-{t}"), &["rbd"], &[])?;
        let mp = a.conn()?.mount(&name, &mount_id(1)).ctx(&ctx)?;
        let marker = mp.join("written-by-a");
        std::fs::write(&marker, b"acknowledged before the crash").ctx("writing on A")?;
        std::fs::File::open(&marker)
            .and_then(|f| f.sync_all())
            .ctx("fsync on A")?;
        let pid = a.exporter_pid("rbd", &name)?;
        // Let the dead holder's last watch ping land at a random point of the interval,
        // as a real crash would.
        std::thread::sleep(Duration::from_millis(137 * (t as u64 % 8)));
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).ctx("killing A's exporter")?;
        let t0 = Instant::now();
        let mp_b = bc.mount(&name, &mount_id(2)).ctx(&ctx)?;
        takeover.push_dur(t0.elapsed());
        let seen = std::fs::read_to_string(mp_b.join("written-by-a")).unwrap_or_default();
        if seen != "acknowledged before the crash" {
            return Err(format!(
                "{ctx}: B does not see A's acknowledged write ({seen:?})"
            ));
        }
        bc.unmount(&name, &mount_id(2)).ctx(&ctx)?;
        // A's leftovers go before anything else touches the volume.
        drop(a);
        let t0 = Instant::now();
        bc.mount(&name, &mount_id(3)).ctx(&ctx)?;
        free.push_dur(t0.elapsed());
        bc.unmount(&name, &mount_id(3)).ctx(&ctx)?;
        let mut removed = bc.remove(&name);
        for _ in 0..10 {
            if removed.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            removed = bc.remove(&name);
        }
        removed.ctx(format!("{ctx}: removing {name}"))?;
    }
    let wt = env.watch_timeout as f64;
    sec.para(&format!(
        "{trials} trials. Each: a fresh 256 MiB volume; host A (its own daemon, socket, state \
         dir, mount root and host id) mounts it, writes and fsyncs a file; A's exporter is \
         SIGKILLed at a varying point of the 1 s watch-ping interval; host B's Mount (takeover \
         wait 60 s) is timed from the kill to its answer, and B must see A's file. The cluster's \
         `osd client watch timeout` is {} s. Then B unmounts, A's leftovers are cleaned up \
         (its filesystem, its loop device, its dead FUSE mount) and B mounts the now free \
         volume again for comparison.",
        env.watch_timeout
    ));
    sec.table(
        &["", "median / p99", "÷ watch timeout (medians)"],
        &[
            vec![
                "B's Mount after A died (takeover)".into(),
                fmt_mp(&takeover),
                format!("{:.2}", takeover.median() / wt),
            ],
            vec![
                "B's Mount of the same volume when free".into(),
                fmt_mp(&free),
                format!("{:.2}", free.median() / wt),
            ],
            vec![
                "difference: waiting for the dead owner to be declared dead and fenced".into(),
                fmt_s(takeover.median() - free.median()),
                format!("{:.2}", (takeover.median() - free.median()) / wt),
            ],
        ],
    );
    sec.para(&format!(
        "No target is set for takeover. Expected: the dead owner's watch expires between \
         (watch timeout − 1 s ping) and the watch timeout after its last ping; B's librbd then \
         blocklists it and takes the lock, and B mounts (replaying A's journal), so about {} s \
         + a Mount. \
         Measured: {} median, {} p99.",
        env.watch_timeout,
        fmt_s(takeover.median()),
        fmt_s(takeover.p99())
    ));
    Ok(())
}
