//! Webhooks: events of the kinds an operator chose are POSTed as JSON to a URL,
//! signed with a secret of the webhook's own (`Ferry-Signature: sha256=<hex
//! HMAC-SHA256(secret, body)>`), retried with exponential backoff. See
//! docs/control-plane.md, "Webhooks".
//!
//! - `store`: the `webhooks` table, each webhook's cursor and delivery lease.
//! - `deliver`: the background task that sends them.

pub mod deliver;
pub mod store;

/// The event kinds a webhook may ask for: changes of health (`health`), job ends
/// (`job-succeeded`, `job-failed`, `job-cancelled`), and fencing (`fencing`).
pub const EVENT_KINDS: [&str; 5] = [
    "health",
    "job-succeeded",
    "job-failed",
    "job-cancelled",
    "fencing",
];

#[cfg(test)]
pub(crate) mod tests;
