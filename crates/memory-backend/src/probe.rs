//! Checking that an address faults, without risking the calling process.
//!
//! A forked child reads one byte at the address and exits; the parent looks at how the
//! child ended. A read cannot change the parent's memory even for shared mappings, and a
//! fault kills only the child.

use std::io;

/// How a child that read an address ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The read succeeded: the address is accessible.
    Accessible,
    /// The child was killed by this signal (`SIGSEGV` for a protected or unmapped
    /// address, `SIGBUS` for a missing hugetlb page or a file hole past EOF).
    Signal(i32),
    /// The child exited in another way (exit status).
    Other(i32),
}

/// Forks a child that reads one byte at address `addr` and reports how it ended. The
/// address is a number: the parent never dereferences it.
///
/// # Errors
///
/// The OS error when `fork` or `waitpid` fails.
pub fn read_in_child(addr: usize) -> io::Result<ProbeOutcome> {
    // SAFETY: the child only performs a volatile read and `_exit`, both async-signal-safe,
    // so forking a multi-threaded process is fine (no locks or allocations in the child).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: a fault here kills only the child, which is the purpose;
        // the read cannot change memory. `_exit` skips atexit handlers and destructors
        // that belong to the parent.
        unsafe {
            let _ = (addr as *const u8).read_volatile();
            libc::_exit(0);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    Ok(if libc::WIFSIGNALED(status) {
        ProbeOutcome::Signal(libc::WTERMSIG(status))
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        ProbeOutcome::Accessible
    } else {
        ProbeOutcome::Other(status)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_memory_is_accessible() {
        let x = Box::new(7u8);
        assert_eq!(
            read_in_child(&raw const *x as usize).unwrap(),
            ProbeOutcome::Accessible
        );
    }

    #[test]
    fn null_faults() {
        assert_eq!(
            read_in_child(0).unwrap(),
            ProbeOutcome::Signal(libc::SIGSEGV)
        );
    }
}
