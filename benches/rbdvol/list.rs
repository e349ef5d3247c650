//! Owns figure 2, List scaling: the dedicated pool `bench` is filled to 100, 1 000 and
//! 10 000 images (created through librbd on a few parallel connections), and at each
//! size List is timed through a daemon that serves only that pool, next to the librbd
//! floor (`ceph::images::list`) and `rbd ls`.

use std::time::{Duration, Instant};

use rbdvol::ceph::sys::{CreateSpec, Rados};

use crate::plugin::Plugin;
use crate::report::Section;
use crate::util::{fmt_kib, fmt_mp, fmt_ratio, fmt_s, rbd_argv, run_ok, Ctx, Env, Samples, R};

const POOL: &str = "bench";
const SCALES: [usize; 3] = [100, 1_000, 10_000];
const CONNECTIONS: usize = 4;

/// Creates images `from..to`; returns the time taken and how many creates were retried.
fn fill(env: &Env, from: usize, to: usize) -> R<(Duration, usize)> {
    let spec = CreateSpec {
        size: 1 << 30,
        features: 1 | 4,
        order: None,
        data_pool: None,
    };
    let started = Instant::now();
    let names: Vec<String> = (from..to).map(|i| format!("ls-{i:05}")).collect();
    let chunk = names.len().div_ceil(CONNECTIONS).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = names
            .chunks(chunk)
            .map(|part| {
                let spec = &spec;
                s.spawn(move || -> R<usize> {
                    let settings = env.ceph_settings(&[POOL]);
                    let r = Rados::connect(&rbdvol::ceph::connect_spec(&settings))
                        .map_err(|(st, e)| format!("{st}: {}", e.describe()))?;
                    let pool = r.pool(POOL).map_err(|e| e.describe())?;
                    let mut retried = 0;
                    for n in part {
                        // Filling is set-up, not a measurement: a transient error (seen
                        // once as EBADF under heavy load) is retried; EEXIST on a retry
                        // means the first attempt had succeeded.
                        let mut attempt = 0;
                        loop {
                            match pool.create_image(n, spec) {
                                Ok(()) => break,
                                Err(e) if attempt > 0 && e.0 == libc::EEXIST => break,
                                Err(e) if attempt < 5 => {
                                    attempt += 1;
                                    retried += 1;
                                    eprintln!("bench: creating {n}: {}; retrying", e.describe());
                                    std::thread::sleep(Duration::from_millis(200));
                                }
                                Err(e) => return Err(format!("creating {n}: {}", e.describe())),
                            }
                        }
                    }
                    Ok(retried)
                })
            })
            .collect();
        let mut retried = 0;
        for w in workers {
            retried += w
                .join()
                .map_err(|_| "a filler thread panicked".to_string())??;
        }
        Ok::<usize, String>(retried)
    })
    .map(|retried| (started.elapsed(), retried))
}

pub fn run(env: &Env, sec: &mut Section) -> R<()> {
    let samples = env.pick(15, 50);
    let cli_samples = env.pick(5, 15);
    let d = Plugin::start(env, "list", &[POOL], &[])?;
    let mut conn = d.conn()?;
    let rados = env.connect()?;
    let mut rows = Vec::new();
    let mut have = 0;
    let mut fill_notes = Vec::new();
    let mut ten_k = None;
    for &scale in &SCALES {
        let (took, retried) =
            fill(env, have, scale).ctx(format!("filling pool {POOL} to {scale}"))?;
        fill_notes.push(format!(
            "{} → {} in {:.1} s{}",
            have,
            scale,
            took.as_secs_f64(),
            if retried > 0 {
                format!(" ({retried} creates retried after a transient error)")
            } else {
                String::new()
            }
        ));
        have = scale;
        // One unrecorded call each, so the daemon's listing hint has seen this size.
        let got = conn.list()?;
        if got.len() != scale {
            return Err(format!(
                "List returned {} volumes, expected {scale}",
                got.len()
            ));
        }
        let (mut p, mut f, mut c) = (Samples::default(), Samples::default(), Samples::default());
        let hint = scale + 64;
        for i in 0..samples {
            let t = Instant::now();
            let got = conn.list()?;
            p.push_dur(t.elapsed());
            if got.len() != scale {
                return Err(format!(
                    "List returned {} volumes, expected {scale}",
                    got.len()
                ));
            }
            let t = Instant::now();
            let names =
                rbdvol::ceph::images::list(&rados, POOL, hint).map_err(|e| e.to_string())?;
            f.push_dur(t.elapsed());
            if names.len() != scale {
                return Err(format!("librbd listed {}, expected {scale}", names.len()));
            }
            if i < cli_samples {
                let t = Instant::now();
                let out = run_ok(&rbd_argv(env, &["ls", "-p", POOL]), Duration::from_secs(60))?;
                c.push_dur(t.elapsed());
                if out.stdout.lines().count() != scale {
                    return Err(format!(
                        "rbd ls printed {} lines",
                        out.stdout.lines().count()
                    ));
                }
            }
        }
        rows.push(vec![
            format!("{scale}"),
            fmt_mp(&p),
            fmt_mp(&f),
            fmt_mp(&c),
            fmt_ratio(p.median() / f.median()),
        ]);
        if scale == 10_000 {
            ten_k = Some(p);
        }
    }
    let (rss, hwm) = d.rss()?;
    sec.para(&format!(
        "Pool `{POOL}` holds only these images (1 GiB, `layering,exclusive-lock`, created through \
         librbd on {CONNECTIONS} connections: {}). A daemon serving only that pool answers List over \
         one keep-alive connection; every answer is checked to hold exactly the expected number \
         of volumes. {samples} plugin and floor samples and {cli_samples} `rbd ls` samples per size.",
        fill_notes.join(", ")
    ));
    sec.table(
        &[
            "images in pool",
            "plugin List",
            "librbd floor (`rbd_list2`)",
            "`rbd ls` per call",
            "plugin ÷ floor",
        ],
        &rows,
    );
    sec.para(&format!(
        "The List daemon's RSS after these listings: {} (peak {}).",
        fmt_kib(rss),
        fmt_kib(hwm)
    ));
    let p = ten_k.ok_or("no 10 000 sample")?;
    let med = p.median();
    sec.target(
        "List of 10 000 volumes < 100 ms (median)",
        format!("{} (p99 {})", fmt_s(med), fmt_s(p.p99())),
        med < 0.1,
        if med < 0.1 {
            "One `rbd_list2` per pool and no per-image call.".into()
        } else {
            "The listing itself (see the floor column) or the response size dominates.".into()
        },
    );
    Ok(())
}
