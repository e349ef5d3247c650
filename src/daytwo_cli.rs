//! `rbdvol snapshot …` and `rbdvol resize`: the operator's front end to the
//! controller's day-two operations, on a cluster connection of its own. Output is one
//! line of words per result, or JSON with `--json`; errors go to stderr and the exit
//! code is 1 (see `main`).

use std::sync::Arc;

use serde_json::json;

use crate::ceph::ops::Remembering;
use crate::ceph::{self, Cluster};
use crate::cli::{Command, ServeArgs, SnapshotCommand};
use crate::controller::{parse_snapshot_ref, Controller, ControllerConfig, FsGrow};
use crate::error::{Error, Result};
use crate::units::format_size;

fn controller(args: &ServeArgs) -> Result<Controller> {
    let settings = args.settings()?;
    let cluster = Arc::new(Cluster::new(ceph::connect_spec(&settings.ceph)));
    Ok(Controller::new(
        ControllerConfig {
            host_id: settings.effective_host_id(),
            pools: settings.ceph.pools.clone(),
            defaults: settings.volume.clone(),
            remove: settings.remove.clone(),
        },
        Arc::new(Remembering::new(cluster)),
    ))
}

fn time(t: Option<std::time::SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

/// Runs a `snapshot` or `resize` command; what it prints on success is returned.
pub fn run(cmd: &Command) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(run_async(cmd))
}

async fn run_async(cmd: &Command) -> Result<String> {
    match cmd {
        Command::Resize {
            volume,
            size,
            json,
            args,
        } => {
            let r = controller(args)?.resize(volume, size).await?;
            let fs = match &r.filesystem {
                FsGrow::Online { host } => format!("its filesystem was grown on {host}, where it is mounted"),
                FsGrow::AtNextMount { why: None } => "its filesystem grows at its next Mount".to_string(),
                FsGrow::AtNextMount { why: Some(why) } => format!(
                    "its filesystem could not be grown where it is mounted ({why}), so it grows at its next Mount"
                ),
            };
            Ok(if *json {
                json!({ "volume": volume, "old_bytes": r.old, "new_bytes": r.new, "filesystem": fs })
                    .to_string()
            } else if r.old == r.new {
                format!("volume {volume} is already {}; {fs}", format_size(r.new))
            } else {
                format!(
                    "grew volume {volume} from {} to {}; {fs}",
                    format_size(r.old),
                    format_size(r.new)
                )
            })
        }
        Command::Snapshot(s) => snapshot(s).await,
        _ => Err(Error::BadRequest("not a snapshot or resize command".into())),
    }
}

async fn snapshot(cmd: &SnapshotCommand) -> Result<String> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            name,
            json,
            crash_consistent,
            args,
        } => {
            let s = controller(args)?
                .snapshot_create(volume, name.as_deref(), *crash_consistent)
                .await?;
            Ok(if *json {
                json!({ "volume": volume, "snapshot": s.name, "frozen_by": s.frozen_by })
                    .to_string()
            } else {
                match &s.frozen_by {
                    Some(h) => format!(
                        "created snapshot {volume}@{} (filesystem frozen for it on {h})",
                        s.name
                    ),
                    None => format!("created snapshot {volume}@{}", s.name),
                }
            })
        }
        SnapshotCommand::Ls { volume, json, args } => {
            let snaps = controller(args)?.snapshots(volume).await?;
            if *json {
                let rows: Vec<_> = snaps
                    .iter()
                    .map(|s| {
                        json!({
                            "name": s.name,
                            "created": s.created.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                            "size_bytes": s.size,
                            "protected": s.protected,
                            "clones": s.clones,
                        })
                    })
                    .collect();
                return Ok(serde_json::Value::from(rows).to_string());
            }
            let mut out = format!("{:<32} {:<21} {:>10} CLONES", "SNAPSHOT", "CREATED", "SIZE");
            for s in &snaps {
                let clones = if s.clones.is_empty() {
                    "-".to_string()
                } else {
                    s.clones.join(",")
                };
                out.push_str(&format!(
                    "\n{:<32} {:<21} {:>10} {clones}",
                    s.name,
                    time(s.created),
                    format_size(s.size)
                ));
            }
            if snaps.is_empty() {
                out.push_str(&format!("\n(volume {volume} has no snapshots)"));
            }
            Ok(out)
        }
        SnapshotCommand::Rm {
            snapshot,
            json,
            args,
        } => {
            let (volume, snap) = parse_snapshot_ref(snapshot)?;
            controller(args)?.snapshot_remove(&volume, &snap).await?;
            Ok(if *json {
                json!({ "volume": volume, "snapshot": snap, "removed": true }).to_string()
            } else {
                format!("removed snapshot {volume}@{snap}")
            })
        }
        SnapshotCommand::Rollback {
            snapshot,
            json,
            args,
        } => {
            let (volume, snap) = parse_snapshot_ref(snapshot)?;
            controller(args)?.rollback(&volume, &snap).await?;
            Ok(if *json {
                json!({ "volume": volume, "snapshot": snap, "rolled_back": true }).to_string()
            } else {
                format!("rolled volume {volume} back to snapshot {snap}; what was written after it is gone")
            })
        }
    }
}
