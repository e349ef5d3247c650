//! Owns figure 1, the control plane: Create, Get, List and Remove through the plugin
//! socket, against (a) the floor, the same librbd work done with rbdvol's own
//! `ceph::images` functions on an already open connection, and (b) a fresh `rbd` CLI
//! process per call, the way most RBD plugins work. The three run interleaved (the
//! order rotates every iteration) so drift in the cluster hits them alike.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use rbdvol::ceph::images::{self, Disposal};
use rbdvol::ceph::sys::Rados;
use rbdvol::config::VolumeDefaults;
use rbdvol::volume::options::VolumeOptions;

use crate::plugin::{Conn, Plugin};
use crate::report::Section;
use crate::util::{fmt_mp, fmt_ratio, fmt_s, rbd_argv, run_ok, Ctx, Env, Samples, R};

const POOL: &str = "rbd";
const SIZE: &str = "1G";
const CLI_DEADLINE: Duration = Duration::from_secs(60);
const OPS: [&str; 4] = ["Create", "Get", "List", "Remove"];

#[derive(Default)]
struct Table {
    plugin: BTreeMap<&'static str, Samples>,
    floor: BTreeMap<&'static str, Samples>,
    cli: BTreeMap<&'static str, Samples>,
}

fn t<T>(into: &mut Samples, f: impl FnOnce() -> R<T>) -> R<T> {
    let start = Instant::now();
    let v = f()?;
    into.push_dur(start.elapsed());
    Ok(v)
}

fn plugin_cycle(c: &mut Conn, name: &str, s: &mut BTreeMap<&'static str, Samples>) -> R<()> {
    t(s.entry("Create").or_default(), || c.create(name, SIZE))?;
    let v = t(s.entry("Get").or_default(), || c.get(name))?;
    if v["Volume"]["Name"] != name {
        return Err(format!("Get {name} answered {v}"));
    }
    let l = t(s.entry("List").or_default(), || c.list())?;
    if !l.iter().any(|n| n == name) {
        return Err(format!("List lacks {name}"));
    }
    t(s.entry("Remove").or_default(), || c.remove(name))
}

/// What the daemon's Create writes, from its own option parser.
fn create_parts(
    name: &str,
    size: &str,
) -> R<(rbdvol::ceph::sys::CreateSpec, Vec<(String, String)>)> {
    let mut opts = BTreeMap::new();
    opts.insert("size".to_string(), size.to_string());
    let wanted = VolumeOptions::parse(&opts, &VolumeDefaults::default(), &[POOL.to_string()])
        .map_err(|e| format!("parsing options for {name}: {e}"))?;
    let created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let meta = wanted.to_meta("bench-floor", &created_at);
    Ok((wanted.create_spec(), meta))
}

/// The daemon's Create, in librbd terms: look the name up (absent), create, write
/// the metadata.
pub fn floor_create_sized(r: &Rados, name: &str, size: &str) -> R<()> {
    let (spec, meta) = create_parts(name, size)?;
    if images::describe(r, POOL, name)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err(format!("{name} exists already"));
    }
    images::create(r, POOL, name, &spec, &meta)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn floor_create(r: &Rados, name: &str) -> R<()> {
    floor_create_sized(r, name, SIZE)
}

fn floor_remove(r: &Rados, name: &str, how: Disposal) -> R<()> {
    // The same single call the daemon's Remove makes.
    images::remove(r, &[POOL.to_string()], name, how).map_err(|e| e.to_string())
}

fn floor_cycle(r: &Rados, name: &str, s: &mut BTreeMap<&'static str, Samples>) -> R<()> {
    t(s.entry("Create").or_default(), || floor_create(r, name))?;
    let f = t(s.entry("Get").or_default(), || {
        images::describe(r, POOL, name).map_err(|e| e.to_string())
    })?;
    if f.is_none() {
        return Err(format!("describe {name}: absent"));
    }
    let l = t(s.entry("List").or_default(), || {
        images::list(r, POOL, 1024).map_err(|e| e.to_string())
    })?;
    if !l.iter().any(|n| n == name) {
        return Err(format!("list lacks {name}"));
    }
    t(s.entry("Remove").or_default(), || {
        floor_remove(r, name, Disposal::Delete)
    })
}

fn cli_cycle(env: &Env, name: &str, s: &mut BTreeMap<&'static str, Samples>) -> R<()> {
    let img = format!("{POOL}/{name}");
    let create = [
        "create",
        "--size",
        SIZE,
        "--image-feature",
        "layering",
        "--image-feature",
        "exclusive-lock",
        &img,
    ];
    t(s.entry("Create").or_default(), || {
        run_ok(&rbd_argv(env, &create), CLI_DEADLINE)
    })?;
    t(s.entry("Get").or_default(), || {
        run_ok(&rbd_argv(env, &["info", &img]), CLI_DEADLINE)
    })?;
    let l = t(s.entry("List").or_default(), || {
        run_ok(&rbd_argv(env, &["ls", "-p", POOL]), CLI_DEADLINE)
    })?;
    if !l.stdout.lines().any(|n| n == name) {
        return Err(format!("rbd ls lacks {name}"));
    }
    t(s.entry("Remove").or_default(), || {
        run_ok(&rbd_argv(env, &["rm", "--no-progress", &img]), CLI_DEADLINE)
    })
    .map(drop)
}

