//! The `stockade` admin tool: `stockade up` (a whole cluster on one machine) and the admin
//! commands.

pub mod admin_client;
pub mod attach_local;
pub mod cli;
pub mod events;
pub mod image;
pub mod up;
