//! The guest's serial console as seen from the harness: a reader thread that splits the
//! VMM's console output into lines (kept in a log file too), and a writer for agent
//! commands. Works with any VMM that puts the guest's ttyS0 on its stdin/stdout.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::AgentLine;

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The expected line did not come in time.
    #[error(
        "timed out after {secs:.0} s waiting for {waiting_for} ({lines_seen} console lines \
         came meanwhile, the last {silent_s:.0} s ago: {last_line:?}; console log: {log})"
    )]
    Timeout {
        /// What we waited for.
        waiting_for: String,
        /// How long.
        secs: f64,
        /// Console lines (agent or not) that arrived during the wait: 0 means no answer at
        /// all, more means the output began and then stopped.
        lines_seen: usize,
        /// Seconds since the last console line of the wait (the whole wait when none came).
        silent_s: f64,
        /// The last console line of the wait (empty when none came).
        last_line: String,
        /// The console log file.
        log: String,
    },
    /// The VMM closed its console (exited?).
    #[error("the console closed while waiting for {waiting_for} (VMM exited? console log: {log})")]
    Closed {
        /// What we waited for.
        waiting_for: String,
        /// The console log file.
        log: String,
    },
    /// The guest kernel panicked (seen on the console).
    #[error("guest kernel panic while waiting for {waiting_for}: {line} (console log: {log})")]
    GuestPanic {
        /// What we waited for.
        waiting_for: String,
        /// The panic line.
        line: String,
        /// The console log file.
        log: String,
    },
    /// The agent came up again although nobody asked for a reboot: the guest reset
    /// (triple fault, or a panic whose message did not reach the console).
    #[error(
        "the guest rebooted unexpectedly while waiting for {waiting_for} (console log: {log})"
    )]
    UnexpectedReboot {
        /// What we waited for.
        waiting_for: String,
        /// The console log file.
        log: String,
    },
    /// Writing a command to the VMM's stdin failed.
    #[error("cannot send '{command}' to the guest console: {source}")]
    Send {
        /// The command.
        command: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The console log file could not be created.
    #[error("cannot create console log {path}: {source}")]
    Log {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A line from the console with the host time it arrived.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// When the harness read it.
    pub at: Instant,
    /// The raw text (without CR/LF).
    pub text: String,
}

/// The guest console: agent commands in, lines out.
pub struct Console {
    rx: Receiver<ConsoleLine>,
    pending: VecDeque<ConsoleLine>,
    input: Box<dyn Write + Send>,
    log_path: String,
    echo: bool,
}

impl Console {
    /// Starts reading `output` on a thread; every line is appended to `log_path`.
    /// With `echo`, lines are also printed to stdout as they come.
    ///
    /// # Errors
    ///
    /// [`ConsoleError::Log`] when the log file cannot be created.
    pub fn new(
        output: Box<dyn Read + Send>,
        input: Box<dyn Write + Send>,
        log_path: &Path,
        echo: bool,
    ) -> Result<Self, ConsoleError> {
        let mut log = File::create(log_path).map_err(|source| ConsoleError::Log {
            path: log_path.display().to_string(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        // The log is best effort: a full disk must not stop the test.
                        let _ = writeln!(log, "{text}");
                        let line = ConsoleLine {
                            at: Instant::now(),
                            text,
                        };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Self {
            rx,
            pending: VecDeque::new(),
            input,
            log_path: log_path.display().to_string(),
            echo,
        })
    }

    /// The console log file.
    pub fn log_path(&self) -> &str {
        &self.log_path
    }

    /// Sends one command line to the agent.
    ///
    /// # Errors
    ///
    /// [`ConsoleError::Send`] when the VMM's stdin is closed.
    pub fn send(&mut self, command: &str) -> Result<(), ConsoleError> {
        log::debug!("-> {command}");
        self.input
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|()| self.input.flush())
            .map_err(|source| ConsoleError::Send {
                command: command.to_string(),
                source,
            })
    }

    /// Reads lines until an agent line satisfies `pred`; returns every agent line read
    /// (the matching one last) and when the match arrived.
    ///
    /// # Errors
    ///
    /// [`ConsoleError::Timeout`], [`ConsoleError::Closed`], [`ConsoleError::GuestPanic`],
    /// or [`ConsoleError::UnexpectedReboot`] when the agent announces `ready` while
    /// something else was expected.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&AgentLine) -> bool,
    ) -> Result<(Vec<AgentLine>, Instant), ConsoleError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut lines = Vec::new();
        let mut seen = 0usize;
        let mut last: Option<(Instant, String)> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = match self.pending.pop_front() {
                Some(line) => Ok(line),
                None => self.rx.recv_timeout(left).inspect(|line| {
                    if self.echo {
                        println!("    | {}", line.text);
                    }
                }),
            };
            match next {
                Ok(line) => {
                    seen += 1;
                    last = Some((line.at, line.text.clone()));
                    if let Some(parsed) = AgentLine::parse(&line.text) {
                        let hit = pred(&parsed);
                        if !hit && parsed.kind == "ready" {
                            return Err(ConsoleError::UnexpectedReboot {
                                waiting_for: what.to_string(),
                                log: self.log_path.clone(),
                            });
                        }
                        lines.push(parsed);
                        if hit {
                            return Ok((lines, line.at));
                        }
                    } else if line.text.contains("Kernel panic - not syncing") {
                        return Err(ConsoleError::GuestPanic {
                            waiting_for: what.to_string(),
                            line: line.text,
                            log: self.log_path.clone(),
                        });
                    } else {
                        log::trace!("console: {}", line.text);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let (at, last_line) = last.unwrap_or((started, String::new()));
                    return Err(ConsoleError::Timeout {
                        waiting_for: what.to_string(),
                        secs: timeout.as_secs_f64(),
                        lines_seen: seen,
                        silent_s: at.elapsed().as_secs_f64(),
                        last_line,
                        log: self.log_path.clone(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ConsoleError::Closed {
                        waiting_for: what.to_string(),
                        log: self.log_path.clone(),
                    })
                }
            }
        }
    }

    /// Looks at what the console printed so far without waiting (lines are kept for the
    /// next [`Console::wait_for`]): fails on a guest panic or an unexpected agent restart.
    /// For polling loops that only talk to the VMM.
    ///
    /// # Errors
    ///
    /// [`ConsoleError::GuestPanic`] or [`ConsoleError::UnexpectedReboot`].
    pub fn check_events(&mut self, what: &str) -> Result<(), ConsoleError> {
        loop {
            match self.rx.try_recv() {
                Ok(line) => {
                    if self.echo {
                        println!("    | {}", line.text);
                    }
                    if line.text.contains("Kernel panic - not syncing") {
                        return Err(ConsoleError::GuestPanic {
                            waiting_for: what.to_string(),
                            line: line.text,
                            log: self.log_path.clone(),
                        });
                    }
                    if AgentLine::parse(&line.text).is_some_and(|l| l.kind == "ready") {
                        return Err(ConsoleError::UnexpectedReboot {
                            waiting_for: what.to_string(),
                            log: self.log_path.clone(),
                        });
                    }
                    self.pending.push_back(line);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Sends `command` and collects the agent lines up to its `AGENT done cmd=<name>`.
    ///
    /// # Errors
    ///
    /// As [`Console::send`] and [`Console::wait_for`].
    pub fn command(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<Vec<AgentLine>, ConsoleError> {
        let name = command.split_whitespace().next().unwrap_or("").to_string();
        self.send(command)?;
        let what = format!("the agent to finish '{command}'");
        let (lines, _) = self.wait_for(&what, timeout, |l| {
            l.kind == "done" && l.get("cmd") == Some(name.as_str())
        })?;
        Ok(lines)
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sink() -> Box<dyn Write + Send> {
        Box::new(std::io::sink())
    }

    fn log() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("guest-tests-console-{}.log", std::process::id()))
    }

    #[test]
    fn collects_until_done() {
        let out =
            "boot noise\r\nAGENT meminfo memtotal_kb=1 t=1.0\r\nAGENT done cmd=meminfo t=1.1\r\n";
        let mut c = Console::new(Box::new(Cursor::new(out)), sink(), &log(), false).unwrap();
        let lines = c.command("meminfo", Duration::from_secs(5)).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].get_u64("memtotal_kb"), Some(1));
    }

    #[test]
    fn guest_panic_is_reported() {
        let out = "[  113.6] Kernel panic - not syncing: System is deadlocked on memory\n";
        let mut c = Console::new(Box::new(Cursor::new(out)), sink(), &log(), false).unwrap();
        let err = c.command("report", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, ConsoleError::GuestPanic { .. }), "{err}");
    }

    #[test]
    fn unexpected_ready_is_a_reboot() {
        let out = "AGENT ready kernel=x t=1.0\nAGENT done cmd=report t=1.1\n";
        let mut c = Console::new(Box::new(Cursor::new(out)), sink(), &log(), false).unwrap();
        let err = c.command("report", Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(err, ConsoleError::UnexpectedReboot { .. }),
            "{err}"
        );
    }

    #[test]
    fn check_events_keeps_lines_and_spots_reboots() {
        let out = "AGENT meminfo memtotal_kb=1 t=1\nAGENT done cmd=meminfo t=1\n";
        let mut c = Console::new(Box::new(Cursor::new(out)), sink(), &log(), false).unwrap();
        thread::sleep(Duration::from_millis(100));
        c.check_events("polling").unwrap();
        let (lines, _) = c
            .wait_for("done", Duration::from_secs(5), |l| l.kind == "done")
            .unwrap();
        assert_eq!(lines.len(), 2);
        let out = "AGENT ready t=1\n";
        let mut c = Console::new(Box::new(Cursor::new(out)), sink(), &log(), false).unwrap();
        thread::sleep(Duration::from_millis(100));
        let err = c.check_events("polling").unwrap_err();
        assert!(
            matches!(err, ConsoleError::UnexpectedReboot { .. }),
            "{err}"
        );
    }

    #[test]
    fn closed_console_is_an_error() {
        let mut c = Console::new(Box::new(Cursor::new("")), sink(), &log(), false).unwrap();
        let err = c.command("report", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, ConsoleError::Closed { .. }), "{err}");
    }

    #[test]
    fn times_out() {
        // A console that stays silent for longer than the wait.
        struct Silent;
        impl Read for Silent {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                thread::sleep(Duration::from_secs(5));
                Ok(0)
            }
        }
        let mut c = Console::new(Box::new(Silent), sink(), &log(), false).unwrap();
        let err = c
            .wait_for("nothing", Duration::from_millis(50), |_| true)
            .unwrap_err();
        assert!(matches!(err, ConsoleError::Timeout { .. }), "{err}");
    }
}
