//! The guest agent's line protocol (see `guest-tests/README.md`).
//!
//! The agent (`guest-tests/image/guest-init.sh`, PID 1 of the guest image) prints lines
//! `AGENT <kind> key=value ... [msg=free text to the end of the line]` on the serial
//! console. This module parses those lines and the multi-line `report` answer into typed
//! values; it does no I/O.

use std::collections::BTreeMap;

/// Prefix of every agent line on the console.
pub const PREFIX: &str = "AGENT ";

/// One parsed agent line.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentLine {
    /// The kind, first word after the prefix (`ready`, `meminfo`, `done`, ...).
    pub kind: String,
    /// `key=value` fields before `msg=`.
    pub fields: BTreeMap<String, String>,
    /// Free text after `msg=` (to the end of the line), if present.
    pub msg: Option<String>,
}

impl AgentLine {
    /// Parses one console line; `None` when it is not an agent line.
    ///
    /// Carriage returns and anything before the prefix (e.g. a kernel message printed
    /// mid-line) are ignored.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim_end_matches(['\r', '\n']);
        let start = line.find(PREFIX)?;
        let rest = &line[start + PREFIX.len()..];
        let (kind, mut rest) = match rest.split_once(' ') {
            Some((k, r)) => (k, r),
            None => (rest, ""),
        };
        if kind.is_empty() {
            return None;
        }
        let mut fields = BTreeMap::new();
        let mut msg = None;
        loop {
            rest = rest.trim_start_matches(' ');
            if rest.is_empty() {
                break;
            }
            if let Some(text) = rest.strip_prefix("msg=") {
                // msg may be followed by the agent's " t=<uptime>" suffix: keep it apart.
                let (text, t) = split_trailing_t(text);
                msg = Some(text.to_string());
                if let Some(t) = t {
                    fields.insert("t".to_string(), t.to_string());
                }
                break;
            }
            let (word, next) = match rest.split_once(' ') {
                Some((w, n)) => (w, n),
                None => (rest, ""),
            };
            if let Some((k, v)) = word.split_once('=') {
                fields.insert(k.to_string(), v.to_string());
            }
            rest = next;
        }
        Some(Self {
            kind: kind.to_string(),
            fields,
            msg,
        })
    }

    /// A field as text.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A field as an unsigned integer (decimal, or hex with `0x`).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        parse_u64(self.get(key)?)
    }

    /// A field as a float (e.g. `t`, the guest uptime in seconds).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.parse().ok()
    }

    /// The guest uptime (seconds) when the agent printed this line, if it carries one.
    pub fn uptime(&self) -> Option<f64> {
        self.get_f64("t")
    }
}

/// Splits a trailing ` t=<number>` off a `msg=` text.
fn split_trailing_t(text: &str) -> (&str, Option<&str>) {
    if let Some(pos) = text.rfind(" t=") {
        let t = &text[pos + 3..];
        if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return (&text[..pos], Some(t));
        }
    }
    (text, None)
}

/// Parses decimal or `0x` hex.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// One memory block (`/sys/devices/system/memory/memoryN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBlock {
    /// Block index N.
    pub id: u64,
    /// `online` or `offline` (`going-offline` transiently).
    pub state: String,
    /// `valid_zones`, comma separated (`Movable`, `Normal`, or a list when offline).
    pub zones: String,
}

/// One zone of `/proc/zoneinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Zone name (`DMA`, `DMA32`, `Normal`, `Movable`, ...).
    pub name: String,
    /// Present pages (4 KiB).
    pub present_pages: u64,
    /// Managed pages (4 KiB).
    pub managed_pages: u64,
}

/// One `/proc/iomem` line mentioning virtio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IomemRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// Resource name (`virtio0`, `System RAM (virtio_mem)`, ...).
    pub name: String,
}

impl IomemRange {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.end.saturating_sub(self.start).saturating_add(1)
    }
}

