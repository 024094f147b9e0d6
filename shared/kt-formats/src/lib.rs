//! Weight files: GGUF (versions 2 and 3, single files, split sets and folders) and Hugging Face
//! folders of safetensors files.
//!
//! Files are memory-mapped and never copied: a [`kt_core::WeightTensor`] handed out here points
//! into the map. Input is treated as hostile: every count, length and offset is checked against
//! the bytes that are actually there before anything is allocated or read, and problems come
//! back as a [`FormatError`] naming the file and what is wrong, never as a panic.
//!
//! Model code loads weights through [`TensorSource`], which [`GgufModel`] and [`HfFolder`]
//! implement.

pub mod embedded;
mod error;
pub mod gguf;
pub mod hf;
mod mmap;
pub mod safetensors;
mod source;

pub use error::FormatError;
pub use gguf::{Array, GgufFile, GgufModel, Metadata, StringArray, TensorInfo, Value, ValueType};
pub use hf::HfFolder;
pub use safetensors::{Dtype, SafetensorsFile, SafetensorsInfo};
pub use source::TensorSource;
