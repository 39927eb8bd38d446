//! sidecar-shim: a CRI proxy that sits between kubelet and containerd.
#![forbid(unsafe_code)]

pub mod admin;
pub mod check;
pub mod config;
pub mod failpoint;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod signal;
