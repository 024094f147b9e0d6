//! The worker tier (skeleton; filled by the worker change).
