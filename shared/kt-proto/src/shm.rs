//! The shared-memory ring between a worker and an expert server on one host: the byte layout
//! both processes agree on, the proof that they share it, and the slot protocol.
//!
//! # When it is used
//! Only after both sides proved they share the memory: same boot id
//! (`/proc/sys/kernel/random/boot_id`), same shared-memory directory (device and inode of
//! `/dev/shm`), and a random nonce the server wrote into the ring read back by the client,
//! which then writes an acknowledgement the server checks before serving the ring. Containers
//! that share the kernel but not `/dev/shm` fail the second or third check; the gRPC stream is
//! the fallback. The negotiation runs over gRPC (`Info`, `OpenShm`, `Forward` metadata, see
//! `proto/kt/v1/expert.proto`).
//!
//! # Layout (all integers little-endian)
//! ```text
//! 0      header (4096 bytes)
//!          0 magic "KTSHMRG1"   8 version u32   12 slots u32   16 slot_bytes u64
//!         24 nonce u64 (server) 32 ack u64 (client, = ack_of(nonce))   40 state u32 (server)
//! 4096   slot 0 (slot_bytes), slot 1, ...
//!        slot header (128 bytes):
//!          0 state u32: 0 free, 1 request, 2 taken, 3 response
//!          8 seq u64 (client)  16 layer u32  20 n u32  24 k u32  28 dtype u32 (kt.v1.DataType)
//!         64 status u32 (0 ok, else kt.v1.ExpertError.Code)  68 dtype u32  72 len u64
//!         80 seq u64 (server echo)
//!        payload at 128: request = ids [n×k u32], weights [n×k f32], padding to 64 bytes,
//!        hidden [n×hidden dtype]; response = output [n×hidden dtype] or a UTF-8 message.
//! ```
//! The client owns a slot while it is free or answered, the server while it holds a request;
//! the `state` word hands it over (release store after writing, acquire load before reading).
//!
//! # Hostile contents
//! Every field read from the ring is checked before use: slot states, sequence numbers,
//! counts, dtypes and lengths are bounded by the slot and the model, so a broken or malicious
//! peer gives a [`ShmError`], never an out-of-bounds access. Payload bytes are copied out of
//! the mapping through raw pointers (no reference to shared bytes is ever formed) before they
//! are looked at. Both processes `fallocate` nothing after the handshake and never truncate
//! the object; a peer that shrank it anyway would make the other side fault (SIGBUS), which
//! no check in user space can prevent for a shared file mapping.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::convert::{read_values, CallParts, SeamShape, WireDType};
use crate::values;

#[cfg(target_endian = "big")]
compile_error!("the shared-memory ring copies f32 payloads as little-endian bytes");
use crate::v1::ShmHost;
use crate::{check_k, check_layer, Limits, WireError};

/// Where shared-memory objects live on Linux hosts.
pub const HOST_SHM_DIR: &str = "/dev/shm";
/// Magic number at offset 0 ("KTSHMRG1").
pub const MAGIC: u64 = u64::from_le_bytes(*b"KTSHMRG1");
/// Layout version at offset 8.
pub const VERSION: u32 = 1;
/// Bytes before the first slot.
pub const HEADER_BYTES: usize = 4096;
/// Bytes of a slot's header; its payload follows.
pub const SLOT_HEADER: usize = 128;
/// Most slots a ring may have.
pub const MAX_SLOTS: usize = 64;
/// Longest error message carried in a response.
const MAX_MESSAGE: usize = 4096;

/// Slot states.
pub const FREE: u32 = 0;
pub const REQUEST: u32 = 1;
pub const TAKEN: u32 = 2;
pub const RESPONSE: u32 = 3;

/// Ring (header) states, written by the server.
pub const RING_INIT: u32 = 0;
pub const RING_SERVING: u32 = 1;
pub const RING_CLOSED: u32 = 2;

const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_SLOTS: usize = 12;
const H_SLOT_BYTES: usize = 16;
const H_NONCE: usize = 24;
const H_ACK: usize = 32;
const H_STATE: usize = 40;

const S_STATE: usize = 0;
const S_SEQ: usize = 8;
const S_LAYER: usize = 16;
const S_N: usize = 20;
const S_K: usize = 24;
const S_DTYPE: usize = 28;
const S_STATUS: usize = 64;
const S_RDTYPE: usize = 68;
const S_RLEN: usize = 72;
const S_RSEQ: usize = 80;

/// The acknowledgement a client writes for `nonce`: proves it mapped the server's object.
pub fn ack_of(nonce: u64) -> u64 {
    nonce.rotate_left(17) ^ 0x6b74_6163_6b6e_6f77
}

/// What went wrong with shared memory.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shared memory: {what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The two processes could not prove they share the memory.
    #[error("shared memory not shared: {0}")]
    NotShared(String),
    /// The ring's contents break the layout (a broken or hostile peer).
    #[error("shared-memory ring is corrupt: {0}")]
    Corrupt(String),
    /// A call does not fit a slot.
    #[error("shared-memory slot too small: {0}")]
    TooLarge(String),
    /// A request in the ring is well-formed as a ring entry but not as a call.
    #[error(transparent)]
    Wire(#[from] WireError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShmError {
    let what = what.into();
    move |source| ShmError::Io { what, source }
}

/// Where a process runs, as far as sharing memory goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostId {
    pub boot_id: String,
    pub dev: u64,
    pub ino: u64,
}

