//! NUMA placement of the compute threads.
//!
//! `--numa N` pins every compute thread to the CPUs of node N, read from
//! `/sys/devices/system/node/nodeN/cpulist`. Where that file does not exist (a single-node
//! machine without the node directory, some containers) or pinning fails, the server logs it
//! and runs unpinned. Memory placement is not done yet: weights stay memory-mapped and are
//! paged in by whichever thread touches them first (the pinned compute threads, so usually on
//! the node — but no `mbind`/explicit first-touch pass guarantees it yet).

use std::path::Path;

/// The CPUs of NUMA node `node`, or `None` when the system does not describe it.
pub fn node_cpus(node: usize) -> Option<Vec<usize>> {
    let path = format!("/sys/devices/system/node/node{node}/cpulist");
    let text = std::fs::read_to_string(Path::new(&path)).ok()?;
    parse_cpulist(text.trim())
}

/// Parses the kernel's cpulist format (`0-3,8,10-11`).
pub fn parse_cpulist(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Pins the calling thread to `cpus`. Returns the OS error on failure.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; zeroed is its empty set (what CPU_ZERO does).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &c in cpus.iter().filter(|&&c| c < max) {
        // SAFETY: `c` is below the set's capacity in bits, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid, initialized cpu_set_t and the size passed is its size;
    // pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pinning is only implemented on Linux.
#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpus: &[usize]) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "thread pinning needs Linux"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpulist("5"), Some(vec![5]));
        assert_eq!(parse_cpulist(""), None);
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("x"), None);
    }

    #[test]
    fn absent_node_is_none() {
        assert_eq!(node_cpus(100_000), None);
    }
}
