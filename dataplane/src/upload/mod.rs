//! The upload stage, the pipeline's last step: `uploader` is one shard's upload thread
//! (it tails the shard's cache behind the durable position, groups frames by disk and
//! retries failing disks with backoff); `stage` is what it does for one disk (seal the
//! disk's run of frames into one segment and commit it with its recovery points).

pub mod stage;
pub mod uploader;

pub use stage::DiskUploader;
pub use uploader::{run, UploadStatus};
