//! Memory-mapping weight files: the one place in this crate with `unsafe`.

use std::fs::File;
use std::path::Path;

use kt_core::SharedBytes;

use crate::FormatError;

/// Maps `path` read-only. Nothing is copied: tensor bytes are sliced out of the map and the
/// kernel pages them in on first touch.
pub(crate) fn map_file(path: &Path) -> Result<SharedBytes, FormatError> {
    let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let len = file.metadata().map_err(|e| FormatError::io(path, e))?.len();
    if len == 0 {
        // mmap(2) rejects empty mappings; an empty buffer parses (and fails) the same way.
        return Ok(SharedBytes::new(Vec::new()));
    }
    // SAFETY: the map is read-only and private to this process, and every read through it is
    // bounds-checked against its length. The remaining hazard of any file map is another
    // process truncating or rewriting the file while it is mapped (reads then see the new
    // bytes, or fault); model files are not modified while they are served, as with llama.cpp.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
    Ok(SharedBytes::new(map))
}
