//! The CSI services.

pub mod controller;
pub mod identity;
pub mod node;
pub mod params;
