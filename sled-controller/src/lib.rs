//! sled controller
