//! Raw mode for an interactive console: when stdin is a terminal, keystrokes go to the
//! guest unprocessed (no local echo or line editing, Ctrl-C reaches the guest). The previous
//! mode is restored when the guard drops.

use std::io;

/// Restores the terminal mode on drop.
#[derive(Debug)]
pub struct RawModeGuard {
    saved: libc::termios,
}

/// Puts stdin in raw mode if it is a terminal; `Ok(None)` when it is not (a pipe, a file,
/// /dev/null), which is left alone.
///
/// # Errors
///
/// The terminal attributes cannot be read or set.
pub fn raw_stdin() -> io::Result<Option<RawModeGuard>> {
    // SAFETY: isatty only inspects the descriptor number.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return Ok(None);
    }
    // SAFETY: termios is plain data; an all-zero value is valid to be overwritten.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `saved` is a valid, writable termios; stdin is open.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = saved;
    // SAFETY: `raw` is a valid termios that cfmakeraw modifies in place.
    unsafe { libc::cfmakeraw(&mut raw) };
    // Keep output post-processing so the host's own messages still get CR-LF.
    raw.c_oflag = saved.c_oflag;
    // SAFETY: `raw` is a valid termios; stdin is open.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(RawModeGuard { saved }))
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios read from this same terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
