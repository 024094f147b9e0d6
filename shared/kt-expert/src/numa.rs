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

pub use kt_core::pin_current_thread;

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
