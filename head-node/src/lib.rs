//! The Stockade head node: serves volumes over NBD (and, later, replicates them with Raft and
//! writes them back to sleds).

pub mod nbd;
