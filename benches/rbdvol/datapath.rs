//! Owns figure 7, the data path through the userspace mapper: fio (O_DIRECT) on a file in
//! a volume mounted through the plugin (ext4 on a loop device on the exporter's FUSE
//! file, librbd underneath), against `rbd bench` on an image of the same size and
//! features (the librbd floor, with the exporter's `rbd_cache = false`). Same block
//! sizes, patterns and queue depths on both sides; runs alternate.
//! Also reports the exporter's RSS (for figure 6), idle and after the I/O.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::plugin::{mount_id, Plugin};
use crate::report::Section;
use crate::util::{
    fmt_mib_s, fmt_ratio, fmt_s, rbd_argv, rss_kib, run_ok, s, Env, Holder, Samples, R,
};

struct Test {
    label: &'static str,
    /// fio --rw and rbd bench --io-type.
    fio_rw: &'static str,
    rbd_type: &'static str,
    random: bool,
    bs: u64,
    qd: u32,
}

const TESTS: [Test; 8] = [
    Test {
        label: "sequential write, 1 MiB, QD1",
        fio_rw: "write",
        rbd_type: "write",
        random: false,
        bs: 1 << 20,
        qd: 1,
    },
    Test {
        label: "sequential read, 1 MiB, QD1",
        fio_rw: "read",
        rbd_type: "read",
        random: false,
        bs: 1 << 20,
        qd: 1,
    },
    Test {
        label: "random write, 4 KiB, QD1",
        fio_rw: "randwrite",
        rbd_type: "write",
        random: true,
        bs: 4096,
        qd: 1,
    },
    Test {
        label: "random read, 4 KiB, QD1",
        fio_rw: "randread",
        rbd_type: "read",
        random: true,
        bs: 4096,
        qd: 1,
    },
    Test {
        label: "random write, 4 KiB, QD16",
        fio_rw: "randwrite",
        rbd_type: "write",
        random: true,
        bs: 4096,
        qd: 16,
    },
    Test {
        label: "random read, 4 KiB, QD16",
        fio_rw: "randread",
        rbd_type: "read",
        random: true,
        bs: 4096,
        qd: 16,
    },
    Test {
        label: "random write, 4 KiB, QD64",
        fio_rw: "randwrite",
        rbd_type: "write",
        random: true,
        bs: 4096,
        qd: 64,
    },
    Test {
        label: "random read, 4 KiB, QD64",
        fio_rw: "randread",
        rbd_type: "read",
        random: true,
        bs: 4096,
        qd: 64,
    },
];

/// Bytes per second and (for fio) completion-latency p50/p99 in seconds.
struct Run {
    bw: f64,
    lat: Option<(f64, f64)>,
}

fn fio(file: &Path, size: u64, t: &Test, runtime: u64) -> R<Run> {
    let bs = t.bs.to_string();
    let size = size.to_string();
    let qd = t.qd.to_string();
    let rt = format!("{runtime}s");
    let mut argv = vec![
        "fio",
        "--name=bench",
        "--output-format=json",
        "--direct=1",
        "--filename",
        s(file),
        "--size",
        &size,
        "--bs",
        &bs,
        "--rw",
        t.fio_rw,
        "--iodepth",
        &qd,
        "--randrepeat=0",
    ];
    argv.push(if t.qd > 1 {
        "--ioengine=libaio"
    } else {
        "--ioengine=psync"
    });
    if t.random {
        argv.extend(["--time_based", "--runtime", &rt]);
    }
    if t.fio_rw.contains("write") {
        argv.push("--end_fsync=1");
    }
    let out = run_ok(&argv, Duration::from_secs(300))?;
    let v: Value =
        serde_json::from_str(&out.stdout).map_err(|e| format!("fio json: {e}: {}", out.stdout))?;
    let job = &v["jobs"][0];
    let side = if t.fio_rw.contains("write") {
        &job["write"]
    } else {
        &job["read"]
    };
    let bw = side["bw_bytes"].as_f64().ok_or("fio: no bw_bytes")?;
    let pct = &side["clat_ns"]["percentile"];
    let lat = match (pct["50.000000"].as_f64(), pct["99.000000"].as_f64()) {
        (Some(a), Some(b)) => Some((a / 1e9, b / 1e9)),
        _ => None,
    };
    Ok(Run { bw, lat })
}