impl HostId {
    /// This process's host with `dir` (normally `/dev/shm`) as the shared-memory directory.
    pub fn of(dir: &Path) -> Result<HostId, ShmError> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(io("reading /proc/sys/kernel/random/boot_id"))?
            .trim()
            .to_string();
        if boot_id.is_empty() {
            return Err(ShmError::NotShared("the boot id is empty".into()));
        }
        let meta = std::fs::metadata(dir).map_err(io(format!("stat {}", dir.display())))?;
        if !meta.is_dir() {
            return Err(ShmError::NotShared(format!("{} is not a directory", dir.display())));
        }
        Ok(HostId { boot_id, dev: meta.dev(), ino: meta.ino() })
    }

    pub fn to_proto(&self) -> ShmHost {
        ShmHost { boot_id: self.boot_id.clone(), shm_dev: self.dev, shm_ino: self.ino }
    }

    /// `None` when the message offers no shared memory (empty boot id).
    pub fn from_proto(h: &ShmHost) -> Option<HostId> {
        (!h.boot_id.is_empty()).then(|| HostId {
            boot_id: h.boot_id.chars().take(64).collect(),
            dev: h.shm_dev,
            ino: h.shm_ino,
        })
    }

    /// Why `self` and `other` cannot share memory, or `None` when they may (the nonce check
    /// still follows).
    pub fn differs(&self, other: &HostId) -> Option<String> {
        if self.boot_id != other.boot_id {
            return Some(format!(
                "different boot ids ({} here, {} there): not the same kernel",
                self.boot_id, other.boot_id
            ));
        }
        if (self.dev, self.ino) != (other.dev, other.ino) {
            return Some(format!(
                "different shared-memory directories (device {} inode {} here, device {} inode {} there)",
                self.dev, self.ino, other.dev, other.ino
            ));
        }
        None
    }
}

/// Slots and their size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub slots: usize,
    /// Bytes per slot, header included; a multiple of 64.
    pub slot_bytes: usize,
}

fn align64(x: usize) -> Option<usize> {
    x.checked_add(63).map(|v| v & !63)
}

/// Payload bytes of a request of `n` tokens, top-`k`, hidden `hidden` in `dtype`, and the
/// offset of the hidden states in it.
fn request_bytes(n: usize, k: usize, hidden: usize, dtype: WireDType) -> Option<(usize, usize)> {
    let ids = n.checked_mul(k)?.checked_mul(4)?;
    let h_off = align64(ids.checked_mul(2)?)?;
    let total = h_off.checked_add(n.checked_mul(hidden)?.checked_mul(dtype.size())?)?;
    Some((total, h_off))
}

impl Layout {
    /// A layout whose slots hold calls of up to `max_tokens` tokens of `hidden` in `dtype` with
    /// up to `max_k` experts per token.
    pub fn for_calls(
        slots: usize,
        max_tokens: usize,
        hidden: usize,
        max_k: usize,
        dtype: WireDType,
    ) -> Option<Layout> {
        let (payload, _) = request_bytes(max_tokens, max_k, hidden, dtype)?;
        let payload = payload.max(MAX_MESSAGE);
        let slot_bytes = align64(SLOT_HEADER.checked_add(payload)?)?;
        Some(Layout { slots, slot_bytes })
    }

    /// Checks a layout a peer asked for or announced, against the largest slot accepted.
    pub fn check(&self, max_slot_bytes: usize) -> Result<(), ShmError> {
        if self.slots == 0 || self.slots > MAX_SLOTS {
            return Err(ShmError::TooLarge(format!("{} slots (1..={MAX_SLOTS})", self.slots)));
        }
        if self.slot_bytes < SLOT_HEADER + MAX_MESSAGE
            || !self.slot_bytes.is_multiple_of(64)
            || self.slot_bytes > max_slot_bytes
        {
            return Err(ShmError::TooLarge(format!(
                "slots of {} bytes (a multiple of 64 from {} to {max_slot_bytes})",
                self.slot_bytes,
                SLOT_HEADER + MAX_MESSAGE
            )));
        }
        self.size()
            .map(|_| ())
            .ok_or_else(|| ShmError::TooLarge("the ring's size overflows".into()))
    }

    /// Bytes of the whole object.
    pub fn size(&self) -> Option<usize> {
        self.slots.checked_mul(self.slot_bytes)?.checked_add(HEADER_BYTES)
    }

    fn capacity(&self) -> usize {
        self.slot_bytes - SLOT_HEADER
    }
}

/// Whether `name` is acceptable as an object name (no path, no surprises).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A mapped ring.
pub struct Ring {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
    nonce: u64,
    /// The object's path while it still has a name (the creator unlinks it once attached).
    path: Option<PathBuf>,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics or raw copies
// with bounds checked against `len`, so using it from several threads is sound.
unsafe impl Send for Ring {}
// SAFETY: as above; `&Ring` only permits atomic accesses and raw copies.
unsafe impl Sync for Ring {}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("layout", &self.layout).field("path", &self.path).finish()
    }
}

/// A random non-zero u64 from the kernel.
fn random_u64() -> Result<u64, ShmError> {
    let mut buf = [0u8; 8];
    loop {
        // SAFETY: `buf` is valid for writes of 8 bytes; getrandom writes at most that many.
        let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got == 8 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if got < 0 && err.kind() != std::io::ErrorKind::Interrupted {
            return Err(ShmError::Io { what: "getrandom".into(), source: err });
        }
    }
    Ok(u64::from_le_bytes(buf) | 1)
}

