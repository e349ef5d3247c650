//! Owns figure 4, concurrency: 64 concurrent Mount/Unmount pairs (distinct mount IDs,
//! one connection each, released together by a barrier) across 16 volumes and across
//! 1 volume: throughput, errors and latencies; and the proof that different volumes do
//! not serialise: 16 cold Mounts of 16 volumes at once against one volume's cold Mount.

use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use crate::common::mounts_under;
use crate::plugin::{mount_id, Plugin};
use crate::report::Section;
use crate::util::{fmt_mp, fmt_ratio, fmt_s, Ctx, Env, Samples, R};

const VOLUMES: usize = 16;
const PAIRS: usize = 64;

#[derive(Default)]
struct Burst {
    wall: Duration,
    mount: Samples,
    unmount: Samples,
    errors: Vec<String>,
}

/// `jobs` threads, each with its own connection, released at once; job j runs `f(j)`
/// with its connection. Returns the wall time from release to the last job's end.
fn burst(
    main: &Plugin,
    jobs: usize,
    f: impl Fn(usize, &mut crate::plugin::Conn, &Mutex<Burst>) + Sync,
) -> R<Burst> {
    let out = Mutex::new(Burst::default());
    let barrier = Barrier::new(jobs + 1);
    let mut conns = Vec::new();
    for _ in 0..jobs {
        conns.push(main.conn()?);
    }
    let wall = std::thread::scope(|s| {
        for (j, mut c) in conns.into_iter().enumerate() {
            let (barrier, out, f) = (&barrier, &out, &f);
            s.spawn(move || {
                barrier.wait();
                f(j, &mut c, out);
            });
        }
        barrier.wait();
        Instant::now()
    });
    let mut b = out.into_inner().unwrap_or_else(|e| e.into_inner());
    b.wall = wall.elapsed();
    Ok(b)
}

fn timed_mount(c: &mut crate::plugin::Conn, name: &str, id: &str, out: &Mutex<Burst>) -> bool {
    let t = Instant::now();
    let r = c.mount(name, id);
    let d = t.elapsed();
    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
    match r {
        Ok(_) => {
            o.mount.push_dur(d);
            true
        }
        Err(e) => {
            o.errors.push(format!("Mount {name}: {e}"));
            false
        }
    }
}

fn timed_unmount(c: &mut crate::plugin::Conn, name: &str, id: &str, out: &Mutex<Burst>) {
    let t = Instant::now();
    let r = c.unmount(name, id);
    let d = t.elapsed();
    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
    match r {
        Ok(()) => o.unmount.push_dur(d),
        Err(e) => o.errors.push(format!("Unmount {name}: {e}")),
    }
}

/// Machine-wide (busy, total) jiffies from /proc/stat, for CPU use during a burst.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The outcome of Mounting other volumes while one volume's Mount is stuck.
struct Stuck {
    /// How long the stuck Mount waited (until the other host released the volume).
    waited: Duration,
    /// Mount latencies of other volumes meanwhile.
    during: Samples,
    /// Whether the stuck Mount was still waiting when all of them had finished.
    still_waiting: bool,
}

/// Host `holder` keeps volume `held` mounted, so the main daemon's Mount of it waits
/// for the lock; meanwhile the main daemon mounts and unmounts other volumes. Then the
/// holder releases and the stuck Mount completes (a clean hand-over).
fn stuck_volume(env: &Env, main: &Plugin, others: &[String]) -> R<Stuck> {
    let held = "cc-held";
    let holder = Plugin::start(env, "cc-holder", &["rbd"], &[])?;
    let mut hc = holder.conn()?;
    hc.create(held, "256M")?;
    hc.mount(held, &mount_id(1))?;
    let out = std::thread::scope(|s| -> R<Stuck> {
        let waiting = s.spawn(|| -> R<Duration> {
            let t = Instant::now();
            main.conn()?.mount(held, &mount_id(2))?;
            Ok(t.elapsed())
        });
        // Long enough for it to have looked the volume up and started its exporter.
        std::thread::sleep(Duration::from_millis(500));
        let mut c = main.conn()?;
        let mut during = Samples::default();
        for (i, name) in others.iter().enumerate() {
            let id = mount_id(50_000 + i as u64);
            let t = Instant::now();
            c.mount(name, &id)?;
            during.push_dur(t.elapsed());
            c.unmount(name, &id)?;
        }
        let still_waiting = !waiting.is_finished();
        hc.unmount(held, &mount_id(1))?;
        let waited = waiting
            .join()
            .map_err(|_| "the stuck Mount's thread panicked".to_string())??;
        Ok(Stuck {
            waited,
            during,
            still_waiting,
        })
    });
    let mut c = main.conn()?;
    let _ = c.unmount(held, &mount_id(2));
    let _ = c.remove(held);
    out
}

