//! Ferry's data plane. Today: `export`, the writers that lay a rebuilt disk into an
//! output image (raw, or a fixed VHD that Azure accepts as a managed disk). The process
//! server pipeline (ingest -> cache -> batch -> seal -> upload) and the master target
//! that writes failback deltas onto home disks join it here.

pub mod export;
pub mod protocol;
