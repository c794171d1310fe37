//! The ringlet node: loads a model, runs the inference engine, and serves
//! the OpenAI-compatible HTTP API. The `ringlet` binary is a thin layer
//! over this library.

pub mod api;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod engine;
pub mod limits;
pub mod loaded_model;
pub mod model_store;
pub mod run;
pub mod serve;
pub mod text;
