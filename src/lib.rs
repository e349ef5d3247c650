//! rbdvol: a Docker volume plugin that gives containers Ceph RBD block volumes.
//!
//! Layers, top to bottom (data flows one way):
//! - [`api`]: Docker's plugin protocol over HTTP on a unix socket.
//! - [`driver`]: the volume lifecycle (create, inspect, list, remove, mount) and policy.
//! - [`lock`]: ownership across hosts: who holds a volume, breaking a lock.
//! - [`host`]: effects on this machine: commands, mapping, mkfs, mount.
//! - [`ceph`]: the cluster connection, librbd calls, and the one `unsafe` module.
//!
//! [`config`], [`error`] and [`units`] are shared by all layers.

pub mod api;
pub mod ceph;
pub mod certs;
pub mod cli;
pub mod config;
pub mod driver;
pub mod error;
pub mod failpoint;
pub mod host;
pub mod lock;
pub mod units;
