//! The agent <-> process-server wire protocol, version 2 (docs/protocol.md): frame
//! types and a codec that never trusts its input. Decoding borrows from the receive
//! buffer, so write data is handed on without a copy; every length is checked against
//! what remains and against the negotiated frame limit before anything is allocated.

mod codec;
mod frame;

pub use codec::{
    decode, encode, encode_write_header, DecodeError, Decoded, SUMS_HEADER_BYTES, SUM_BYTES,
};
pub use frame::{Bookmark, ErrorCode, Frame, Hello, PointKindWire, Welcome};

/// Protocol version this build speaks. 2 added the disk's size to Bookmark.
pub const VERSION: u16 = 2;
/// The oldest version a server still accepts from an agent (agents are upgraded
/// after their process servers).
pub const OLDEST_VERSION: u16 = 1;
/// Bytes of every frame header: type u8, flags u8, reserved u16, payload length u32.
pub const HEADER_BYTES: usize = 8;
/// The largest payload either side may ever send; a session may negotiate less.
pub const MAX_PAYLOAD_BYTES: u32 = 4 << 20;
/// Default TCP port of the data path.
pub const DEFAULT_PORT: u16 = 9443;

/// Credit a frame costs: its data, or a flat 64 bytes for the small ones. The server
/// grants credit by it and the client spends it, so both ends count alike.
pub fn payload_bytes(f: &Frame<'_>) -> u64 {
    match f {
        Frame::Write { data, .. } => data.len() as u64,
        // Zero and bookmark frames are small but must still count, or an agent could
        // flood the cache with them.
        _ => 64,
    }
}
