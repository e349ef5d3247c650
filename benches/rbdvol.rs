//! The benchmark behind `integration/bench` (issue 6). Owns running every figure in one
//! process against one throwaway cluster and writing the markdown report: machine
//! details, median and p99 of every figure, the ratios, and each target MET or MISSED.
//!
//! Run by `integration/bench`, which brings the cluster up and sets:
//!   BENCH_CEPH_CONF      the cluster's ceph.conf
//!   BENCH_DIR            an empty directory of the run: every daemon, exporter, mount
//!                        and loop device of the benchmark lives below it (and its
//!                        teardown finds them by that path)
//!   BENCH_WATCH_TIMEOUT  the cluster's `osd client watch timeout` (s)
//!   BENCH_GIT_REV        optional: the source revision, for the report
//!
//!   cargo bench --bench rbdvol -- [--quick] --report FILE
//!
//! Without BENCH_CEPH_CONF it says so and does nothing (`cargo bench` alone, or a
//! `cargo test --all-targets`, must not fail for want of a cluster).

// The test fixtures (daemon client, host teardown), shared rather than copied.
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "rbdvol/concurrency.rs"]
mod concurrency;
#[path = "rbdvol/control.rs"]
mod control;
#[path = "rbdvol/datapath.rs"]
mod datapath;
#[path = "rbdvol/hand.rs"]
mod hand;
#[path = "rbdvol/list.rs"]
mod list;
#[path = "rbdvol/memory.rs"]
mod memory;
#[path = "rbdvol/mount.rs"]
mod mount;
#[path = "rbdvol/plugin.rs"]
mod plugin;
#[path = "rbdvol/report.rs"]
mod report;
#[path = "rbdvol/takeover.rs"]
mod takeover;
#[path = "rbdvol/util.rs"]
mod util;

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use plugin::Plugin;
use report::{Report, Section};
use util::{fmt_kib, run, Env, R};

fn first_line(argv: &[&str]) -> String {
    run(argv, std::time::Duration::from_secs(30))
        .ok()
        .map(|o| {
            let text = if o.stdout.trim().is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            text.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

fn machine_details(env: &Env, started: SystemTime) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let usable = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    let (a, b, c) = rbdvol::ceph::sys::librbd_version();
    let exe = env.exe.to_string_lossy().into_owned();
    let rev = std::env::var("BENCH_GIT_REV").unwrap_or_else(|_| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    vec![
        ("date (UTC)".into(), humantime::format_rfc3339_seconds(started).to_string()),
        (
            "mode".into(),
            if env.quick { "quick (`integration/bench --quick`)".into() } else { "full (`integration/bench`)".into() },
        ),
        ("CPU".into(), format!("{model}; {cpus} logical CPUs, {usable} usable by this process")),
        ("memory".into(), mem),
        ("kernel".into(), format!("{kernel} ({os})")),
        ("ceph".into(), format!("{}; librbd {a}.{b}.{c}", first_line(&["rbd", "--version"]))),
        ("cluster".into(), format!(
            "throwaway `integration/ceph-up --watch-timeout {} --pool bench`: 1 mon + 1 memstore OSD (RAM-backed) on 127.0.0.1, cephx, size-1 pools",
            env.watch_timeout
        )),
        ("rbdvol".into(), format!("{} (`{}` release build), source {rev}", first_line(&[exe.as_str(), "--version"]), "target/release/rbdvol")),
        ("mapper".into(), "userspace (`rbdvol export` FUSE file + loop device); this kernel has no rbd or nbd module".into()),
        ("fio".into(), first_line(&["fio", "--version"])),
        ("load average at start".into(), load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
    ]
}

struct Args {
    quick: bool,
    report: PathBuf,
    /// `--only 1,3`: run just these figures (for working on one figure).
    only: Option<Vec<u32>>,
}

fn parse_args() -> R<Args> {
    let mut quick = false;
    let mut report = None;
    let mut only = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--report" => report = Some(PathBuf::from(it.next().ok_or("--report needs a FILE")?)),
            "--only" => {
                let list = it.next().ok_or("--only needs figure numbers, e.g. 1,3")?;
                let nums: Result<Vec<u32>, _> = list.split(',').map(str::parse).collect();
                only = Some(nums.map_err(|e| format!("--only {list}: {e}"))?);
            }
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: -- [--quick] --report FILE"
                ))
            }
        }
    }
    Ok(Args {
        quick,
        report: report.ok_or("--report FILE is required")?,
        only,
    })
}

