//! Shared test support.
#![allow(dead_code, unreachable_pub)]

pub mod demo;
pub mod http;
pub mod logs;
pub mod redis;
#[cfg(feature = "server")]
pub mod server;
