//! rbdvol: a Docker volume plugin that gives containers Ceph RBD block volumes.
//!
//! Layers, top to bottom (data flows one way):
//! - [`api`]: front ends. Docker's volume plugin protocol over HTTP on a unix socket
//!   (and HTTPS); it translates requests to the two halves below and back.
//! - [`controller`]: the cluster-side lifecycle of volumes (create, describe, list,
//!   remove), the same from every host.
//! - [`node`]: this host's side (attach and detach, references, fencing, orphans,
//!   reconcile after a crash).
//! - [`lock`]: ownership across hosts for operators: who holds a volume, breaking a lock.
//! - [`host`] and [`ceph`]: effects. The node and controller reach them only through
//!   the [`host::ops::HostOps`], [`host::mapper::Mapper`] and [`ceph::ClusterOps`]
//!   traits, chosen in `main.rs`; the one `unsafe` module is `ceph::sys`.
//!
//! [`export`] is a separate program sharing the binary (`rbdvol export`, the userspace
//! mapper's per-image FUSE exporter). It uses [`ceph`] and [`config`]; the daemon
//! reaches it only by starting it, and the two share one type, the state file in
//! [`host::mapper::userspace::state`].
//!
//! [`volume`] is the shared vocabulary: the volume record spelled once, names and
//! options. [`config`], [`error`] and [`units`] are shared by all layers.

pub mod api;
pub mod ceph;
pub mod certs;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daytwo_cli;
pub mod doctor;
pub mod error;
pub mod export;
pub mod failpoint;
pub mod host;
pub mod lock;
pub mod metrics;
pub mod node;
pub mod show_config;
#[cfg(test)]
pub mod testing;
pub mod units;
pub mod volume;
