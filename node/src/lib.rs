//! The ringlet node: loads a model, runs the inference engine, and serves
//! the OpenAI-compatible HTTP API. The `ringlet` binary is a thin layer
//! over this library.

pub mod api;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod current;
pub mod engine;
pub mod hub;
pub mod identity;
pub mod limits;
pub mod loaded_model;
pub mod metrics;
pub mod model_store;
pub mod policy;
pub mod prompt;
pub mod run;
pub mod serve;
pub mod stage;
pub mod stopping;
pub mod text;
pub mod tools;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Microseconds since the Unix epoch: hop timestamps in frames (the
/// nodes of a ring share a clock on one host, and NTP's on a LAN).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
