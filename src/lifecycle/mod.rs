//! The sidecar lifecycle: which containers are sidecars (from pod
//! annotations), when they are ready, and the order in which containers of a
//! pod may start and stop.
//!
//! * [`spec`]: pod annotations and labels into a checked [`spec::PodSpec`].
//! * [`probe`]: readiness checks, run inside the pod's network namespace.
//! * [`machine`]: the pure lifecycle state machine (events in, actions out).
//! * [`service`]: the interceptor that feeds the machine and acts on it.
//! * [`store`]: the state directory, where the machine's pod records
//!   survive a restart of the shim.

pub mod machine;
pub mod probe;
pub mod service;
pub mod spec;
pub mod store;
