//! Owns figure 3, the mount path: the first Mount of a fresh volume (map + mkfs + mount)
//! at 1 GiB and 10 GiB, Unmount, and the re-Mount of the formatted volume, through the
//! plugin; against the same steps run by hand (`hand.rs`) on an image created with the
//! same features and metadata. Plugin and by-hand trials alternate.

use std::time::{Instant, SystemTime};

use crate::control::floor_create_sized;
use crate::hand;
use crate::plugin::{mount_id, Plugin};
use crate::report::Section;
use crate::util::{fmt_mp, fmt_s, Ctx, Env, Samples, R};

#[derive(Default)]
struct Size {
    first: Samples,
    unmount: Samples,
    remount: Samples,
    hand_first: Samples,
    hand_unmount: Samples,
    hand_remount: Samples,
    hand_remount_bare: Samples,
    hand_steps_first: [Samples; 5],
    hand_steps_re: [Samples; 5],
    /// From the daemon's log: request → exporter serving → mapped → mounted → answer.
    phases_first: [Samples; 4],
    phases_re: [Samples; 4],
}

const MARKS: [&str; 3] = ["exporter serving", "mapped", "mounted"];

/// Times one Mount request and splits it into phases by the daemon's log lines.
fn mount_phases(
    d: &Plugin,
    conn: &mut crate::plugin::Conn,
    name: &str,
    id: &str,
    total: &mut Samples,
    phases: &mut [Samples; 4],
) -> R<()> {
    let (w0, s) = (SystemTime::now(), Instant::now());
    conn.mount(name, id)?;
    total.push_dur(s.elapsed());
    let w1 = SystemTime::now();
    let marks = d.log_marks(name, &MARKS, w0, w1);
    if let [Some(a), Some(b), Some(c)] = marks[..] {
        let gap = |x: SystemTime, y: SystemTime| y.duration_since(x).unwrap_or_default();
        for (i, g) in [gap(w0, a), gap(a, b), gap(b, c), gap(c, w1)]
            .into_iter()
            .enumerate()
        {
            phases[i].push_dur(g);
        }
    }
    Ok(())
}

fn push_steps(into: &mut [Samples; 5], s: &hand::Steps) {
    for (i, d) in [s.export, s.losetup, s.blkid, s.format_or_check, s.mount]
        .into_iter()
        .enumerate()
    {
        into[i].push_dur(d);
    }
}

