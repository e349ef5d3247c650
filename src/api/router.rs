//! Maps each `/VolumeDriver.*` endpoint to the driver and every result to Docker's
//! response shape. This is the one place where [`Error`] becomes `{"Err": "..."}`.

use hyper::StatusCode;
use serde_json::{json, Value};

use super::protocol::{decode, CreateRequest, MountRequest, NameRequest};
use super::Backends;
use crate::controller::VolumeInfo;
use crate::error::{Error, Result};
use crate::node::Attached;
use crate::units::format_size;
use crate::volume::{feature_names, names};

/// What to send back for one request.
pub enum Reply {
    Json(StatusCode, Value),
    /// Close the connection without an answer. Docker reads a transport error as
    /// "the plugin could not answer", not "the volume is gone", so this is how Get
    /// avoids making Docker purge volumes while the cluster is unreachable.
    Abort,
}

pub const ENDPOINTS: &[&str] = &[
    "/Plugin.Activate",
    "/VolumeDriver.Create",
    "/VolumeDriver.Remove",
    "/VolumeDriver.Mount",
    "/VolumeDriver.Unmount",
    "/VolumeDriver.Path",
    "/VolumeDriver.Get",
    "/VolumeDriver.List",
    "/VolumeDriver.Capabilities",
];

fn ok(v: Value) -> Reply {
    Reply::Json(StatusCode::OK, v)
}

/// Docker accepts an error either as 200 + Err or non-200 + Err; 200 keeps it simple
/// for every client, with the text exactly as the user will read it.
pub fn respond(result: Result<Value>) -> Reply {
    match result {
        Ok(v) => ok(v),
        Err(e) => {
            tracing::warn!(error = %e, "request failed");
            ok(json!({ "Err": e.to_string() }))
        }
    }
}

/// Get's `Volume`: the controller's description plus, if mounted here, the node's.
fn volume_json(v: &VolumeInfo, here: Option<Attached>) -> Value {
    let r = &v.record;
    let mut status = json!({
        "pool": v.pool,
        "image": format!("{}/{}", v.pool, v.name),
        "size": format_size(v.size),
        "size_bytes": v.size,
        "features": feature_names(v.features & crate::volume::USER_FEATURE_MASK),
        "object_size": format_size(v.object_size),
        "fstype": r.fstype.clone().unwrap_or_default(),
        "mkfs_options": r.mkfs_options,
        "mount_options": r.mount_options,
        "read_only": r.read_only,
        "allow_suid_dev": r.allow_suid_dev,
        "created_by": r.created_by.clone().unwrap_or_default(),
        "formatted": if r.formatted.is_some() { "yes" } else { "no" },
        "in_use": v.holder.clone().unwrap_or_else(|| "no".to_string()),
    });
    if let Some(dp) = &r.data_pool {
        status["data_pool"] = json!(dp);
    }
    if let Some(o) = &r.origin {
        status["origin"] = json!(o);
    }
    if !v.snapshots.is_empty() {
        status["snapshots"] = v
            .snapshots
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "created": s.created.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "size": format_size(s.size),
                })
            })
            .collect();
    }
    if let Some(why) = &v.stale {
        status["note"] = json!(format!(
            "cluster unreachable, showing the last known state: {why}"
        ));
    }
    let mut vol = json!({ "Name": v.name });
    if let Some(a) = here {
        status["mounted_here"] = json!({
            "mountpoint": a.mountpoint,
            "device": a.device,
            "mapper": a.mapper.name(),
            "container_mounts": a.container_mounts,
            "since": a.since,
            "fenced": a.fenced,
        });
        vol["Mountpoint"] = json!(a.mountpoint);
    }
    vol["Status"] = status;
    if let Some(c) = &v.created_at {
        vol["CreatedAt"] = json!(c);
    }
    vol
}

