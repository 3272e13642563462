//! Shared test support.
#![allow(dead_code, unreachable_pub)]

pub mod vectors;
pub mod demo;
