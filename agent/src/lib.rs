//! pmem-agent: the CSI plugin daemon (library part, shared by the `pmem-agent`
//! and `pmemctl` binaries and the tests).

pub mod admin;
pub mod allocd;
pub mod client;
pub mod config;
pub mod csi;
pub mod device_events;
pub mod driver;
pub mod error;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod notify;
pub mod rpc;
pub mod server;
pub mod store;
pub mod transport;
pub mod wire;