/// One kernel log line with its timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct DmesgLine {
    /// Seconds since boot, from the `[   12.345678]` prefix.
    pub time: Option<f64>,
    /// The message after the timestamp.
    pub text: String,
}

impl DmesgLine {
    /// Parses `[   12.345678] text`.
    pub fn parse(line: &str) -> Self {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix('[') {
            if let Some((ts, text)) = rest.split_once(']') {
                if let Ok(time) = ts.trim().parse::<f64>() {
                    return Self {
                        time: Some(time),
                        text: text.trim_start().to_string(),
                    };
                }
            }
        }
        Self {
            time: None,
            text: trimmed.to_string(),
        }
    }
}

/// Everything the agent's `report` command prints, typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// MemTotal in kB.
    pub memtotal_kb: u64,
    /// MemFree in kB.
    pub memfree_kb: u64,
    /// MemAvailable in kB.
    pub memavail_kb: u64,
    /// Memory block size in bytes (`block_size_bytes`).
    pub block_size: u64,
    /// `auto_online_blocks` policy.
    pub auto_online: String,
    /// All memory blocks.
    pub blocks: Vec<MemoryBlock>,
    /// All zones.
    pub zones: Vec<Zone>,
    /// `/proc/iomem` lines mentioning virtio.
    pub iomem: Vec<IomemRange>,
    /// virtio_mem kernel log lines and bad signs.
    pub dmesg: Vec<DmesgLine>,
    /// Guest uptime when the report ended.
    pub uptime: f64,
}

impl Report {
    /// Builds a report from the lines of one `report` (or partial: `meminfo`, `blocks`...).
    pub fn from_lines(lines: &[AgentLine]) -> Self {
        let mut r = Self::default();
        for l in lines {
            match l.kind.as_str() {
                "meminfo" => {
                    r.memtotal_kb = l.get_u64("memtotal_kb").unwrap_or(0);
                    r.memfree_kb = l.get_u64("memfree_kb").unwrap_or(0);
                    r.memavail_kb = l.get_u64("memavail_kb").unwrap_or(0);
                }
                "blocksize" => {
                    r.block_size = l.get_u64("bytes").unwrap_or(0);
                    r.auto_online = l.get("auto_online").unwrap_or("").to_string();
                }
                "block" => r.blocks.push(MemoryBlock {
                    id: l.get_u64("id").unwrap_or(0),
                    state: l.get("state").unwrap_or("").to_string(),
                    zones: l.get("zones").unwrap_or("").to_string(),
                }),
                "zone" => r.zones.push(Zone {
                    name: l.get("name").unwrap_or("").to_string(),
                    present_pages: l.get_u64("present_pages").unwrap_or(0),
                    managed_pages: l.get_u64("managed_pages").unwrap_or(0),
                }),
                "iomem" => r.iomem.push(IomemRange {
                    start: l.get_u64("start").unwrap_or(0),
                    end: l.get_u64("end").unwrap_or(0),
                    name: l.msg.clone().unwrap_or_default(),
                }),
                "dmesg" => r
                    .dmesg
                    .push(DmesgLine::parse(l.msg.as_deref().unwrap_or(""))),
                _ => {}
            }
            if let Some(t) = l.uptime() {
                r.uptime = t;
            }
        }
        r
    }

    /// Memory blocks whose physical range lies in `[start, start + size)`.
    pub fn blocks_in(&self, start: u64, size: u64) -> Vec<&MemoryBlock> {
        if self.block_size == 0 {
            return Vec::new();
        }
        let first = start / self.block_size;
        let end = start.saturating_add(size).div_ceil(self.block_size);
        self.blocks
            .iter()
            .filter(|b| b.id >= first && b.id < end)
            .collect()
    }

    /// Total bytes of `System RAM (virtio_mem)` in `/proc/iomem`.
    pub fn virtio_mem_ram(&self) -> u64 {
        self.iomem
            .iter()
            .filter(|r| r.name.contains("System RAM (virtio_mem)"))
            .map(IomemRange::size)
            .sum()
    }

