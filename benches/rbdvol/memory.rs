//! Owns figure 6's many-volume part: 50 volumes mounted at once through the main
//! daemon, and what they cost in resident memory (every exporter plus the daemon).

use crate::plugin::{mount_id, Plugin};
use crate::util::{rss_kib, Holder, R};

/// Volumes mounted at once (issue 16).
pub const VOLUMES: usize = 50;

/// RSS in KiB while `VOLUMES` volumes are mounted.
pub struct Many {
    pub exporters: u64,
    /// The exporters' anonymous memory alone (RssAnon): RSS also counts the shared
    /// library and binary pages, which all exporters share.
    pub anon: u64,
    /// The exporters' proportional set size (shared pages divided among sharers).
    pub pss: u64,
    pub largest: u64,
    pub daemon: u64,
}

fn name(i: usize) -> String {
    format!("mem-{i:02}")
}

/// Creates and mounts the volumes, measures, then unmounts and removes them whatever
/// happened.
pub fn many(main: &Plugin) -> R<Many> {
    let result = measure(main);
    if let Ok(mut conn) = main.conn() {
        for i in 0..VOLUMES {
            let _ = conn.unmount(&name(i), &mount_id(1));
            let _ = conn.remove(&name(i));
        }
    }
    result
}

fn measure(main: &Plugin) -> R<Many> {
    let mut conn = main.conn()?;
    let mut pids = Vec::new();
    // Mounting them all takes longer than `map.orphan_grace`.
    let mut containers = Vec::new();
    for i in 0..VOLUMES {
        conn.create(&name(i), "64M")?;
        let mp = conn.mount(&name(i), &mount_id(1))?;
        containers.push(Holder::new(&mp, &main.dir.join("holders").join(name(i)))?);
        pids.push(main.exporter_pid("rbd", &name(i))?);
    }
    // Let the exporters settle (watch registered, first watchdog round done).
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (mut exporters, mut largest, mut anon, mut pss) = (0, 0, 0, 0);
    for pid in pids {
        let (rss, _) = rss_kib(pid)?;
        exporters += rss;
        largest = largest.max(rss);
        anon += kib_field(&format!("/proc/{pid}/status"), "RssAnon:")?;
        pss += kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")?;
    }
    let (daemon, _) = main.rss()?;
    Ok(Many {
        exporters,
        anon,
        pss,
        largest,
        daemon,
    })
}

/// One "Name:   123 kB" field of a /proc file, in KiB.
pub fn kib_field(path: &str, key: &str) -> R<u64> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in {path}"))
}