pub fn run(env: &Env, main: &Plugin, sec: &mut Section) -> R<()> {
    let n = env.pick(20, 100);
    let rados = env.connect()?;
    let mut conn = main.conn()?;
    // A second host with the default remove policy (trash), for the extra Remove row.
    let trash = Plugin::start(env, "cp-trash", &[POOL], &[])?;
    let mut tconn = trash.conn()?;
    let mut tab = Table::default();
    let mut trash_plugin = Samples::default();
    let mut trash_floor = Samples::default();
    // Iteration 0 warms every path up (first connection, page cache) and is not kept.
    for i in 0..=n {
        let mut it = Table::default();
        for k in 0..3 {
            let name = format!("cp-{i}-{k}");
            match (i + k) % 3 {
                0 => plugin_cycle(&mut conn, &name, &mut it.plugin).ctx("plugin")?,
                1 => floor_cycle(&rados, &name, &mut it.floor).ctx("floor")?,
                _ => cli_cycle(env, &name, &mut it.cli).ctx("rbd CLI")?,
            }
        }
        let name = format!("cp-trash-{i}");
        floor_create(&rados, &name)?;
        let start = Instant::now();
        tconn.remove(&name)?;
        let tp = start.elapsed();
        floor_create(&rados, &name)?;
        let start = Instant::now();
        floor_remove(
            &rados,
            &name,
            Disposal::Trash(Duration::from_secs(7 * 24 * 3600)),
        )?;
        let tf = start.elapsed();
        if i == 0 {
            continue;
        }
        trash_plugin.push_dur(tp);
        trash_floor.push_dur(tf);
        for (from, into) in [
            (it.plugin, &mut tab.plugin),
            (it.floor, &mut tab.floor),
            (it.cli, &mut tab.cli),
        ] {
            for (op, v) in from {
                into.entry(op).or_default().0.extend(v.0);
            }
        }
    }

    sec.para(&format!(
        "{n} iterations (plus one warm-up, not counted); each makes a fresh 1 GiB volume \
         (`layering,exclusive-lock`, the plugin's defaults) through each path in turn and runs \
         Create, Get, List and Remove on it. Plugin: one keep-alive connection to the real \
         daemon's socket, requests shaped like dockerd's; the daemon runs with \
         `remove.policy = delete`, so all three paths delete. Floor: the same librbd calls the \
         daemon makes (`ceph::images::describe` + `create` with the same metadata, `describe`, \
         `list`, `remove`) on an already open connection, in this process. CLI: one \
         fresh process per call: `rbd create --size 1G --image-feature layering --image-feature \
         exclusive-lock`, `rbd info`, `rbd ls`, `rbd rm`. The pool holds only the volume under test. \
         Note that the plugin's (and the floor's) Create does more than `rbd create`: it first \
         looks the name up and then writes the volume's options as 8 image-metadata keys."
    ));
    let mut rows = Vec::new();
    for op in OPS {
        let (p, f, c) = (&tab.plugin[op], &tab.floor[op], &tab.cli[op]);
        rows.push(vec![
            op.to_string(),
            fmt_mp(p),
            fmt_mp(f),
            fmt_mp(c),
            fmt_ratio(p.median() / f.median()),
            fmt_ratio(c.median() / p.median()),
        ]);
    }
    rows.push(vec![
        "Remove to trash (default policy)".into(),
        fmt_mp(&trash_plugin),
        fmt_mp(&trash_floor),
        "–".into(),
        fmt_ratio(trash_plugin.median() / trash_floor.median()),
        "–".into(),
    ]);
    sec.table(
        &[
            "operation",
            "plugin",
            "librbd floor",
            "rbd CLI per call",
            "plugin ÷ floor",
            "CLI ÷ plugin",
        ],
        &rows,
    );
    for op in OPS {
        let (p, f) = (&tab.plugin[op], &tab.floor[op]);
        let r = p.median() / f.median();
        let extra = p.median() - f.median();
        sec.target(
            &format!("{op}: plugin ≤ 1.5× the librbd floor"),
            format!(
                "{} ({} vs {})",
                fmt_ratio(r),
                fmt_s(p.median()),
                fmt_s(f.median())
            ),
            r <= 1.5,
            if r <= 1.5 && extra <= 0.0 {
                "The plugin's own cost (HTTP, JSON, hand-off to a blocking thread) is lost in the noise of the librbd work.".into()
            } else if r <= 1.5 {
                format!(
                    "The plugin adds {} (HTTP, JSON, hand-off to a blocking thread) to the librbd work.",
                    fmt_s(extra)
                )
            } else {
                format!(
                    "The plugin adds {} to the floor's {}; the fixed per-request cost (HTTP, JSON, \
                     hand-off to a blocking thread) is large next to such a short librbd call.",
                    fmt_s(extra),
                    fmt_s(f.median())
                )
            },
        );
    }
    for op in OPS {
        let (p, c) = (&tab.plugin[op], &tab.cli[op]);
        let r = c.median() / p.median();
        sec.target(
            &format!("{op}: plugin ≥ 10× faster than a CLI process per call"),
            format!(
                "{} ({} vs {})",
                fmt_ratio(r),
                fmt_s(c.median()),
                fmt_s(p.median())
            ),
            r >= 10.0,
            if r >= 10.0 {
                "A CLI call pays process start and a fresh cluster connection every time; the plugin's connection is already open.".into()
            } else {
                format!(
                    "The work itself dominates here: the librbd floor alone takes {}, so even a \
                     zero-overhead plugin could be at most {} faster than the CLI's {}.",
                    fmt_s(tab.floor[op].median()),
                    fmt_ratio(c.median() / tab.floor[op].median()),
                    fmt_s(c.median())
                )
            },
        );
    }
    Ok(())
}
