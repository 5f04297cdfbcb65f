//! Clocks used by the harness: CLOCK_MONOTONIC_RAW for timestamps (one
//! system-wide clock, so a sender's and a receiver's stamps on different CPUs
//! are directly comparable), thread/process CPU clocks for cost per message.

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC_RAW in nanoseconds (vDSO, not slewed by NTP).
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_RAW)
}

/// CPU time consumed by the calling thread.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// User + system CPU time of the whole process (all threads, including
/// io_uring SQPOLL/io-wq threads, which belong to the thread group).
pub fn process_cpu_ns() -> u64 {
    // SAFETY: rusage is plain old data; zeroed is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Median cost of reading the timestamp clock, for the report.
pub fn clock_overhead_ns() -> u64 {
    let mut v: Vec<u64> = (0..1001)
        .map(|_| {
            let a = now_ns();
            let b = now_ns();
            b - a
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}

/// The kernel's current clocksource (e.g. "tsc"), if readable.
pub fn clocksource() -> String {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_cpu_clocks_advance() {
        let t0 = now_ns();
        let c0 = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..200_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(now_ns() > t0);
        assert!(thread_cpu_ns() > c0);
        assert!(process_cpu_ns() > 0);
    }
}
