//! x86-64 Linux syscall numbers to names (the common ones).

/// `(number, name)`, by number.
const NAMES: &[(u64, &str)] = &[
    (0, "read"),
    (1, "write"),
    (2, "open"),
    (3, "close"),
    (4, "stat"),
    (5, "fstat"),
    (8, "lseek"),
    (9, "mmap"),
    (10, "mprotect"),
    (11, "munmap"),
    (12, "brk"),
    (13, "rt_sigaction"),
    (14, "rt_sigprocmask"),
    (16, "ioctl"),
    (17, "pread64"),
    (18, "pwrite64"),
    (20, "writev"),
    (21, "access"),
    (22, "pipe"),
    (24, "sched_yield"),
    (32, "dup"),
    (33, "dup2"),
    (35, "nanosleep"),
    (39, "getpid"),
    (41, "socket"),
    (42, "connect"),
    (56, "clone"),
    (57, "fork"),
    (58, "vfork"),
    (59, "execve"),
    (60, "exit"),
    (61, "wait4"),
    (62, "kill"),
    (63, "uname"),
    (72, "fcntl"),
    (78, "getdents"),
    (79, "getcwd"),
    (80, "chdir"),
    (82, "rename"),
    (83, "mkdir"),
    (87, "unlink"),
    (89, "readlink"),
    (96, "gettimeofday"),
    (102, "getuid"),
    (110, "getppid"),
    (158, "arch_prctl"),
    (165, "mount"),
    (186, "gettid"),
    (202, "futex"),
    (217, "getdents64"),
    (218, "set_tid_address"),
    (228, "clock_gettime"),
    (231, "exit_group"),
    (257, "openat"),
    (262, "newfstatat"),
    (293, "pipe2"),
    (302, "prlimit64"),
    (318, "getrandom"),
    (334, "rseq"),
    (435, "clone3"),
];

/// The name of syscall `nr` (`unknown` if not in the table).
pub fn name(nr: u64) -> &'static str {
    NAMES.binary_search_by_key(&nr, |&(n, _)| n).ok().and_then(|i| NAMES.get(i)).map_or("unknown", |&(_, n)| n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_by_number() {
        assert!(super::NAMES.windows(2).all(|w| w[0].0 < w[1].0), "sorted, no duplicates");
        assert_eq!(super::name(39), "getpid");
        assert_eq!(super::name(0), "read");
        assert_eq!(super::name(435), "clone3");
        assert_eq!(super::name(9999), "unknown");
    }
}
