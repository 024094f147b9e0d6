//! The gateway tier (skeleton; filled by the gateway change).
