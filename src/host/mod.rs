//! Effects on this host: running external commands under deadlines, mapping images to
//! block devices (three mappers behind one trait), probing, formatting and mounting
//! filesystems, and loop devices.

pub mod command;
pub mod exporter;
pub mod exporter_proc;
pub mod fs;
pub mod kernel_map;
pub mod loopdev;
pub mod mapper;
pub mod ops;
pub mod usage;