    /// Present bytes of the named zone.
    pub fn zone_present_bytes(&self, name: &str) -> u64 {
        self.zones
            .iter()
            .filter(|z| z.name == name)
            .map(|z| z.present_pages.saturating_mul(4096))
            .sum()
    }

    /// Present bytes of all kernel zones (everything but Movable and Device).
    pub fn kernel_present_bytes(&self) -> u64 {
        self.zones
            .iter()
            .filter(|z| z.name != "Movable" && z.name != "Device")
            .map(|z| z.present_pages.saturating_mul(4096))
            .sum()
    }

    /// The value of the last virtio_mem log line `<key>: 0x...` (e.g. `requested size`).
    pub fn dmesg_value(&self, key: &str) -> Option<u64> {
        self.dmesg_values(key).last().map(|(_, v)| *v)
    }

    /// All virtio_mem log lines `<key>: 0x...`, with their timestamps, oldest first.
    pub fn dmesg_values(&self, key: &str) -> Vec<(Option<f64>, u64)> {
        let needle = format!("{key}: ");
        self.dmesg
            .iter()
            .filter(|d| d.text.contains("virtio_mem"))
            .filter_map(|d| {
                let pos = d.text.find(&needle)?;
                let v = d.text[pos + needle.len()..].split_whitespace().next()?;
                Some((d.time, parse_u64(v)?))
            })
            .collect()
    }
}

/// Log lines that mean the driver or the memory hotplug path went wrong
/// (the Linux driver's and memory hotplug's own error messages).
pub const BAD_SIGNS: &[&str] = &[
    "alignment of the physical",
    "not addressable",
    "not pluggable",
    "could not reserve device region",
    "marking device broken",
    "onlining denied",
    "WARNING:",
    "BUG:",
    "Oops",
    "Call Trace",
];

/// Marks of the guest running out of memory: bad except where a scenario squeezes
/// the guest on purpose (pressure), where they are the expected cost.
pub const OOM_SIGNS: &[&str] = &["page allocation failure", "Out of memory"];

