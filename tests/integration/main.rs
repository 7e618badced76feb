//! Integration tests: the real `edgeinfer` binary against a real mosquitto broker, real fixture
//! models and their onnxruntime reference outputs. One binary, one module per area.

mod cli;
mod engine;
mod events;
mod faults;
mod health;
mod hostile;
mod images;
mod lifecycle;
mod malformed;
mod metrics;
mod models;
mod ota;
mod overload;
mod queueing;
mod routing;
mod streams;
mod swap;
mod system;
mod tls;