fn map(file: &File, len: usize, what: &str) -> Result<*mut u8, ShmError> {
    // SAFETY: a fresh shared read-write mapping of `len` bytes of an open file descriptor;
    // the kernel picks the address. The result is checked for MAP_FAILED below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(ShmError::Io {
            what: format!("mmap {what}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(ptr.cast())
}

impl Ring {
    /// Creates `dir/name` (which must not exist) with `layout`, reserves its memory (so that a
    /// full tmpfs fails here, not with SIGBUS later), maps it and writes the header with a
    /// fresh nonce.
    pub fn create(dir: &Path, name: &str, layout: Layout) -> Result<Ring, ShmError> {
        if !valid_name(name) {
            return Err(ShmError::Corrupt(format!("bad object name {name:?}")));
        }
        layout.check(usize::MAX)?;
        let len = layout.size().ok_or_else(|| ShmError::TooLarge("ring size".into()))?;
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(format!("creating {}", path.display())))?;
        let cleanup = |e: ShmError| {
            let _ = std::fs::remove_file(&path);
            e
        };
        let off_len = libc::off_t::try_from(len)
            .map_err(|_| cleanup(ShmError::TooLarge(format!("{len} bytes"))))?;
        // SAFETY: plain syscall on an open descriptor with in-range arguments.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, off_len) };
        if rc != 0 {
            return Err(cleanup(ShmError::Io {
                what: format!("reserving {len} bytes for {}", path.display()),
                source: std::io::Error::from_raw_os_error(rc),
            }));
        }
        let ptr = map(&file, len, &path.display().to_string()).map_err(cleanup)?;
        let nonce = random_u64().map_err(cleanup)?;
        let ring = Ring { ptr, len, layout, nonce, path: Some(path) };
        ring.u64_at(H_MAGIC).store(MAGIC, Ordering::Relaxed);
        ring.u32_at(H_VERSION).store(VERSION, Ordering::Relaxed);
        ring.u32_at(H_SLOTS).store(layout.slots as u32, Ordering::Relaxed);
        ring.u64_at(H_SLOT_BYTES).store(layout.slot_bytes as u64, Ordering::Relaxed);
        ring.u64_at(H_ACK).store(0, Ordering::Relaxed);
        ring.u32_at(H_STATE).store(RING_INIT, Ordering::Relaxed);
        ring.u64_at(H_NONCE).store(nonce, Ordering::Release);
        Ok(ring)
    }

    /// Opens the object `dir/name` a server offered: it must lie in `dir`'s file system, be
    /// exactly `layout`'s size, carry the layout and `nonce` in its header. Then writes the
    /// acknowledgement of the nonce, which the server checks before it serves the ring.
    pub fn open(dir: &Path, name: &str, layout: Layout, nonce: u64) -> Result<Ring, ShmError> {
        if !valid_name(name) {
            return Err(ShmError::Corrupt(format!("bad object name {name:?}")));
        }
        layout.check(usize::MAX)?;
        let len = layout.size().ok_or_else(|| ShmError::TooLarge("ring size".into()))?;
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| ShmError::NotShared(format!("cannot open {}: {e}", path.display())))?;
        let meta = file.metadata().map_err(io(format!("stat {}", path.display())))?;
        let dir_meta = std::fs::metadata(dir).map_err(io(format!("stat {}", dir.display())))?;
        if meta.dev() != dir_meta.dev() {
            return Err(ShmError::NotShared(format!(
                "{} is on device {}, not on {}'s device {}",
                path.display(),
                meta.dev(),
                dir.display(),
                dir_meta.dev()
            )));
        }
        if meta.len() != len as u64 {
            return Err(ShmError::Corrupt(format!(
                "{} has {} bytes, the offer says {len}",
                path.display(),
                meta.len()
            )));
        }
        let ptr = map(&file, len, &path.display().to_string())?;
        let ring = Ring { ptr, len, layout, nonce, path: None };
        let found = ring.u64_at(H_NONCE).load(Ordering::Acquire);
        if found != nonce {
            return Err(ShmError::NotShared(format!(
                "the nonce in {} is {found:016x}, the server sent {nonce:016x} (another object of the same name?)",
                path.display()
            )));
        }
        let (magic, version) = (
            ring.u64_at(H_MAGIC).load(Ordering::Relaxed),
            ring.u32_at(H_VERSION).load(Ordering::Relaxed),
        );
        if magic != MAGIC || version != VERSION {
            return Err(ShmError::Corrupt(format!(
                "magic {magic:016x} version {version} (expected {MAGIC:016x} version {VERSION})"
            )));
        }
        let slots = ring.u32_at(H_SLOTS).load(Ordering::Relaxed) as usize;
        let slot_bytes = ring.u64_at(H_SLOT_BYTES).load(Ordering::Relaxed);
        if slots != layout.slots || slot_bytes != layout.slot_bytes as u64 {
            return Err(ShmError::Corrupt(format!(
                "the header says {slots} slots of {slot_bytes} bytes, the offer {} of {}",
                layout.slots, layout.slot_bytes
            )));
        }
        ring.u64_at(H_ACK).store(ack_of(nonce), Ordering::Release);
        Ok(ring)
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Whether the client acknowledged the nonce (server side).
    pub fn acknowledged(&self) -> bool {
        self.u64_at(H_ACK).load(Ordering::Acquire) == ack_of(self.nonce)
    }

    /// Removes the object's name (the mapping stays valid in every process that has it).
    pub fn unlink(&mut self) {
        if let Some(path) = self.path.take() {
            // Already gone (removed by hand, or the directory was cleaned): nothing to do.
            let _ = std::fs::remove_file(&path);
        }
    }

    /// The ring's state word (server: [`RING_SERVING`], [`RING_CLOSED`]).
    pub fn set_ring_state(&self, state: u32) {
        self.u32_at(H_STATE).store(state, Ordering::Release);
    }

    pub fn ring_state(&self) -> u32 {
        self.u32_at(H_STATE).load(Ordering::Acquire)
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // Offsets come from the layout constants and `slot_base`, which keep them inside the
        // mapping and 4-aligned (the mapping is page-aligned, slots 64-aligned); clamp anyway
        // so that a bug cannot reach outside it.
        let off = off.min(self.len - 4) & !3;
        // SAFETY: `ptr + off` is inside the live mapping (clamped above), 4-aligned, and only
        // ever accessed atomically or by raw copies, so an `AtomicU32` view of it is valid for
        // as long as `self` (which owns the mapping) lives.
        unsafe { &*self.ptr.add(off).cast::<AtomicU32>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        let off = off.min(self.len - 8) & !7;
        // SAFETY: as in `u32_at`, with 8-byte alignment.
        unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping.
    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), ShmError> {
        if off.checked_add(dst.len()).is_none_or(|end| end > self.len) {
            return Err(ShmError::Corrupt(format!("{} bytes at {off} pass the end", dst.len())));
        }
        // SAFETY: the source range lies inside the mapping (checked above) and `dst` is a
        // distinct private buffer; no reference to the shared bytes is formed.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the mapping at `off`.
    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), ShmError> {
        if off.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return Err(ShmError::TooLarge(format!("{} bytes at {off} pass the end", src.len())));
        }
        // SAFETY: the destination range lies inside the mapping (checked above), which is
        // writable, and `src` is a distinct private buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        Ok(())
    }

    /// Reads `count` elements of `dtype` at `off` out of the mapping as f32, converted
    /// straight into the answer through the raw pointer (never a reference into the shared
    /// bytes), and whether they are all finite.
    fn read_f32s(
        &self,
        off: usize,
        count: usize,
        dtype: WireDType,
    ) -> Result<(Vec<f32>, bool), ShmError> {
        let bytes = count.checked_mul(dtype.size());
        if bytes.and_then(|b| off.checked_add(b)).is_none_or(|end| end > self.len) {
            return Err(ShmError::Corrupt(format!("{count} values at {off} pass the end")));
        }
        match dtype {
            WireDType::F32 => {
                let mut out = vec![0.0f32; count];
                self.copy_out(off, values::f32_bytes_mut(&mut out))?;
                let finite = values::all_finite(&out);
                Ok((out, finite))
            }
            WireDType::Bf16 => {
                let mut out = Vec::new();
                // SAFETY: the `2 × count` bytes at `off` lie inside the mapping (checked
                // above); they are only read through the pointer.
                let finite =
                    unsafe { values::extend_from_bf16_raw(&mut out, self.ptr.add(off), count) };
                Ok((out, finite))
            }
        }
    }

    /// Writes `values` as `dtype` elements at `off` into the mapping.
    fn write_f32s(&self, off: usize, values: &[f32], dtype: WireDType) -> Result<(), ShmError> {
        let bytes = values.len() * dtype.size();
        if off.checked_add(bytes).is_none_or(|end| end > self.len) {
            return Err(ShmError::TooLarge(format!("{bytes} bytes at {off} pass the end")));
        }
        match dtype {
            WireDType::F32 => self.copy_in(off, values::f32_bytes(values)),
            WireDType::Bf16 => {
                // SAFETY: the `2 × values.len()` bytes at `off` lie inside the mapping, which
                // is writable (checked above); they are only written through the pointer.
                unsafe { values::f32_to_bf16_raw(values, self.ptr.add(off)) };
                Ok(())
            }
        }
    }

    fn slot_base(&self, slot: usize) -> Result<usize, ShmError> {
        if slot >= self.layout.slots {
            return Err(ShmError::Corrupt(format!("slot {slot} of {}", self.layout.slots)));
        }
        Ok(HEADER_BYTES + slot * self.layout.slot_bytes)
    }

    /// The state of `slot` (acquire: what the peer wrote before it is visible after).
    pub fn slot_state(&self, slot: usize) -> Result<u32, ShmError> {
        Ok(self.u32_at(self.slot_base(slot)? + S_STATE).load(Ordering::Acquire))
    }

    fn set_slot_state(&self, slot: usize, state: u32) -> Result<(), ShmError> {
        self.u32_at(self.slot_base(slot)? + S_STATE).store(state, Ordering::Release);
        Ok(())
    }

    /// Client: writes a request into free `slot` and hands it to the server.
    #[allow(clippy::too_many_arguments)]
    pub fn post_request(
        &self,
        slot: usize,
        seq: u64,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        ids: &[u32],
        weights: &[f32],
        k: usize,
        dtype: WireDType,
    ) -> Result<(), ShmError> {
        self.write_request(slot, seq, layer, hidden, hidden_size, ids, weights, k, dtype)?;
        self.set_slot_state(slot, REQUEST)
    }

    /// Client: hands a written slot to the server (what [`Ring::post_request`] ends with).
    pub fn publish_request(&self, slot: usize) -> Result<(), ShmError> {
        self.set_slot_state(slot, REQUEST)
    }

    /// Client: writes a request into free `slot` without handing it over (tests use it to
    /// break a request on purpose before [`Ring::publish_request`]).
    #[allow(clippy::too_many_arguments)]
    pub fn write_request(
        &self,
        slot: usize,
        seq: u64,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        ids: &[u32],
        weights: &[f32],
        k: usize,
        dtype: WireDType,
    ) -> Result<(), ShmError> {
        let base = self.slot_base(slot)?;
        let state = self.slot_state(slot)?;
        if state != FREE {
            return Err(ShmError::Corrupt(format!("slot {slot} is in state {state}, not free")));
        }
        let n = hidden.len().checked_div(hidden_size).unwrap_or(0);
        let (total, h_off) = request_bytes(n, k, hidden_size, dtype)
            .filter(|&(t, _)| t <= self.layout.capacity())
            .ok_or_else(|| {
                ShmError::TooLarge(format!(
                    "{n} tokens of hidden {hidden_size} top-{k} need more than a slot's {} bytes",
                    self.layout.capacity()
                ))
            })?;
        if ids.len() != n * k || weights.len() != n * k || n * hidden_size != hidden.len() {
            return Err(ShmError::TooLarge(format!(
                "{} ids, {} weights, {} values for {n} tokens of top-{k}",
                ids.len(),
                weights.len(),
                hidden.len()
            )));
        }
        if total > self.layout.capacity() {
            return Err(ShmError::TooLarge(format!("a request of {total} bytes")));
        }
        let mut small = vec![0u8; h_off];
        for (o, id) in small.chunks_exact_mut(4).zip(ids) {
            o.copy_from_slice(&id.to_le_bytes());
        }
        let w_off = ids.len() * 4;
        for (o, w) in small[w_off..].chunks_exact_mut(4).zip(weights) {
            o.copy_from_slice(&w.to_le_bytes());
        }
        self.copy_in(base + SLOT_HEADER, &small)?;
        self.write_f32s(base + SLOT_HEADER + h_off, hidden, dtype)?;
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| ShmError::TooLarge(format!("{what} {v}")))
        };
        self.u64_at(base + S_SEQ).store(seq, Ordering::Relaxed);
        self.u32_at(base + S_LAYER).store(to_u32(layer, "layer")?, Ordering::Relaxed);
        self.u32_at(base + S_N).store(to_u32(n, "tokens")?, Ordering::Relaxed);
        self.u32_at(base + S_K).store(to_u32(k, "k")?, Ordering::Relaxed);
        self.u32_at(base + S_DTYPE).store(dtype.to_proto() as u32, Ordering::Relaxed);
        Ok(())
    }

    /// Server: takes the request in `slot` (state [`REQUEST`]; it becomes [`TAKEN`]) and
    /// checks it against the model and `limits`. `Ok((seq, Err(..)))` is a request that must
    /// be answered with an error; `Err` means the slot itself is unusable.
    pub fn take_request(
        &self,
        slot: usize,
        shape: &SeamShape,
        limits: &Limits,
    ) -> Result<(u64, Result<CallParts, WireError>), ShmError> {
        let base = self.slot_base(slot)?;
        let state = self.slot_state(slot)?;
        if state != REQUEST {
            return Err(ShmError::Corrupt(format!("slot {slot} is in state {state}, not request")));
        }
        self.set_slot_state(slot, TAKEN)?;
        let seq = self.u64_at(base + S_SEQ).load(Ordering::Relaxed);
        let parts = self.read_request(base, shape, limits).map(|mut p| {
            p.request_id = seq;
            p
        });
        Ok((seq, parts))
    }

    fn read_request(
        &self,
        base: usize,
        shape: &SeamShape,
        limits: &Limits,
    ) -> Result<CallParts, WireError> {
        let layer = check_layer(self.u32_at(base + S_LAYER).load(Ordering::Relaxed), shape)?;
        let n = self.u32_at(base + S_N).load(Ordering::Relaxed) as usize;
        if n > limits.max_tokens {
            return Err(WireError::TooLarge {
                field: "n",
                reason: format!("{n} tokens (at most {})", limits.max_tokens),
            });
        }
        let k = check_k(self.u32_at(base + S_K).load(Ordering::Relaxed), n, shape)?;
        let raw = self.u32_at(base + S_DTYPE).load(Ordering::Relaxed);
        let dtype = WireDType::from_proto(i32::try_from(raw).unwrap_or(i32::MAX))?;
        let (total, h_off) = request_bytes(n, k, shape.hidden, dtype)
            .filter(|&(t, _)| t <= self.layout.capacity())
            .ok_or_else(|| WireError::TooLarge {
                field: "n",
                reason: format!(
                    "{n} tokens of top-{k} do not fit a slot of {} bytes",
                    self.layout.capacity()
                ),
            })?;
        let payload = |e: ShmError| WireError::Invalid { field: "payload", reason: e.to_string() };
        debug_assert!(total <= self.layout.capacity());
        let mut small = vec![0u8; h_off];
        self.copy_out(base + SLOT_HEADER, &mut small).map_err(payload)?;
        let nk = n * k;
        let ids = small[..nk * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let weights = read_values(&small[nk * 4..nk * 8], WireDType::F32);
        let (hidden, hidden_finite) =
            self.read_f32s(base + SLOT_HEADER + h_off, n * shape.hidden, dtype).map_err(payload)?;
        Ok(CallParts { request_id: 0, layer, n, k, dtype, hidden, hidden_finite, ids, weights })
    }

    /// Server: answers the request in `slot` (state [`TAKEN`]) with `output` (`n × hidden`
    /// values, sent in `dtype`) or an error `(code, message)`, and hands the slot back.
    pub fn post_response(
        &self,
        slot: usize,
        seq: u64,
        result: Result<(&[f32], WireDType), (u32, &str)>,
    ) -> Result<(), ShmError> {
        let base = self.slot_base(slot)?;
        let cap = self.layout.capacity();
        let (status, dtype, len) = match result {
            Ok((values, dtype)) => {
                let len = values.len() * dtype.size();
                if len > cap {
                    return Err(ShmError::TooLarge(format!("an answer of {len} bytes")));
                }
                self.write_f32s(base + SLOT_HEADER, values, dtype)?;
                (0, dtype.to_proto() as u32, len)
            }
            Err((code, message)) => {
                let mut end = message.len().min(MAX_MESSAGE).min(cap);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                self.copy_in(base + SLOT_HEADER, &message.as_bytes()[..end])?;
                (code.max(1), 0, end)
            }
        };
        self.u32_at(base + S_STATUS).store(status, Ordering::Relaxed);
        self.u32_at(base + S_RDTYPE).store(dtype, Ordering::Relaxed);
        self.u64_at(base + S_RLEN).store(len as u64, Ordering::Relaxed);
        self.u64_at(base + S_RSEQ).store(seq, Ordering::Relaxed);
        self.set_slot_state(slot, RESPONSE)
    }

    /// Client: reads the answer in `slot` (state [`RESPONSE`]) to request `seq` of `n` tokens
    /// of `hidden` sent in `dtype`, and frees the slot. The inner `Err` is the server's error
    /// `(code, message)`.
    pub fn take_response(
        &self,
        slot: usize,
        seq: u64,
        n: usize,
        hidden: usize,
        dtype: WireDType,
    ) -> Result<Result<Vec<f32>, (u32, String)>, ShmError> {
        let base = self.slot_base(slot)?;
        let state = self.slot_state(slot)?;
        if state != RESPONSE {
            return Err(ShmError::Corrupt(format!(
                "slot {slot} is in state {state}, not response"
            )));
        }
        let rseq = self.u64_at(base + S_RSEQ).load(Ordering::Relaxed);
        if rseq != seq {
            return Err(ShmError::Corrupt(format!(
                "slot {slot} answers request {rseq}, request {seq} was asked"
            )));
        }
        let status = self.u32_at(base + S_STATUS).load(Ordering::Relaxed);
        let len = self.u64_at(base + S_RLEN).load(Ordering::Relaxed);
        let cap = self.layout.capacity() as u64;
        let result = if status == 0 {
            let raw = self.u32_at(base + S_RDTYPE).load(Ordering::Relaxed);
            if raw != dtype.to_proto() as u32 {
                return Err(ShmError::Corrupt(format!(
                    "answer in dtype {raw}, {} was sent",
                    dtype.to_proto().as_str_name()
                )));
            }
            let want = (n * hidden * dtype.size()) as u64;
            if len != want || len > cap {
                return Err(ShmError::Corrupt(format!(
                    "answer of {len} bytes for {n} tokens of hidden {hidden} ({want} expected)"
                )));
            }
            let (values, finite) = self.read_f32s(base + SLOT_HEADER, n * hidden, dtype)?;
            if !finite {
                let v = values::first_non_finite(&values).unwrap_or(f32::NAN);
                return Err(ShmError::Corrupt(format!("answer holds {v}")));
            }
            Ok(values)
        } else if status <= 3 {
            if len > cap.min(MAX_MESSAGE as u64) {
                return Err(ShmError::Corrupt(format!("error message of {len} bytes")));
            }
            let mut buf = vec![0u8; len as usize];
            self.copy_out(base + SLOT_HEADER, &mut buf)?;
            Err((status, String::from_utf8_lossy(&buf).into_owned()))
        } else {
            return Err(ShmError::Corrupt(format!("unknown status {status}")));
        };
        self.set_slot_state(slot, FREE)?;
        Ok(result)
    }

    /// Client: frees a slot whose answer arrived after its caller gave up.
    pub fn reclaim(&self, slot: usize) -> Result<bool, ShmError> {
        if self.slot_state(slot)? == RESPONSE {
            self.set_slot_state(slot, FREE)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes raw bytes into a slot's header or payload: for tests that break a ring on
    /// purpose (a hostile peer), nothing else.
    #[doc(hidden)]
    pub fn poke(&self, slot: usize, off: usize, bytes: &[u8]) -> Result<(), ShmError> {
        let base = self.slot_base(slot)?;
        if off.checked_add(bytes.len()).is_none_or(|e| e > self.layout.slot_bytes) {
            return Err(ShmError::TooLarge("poke past the slot".into()));
        }
        self.copy_in(base + off, bytes)
    }
}

/// Slot header offsets, for tests that break rings on purpose.
#[doc(hidden)]
pub mod offsets {
    pub const STATE: usize = super::S_STATE;
    pub const SEQ: usize = super::S_SEQ;
    pub const LAYER: usize = super::S_LAYER;
    pub const N: usize = super::S_N;
    pub const K: usize = super::S_K;
    pub const DTYPE: usize = super::S_DTYPE;
    pub const STATUS: usize = super::S_STATUS;
    pub const RLEN: usize = super::S_RLEN;
    pub const RSEQ: usize = super::S_RSEQ;
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: `ptr`/`len` are the mapping made in create/open, unmapped exactly once here;
        // no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Waiting on a peer: spin for `spin`, then yield the CPU for a while, then sleep in short
/// steps, so an idle waiter costs little and a busy one answers in well under a microsecond.
#[derive(Debug)]
pub struct Backoff {
    start: Instant,
    spin: Duration,
}

/// How long a waiter yields after spinning before it starts to sleep.
const YIELD_FOR: Duration = Duration::from_millis(2);
/// One sleep step after that.
const SLEEP_STEP: Duration = Duration::from_micros(50);

impl Backoff {
    pub fn new(spin: Duration) -> Self {
        Self { start: Instant::now(), spin }
    }

    /// Time since the wait began.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits a little (the caller checks its condition again after each call).
    pub fn snooze(&mut self) {
        let t = self.start.elapsed();
        if t < self.spin {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        } else if t < self.spin + YIELD_FOR {
            std::thread::yield_now();
        } else {
            std::thread::sleep(SLEEP_STEP);
        }
    }

    /// Whether the wait is in its sleeping phase (past spinning and yielding).
    pub fn sleeping(&self) -> bool {
        self.start.elapsed() >= self.spin + YIELD_FOR
    }

    /// One sleep step as a park: `Thread::unpark` ends it early.
    pub fn park(&mut self) {
        std::thread::park_timeout(SLEEP_STEP);
    }

    /// Starts over (something happened).
    pub fn reset(&mut self) {
        self.start = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use kt_models::NO_EXPERT;

    const SHAPE: SeamShape = SeamShape { hidden: 8, n_layers: 2, n_experts: 4 };

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("kt-shm-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn pair(tag: &str, layout: Layout) -> (Ring, Ring) {
        let d = dir();
        let name = format!("ring-{tag}");
        let _ = std::fs::remove_file(d.join(&name));
        let server = Ring::create(&d, &name, layout).unwrap();
        assert!(!server.acknowledged());
        let client = Ring::open(&d, &name, layout, server.nonce()).unwrap();
        assert!(server.acknowledged());
        (server, client)
    }

    fn layout() -> Layout {
        Layout::for_calls(2, 4, SHAPE.hidden, 2, WireDType::F32).unwrap()
    }

    fn post(client: &Ring, slot: usize, seq: u64, n: usize, dtype: WireDType) {
        let hidden: Vec<f32> = (0..n * 8).map(|i| i as f32 * 0.5).collect();
        let ids: Vec<u32> = (0..n * 2).map(|i| if i % 2 == 0 { 1 } else { NO_EXPERT }).collect();
        client.post_request(slot, seq, 1, &hidden, 8, &ids, &vec![0.5; n * 2], 2, dtype).unwrap();
    }

    #[test]
    fn round_trip_through_a_slot() {
        let (server, client) = pair("rt", layout());
        let limits = Limits::default();
        for (seq, dtype) in [(7, WireDType::F32), (8, WireDType::Bf16)] {
            post(&client, 1, seq, 3, dtype);
            assert_eq!(server.slot_state(1).unwrap(), REQUEST);
            let (got_seq, parts) = server.take_request(1, &SHAPE, &limits).unwrap();
            let parts = parts.unwrap();
            assert_eq!(
                (got_seq, parts.layer, parts.n, parts.k, parts.dtype),
                (seq, 1, 3, 2, dtype)
            );
            assert_eq!(parts.hidden[5], 2.5);
            assert_eq!(parts.ids[1], NO_EXPERT);
            let out: Vec<f32> = parts.hidden.iter().map(|v| v * 2.0).collect();
            server.post_response(1, seq, Ok((&out, dtype))).unwrap();
            let back = client.take_response(1, seq, 3, 8, dtype).unwrap().unwrap();
            assert_eq!(back, out);
            assert_eq!(client.slot_state(1).unwrap(), FREE);
        }
        post(&client, 0, 9, 1, WireDType::F32);
        let (seq, _) = server.take_request(0, &SHAPE, &limits).unwrap();
        server.post_response(0, seq, Err((2, "expert 3 is not held"))).unwrap();
        let err = client.take_response(0, 9, 1, 8, WireDType::F32).unwrap().unwrap_err();
        assert_eq!(err, (2, "expert 3 is not held".to_string()));
    }

    #[test]
    fn too_large_calls_are_refused_before_writing() {
        let (_server, client) = pair("big", layout());
        let hidden = vec![0.0f32; 8 * 1000];
        let e = client
            .post_request(0, 1, 0, &hidden, 8, &[0; 2000], &[0.0; 2000], 2, WireDType::F32)
            .unwrap_err();
        assert!(matches!(e, ShmError::TooLarge(_)), "{e}");
        assert_eq!(client.slot_state(0).unwrap(), FREE);
    }

    #[test]
    fn hostile_requests_are_errors() {
        let (server, client) = pair("hostile-req", layout());
        let limits = Limits { max_tokens: 4, max_message_bytes: 1 << 20 };
        let cases: [(usize, u32, &str); 5] = [
            (offsets::N, 1_000_000, "n"),
            (offsets::N, 0, "hidden.shape"),
            (offsets::K, 0, "k"),
            (offsets::K, 9, "k"),
            (offsets::DTYPE, 77, "dtype"),
        ];
        for (off, value, field) in cases {
            post(&client, 0, 1, 2, WireDType::F32);
            server.poke(0, off, &value.to_le_bytes()).unwrap();
            let (_, parts) = server.take_request(0, &SHAPE, &limits).unwrap();
            let e = parts.unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
            server.post_response(0, 1, Err((1, "bad"))).unwrap();
            client.take_response(0, 1, 2, 8, WireDType::F32).unwrap().unwrap_err();
        }
        // n fits the limits but not the slot.
        let limits = Limits::default();
        post(&client, 0, 1, 2, WireDType::F32);
        server.poke(0, offsets::N, &4000u32.to_le_bytes()).unwrap();
        let (_, parts) = server.take_request(0, &SHAPE, &limits).unwrap();
        assert!(parts.unwrap_err().to_string().contains("do not fit"));
        // A slot that is not in the request state is not taken.
        server.poke(0, offsets::STATE, &9u32.to_le_bytes()).unwrap();
        assert!(matches!(server.take_request(0, &SHAPE, &limits), Err(ShmError::Corrupt(_))));
        assert!(server.take_request(5, &SHAPE, &limits).is_err());
    }

    #[test]
    fn hostile_responses_are_errors() {
        let (server, client) = pair("hostile-resp", layout());
        let limits = Limits::default();
        let answer = |poke: &dyn Fn(&Ring)| {
            post(&client, 0, 4, 2, WireDType::F32);
            let (seq, _) = server.take_request(0, &SHAPE, &limits).unwrap();
            server.post_response(0, seq, Ok((&[1.0; 16], WireDType::F32))).unwrap();
            poke(&server);
            let r = client.take_response(0, 4, 2, 8, WireDType::F32);
            client.poke(0, offsets::STATE, &FREE.to_le_bytes()).unwrap();
            r
        };
        assert_eq!(answer(&|_| {}).unwrap().unwrap(), vec![1.0; 16]);
        let bad: [(usize, u64); 5] = [
            (offsets::RSEQ, 5),
            (offsets::RLEN, 1 << 40),
            (offsets::RLEN, 60),
            (offsets::STATUS, 9),
            (offsets::STATE, 2),
        ];
        for (off, v) in bad {
            let bytes = if off == offsets::STATUS || off == offsets::STATE {
                (v as u32).to_le_bytes().to_vec()
            } else {
                v.to_le_bytes().to_vec()
            };
            let e = answer(&|s| s.poke(0, off, &bytes).unwrap()).unwrap_err();
            assert!(matches!(e, ShmError::Corrupt(_)), "{off}: {e}");
        }
        // An error message longer than allowed.
        let e = answer(&|s| {
            s.poke(0, offsets::STATUS, &1u32.to_le_bytes()).unwrap();
            s.poke(0, offsets::RLEN, &(1u64 << 20).to_le_bytes()).unwrap();
        })
        .unwrap_err();
        assert!(matches!(e, ShmError::Corrupt(_)), "{e}");
        // NaN in an answer.
        let e = answer(&|s| s.poke(0, SLOT_HEADER, &f32::NAN.to_le_bytes()).unwrap()).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
    }

    #[test]
    fn proof_fails_on_wrong_nonce_size_or_directory() {
        let d = dir();
        let name = "ring-proof";
        let _ = std::fs::remove_file(d.join(name));
        let server = Ring::create(&d, name, layout()).unwrap();
        let e = Ring::open(&d, name, layout(), server.nonce() ^ 2).unwrap_err();
        assert!(matches!(e, ShmError::NotShared(_)), "{e}");
        assert!(!server.acknowledged());
        let other = Layout { slots: 3, ..layout() };
        assert!(Ring::open(&d, name, other, server.nonce()).is_err());
        let e = Ring::open(&d, "no-such-ring", layout(), 1).unwrap_err();
        assert!(matches!(e, ShmError::NotShared(_)), "{e}");
        for bad in ["../x", "", ".hidden", "a/b"] {
            assert!(Ring::open(&d, bad, layout(), 1).is_err());
        }
        // Same name twice is refused by the creator.
        assert!(Ring::create(&d, name, layout()).is_err());
        drop(server);
        assert!(!d.join(name).exists(), "the creator removes its object");
    }

    #[test]
    fn host_ids_compare() {
        let here = HostId::of(&dir()).unwrap();
        assert_eq!(here.differs(&here.clone()), None);
        let other_boot = HostId { boot_id: "x".into(), ..here.clone() };
        assert!(here.differs(&other_boot).unwrap().contains("boot id"));
        let other_dir = HostId { ino: here.ino + 1, ..here.clone() };
        assert!(here.differs(&other_dir).unwrap().contains("shared-memory directories"));
        assert_eq!(HostId::from_proto(&here.to_proto()), Some(here));
        assert_eq!(HostId::from_proto(&ShmHost::default()), None);
    }

    #[test]
    fn layouts_are_checked() {
        assert!(layout().check(1 << 20).is_ok());
        assert!(Layout { slots: 0, ..layout() }.check(usize::MAX).is_err());
        assert!(Layout { slots: 65, ..layout() }.check(usize::MAX).is_err());
        assert!(Layout { slot_bytes: 100, ..layout() }.check(usize::MAX).is_err());
        assert!(Layout { slot_bytes: layout().slot_bytes + 8, ..layout() }
            .check(usize::MAX)
            .is_err());
        assert!(layout().check(1024).is_err());
        assert!(Layout::for_calls(1, usize::MAX, 8, 2, WireDType::F32).is_none());
    }
}
