//! Maps each `/VolumeDriver.*` endpoint to the driver and every result to Docker's
//! response shape. This is the one place where [`Error`] becomes `{"Err": "..."}`.

use hyper::StatusCode;
use serde_json::{json, Value};

use super::protocol::{decode, CreateRequest, MountRequest, NameRequest};
use crate::driver::{Driver, VolumeView};
use crate::error::{Error, Result};

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

fn volume_json(v: &VolumeView) -> Value {
    let mut vol = json!({ "Name": v.name, "Status": v.status });
    if let Some(m) = &v.mountpoint {
        vol["Mountpoint"] = json!(m);
    }
    if let Some(c) = &v.created_at {
        vol["CreatedAt"] = json!(c);
    }
    vol
}

pub async fn dispatch(driver: &Driver, path: &str, body: &[u8]) -> Reply {
    match path {
        "/Plugin.Activate" => ok(json!({ "Implements": ["VolumeDriver"] })),
        "/VolumeDriver.Capabilities" => ok(json!({ "Capabilities": { "Scope": "global" } })),
        "/VolumeDriver.Create" => respond(create(driver, body).await),
        "/VolumeDriver.Get" => match get(driver, body).await {
            Err(e) if e.is_unreachable() => {
                tracing::warn!(error = %e, "Get: cluster unreachable and volume unknown; dropping the connection so Docker keeps its record");
                Reply::Abort
            }
            other => respond(other),
        },
        "/VolumeDriver.List" => respond(list(driver).await),
        "/VolumeDriver.Remove" => respond(remove(driver, body).await),
        "/VolumeDriver.Path" => respond(path_of(driver, body).await),
        "/VolumeDriver.Mount" => respond(mount(driver, body).await),
        "/VolumeDriver.Unmount" => respond(unmount(driver, body).await),
        other => Reply::Json(
            StatusCode::NOT_FOUND,
            json!({ "Err": format!("unknown endpoint {other}; this is a Docker volume plugin serving {}", ENDPOINTS.join(", ")) }),
        ),
    }
}

async fn create(driver: &Driver, body: &[u8]) -> Result<Value> {
    let req: CreateRequest = decode("VolumeDriver.Create", body)?;
    let opts = req.opts.map(|o| o.0).unwrap_or_default();
    driver.create(&req.name, &opts).await?;
    Ok(json!({}))
}

async fn get(driver: &Driver, body: &[u8]) -> Result<Value> {
    let req: NameRequest = decode("VolumeDriver.Get", body)?;
    let view = driver.get(&req.name).await?;
    Ok(json!({ "Volume": volume_json(&view) }))
}

async fn list(driver: &Driver) -> Result<Value> {
    let vols: Vec<Value> = driver
        .list()
        .await?
        .into_iter()
        .map(|(name, mp)| match mp {
            Some(m) => json!({ "Name": name, "Mountpoint": m }),
            None => json!({ "Name": name }),
        })
        .collect();
    Ok(json!({ "Volumes": vols }))
}

async fn remove(driver: &Driver, body: &[u8]) -> Result<Value> {
    let req: NameRequest = decode("VolumeDriver.Remove", body)?;
    driver.remove(&req.name).await?;
    Ok(json!({}))
}

async fn path_of(driver: &Driver, body: &[u8]) -> Result<Value> {
    let req: NameRequest = decode("VolumeDriver.Path", body)?;
    let mp = driver.path(&req.name).await?;
    Ok(json!({ "Mountpoint": mp.map(|p| p.display().to_string()).unwrap_or_default() }))
}

async fn mount(driver: &Driver, body: &[u8]) -> Result<Value> {
    let req: MountRequest = decode("VolumeDriver.Mount", body)?;
    check_id(&req.id)?;
    let mp = driver.mount(&req.name, &req.id).await?;
    Ok(json!({ "Mountpoint": mp }))
}

async fn unmount(driver: &Driver, body: &[u8]) -> Result<Value> {
    let req: MountRequest = decode("VolumeDriver.Unmount", body)?;
    check_id(&req.id)?;
    driver.unmount(&req.name, &req.id).await?;
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
