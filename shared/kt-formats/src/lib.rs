//! Weight files (being written).