pub async fn dispatch(b: &Backends, path: &str, body: &[u8]) -> Reply {
    match path {
        "/Plugin.Activate" => ok(json!({ "Implements": ["VolumeDriver"] })),
        "/VolumeDriver.Capabilities" => ok(json!({ "Capabilities": { "Scope": "global" } })),
        "/VolumeDriver.Create" => respond(create(b, body).await),
        "/VolumeDriver.Get" => match get(b, body).await {
            Err(e) if e.is_unreachable() => {
                tracing::warn!(error = %e, "Get: cluster unreachable and volume unknown; dropping the connection so Docker keeps its record");
                Reply::Abort
            }
            other => respond(other),
        },
        "/VolumeDriver.List" => respond(list(b).await),
        "/VolumeDriver.Remove" => respond(remove(b, body).await),
        "/VolumeDriver.Path" => respond(path_of(b, body).await),
        "/VolumeDriver.Mount" => respond(mount(b, body).await),
        "/VolumeDriver.Unmount" => respond(unmount(b, body).await),
        other => Reply::Json(
            StatusCode::NOT_FOUND,
            json!({ "Err": format!("unknown endpoint {other}; this is a Docker volume plugin serving {}", ENDPOINTS.join(", ")) }),
        ),
    }
}

async fn create(b: &Backends, body: &[u8]) -> Result<Value> {
    let req: CreateRequest = decode("VolumeDriver.Create", body)?;
    let opts = req.opts.map(|o| o.0).unwrap_or_default();
    b.controller.create(&req.name, &opts).await?;
    Ok(json!({}))
}

async fn get(b: &Backends, body: &[u8]) -> Result<Value> {
    let req: NameRequest = decode("VolumeDriver.Get", body)?;
    names::validate(&req.name)?;
    // Say so at once if this host has just lost the volume.
    b.node.check_fencing(Some(&req.name)).await;
    let info = b.controller.get(&req.name).await?;
    Ok(json!({ "Volume": volume_json(&info, b.node.attached(&req.name)) }))
}

async fn list(b: &Backends) -> Result<Value> {
    let names = b.controller.list().await?;
    let here = b.node.mountpoints();
    let vols: Vec<Value> = names
        .into_iter()
        .map(|name| match here.get(&name) {
            Some(m) => json!({ "Name": name, "Mountpoint": m }),
            None => json!({ "Name": name }),
        })
        .collect();
    Ok(json!({ "Volumes": vols }))
}

async fn remove(b: &Backends, body: &[u8]) -> Result<Value> {
    let req: NameRequest = decode("VolumeDriver.Remove", body)?;
    names::validate(&req.name)?;
    b.node
        .while_unmounted(&req.name, b.controller.remove(&req.name))
        .await?;
    Ok(json!({}))
}

async fn path_of(b: &Backends, body: &[u8]) -> Result<Value> {
    let req: NameRequest = decode("VolumeDriver.Path", body)?;
    names::validate(&req.name)?;
    let mp = b.node.attached(&req.name).map(|a| a.mountpoint);
    Ok(json!({ "Mountpoint": mp.map(|p| p.display().to_string()).unwrap_or_default() }))
}

async fn mount(b: &Backends, body: &[u8]) -> Result<Value> {
    let req: MountRequest = decode("VolumeDriver.Mount", body)?;
    check_id(&req.id)?;
    let mp = b.node.mount(&req.name, &req.id).await?;
    Ok(json!({ "Mountpoint": mp }))
}

async fn unmount(b: &Backends, body: &[u8]) -> Result<Value> {
    let req: MountRequest = decode("VolumeDriver.Unmount", body)?;
    check_id(&req.id)?;
    b.node.unmount(&req.name, &req.id).await?;
    Ok(json!({}))
}

/// Mount IDs are 64 hex characters from dockerd; other clients may send other
/// tokens, but nothing empty, huge or unprintable (they are persisted in state).
fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::BadRequest(format!(
            "mount ID {id:?} is not valid: use 1 to 128 printable ASCII characters (dockerd sends 64 hex)"
        )));
    }
    Ok(())
}