fn rbd_bench(env: &Env, image: &str, t: &Test, total: u64) -> R<Run> {
    let bs = t.bs.to_string();
    let qd = t.qd.to_string();
    let total = total.to_string();
    let pattern = if t.random { "rand" } else { "seq" };
    let args = [
        "bench",
        "--io-type",
        t.rbd_type,
        "--io-size",
        &bs,
        "--io-threads",
        &qd,
        "--io-total",
        &total,
        "--io-pattern",
        pattern,
        "--rbd_cache=false",
        image,
    ];
    let out = run_ok(&rbd_argv(env, &args), Duration::from_secs(300))?;
    let last = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("elapsed:"))
        .ok_or_else(|| format!("rbd bench printed no summary: {}", out.stdout))?;
    let ops: f64 = last
        .split_whitespace()
        .skip_while(|w| *w != "ops/sec:")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("cannot read ops/sec from {last:?}"))?;
    Ok(Run {
        bw: ops * t.bs as f64,
        lat: None,
    })
}

/// Exporter RSS in KiB: (after mount, after the I/O, peak).
pub struct ExporterMem {
    pub idle: u64,
    pub after: u64,
    pub peak: u64,
}

pub fn run(env: &Env, main: &Plugin, sec: &mut Section) -> R<ExporterMem> {
    let (vol_size, label): (u64, &str) = env.pick((512 << 20, "512M"), (1 << 30, "1G"));
    let shown = if env.quick { "512 MiB" } else { "1 GiB" };
    let mut conn = main.conn()?;
    let rados = env.connect()?;
    conn.create(NAME, label)?;
    crate::control::floor_create_sized(&rados, FLOOR, label)?;
    let result = measure(env, main, sec, vol_size, shown);
    // Whatever happened: unmount, and free the cluster's RAM (memstore).
    let _ = conn.unmount(NAME, &mount_id(1));
    let _ = conn.remove(NAME);
    let _ = rados.pool("rbd").and_then(|p| p.remove_image(FLOOR));
    result
}

const NAME: &str = "dp";
/// The exporter's FUSE worker threads (src/export/mod.rs), for the report's explanation.
const WORKERS: usize = 16;

/// Issue 16's targets: each pattern at least 0.8× librbd, and 4 KiB random reads at
/// QD16 at least 3× QD1 wherever librbd itself scales that much.
fn targets(sec: &mut Section, medians: &[(f64, f64, f64)]) {
    for (t, &(fs, floor, p50)) in TESTS.iter().zip(medians) {
        let r = fs / floor;
        let why = if r >= 0.8 {
            "The extra kernel crossings cost less than a fifth.".to_string()
        } else if t.qd == 1 {
            format!(
                "At queue depth 1 every request waits for the whole chain; a fio request took \
                 {} (median), and the loop device, FUSE and the worker's reply add to librbd's \
                 own round trip.",
                fmt_s(p50)
            )
        } else {
            format!(
                "At QD{} requests are served side by side by the worker threads; the two \
                 CPUs of this machine are shared by fio, the kernel's loop and FUSE work, the \
                 exporter and the OSD, and `rbd bench` needs only the last two.",
                t.qd
            )
        };
        sec.target(
            &format!("{}: ≥ 0.8× `rbd bench`", t.label),
            format!("{} ({:.0} % of librbd)", fmt_ratio(r), r * 100.0),
            r >= 0.8,
            why,
        );
    }
    let find = |label: &str| {
        TESTS
            .iter()
            .position(|t| t.label == label)
            .map(|i| medians[i])
    };
    if let (Some(q1), Some(q16)) = (
        find("random read, 4 KiB, QD1"),
        find("random read, 4 KiB, QD16"),
    ) {
        let fs = q16.0 / q1.0;
        let floor = q16.1 / q1.1;
        let applies = floor >= 3.0;
        sec.target(
            "random read 4 KiB: QD16 ≥ 3× QD1 (where librbd scales ≥ 3×)",
            format!("{fs:.1}× (librbd {floor:.1}×)"),
            !applies || fs >= 3.0,
            if applies {
                format!("librbd scales {floor:.1}× on this cluster, so the target applies.")
            } else {
                format!(
                    "librbd itself scales only {floor:.1}× from QD1 to QD16 on this cluster \
                     (one memstore OSD, 2 CPUs), so the target does not apply; the mounted \
                     filesystem scales {fs:.1}×."
                )
            },
        );
    }
}
const FLOOR: &str = "dp-floor";