/// Mounts left under the daemon's mount root: after a burst there must be none.
fn leftovers(main: &Plugin) -> Vec<String> {
    mounts_under(&main.dir.join("mounts"))
        .iter()
        .map(|m| format!("still mounted: {m}"))
        .collect()
}

fn merge(into: &mut Burst, b: Burst) {
    into.wall += b.wall;
    into.mount.0.extend(b.mount.0);
    into.unmount.0.extend(b.unmount.0);
    into.errors.extend(b.errors);
}

pub fn run(env: &Env, main: &Plugin, sec: &mut Section) -> R<()> {
    let names: Vec<String> = (0..VOLUMES).map(|i| format!("cc-{i}")).collect();
    let result = measure(env, main, sec, &names);
    if result.is_err() {
        // Best effort, to free the cluster's RAM; whatever is still mounted goes when
        // the main daemon is torn down.
        if let Ok(mut c) = main.conn() {
            for n in &names {
                let _ = c.remove(n);
            }
        }
    }
    result
}

fn measure(env: &Env, main: &Plugin, sec: &mut Section, names: &[String]) -> R<()> {
    let rounds = env.pick(1, 3);
    let singles = env.pick(3, 5);
    let mut conn = main.conn()?;
    for n in names {
        conn.create(n, "256M")?;
        // Formatted once, so every Mount below is a cold re-mount (map + fsck + mount).
        conn.mount(n, &mount_id(9999))
            .ctx(format!("formatting {n}"))?;
        conn.unmount(n, &mount_id(9999))?;
    }

    // One volume alone, sequentially: the unit a serialising plugin would add up.
    let mut single = Samples::default();
    for i in 0..singles {
        let t = Instant::now();
        conn.mount(&names[0], &mount_id(i as u64))?;
        single.push_dur(t.elapsed());
        conn.unmount(&names[0], &mount_id(i as u64))?;
    }

    // A Mount stuck on one volume must not hold up Mounts of the others.
    let stuck = stuck_volume(env, main, &names[..8]).ctx("mounting while one volume is stuck")?;

    // 16 cold Mounts of 16 different volumes at once.
    let cpu0 = cpu_jiffies();
    let mut parallel = Burst::default();
    let mut parallel_unmount = Samples::default();
    for round in 0..rounds {
        let id = mount_id(10_000 + round as u64);
        let b = burst(main, VOLUMES, |j, c, out| {
            timed_mount(c, &names[j], &id, out);
        })?;
        merge(&mut parallel, b);
        let u = burst(main, VOLUMES, |j, c, out| {
            timed_unmount(c, &names[j], &id, out);
        })?;
        parallel_unmount.push_dur(u.wall);
        parallel.errors.extend(u.errors);
        parallel.errors.extend(leftovers(main));
    }
    let per_round_wall = parallel.wall.as_secs_f64() / rounds as f64;
    let cpu1 = cpu_jiffies();
    let busy = (cpu1.0 - cpu0.0) as f64 / (cpu1.1 - cpu0.1).max(1) as f64;

    // 64 Mount/Unmount pairs: across 16 volumes, then all on 1 volume.
    let mut spread = Burst::default();
    let mut one = Burst::default();
    let mut spread_walls = Samples::default();
    let mut one_walls = Samples::default();
    for round in 0..rounds {
        for (target, walls, vols) in [
            (&mut spread, &mut spread_walls, VOLUMES),
            (&mut one, &mut one_walls, 1),
        ] {
            let b = burst(main, PAIRS, |j, c, out| {
                let name = &names[j % vols];
                let id = mount_id(100_000 * (round as u64 + 1) + j as u64);
                if timed_mount(c, name, &id, out) {
                    timed_unmount(c, name, &id, out);
                }
            })?;
            walls.push_dur(b.wall);
            merge(target, b);
            target.errors.extend(leftovers(main));
        }
    }
    for n in names {
        conn.remove(n)?;
    }

    let t1 = single.median();
    let serial = VOLUMES as f64 * t1;
    let speedup = serial / per_round_wall;
    sec.para(&format!(
        "{VOLUMES} volumes of 256 MiB, formatted beforehand, so every first reference is a cold \
         re-mount (exporter + loop device + `e2fsck -p` + mount) and every last Unmount unmaps. \
         Each concurrent request has its own connection; all are released at once by a barrier. \
         {rounds} round(s) of each burst; walls are per round."
    ));
    sec.table(
        &[
            "burst",
            "wall (median / p99 over rounds)",
            "throughput",
            "Mount latency",
            "Unmount latency",
            "errors",
        ],
        &[
            vec![
                format!("{PAIRS} Mount/Unmount pairs across {VOLUMES} volumes"),
                fmt_mp(&spread_walls),
                format!("{:.1} pairs/s", PAIRS as f64 / spread_walls.median()),
                fmt_mp(&spread.mount),
                fmt_mp(&spread.unmount),
                spread.errors.len().to_string(),
            ],
            vec![
                format!("{PAIRS} Mount/Unmount pairs on 1 volume (distinct IDs)"),
                fmt_mp(&one_walls),
                format!("{:.1} pairs/s", PAIRS as f64 / one_walls.median()),
                fmt_mp(&one.mount),
                fmt_mp(&one.unmount),
                one.errors.len().to_string(),
            ],
            vec![
                format!("{VOLUMES} cold Mounts of {VOLUMES} volumes at once"),
                fmt_s(per_round_wall),
                format!("{:.1} mounts/s", VOLUMES as f64 / per_round_wall),
                fmt_mp(&parallel.mount),
                format!(
                    "(all {VOLUMES} Unmounts at once: {} wall)",
                    fmt_s(parallel_unmount.median())
                ),
                parallel.errors.len().to_string(),
            ],
        ],
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    sec.para(&format!(
        "**A stuck volume does not hold up the others.** Another host kept volume `cc-held` \
         mounted, so the daemon's Mount of it had to wait for the lock; it waited {} and \
         completed once that host released the volume. While it waited, the daemon mounted and \
         unmounted {} other volumes one after another: their Mounts took {} (median / p99), \
         against {} for one volume's cold Mount with nothing else going on ({singles} samples). \
         The stuck Mount was {} when they had all finished.",
        fmt_s(stuck.waited.as_secs_f64()),
        stuck.during.0.len(),
        fmt_mp(&stuck.during),
        fmt_s(t1),
        if stuck.still_waiting {
            "still waiting"
        } else {
            "already done"
        },
    ));
    sec.para(&format!(
        "**Wall time.** {VOLUMES} cold Mounts of {VOLUMES} volumes at once took {} per round, \
         against {VOLUMES} × one cold Mount = {} if they had run one after another: {} the \
         serial time, about {:.1} Mounts' worth of work at once. The machine's {cores} cores \
         were {:.0} % busy during these bursts (all processes, from /proc/stat): every cold \
         Mount starts an exporter process that connects to the cluster and runs losetup, \
         e2fsck and mount, and one mon and one OSD serve them all.",
        fmt_s(per_round_wall),
        fmt_s(serial),
        fmt_ratio(per_round_wall / serial),
        speedup,
        busy * 100.0
    ));
    let all_errors: Vec<&String> = spread
        .errors
        .iter()
        .chain(one.errors.iter())
        .chain(parallel.errors.iter())
        .collect();
    if !all_errors.is_empty() {
        let shown: Vec<String> = all_errors
            .iter()
            .take(5)
            .map(|e| format!("- `{}`", e.replace('`', "'")))
            .collect();
        sec.para(&format!("First errors:\n\n{}", shown.join("\n")));
    }
    let errors = all_errors.len();
    sec.target(
        "64 concurrent Mount/Unmount pairs (16 volumes and 1 volume): 0 errors",
        format!("{errors} errors"),
        errors == 0,
        if errors == 0 {
            "Every request succeeded and nothing stayed mounted afterwards.".into()
        } else {
            "See the errors listed in the section.".into()
        },
    );
    let normal = stuck.during.median() <= 2.0 * t1;
    let met = stuck.still_waiting && normal;
    sec.target(
        "different volumes do not serialise behind each other (other volumes' Mounts complete, \
         at ≤ 2× their solo latency, while one volume's Mount waits)",
        format!(
            "{} during a {} wait, vs {} alone",
            fmt_s(stuck.during.median()),
            fmt_s(stuck.waited.as_secs_f64()),
            fmt_s(t1)
        ),
        met,
        if met {
            format!(
                "Mount and Unmount are serialised per volume only. Concurrent Mounts of different \
                 volumes overlap too ({:.1}× faster than serial), as far as the CPU allows.",
                speedup
            )
        } else if !stuck.still_waiting {
            "The stuck Mount finished before the others did, so this run proves nothing either way."
                .into()
        } else {
            "Mounts of other volumes were slowed down while one volume's Mount waited.".into()
        },
    );
    Ok(())
}
