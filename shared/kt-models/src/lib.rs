//! Architectures (being written).
