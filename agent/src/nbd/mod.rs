//! The NBD export of protected disks: what applications' writes come through.

pub mod client;
pub mod device;
pub mod server;
mod transmit;
pub mod wire;

pub use device::FileDevice;
pub use server::{serve, Device, Exports, Piece};
pub use transmit::Sink;
