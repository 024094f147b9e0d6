//! A bounds-checked little-endian cursor over a byte slice. Every read checks the remaining
//! length first and reports where it was and what it wanted when it fails.

use crate::FormatError;

pub(crate) struct Reader<'a> {
    file: &'a str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(file: &'a str, buf: &'a [u8]) -> Self {
        Self { file, buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn file(&self) -> &'a str {
        self.file
    }

    /// An error for `what`, which needs `need` bytes from the current position.
    pub(crate) fn truncated(&self, what: impl Into<String>, need: u128) -> FormatError {
        FormatError::Truncated {
            file: self.file.to_owned(),
            offset: self.pos as u64,
            what: what.into(),
            need,
            have: self.remaining() as u64,
        }
    }

    /// An error about the value that starts at byte `at`.
    pub(crate) fn malformed(&self, at: usize, reason: impl Into<String>) -> FormatError {
        FormatError::Malformed {
            file: self.file.to_owned(),
            offset: at as u64,
            reason: reason.into(),
        }
    }

    /// Fails unless `count` items of at least `min_size` bytes each can fit in the remaining
    /// bytes. Called before allocating room for `count` items.
    pub(crate) fn check_count(
        &self,
        count: u64,
        min_size: usize,
        what: impl FnOnce() -> String,
    ) -> Result<usize, FormatError> {
        let need = u128::from(count) * min_size as u128;
        if need > self.remaining() as u128 {
            return Err(self.truncated(what(), need));
        }
        // `count * min_size <= remaining <= usize::MAX`, so `count` fits when `min_size >= 1`.
        usize::try_from(count).map_err(|_| self.truncated(what(), need))
    }

    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n as u128));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, FormatError> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: a u64 byte length, then that many bytes (not NUL-terminated).
    pub(crate) fn string_bytes(&mut self, what: &str) -> Result<&'a [u8], FormatError> {
        let start = self.pos;
        let len = self.u64(what)?;
        if u128::from(len) > self.remaining() as u128 {
            return Err(FormatError::Truncated {
                file: self.file.to_owned(),
                offset: start as u64,
                what: format!("{what} (length {len})"),
                need: 8 + u128::from(len),
                have: (self.buf.len() - start) as u64,
            });
        }
        // In range: `len <= remaining`.
        self.take(len as usize, what)
    }
}
