//! placeholder until this crate is built