pub fn run(env: &Env, main: &Plugin, sec: &mut Section) -> R<()> {
    let trials = env.pick(3, 10);
    let rados = env.connect()?;
    let mut conn = main.conn()?;
    let sizes = [("1 GiB", "1G"), ("10 GiB", "10G")];
    let mut results: Vec<Size> = sizes.iter().map(|_| Size::default()).collect();
    let by_hand_dir = env.dir.join("by-hand");
    for t in 0..trials {
        for (k, (label, size)) in sizes.iter().enumerate() {
            let r = &mut results[k];
            let ctx = format!("{label}, trial {t}");
            // Plugin.
            let name = format!("mnt-{size}-{t}");
            conn.create(&name, size).ctx(&ctx)?;
            mount_phases(
                main,
                &mut conn,
                &name,
                &mount_id(1),
                &mut r.first,
                &mut r.phases_first,
            )
            .ctx(&ctx)?;
            let s = Instant::now();
            conn.unmount(&name, &mount_id(1)).ctx(&ctx)?;
            r.unmount.push_dur(s.elapsed());
            mount_phases(
                main,
                &mut conn,
                &name,
                &mount_id(2),
                &mut r.remount,
                &mut r.phases_re,
            )
            .ctx(&ctx)?;
            conn.unmount(&name, &mount_id(2)).ctx(&ctx)?;
            conn.remove(&name).ctx(&ctx)?;

            // By hand, on an image made exactly as the daemon's Create makes it.
            let name = format!("hand-{size}-{t}");
            floor_create_sized(&rados, &name, size).ctx(&ctx)?;
            let dir = by_hand_dir.join(&name);
            let (m, steps) = hand::mount(env, &dir, "rbd", &name, true).ctx(&ctx)?;
            r.hand_first.push_dur(steps.total());
            push_steps(&mut r.hand_steps_first, &steps);
            r.hand_unmount.push_dur(m.unmount().ctx(&ctx)?);
            let (m, steps) = hand::mount(env, &dir, "rbd", &name, false).ctx(&ctx)?;
            r.hand_remount.push_dur(steps.total());
            r.hand_remount_bare.push_dur(steps.bare());
            push_steps(&mut r.hand_steps_re, &steps);
            m.unmount().ctx(&ctx)?;
            let pool = rados.pool("rbd").map_err(|e| e.describe())?;
            pool.remove_image(&name)
                .map_err(|e| format!("removing {name}: {}", e.describe()))?;
        }
    }

    sec.para(&format!(
        "{trials} trials per size, plugin and by hand alternating; every volume is ext4 \
         (the default), created fresh for its trial and removed after it. Plugin times are one \
         Mount or Unmount request, from sending it to the answer. By hand runs the daemon's own \
         steps with nothing around them: `rbdvol export` (started by us, its state file polled \
         every 2 ms; the daemon polls every 5 ms), `losetup --find --show`, `blkid -p`, \
         `mkfs.ext4 -q -m0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1` (the daemon's \
         argv for a fresh image, from `host::fs::mkfs_argv`) or `e2fsck -p` on a re-mount, and \
         `mount -o rw`. The plugin also reads the image (Get-style describe) before mapping and \
         writes the `formatted`/`first-mapped` markers; by hand does neither."
    ));
    let mut rows = Vec::new();
    for (k, (label, ..)) in sizes.iter().enumerate() {
        let r = &results[k];
        rows.push(vec![
            format!("first Mount, {label}"),
            fmt_mp(&r.first),
            fmt_mp(&r.hand_first),
            format!(
                "{:+.0} %",
                (r.first.median() / r.hand_first.median() - 1.0) * 100.0
            ),
        ]);
        rows.push(vec![
            format!("re-Mount, {label}"),
            fmt_mp(&r.remount),
            fmt_mp(&r.hand_remount),
            format!(
                "{:+.0} %",
                (r.remount.median() / r.hand_remount.median() - 1.0) * 100.0
            ),
        ]);
        rows.push(vec![
            format!("Unmount, {label}"),
            fmt_mp(&r.unmount),
            fmt_mp(&r.hand_unmount),
            format!(
                "{:+.0} %",
                (r.unmount.median() / r.hand_unmount.median() - 1.0) * 100.0
            ),
        ]);
    }
    sec.table(
        &[
            "operation",
            "plugin",
            "same steps by hand",
            "plugin overhead (medians)",
        ],
        &rows,
    );
    let mut rows = Vec::new();
    for (k, (label, ..)) in sizes.iter().enumerate() {
        let r = &results[k];
        for (what, st, check) in [
            ("first", &r.hand_steps_first, "mkfs.ext4"),
            ("re-mount", &r.hand_steps_re, "e2fsck -p"),
        ] {
            rows.push(vec![
                format!("{what}, {label}"),
                fmt_s(st[0].median()),
                fmt_s(st[1].median()),
                fmt_s(st[2].median()),
                format!("{} ({check})", fmt_s(st[3].median())),
                fmt_s(st[4].median()),
            ]);
        }
    }
    sec.para("Where the time goes by hand (medians of each step):");
    sec.table(
        &[
            "by hand",
            "`rbdvol export` until serving",
            "losetup",
            "blkid -p",
            "mkfs / fsck",
            "mount",
        ],
        &rows,
    );
    let mut rows = Vec::new();
    for (k, (label, ..)) in sizes.iter().enumerate() {
        let r = &results[k];
        for (what, ph, hand) in [
            ("first", &r.phases_first, &r.hand_steps_first),
            ("re-mount", &r.phases_re, &r.hand_steps_re),
        ] {
            rows.push(vec![
                format!("{what}, {label}"),
                format!(
                    "{} (by hand: {})",
                    fmt_s(ph[0].median()),
                    fmt_s(hand[0].median())
                ),
                format!("{} ({})", fmt_s(ph[1].median()), fmt_s(hand[1].median())),
                format!(
                    "{} ({})",
                    fmt_s(ph[2].median()),
                    fmt_s(hand[2].median() + hand[3].median() + hand[4].median())
                ),
                fmt_s(ph[3].median()),
            ]);
        }
    }
    sec.para(
        "Where the time goes in the plugin (medians; phases split at the daemon's own log lines \
         `exporter serving`, `mapped` and `mounted`, by-hand equivalents in brackets). The first \
         phase includes reading the volume from the cluster and starting and waiting for the \
         exporter; the third includes the format decision and the `formatted`/`first-mapped` \
         metadata writes; the last is the reference-table write and the answer.",
    );
    sec.table(
        &[
            "plugin",
            "request → exporter serving",
            "→ mapped (losetup)",
            "→ mounted (blkid, mkfs/fsck, mount)",
            "→ answer",
        ],
        &rows,
    );
    for (k, (label, ..)) in sizes.iter().enumerate() {
        let r = &results[k];
        let over = r.remount.median() / r.hand_remount.median() - 1.0;
        let bare = r.remount.median() / r.hand_remount_bare.median() - 1.0;
        sec.target(
            &format!("re-Mount {label}: ≤ 10 % over the same steps by hand"),
            format!(
                "{:+.0} % ({} vs {})",
                over * 100.0,
                fmt_s(r.remount.median()),
                fmt_s(r.hand_remount.median())
            ),
            over <= 0.10,
            format!(
                "{}Against a bare by-hand re-mount without the safety steps (no `blkid -p`, no \
                 `e2fsck -p`; {}), the plugin is {:+.0} %.",
                if over <= 0.10 {
                    String::new()
                } else {
                    format!(
                        "The plugin spends {} more than the same steps by hand. Up to the \
                         exporter serving it takes {} against {} by hand (reading the volume \
                         first, clearing leftovers, `setsid`, and polling the exporter's state \
                         file every 5 ms); the steps after that take {} against {}. ",
                        fmt_s(r.remount.median() - r.hand_remount.median()),
                        fmt_s(r.phases_re[0].median()),
                        fmt_s(r.hand_steps_re[0].median()),
                        fmt_s(
                            r.phases_re[1].median()
                                + r.phases_re[2].median()
                                + r.phases_re[3].median()
                        ),
                        fmt_s(
                            r.hand_steps_re[1].median()
                                + r.hand_steps_re[2].median()
                                + r.hand_steps_re[3].median()
                                + r.hand_steps_re[4].median()
                        ),
                    )
                },
                fmt_s(r.hand_remount_bare.median()),
                bare * 100.0
            ),
        );
    }
    let ten = &results[1].first;
    sec.target(
        "first Mount of a fresh 10 GiB volume ≤ 2 s",
        format!("{} (p99 {})", fmt_s(ten.median()), fmt_s(ten.p99())),
        ten.median() <= 2.0,
        if ten.median() <= 2.0 {
            "mkfs with lazy inode-table and journal init writes little even on 10 GiB.".into()
        } else {
            format!(
                "By hand the same steps take {}; most of it is mkfs through the userspace mapper.",
                fmt_s(results[1].hand_first.median())
            )
        },
    );
    Ok(())
}
