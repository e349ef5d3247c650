//! Effects on this host: running external commands under deadlines, mapping images to
//! block devices (three mappers behind one trait, in [`mapper`]), probing, formatting
//! and mounting filesystems, and who uses a mount or device.

pub mod command;
pub mod freeze;
pub mod fs;
pub mod grow;
pub mod mapper;
pub mod ops;
pub mod usage;