/// Runs one figure, recording its time and, if it fails, its error; never panics out.
fn figure<T>(
    report: &mut Report,
    path: &std::path::Path,
    title: &str,
    f: impl FnOnce(&mut Section) -> R<T>,
) -> Option<T> {
    let number = title.split('.').next().and_then(|n| n.parse::<u32>().ok());
    if let (Some(only), Some(n)) = (&report.only, number) {
        if !only.contains(&n) {
            return None;
        }
    }
    eprintln!("bench: {title} …");
    let started = Instant::now();
    let mut sec = Section::new(title);
    let load_at_start = report::load1();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut sec)));
    let value = match outcome {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            sec.failed = Some(e);
            None
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            sec.failed = Some(format!("panicked: {msg}"));
            None
        }
    };
    sec.took = started.elapsed();
    sec.load = (load_at_start, report::load1());
    match &sec.failed {
        Some(e) => eprintln!(
            "bench: {title} FAILED after {:.0} s: {e}",
            sec.took.as_secs_f64()
        ),
        None => eprintln!("bench: {title} done in {:.0} s", sec.took.as_secs_f64()),
    }
    report.sections.push(sec);
    if let Err(e) = report.write(path) {
        eprintln!("bench: {e}");
    }
    value
}

fn main() {
    let Some(conf) = std::env::var_os("BENCH_CEPH_CONF") else {
        eprintln!("rbdvol bench: BENCH_CEPH_CONF is not set, so nothing was measured. Run `integration/bench [--quick]`, which brings up a throwaway cluster and sets it.");
        return;
    };
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rbdvol bench: {e}");
            std::process::exit(2);
        }
    };
    let Some(dir) = std::env::var_os("BENCH_DIR") else {
        eprintln!("rbdvol bench: BENCH_DIR is not set");
        std::process::exit(2);
    };
    let env = Env {
        conf: PathBuf::from(conf),
        dir: PathBuf::from(dir),
        quick: args.quick,
        watch_timeout: std::env::var("BENCH_WATCH_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_rbdvol")),
    };
    let started_at = SystemTime::now();
    let started = Instant::now();
    let mut report = Report {
        details: machine_details(&env, started_at),
        sections: Vec::new(),
        only: args.only.clone(),
    };
    let path = args.report.clone();

    // The main "host": figures 1, 3, 4 and 7 run through it; its memory is figure 6.
    let main = match Plugin::start(
        &env,
        "main",
        &["rbd"],
        &[("RBDVOL_REMOVE__POLICY", "delete")],
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rbdvol bench: cannot start the daemon: {e}");
            std::process::exit(1);
        }
    };
    // Idle: started, connected (one List), nothing else.
    let idle = main
        .conn()
        .and_then(|mut c| c.list())
        .and_then(|_| main.rss());
    let idle_anon = memory::kib_field(&format!("/proc/{}/status", main.pid()), "RssAnon:");

    figure(&mut report, &path, "1. Control plane", |sec| {
        control::run(&env, &main, sec)
    });
    figure(&mut report, &path, "3. Mount path", |sec| {
        mount::run(&env, &main, sec)
    });
    figure(&mut report, &path, "4. Concurrency", |sec| {
        concurrency::run(&env, &main, sec)
    });
    let exporter = figure(
        &mut report,
        &path,
        "7. Data path (userspace mapper)",
        |sec| datapath::run(&env, &main, sec),
    );
    figure(&mut report, &path, "5. Takeover after a dead host", |sec| {
        takeover::run(&env, sec)
    });
    figure(&mut report, &path, "2. List scaling", |sec| {
        list::run(&env, sec)
    });
    figure(&mut report, &path, "6. Memory", |sec| {
        let (idle_rss, _) = idle.clone()?;
        let (rss, hwm) = main.rss()?;
        let mut rows = vec![
            vec![
                "daemon, idle (started, connected, one List)".into(),
                fmt_kib(idle_rss),
            ],
            vec![
                "daemon, after figures 1, 3, 4 and 7 (every volume unmounted again)".into(),
                fmt_kib(rss),
            ],
            vec![
                "daemon, peak (VmHWM) over the whole run".into(),
                fmt_kib(hwm),
            ],
        ];
        match &exporter {
            Some(x) => {
                rows.push(vec![
                    "one exporter (`rbdvol export`), just mounted".into(),
                    fmt_kib(x.idle),
                ]);
                rows.push(vec![
                    "the same exporter after figure 7's I/O".into(),
                    fmt_kib(x.after),
                ]);
                rows.push(vec![
                    "the same exporter, peak (VmHWM)".into(),
                    fmt_kib(x.peak),
                ]);
            }
            None => rows.push(vec![
                "one exporter".into(),
                "not measured (figure 7 failed)".into(),
            ]),
        }
        let many = memory::many(&main);
        match &many {
            Ok(m) => {
                rows.push(vec![
                    format!(
                        "{} volumes (64 MiB) mounted at once: all exporters",
                        memory::VOLUMES
                    ),
                    fmt_kib(m.exporters),
                ]);
                rows.push(vec![
                    "the same: all exporters, anonymous memory only (RssAnon) / proportional set size (Pss)".into(),
                    format!("{} / {}", fmt_kib(m.anon), fmt_kib(m.pss)),
                ]);
                rows.push(vec![
                    "the same: largest exporter".into(),
                    fmt_kib(m.largest),
                ]);
                rows.push(vec!["the same: the daemon".into(), fmt_kib(m.daemon)]);
            }
            Err(e) => rows.push(vec![
                format!("{} volumes mounted at once", memory::VOLUMES),
                format!("not measured: {e}"),
            ]),
        }
        sec.para("Resident set size from `/proc/PID/status` (VmRSS, VmHWM) of the main daemon, which served figures 1, 3, 4 and 7, of the exporter that served figure 7's volume, and of everything while 50 fresh 64 MiB volumes are mounted at once through the main daemon (each its own exporter, loop device and ext4). The List daemon's RSS is in figure 2.");
        sec.table(&["process", "RSS"], &rows);
        sec.target(
            "daemon idle RSS ≤ 30 MiB",
            fmt_kib(idle_rss),
            idle_rss <= 30 * 1024,
            match &idle_anon {
                Ok(anon) => format!("Only {} of it is the daemon's own (anonymous) memory; the other {} are pages of the rbdvol binary and of the Ceph libraries (libceph-common, librbd, librados, libcrypto) that librados touches when it starts, mapped from files and shared with every other process that uses them.", fmt_kib(*anon), fmt_kib(idle_rss.saturating_sub(*anon))),
                Err(e) => format!("Most of it is librados and librbd, not the daemon's own state (its anonymous memory could not be read: {e})."),
            },
        );
        if let Ok(m) = &many {
            let total = m.exporters + m.daemon;
            sec.target(
                "50 volumes mounted at once: ≤ 1 GiB RSS in total (exporters and daemon)",
                fmt_kib(total),
                total <= 1024 * 1024,
                format!("One exporter process per volume, each with its own librados client; the largest took {}. RSS counts the binary and librados/librbd pages in every process although they are shared: the exporters' own (anonymous) memory is {}, their proportional share {}.", fmt_kib(m.largest), fmt_kib(m.anon), fmt_kib(m.pss)),
            );
        }
        Ok(())
    });
    drop(main);

    report.details.push((
        "load average at end".into(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    ));
    report.details.push((
        "benchmark run time".into(),
        format!(
            "{:.0} s (without build and cluster start)",
            started.elapsed().as_secs_f64()
        ),
    ));
    // Figures in the order in the report, whatever order they ran in.
    report.sections.sort_by_key(|s| {
        s.title
            .split('.')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(99)
    });
    if let Err(e) = report.write(&path) {
        eprintln!("rbdvol bench: {e}");
        std::process::exit(1);
    }
    let failed = report
        .sections
        .iter()
        .filter(|s| s.failed.is_some())
        .count();
    eprintln!(
        "rbdvol bench: report written to {} ({failed} figure(s) failed)",
        path.display()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
