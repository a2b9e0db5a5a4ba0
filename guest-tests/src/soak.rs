//! The soak: boots one guest after another under a VMM and puts each through the same
//! console-heavy routine (agent ready, `dmesg_all`, `report`, plug 512 MiB, unplug,
//! `dmesg_all`, poweroff), printing one `SOAK` line per boot and a table of failure
//! classes. It measures the test host and the VMM's console and interrupt paths
//! (`ci/testhost-soak`); it is a tool, not part of `ci/test`.
//!
//! Failures of the nested test host itself (L1 panic, hang, exit without status) are
//! seen by `ci/testhost-run`, outside this process; inside, a boot fails in one of the
//! guest-side classes of [`FailureClass`].

use std::path::Path;
use std::time::{Duration, Instant};

use crate::console::ConsoleError;
use crate::guest::{Guest, ScenarioError, MIB, QUICK};
use crate::vmm::{VmSpec, Vmm, VmmError};

/// Plugged and unplugged by every soak boot.
pub const SOAK_PLUG: u64 = 512 * MIB;

/// Why a soak boot (or a scenario) failed, as the soak counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureClass {
    /// The guest never printed the agent's ready line (or the VMM died before).
    BootHang,
    /// The guest reset (the agent came up again) without being asked.
    UnexpectedReset,
    /// The guest kernel panicked.
    GuestPanic,
    /// An agent answer began and then stopped: console output lost mid-answer.
    ConsoleStall,
    /// A command got no answer at all (input lost, or the guest hung).
    AgentTimeout,
    /// The VMM process exited while the guest ran.
    VmmExit,
    /// The guest answered, but not what the routine expects.
    ScenarioFailure,
}

impl FailureClass {
    /// Every class, in table order.
    pub const ALL: [FailureClass; 7] = [
        FailureClass::BootHang,
        FailureClass::UnexpectedReset,
        FailureClass::GuestPanic,
        FailureClass::ConsoleStall,
        FailureClass::AgentTimeout,
        FailureClass::VmmExit,
        FailureClass::ScenarioFailure,
    ];

    /// The grep-able name of the class.
    pub fn label(self) -> &'static str {
        match self {
            FailureClass::BootHang => "l2-boot-hang",
            FailureClass::UnexpectedReset => "l2-unexpected-reset",
            FailureClass::GuestPanic => "l2-panic",
            FailureClass::ConsoleStall => "l2-console-stall",
            FailureClass::AgentTimeout => "agent-timeout",
            FailureClass::VmmExit => "vmm-exit",
            FailureClass::ScenarioFailure => "scenario-failure",
        }
    }

    /// The class of a scenario error; `booting` when it happened before the agent was
    /// ready; `vmm_exited` when the VMM process is gone.
    pub fn of(e: &ScenarioError, booting: bool, vmm_exited: bool) -> FailureClass {
        match e {
            ScenarioError::Console(ConsoleError::UnexpectedReboot { .. }) => {
                FailureClass::UnexpectedReset
            }
            ScenarioError::Console(ConsoleError::GuestPanic { .. }) => FailureClass::GuestPanic,
            // The VMM could not be started or reached: nothing booted.
            ScenarioError::Vmm(VmmError::Spawn { .. } | VmmError::Connect { .. }) => {
                FailureClass::VmmExit
            }
            _ if vmm_exited => FailureClass::VmmExit,
            _ if booting => FailureClass::BootHang,
            ScenarioError::Console(ConsoleError::Timeout { lines_seen, .. }) => {
                if *lines_seen > 0 {
                    FailureClass::ConsoleStall
                } else {
                    FailureClass::AgentTimeout
                }
            }
            ScenarioError::Console(ConsoleError::Closed { .. }) => FailureClass::VmmExit,
            _ => FailureClass::ScenarioFailure,
        }
    }

    /// Whether the failure says the guest lost interrupts or stopped (the cases where the
    /// VMM's state dump is the evidence to keep).
    pub fn wants_dump(self) -> bool {
        matches!(
            self,
            FailureClass::BootHang | FailureClass::ConsoleStall | FailureClass::AgentTimeout
        )
    }
}

/// One soak boot's outcome.
#[derive(Debug, Clone)]
pub struct SoakBoot {
    /// 1-based boot number.
    pub n: usize,
    /// `None` when it passed.
    pub failure: Option<(FailureClass, String)>,
    /// Wall time of the boot and routine.
    pub wall_s: f64,
}