fn measure(
    env: &Env,
    main: &Plugin,
    sec: &mut Section,
    vol_size: u64,
    label: &str,
) -> R<ExporterMem> {
    let reps = env.pick(2, 4);
    let file_size = vol_size / 4 * 3;
    let runtime = env.pick(3, 6);
    let floor = &format!("rbd/{FLOOR}");
    let mp = main.conn()?.mount(NAME, &mount_id(1))?;
    let _container = Holder::new(&mp, &main.dir.join("holders").join(NAME))?;
    let exporter = main.exporter_pid("rbd", NAME)?;
    let (idle, _) = rss_kib(exporter)?;
    let file = mp.join("fio.dat");

    // Fill both sides once so that every read below reads written data: fio lays its
    // file out, rbd bench writes the whole image.
    fio(&file, file_size, &TESTS[0], runtime)?;
    rbd_bench(env, floor, &TESTS[0], vol_size)?;

    let mut rows = Vec::new();
    // (filesystem, floor, fio p50 latency) per test, in TESTS order.
    let mut medians = Vec::new();
    for t in &TESTS {
        let (mut fs_bw, mut floor_bw) = (Samples::default(), Samples::default());
        let (mut p50, mut p99) = (Samples::default(), Samples::default());
        // Random rbd bench runs are sized by count; aim for about `runtime` seconds,
        // from the first fio run's rate, so both sides run comparably long.
        let mut rand_total = 0;
        for _ in 0..reps {
            let f = fio(&file, file_size, t, runtime)?;
            fs_bw.push(f.bw);
            if let Some((a, b)) = f.lat {
                p50.push(a);
                p99.push(b);
            }
            if t.random && rand_total == 0 {
                let bytes = (f.bw * runtime as f64) as u64;
                rand_total = (bytes.clamp(t.bs * 2048, vol_size) / t.bs).max(1) * t.bs;
            }
            let total = if t.random {
                rand_total
            } else {
                file_size / t.bs * t.bs
            };
            floor_bw.push(rbd_bench(env, floor, t, total)?.bw);
        }
        let unit = |bw: f64| {
            if t.random {
                format!("{:.0} IOPS", bw / t.bs as f64)
            } else {
                fmt_mib_s(bw)
            }
        };
        rows.push(vec![
            t.label.to_string(),
            format!("{} / {}", unit(fs_bw.median()), unit(fs_bw.pct(1.0))),
            format!("{} / {}", unit(floor_bw.median()), unit(floor_bw.pct(1.0))),
            fmt_ratio(fs_bw.median() / floor_bw.median()),
            format!("{} / {}", fmt_s(p50.median()), fmt_s(p99.median())),
        ]);
        medians.push((fs_bw.median(), floor_bw.median(), p50.median()));
    }
    let (after, peak) = rss_kib(exporter)?;

    sec.para(&format!(
        "A {label} volume (ext4, mounted through the plugin: loop device → the exporter's FUSE \
         file → librbd with `rbd_cache = false`) holds a {} MiB fio file; `rbd bench` runs on a \
         {label} image with the same features and `--rbd_cache=false`. fio: `--direct=1`, \
         psync at QD1, libaio at QD16 and QD64, writes end with an fsync; random runs are {runtime} s \
         each, and `rbd bench` is given as many I/Os as fio managed in that time. Both sides \
         were filled once before timing, so reads read written data. {reps} runs per row, \
         alternating; throughput is given as median / worst run.",
        file_size >> 20
    ));
    sec.table(
        &[
            "pattern",
            "through the mounted filesystem",
            "librbd floor (`rbd bench`)",
            "filesystem ÷ floor",
            "fio completion latency p50 / p99 (medians over runs)",
        ],
        &rows,
    );
    sec.para(&format!(
        "Every I/O crosses the kernel twice more than `rbd bench` does (ext4 → loop device \
         with direct I/O → FUSE with asynchronous direct I/O → the exporter's {WORKERS} worker \
         threads, each in one blocking librbd call), and `rbd_cache` is off on both sides."
    ));
    targets(sec, &medians);
    Ok(ExporterMem { idle, after, peak })
}
