//! Where the guests run: directly on this host's KVM (it must be the real VMX/SVM one)
//! or inside the nested test host (`ci/testhost-run`), see this crate's README.

/// How to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// Decide from the CPU flags.
    Auto,
    /// Run the VMM here.
    Direct,
    /// Re-run inside the nested test host.
    Testhost,
}

impl Where {
    /// Parses `auto`, `direct`, `testhost`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "direct" => Some(Self::Direct),
            "testhost" => Some(Self::Testhost),
            _ => None,
        }
    }
}

/// True inside the nested test host (`ci/testhost-run` exports `TESTHOST=1`).
pub fn inside_testhost() -> bool {
    std::env::var("TESTHOST").is_ok_and(|v| v == "1")
}

/// Whether a cpuinfo text advertises hardware virtualization (`vmx` or `svm` flags).
pub fn has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Resolves [`Where::Auto`]: direct when this host's CPU has VMX/SVM and `/dev/kvm`
/// exists (or we already are in the test host), else the test host. Returns the choice
/// and a sentence saying why.
pub fn decide(requested: Where) -> (Where, String) {
    if inside_testhost() {
        return (
            Where::Direct,
            "inside the nested test host (L1, kvm_amd on emulated SVM)".into(),
        );
    }
    match requested {
        Where::Direct => (Where::Direct, "directly on this host's KVM (forced)".into()),
        Where::Testhost => (Where::Testhost, "in the nested test host (forced)".into()),
        Where::Auto => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let kvm = std::path::Path::new("/dev/kvm").exists();
            if has_hw_virt(&cpuinfo) && kvm {
                (
                    Where::Direct,
                    "directly on this host's KVM (CPU has vmx/svm)".into(),
                )
            } else {
                (
                    Where::Testhost,
                    format!(
                        "in the nested test host: this host's KVM cannot run Linux guests ({})",
                        if kvm {
                            "no vmx/svm CPU flag"
                        } else {
                            "no /dev/kvm"
                        }
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hw_virt_flags() {
        assert!(has_hw_virt("processor: 0\nflags\t\t: fpu vme svm lm\n"));
        assert!(has_hw_virt("flags : fpu vmx\n"));
        assert!(!has_hw_virt("flags : fpu vme lm\nbugs : svmx\n"));
    }

    #[test]
    fn where_parse() {
        assert_eq!(Where::parse("auto"), Some(Where::Auto));
        assert_eq!(Where::parse("testhost"), Some(Where::Testhost));
        assert_eq!(Where::parse("x"), None);
    }
}