/// Bad-sign lines logged at or after `since` (guest uptime, seconds).
///
/// Lines before `since` are boot-time noise of the nested test CPU (e.g. an xstate
/// warning), unrelated to virtio-mem: callers pass the time of the first virtio_mem line.
/// With `allow_oom`, page allocation failures and the `Call Trace:` that the kernel
/// prints with them (within a second) are not counted.
pub fn bad_lines(dmesg: &[DmesgLine], since: f64, allow_oom: bool) -> Vec<&DmesgLine> {
    let oom_times: Vec<f64> = dmesg
        .iter()
        .filter(|d| OOM_SIGNS.iter().any(|b| d.text.contains(b)))
        .filter_map(|d| d.time)
        .collect();
    dmesg
        .iter()
        .filter(|d| d.time.is_none_or(|t| t >= since))
        .filter(|d| {
            let oom = OOM_SIGNS.iter().any(|b| d.text.contains(b));
            if oom {
                return !allow_oom;
            }
            if !BAD_SIGNS.iter().any(|b| d.text.contains(b)) {
                return false;
            }
            let follows_oom = d.text.contains("Call Trace")
                && d.time
                    .is_some_and(|t| oom_times.iter().any(|o| t >= *o && t - *o < 1.0));
            !(allow_oom && follows_oom)
        })
        .collect()
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_msg_and_trailing_uptime() {
        let l = AgentLine::parse(
            "junk AGENT iomem start=0x100 end=0x1ff msg=System RAM (virtio_mem) t=4.5\r",
        )
        .unwrap();
        assert_eq!(l.kind, "iomem");
        assert_eq!(l.get_u64("start"), Some(0x100));
        assert_eq!(l.get_u64("end"), Some(0x1ff));
        assert_eq!(l.msg.as_deref(), Some("System RAM (virtio_mem)"));
        assert_eq!(l.uptime(), Some(4.5));
    }

    #[test]
    fn non_agent_lines_are_none() {
        assert!(AgentLine::parse("[    1.0] virtio_mem: hello").is_none());
        assert!(AgentLine::parse("AGENT ").is_none());
    }

    #[test]
    fn kind_without_fields() {
        let l = AgentLine::parse("AGENT pong").unwrap();
        assert_eq!(l.kind, "pong");
        assert!(l.fields.is_empty());
    }

    #[test]
    fn dmesg_timestamps() {
        let d = DmesgLine::parse("[    4.202499] virtio_mem virtio0: start address: 0x100000000");
        assert_eq!(d.time, Some(4.202499));
        assert_eq!(d.text, "virtio_mem virtio0: start address: 0x100000000");
        assert_eq!(DmesgLine::parse("no stamp").time, None);
    }

    fn report() -> Report {
        let lines = [
            "AGENT meminfo memtotal_kb=414992 memfree_kb=385724 memavail_kb=386200 shmem_kb=1 t=4.62",
            "AGENT blocksize bytes=0x8000000 auto_online=online_movable t=4.63",
            "AGENT block id=3 state=online zones=DMA32",
            "AGENT block id=32 state=online zones=Movable",
            "AGENT block id=33 state=offline zones=DMA32,Normal,Movable",
            "AGENT zone name=DMA present_pages=3998 managed_pages=3840",
            "AGENT zone name=DMA32 present_pages=126944 managed_pages=99908",
            "AGENT zone name=Movable present_pages=32768 managed_pages=32768",
            "AGENT iomem start=0x100000000 end=0x1ffffffff msg=virtio0",
            "AGENT iomem start=0x100000000 end=0x107ffffff msg=System RAM (virtio_mem)",
            "AGENT dmesg msg=[    4.20] virtio_mem virtio0: requested size: 0x0",
            "AGENT dmesg msg=[    6.50] virtio_mem virtio0: requested size: 0x40000000",
            "AGENT dmesg msg=[    1.06] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606",
            "AGENT done cmd=report t=4.94",
        ];
        let parsed: Vec<_> = lines.iter().filter_map(|l| AgentLine::parse(l)).collect();
        Report::from_lines(&parsed)
    }

    #[test]
    fn report_fields() {
        let r = report();
        assert_eq!(r.memtotal_kb, 414992);
        assert_eq!(r.block_size, 0x8000000);
        assert_eq!(r.auto_online, "online_movable");
        assert_eq!(r.blocks.len(), 3);
        assert_eq!(r.blocks_in(0x100000000, 0x100000000).len(), 2);
        assert_eq!(r.virtio_mem_ram(), 0x8000000);
        assert_eq!(r.zone_present_bytes("Movable"), 32768 * 4096);
        assert_eq!(r.kernel_present_bytes(), (3998 + 126944) * 4096);
        assert_eq!(r.dmesg_value("requested size"), Some(0x40000000));
        assert_eq!(r.dmesg_values("requested size")[1].0, Some(6.5));
        assert_eq!(r.uptime, 4.94);
    }

    #[test]
    fn bad_lines_respect_since() {
        let r = report();
        assert_eq!(bad_lines(&r.dmesg, 0.0, false).len(), 1);
        assert!(bad_lines(&r.dmesg, 4.0, false).is_empty());
    }

    #[test]
    fn allocation_failures_only_allowed_when_asked() {
        let d: Vec<_> = [
            "[ 48.70] kworker/0:1: page allocation failure: order:0, mode:0x140cca",
            "[ 48.78] Call Trace:",
            "[ 60.00] Call Trace:",
        ]
        .iter()
        .map(|l| DmesgLine::parse(l))
        .collect();
        assert_eq!(bad_lines(&d, 0.0, false).len(), 3);
        let allowed = bad_lines(&d, 0.0, true);
        assert_eq!(allowed.len(), 1);
        assert_eq!(allowed[0].time, Some(60.0));
    }
}
