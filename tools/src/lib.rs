//! The `stockade` admin tool: `stockade up` (a whole cluster on one machine) and the admin
//! commands.

pub mod events;
pub mod up;
