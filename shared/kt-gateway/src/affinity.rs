//! CPU lists (`0,1`, `2-9`, `0-3,8`) and pinning threads to them, for `kt bench gateway`'s
//! split of the gateway and the load generator onto separate cores.
//!
//! The FFI module of this crate: `sched_getaffinity`/`sched_setaffinity` through `libc`.

use std::fmt;

/// Why a CPU list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    #[error("the CPU list is empty")]
    Empty,
    #[error("`{part}` in the CPU list is not a CPU number or a range like 2-9")]
    NotANumber { part: String },
    #[error("the range `{part}` in the CPU list runs backwards")]
    Backwards { part: String },
    #[error("CPU {cpu} is beyond the {max} CPUs this system's affinity masks can name")]
    TooLarge { cpu: usize, max: usize },
    #[error("CPU {cpu} is listed twice")]
    Repeated { cpu: usize },
    #[error("CPU {cpu} is not available to this process (it may run on {allowed})")]
    NotAllowed { cpu: usize, allowed: CpuList },
}

/// The largest CPU number plus one that a `cpu_set_t` holds (1024 with glibc).
#[cfg(target_os = "linux")]
const MAX_CPUS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();
#[cfg(not(target_os = "linux"))]
const MAX_CPUS: usize = 1024;

/// A non-empty set of distinct CPU numbers, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// Parses the kernel's cpulist format: comma-separated CPU numbers and inclusive ranges
    /// (`0,1`, `2-9`, `0-3,8,10-11`); spaces around the parts are ignored.
    pub fn parse(text: &str) -> Result<Self, CpuListError> {
        let mut cpus = Vec::new();
        let number = |s: &str, part: &str| {
            let s = s.trim();
            // `usize::from_str` takes a leading `+`; a CPU list does not.
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CpuListError::NotANumber { part: part.to_owned() });
            }
            let cpu = s.parse::<usize>().unwrap_or(usize::MAX);
            if cpu >= MAX_CPUS {
                return Err(CpuListError::TooLarge { cpu, max: MAX_CPUS });
            }
            Ok(cpu)
        };
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                if text.trim().is_empty() {
                    return Err(CpuListError::Empty);
                }
                return Err(CpuListError::NotANumber { part: part.to_owned() });
            }
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a, part)?, number(b, part)?),
                None => {
                    let c = number(part, part)?;
                    (c, c)
                }
            };
            if first > last {
                return Err(CpuListError::Backwards { part: part.to_owned() });
            }
            for cpu in first..=last {
                if cpus.contains(&cpu) {
                    return Err(CpuListError::Repeated { cpu });
                }
                cpus.push(cpu);
            }
        }
        Ok(Self(cpus))
    }

    /// The CPUs, in the order given.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// How many CPUs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a parsed list has at least one CPU.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks every CPU is one this process may run on (its affinity mask: `taskset`, cgroup
    /// cpusets, offline CPUs). Where the mask cannot be read, accepts the list.
    pub fn check_allowed(&self) -> Result<(), CpuListError> {
        let Some(allowed) = allowed_cpus() else { return Ok(()) };
        match self.0.iter().find(|c| !allowed.0.contains(c)) {
            Some(&cpu) => Err(CpuListError::NotAllowed { cpu, allowed }),
            None => Ok(()),
        }
    }
}

impl std::str::FromStr for CpuList {
    type Err = CpuListError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Writes the list back in the compact form (`0-3,8`).
impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i;
            while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
                j += 1;
            }
            if i > 0 {
                f.write_str(",")?;
            }
            if j == i {
                write!(f, "{}", sorted[i])?;
            } else {
                write!(f, "{}-{}", sorted[i], sorted[j])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// The CPUs the calling thread may run on, or `None` where that cannot be read.
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> Option<CpuList> {
    // SAFETY: cpu_set_t is plain old data; zeroed is its empty set (what CPU_ZERO does).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t and the size passed is its size; pid 0 is the
    // calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return None;
    }
    // SAFETY: `c` is below the set's capacity in bits.
    let cpus: Vec<usize> = (0..MAX_CPUS).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    (!cpus.is_empty()).then_some(CpuList(cpus))
}

/// Affinity masks are only read on Linux.
#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> Option<CpuList> {
    None
}

/// Pins the calling thread to `cpus` (it may then run on any of them).
pub fn pin_current_thread(cpus: &CpuList) -> std::io::Result<()> {
    kt_core::pin_current_thread(cpus.cpus())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ok(s: &str) -> Vec<usize> {
        CpuList::parse(s).unwrap().cpus().to_vec()
    }

    #[test]
    fn parses_numbers_ranges_and_mixes() {
        assert_eq!(ok("0,1"), [0, 1]);
        assert_eq!(ok("2-9"), [2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(ok("0-3,8,10-11"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(ok("5"), [5]);
        assert_eq!(ok("7-7"), [7]);
        assert_eq!(ok(" 4 , 1 - 2 "), [4, 1, 2]);
        assert_eq!(ok("1023"), [1023]);
    }

    #[test]
    fn refuses_broken_lists() {
        use CpuListError::*;
        let err = |s: &str| CpuList::parse(s).unwrap_err();
        assert_eq!(err(""), Empty);
        assert_eq!(err("  "), Empty);
        assert_eq!(err("0,,1"), NotANumber { part: "".into() });
        assert_eq!(err("0,"), NotANumber { part: "".into() });
        assert_eq!(err("x"), NotANumber { part: "x".into() });
        assert_eq!(err("1-"), NotANumber { part: "1-".into() });
        assert_eq!(err("-3"), NotANumber { part: "-3".into() });
        assert_eq!(err("1-2-3"), NotANumber { part: "1-2-3".into() });
        assert_eq!(err("+1"), NotANumber { part: "+1".into() });
        assert_eq!(err("0x2"), NotANumber { part: "0x2".into() });
        assert_eq!(err("1.5"), NotANumber { part: "1.5".into() });
        assert_eq!(err("0 1"), NotANumber { part: "0 1".into() });
        assert_eq!(err("9-2"), Backwards { part: "9-2".into() });
        assert_eq!(err("1024"), TooLarge { cpu: 1024, max: MAX_CPUS });
        assert_eq!(err("0-99999999999999999999999"), TooLarge { cpu: usize::MAX, max: MAX_CPUS });
        assert_eq!(err("1,1"), Repeated { cpu: 1 });
        assert_eq!(err("0-3,2"), Repeated { cpu: 2 });
        // The messages name the part at fault.
        assert_eq!(
            err("2-x").to_string(),
            "`2-x` in the CPU list is not a CPU number or a range like 2-9"
        );
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(CpuList::parse("3,0-1,8,9,10").unwrap().to_string(), "0-1,3,8-10");
        assert_eq!(CpuList::parse("5").unwrap().to_string(), "5");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn checks_and_pins_to_allowed_cpus() {
        let allowed = allowed_cpus().unwrap();
        let first = CpuList(vec![allowed.cpus()[0]]);
        first.check_allowed().unwrap();
        assert!(
            matches!(
                CpuList(vec![MAX_CPUS - 1]).check_allowed(),
                Err(CpuListError::NotAllowed { cpu, .. }) if cpu == MAX_CPUS - 1
            ) || allowed.cpus().contains(&(MAX_CPUS - 1))
        );
        // Pin a thread of its own, so the test thread keeps its mask.
        std::thread::spawn(move || {
            pin_current_thread(&first).unwrap();
            assert_eq!(allowed_cpus().unwrap(), first);
        })
        .join()
        .unwrap();
    }
}
