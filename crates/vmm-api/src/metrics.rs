//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4), written by one
//! small builder so every family has its `# HELP` and `# TYPE` lines and valid names.

use std::fmt::Write;

use crate::MemoryStatus;

/// The content type of a metrics answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds a metrics page. Names are given without the `vmm_` prefix the builder adds.
#[derive(Debug, Default)]
pub struct MetricsText {
    out: String,
}

impl MetricsText {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP vmm_{name} {help}");
        let _ = writeln!(self.out, "# TYPE vmm_{name} {kind}");
    }

    /// A gauge with one value.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "gauge", help);
        let _ = writeln!(self.out, "vmm_{name} {value}");
    }

    /// A counter with one value per label set (`[("type", "plug"), ...]`).
    pub fn counter(&mut self, name: &str, help: &str, samples: &[(&[(&str, &str)], u64)]) {
        self.family(name, "counter", help);
        for (labels, value) in samples {
            let _ = writeln!(self.out, "vmm_{name}{} {value}", label_text(labels, None));
        }
    }

    /// A histogram of seconds: `bounds` are the buckets' upper bounds, `buckets` the
    /// observations per bucket (not cumulative, one more than `bounds` for the rest).
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        bounds: &[f64],
        buckets: &[u64],
        sum_s: f64,
        count: u64,
    ) {
        self.family(name, "histogram", help);
        let mut cumulative = 0u64;
        for (i, bound) in bounds.iter().enumerate() {
            cumulative = cumulative.saturating_add(buckets.get(i).copied().unwrap_or(0));
            let le = bound.to_string();
            let _ = writeln!(
                self.out,
                "vmm_{name}_bucket{} {cumulative}",
                label_text(&[], Some(&le))
            );
        }
        let _ = writeln!(self.out, "vmm_{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.out, "vmm_{name}_sum {sum_s}");
        let _ = writeln!(self.out, "vmm_{name}_count {count}");
    }

    /// The sizes and host memory of `status`, as gauges.
    pub fn status(&mut self, status: &MemoryStatus) {
        self.gauge(
            "region_bytes",
            "Size of the virtio-mem region.",
            status.region_size,
        );
        self.gauge(
            "block_size_bytes",
            "Block size of the virtio-mem device.",
            status.block_size,
        );
        self.gauge(
            "requested_bytes",
            "Memory the host asks the guest to plug.",
            status.requested_size,
        );
        self.gauge(
            "plugged_bytes",
            "Memory the guest has plugged.",
            status.plugged_size,
        );
        self.gauge(
            "usable_region_bytes",
            "Part of the region the guest may plug into.",
            status.usable_region_size,
        );
        self.gauge(
            "region_host_resident_bytes",
            "Host memory the region holds, as last sampled.",
            status.host_resident_bytes,
        );
        self.gauge(
            "resize_stalled",
            "1 while a resize makes no progress (see GET /v1/memory for the reason).",
            u64::from(status.state == crate::ResizeState::Stalled),
        );
        self.gauge(
            "host_error",
            "1 while host memory fails (see GET /v1/memory for the error).",
            u64::from(status.host_error.is_some()),
        );
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

/// `{a="x",le="0.5"}`, or nothing without labels. Label values here are the VMM's own
/// words, never client input, so they need no escaping beyond the format's rule.
fn label_text(labels: &[(&str, &str)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    #[test]
    fn a_page_parses_as_prometheus_text_with_every_family() {
        let mut m = MetricsText::new();
        m.status(&MemoryStatus {
            region_size: 1 << 30,
            plugged_size: 256 << 20,
            requested_size: 512 << 20,
            ..MemoryStatus::default()
        });
        m.counter(
            "requests_total",
            "Requests by type and answer.",
            &[
                (&[("type", "plug"), ("response", "ack")], 3),
                (&[("type", "unplug"), ("response", "busy")], 1),
            ],
        );
        m.histogram(
            "plug_host_seconds",
            "Host time per plug.",
            &[0.001, 0.01],
            &[2, 1, 1],
            0.5,
            4,
        );
        let text = m.finish();
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str, label: Option<(&str, &str)>| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| s.value.clone())
        };
        assert!(matches!(
            value("vmm_plugged_bytes", None),
            Some(prometheus_parse::Value::Gauge(v)) if v == f64::from(256u32 << 20)
        ));
        assert!(matches!(
            value("vmm_requests_total", Some(("response", "busy"))),
            Some(prometheus_parse::Value::Counter(v)) if v == 1.0
        ));
        let Some(prometheus_parse::Value::Histogram(h)) = value("vmm_plug_host_seconds", None)
        else {
            panic!("no histogram in:\n{text}");
        };
        let counts: Vec<f64> = h.iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![2.0, 3.0, 4.0], "cumulative buckets:\n{text}");
        for family in [
            "vmm_region_bytes",
            "vmm_requests_total",
            "vmm_plug_host_seconds",
        ] {
            assert!(scrape.docs.contains_key(family), "no HELP for {family}");
        }
    }
}