/// The routine of one booted guest.
fn routine(g: &mut Guest) -> Result<(), ScenarioError> {
    g.agent("dmesg_all", QUICK)?;
    g.report()?;
    let timeout = Duration::from_secs(120);
    let up = g.resize_wait(SOAK_PLUG, g.memtotal_with(SOAK_PLUG), timeout)?;
    crate::ensure!(
        up.reached,
        "plug 512 MiB: MemTotal {} kB, expected {} kB",
        up.memtotal_kb,
        g.memtotal_with(SOAK_PLUG)
    );
    let down = g.resize_wait(0, g.memtotal_with(0), timeout)?;
    crate::ensure!(
        down.reached,
        "unplug: MemTotal {} kB, expected {} kB",
        down.memtotal_kb,
        g.memtotal_with(0)
    );
    g.agent("dmesg_all", QUICK)?;
    g.report()?;
    Ok(())
}

/// Boots `boots` guests from `spec` one after another; prints a `SOAK` line per boot.
pub fn run(vmm: &dyn Vmm, spec: &VmSpec, logs: &Path, boots: usize, echo: bool) -> Vec<SoakBoot> {
    let mut out = Vec::new();
    for n in 1..=boots {
        let mut spec = spec.clone();
        spec.name = format!("{}-soak{n}", spec.name);
        let log = logs.join(format!("{}-{}.log", vmm.name(), spec.name));
        let t = Instant::now();
        let failure = match Guest::boot(vmm, &spec, &log, echo) {
            Err(e) => Some((FailureClass::of(&e, true, false), e.to_string())),
            Ok(mut g) => {
                let res = routine(&mut g);
                let failure = res.err().map(|e| {
                    let exited = g.vmm.exited().is_some();
                    let class = FailureClass::of(&e, false, exited);
                    let mut msg = e.to_string();
                    if class.wants_dump() && !exited {
                        msg.push_str(&format!(" [state dump: {}]", g.save_dump()));
                    }
                    (class, msg)
                });
                g.shutdown();
                failure
            }
        };
        let b = SoakBoot {
            n,
            failure,
            wall_s: t.elapsed().as_secs_f64(),
        };
        match &b.failure {
            None => println!("SOAK {n} ok {:.1} s", b.wall_s),
            Some((c, m)) => println!("SOAK {n} {} {:.1} s: {m}", c.label(), b.wall_s),
        }
        out.push(b);
    }
    out
}

/// The table of failure classes with counts, as printed at the end of a soak.
pub fn summary(boots: &[SoakBoot]) -> String {
    let mut s = String::new();
    let ok = boots.iter().filter(|b| b.failure.is_none()).count();
    s.push_str(&format!("soak: {} boots, {ok} ok\n", boots.len()));
    for c in FailureClass::ALL {
        let n = boots
            .iter()
            .filter(|b| b.failure.as_ref().is_some_and(|(k, _)| *k == c))
            .count();
        s.push_str(&format!("soak: {:<20} {n}\n", c.label()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(lines_seen: usize) -> ScenarioError {
        ScenarioError::Console(ConsoleError::Timeout {
            waiting_for: "x".into(),
            secs: 1.0,
            lines_seen,
            silent_s: 1.0,
            last_line: String::new(),
            log: "l".into(),
        })
    }

    #[test]
    fn classes_of_errors() {
        assert_eq!(
            FailureClass::of(&timeout(3), false, false),
            FailureClass::ConsoleStall
        );
        assert_eq!(
            FailureClass::of(&timeout(0), false, false),
            FailureClass::AgentTimeout
        );
        assert_eq!(
            FailureClass::of(&timeout(0), true, false),
            FailureClass::BootHang
        );
        assert_eq!(
            FailureClass::of(&timeout(3), false, true),
            FailureClass::VmmExit
        );
        let no_vmm = ScenarioError::Vmm(VmmError::Connect {
            path: "s".into(),
            reason: "vmm exited".into(),
        });
        assert_eq!(
            FailureClass::of(&no_vmm, true, false),
            FailureClass::VmmExit
        );
        let reset = ScenarioError::Console(ConsoleError::UnexpectedReboot {
            waiting_for: "x".into(),
            log: "l".into(),
        });
        assert_eq!(
            FailureClass::of(&reset, false, false),
            FailureClass::UnexpectedReset
        );
        assert_eq!(
            FailureClass::of(&ScenarioError::Check("no".into()), false, false),
            FailureClass::ScenarioFailure
        );
    }

    #[test]
    fn summary_counts_each_class() {
        let boots = vec![
            SoakBoot {
                n: 1,
                failure: None,
                wall_s: 1.0,
            },
            SoakBoot {
                n: 2,
                failure: Some((FailureClass::ConsoleStall, "x".into())),
                wall_s: 1.0,
            },
        ];
        let s = summary(&boots);
        assert!(s.contains("soak: 2 boots, 1 ok"), "{s}");
        assert!(s.contains("l2-console-stall     1"), "{s}");
        assert!(s.contains("l2-boot-hang         0"), "{s}");
    }
}
