//! Automatic sizing as the API shows it: the operator's policy, the controller's state
//! and its decisions. The VMM owns the controller; this module only carries its figures.

use serde::{Deserialize, Serialize};

fn default_target() -> u8 {
    75
}

/// An automatic sizing policy as the operator gives it; sizes in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutosizePolicy {
    /// Smallest plugged size.
    pub min: u64,
    /// Largest plugged size.
    pub max: u64,
    /// Target utilisation in percent of guest memory in use (used = total - available),
    /// 1-99.
    #[serde(default = "default_target")]
    pub target_percent: u8,
    /// Memory kept free above used when shrinking; `None`: the VMM's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<u64>,
    /// Grow past what the guest's onlining policy can manage (with everything onlined into
    /// ZONE_MOVABLE, 3x the boot RAM, beyond which the guest kernel runs short of memory
    /// for its own structures), up to `max`. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub beyond_cap: bool,
}

/// Why a policy was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AutosizeError {
    /// The policy is wrong (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// This VMM cannot size automatically (HTTP 409).
    #[error("{0}")]
    Unsupported(String),
}

/// Parses a size like `512M`, `4G`, `1024K`, `2GiB` or a plain byte count (K, M, G, T
/// are powers of 1024).
///
/// # Errors
///
/// A message saying what is wrong with the text.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "invalid size '{s}': expected a number with an optional K, M, G or T suffix, like 512M or 4G"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}': number too large"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "invalid size '{s}': unknown suffix '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

impl AutosizePolicy {
    /// Checks what needs no knowledge of the device: `min <= max`, target 1-99.
    ///
    /// # Errors
    ///
    /// [`AutosizeError::Invalid`] naming the field.
    pub fn check(&self) -> Result<(), AutosizeError> {
        if self.min > self.max {
            return Err(AutosizeError::Invalid(format!(
                "autosize min {} is above max {}",
                self.min, self.max
            )));
        }
        if !(1..=99).contains(&self.target_percent) {
            return Err(AutosizeError::Invalid(format!(
                "autosize target {}% must be between 1 and 99",
                self.target_percent
            )));
        }
        Ok(())
    }

    /// Parses `min=SIZE,max=SIZE[,target=PERCENT][,headroom=SIZE][,beyond_cap=yes|no]`,
    /// keys in any order.
    ///
    /// # Errors
    ///
    /// [`AutosizeError::Invalid`] naming the key that is unknown, repeated, missing or
    /// malformed.
    pub fn parse_spec(s: &str) -> Result<Self, AutosizeError> {
        let bad = |m: String| AutosizeError::Invalid(m);
        let (mut min, mut max, mut target, mut headroom) = (None, None, None, None);
        let mut beyond_cap = None;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("autosize '{part}': expected key=value")))?;
            let size = |v: &str| parse_size(v).map_err(|e| bad(format!("autosize {k}: {e}")));
            let slot_taken = match k {
                "min" => min.replace(size(v)?).is_some(),
                "max" => max.replace(size(v)?).is_some(),
                "headroom" => headroom.replace(size(v)?).is_some(),
                "target" => {
                    let t: u8 = v.trim_end_matches('%').parse().map_err(|_| {
                        bad(format!(
                            "autosize target '{v}': expected a percentage, 1-99"
                        ))
                    })?;
                    target.replace(t).is_some()
                }
                "beyond_cap" => {
                    let b = match v {
                        "yes" | "on" | "true" => true,
                        "no" | "off" | "false" => false,
                        _ => {
                            return Err(bad(format!(
                                "autosize beyond_cap '{v}': expected yes or no"
                            )))
                        }
                    };
                    beyond_cap.replace(b).is_some()
                }
                _ => {
                    return Err(bad(format!(
                        "autosize: unknown key '{k}' (min, max, target, headroom, beyond_cap)"
                    )))
                }
            };
            if slot_taken {
                return Err(bad(format!("autosize: {k} given twice")));
            }
        }
        let need = |v: Option<u64>, k: &str| {
            v.ok_or_else(|| {
                bad(format!(
                    "autosize: {k}=SIZE is missing (e.g. min=512M,max=8G)"
                ))
            })
        };
        Ok(AutosizePolicy {
            min: need(min, "min")?,
            max: need(max, "max")?,
            target_percent: target.unwrap_or_else(default_target),
            headroom,
            beyond_cap: beyond_cap.unwrap_or(false),
        })
    }
}

/// The body of `PUT /v1/memory/autosize`: `{"enabled": false}`, or a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutosizeRequest {
    /// Turn automatic sizing off; the requested size stays where it is.
    Off,
    /// Turn it on (or change the policy).
    On(AutosizePolicy),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    #[serde(default)]
    enabled: Option<bool>,
    min: Option<u64>,
    max: Option<u64>,
    target_percent: Option<u8>,
    headroom: Option<u64>,
    beyond_cap: Option<bool>,
}

impl AutosizeRequest {
    /// Parses a request body.
    ///
    /// # Errors
    ///
    /// [`AutosizeError::Invalid`] saying what the body should be.
    pub fn from_json(body: &[u8]) -> Result<Self, AutosizeError> {
        let shape = "body must be {\"enabled\": false} or {\"min\": <bytes>, \"max\": <bytes>[, \
                     \"target_percent\": 1-99][, \"headroom\": <bytes>][, \"beyond_cap\": \
                     true|false]}";
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| AutosizeError::Invalid(format!("{shape}: {e}")))?;
        if !v.is_object() {
            return Err(AutosizeError::Invalid(format!(
                "{shape}: not a JSON object"
            )));
        }
        let b: RequestBody = serde_json::from_value(v)
            .map_err(|e| AutosizeError::Invalid(format!("{shape}: {e}")))?;
        let any_policy = b.min.is_some()
            || b.max.is_some()
            || b.target_percent.is_some()
            || b.headroom.is_some()
            || b.beyond_cap.is_some();
        match (b.enabled, b.min, b.max) {
            (Some(false), ..) if !any_policy => Ok(AutosizeRequest::Off),
            (Some(false), ..) => Err(AutosizeError::Invalid(format!(
                "{shape}: \"enabled\": false takes no policy fields"
            ))),
            (None | Some(true), Some(min), Some(max)) => {
                let p = AutosizePolicy {
                    min,
                    max,
                    target_percent: b.target_percent.unwrap_or_else(default_target),
                    headroom: b.headroom,
                    beyond_cap: b.beyond_cap.unwrap_or(false),
                };
                p.check()?;
                Ok(AutosizeRequest::On(p))
            }
            _ => Err(AutosizeError::Invalid(format!(
                "{shape}: min and max are both needed"
            ))),
        }
    }

    /// The request as a JSON body.
    pub fn to_json(&self) -> String {
        match self {
            AutosizeRequest::Off => "{\"enabled\":false}".into(),
            // A struct of integers always serializes.
            AutosizeRequest::On(p) => serde_json::to_string(p).unwrap_or_default(),
        }
    }
}

/// The guest's figures as the balloon's statistics last gave them, in bytes unless named.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatsView {
    /// MemTotal.
    pub total: Option<u64>,
    /// MemAvailable.
    pub available: Option<u64>,
    /// MemFree.
    pub free: Option<u64>,
    /// Disk caches.
    pub caches: Option<u64>,
    /// Major page faults (a count).
    pub major_faults: Option<u64>,
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// OOM kills (newer kernels; a count).
    pub oom_kills: Option<u64>,
    /// Allocation stalls (newer kernels; a count).
    pub alloc_stalls: Option<u64>,
    /// Pages scanned by kswapd (newer kernels; a count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Pages scanned in direct reclaim (newer kernels; a count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Pages reclaimed by kswapd (newer kernels; a count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Pages reclaimed in direct reclaim (newer kernels; a count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
    /// Milliseconds since they came.
    pub age_ms: u64,
}

/// One decision of the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutosizeDecision {
    /// Milliseconds since the VMM started.
    pub at_ms: u64,
    /// Requested size before.
    pub from: u64,
    /// Requested size after.
    pub to: u64,
    /// Why.
    pub reason: String,
}

/// The controller's view, in `GET /v1/memory` as `autosize` (absent when off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutosizeStatus {
    /// The policy in force.
    pub policy: AutosizePolicy,
    /// The most the controller plugs: `max`, or less where the guest's onlining policy
    /// limits it and `beyond_cap` is off.
    pub cap: u64,
    /// `watching`, `growing`, `shrinking`, `holding`, `moving`, `at-limit`, `stale`,
    /// `stalled` or `backing-off`.
    pub state: String,
    /// Why the state is what it is.
    pub reason: String,
    /// The guest's latest figures.
    pub stats: Option<GuestStatsView>,
    /// The last decisions, newest last (at most 16).
    pub decisions: Vec<AutosizeDecision>,
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn specs_parse_in_any_order_with_defaults() {
        let p = AutosizePolicy::parse_spec("max=8G,min=512M").unwrap();
        assert_eq!(
            (p.min, p.max, p.target_percent, p.headroom),
            (512 * M, 8 << 30, 75, None)
        );
        let p = AutosizePolicy::parse_spec("min=0,max=2G,target=60%,headroom=128M").unwrap();
        assert_eq!((p.target_percent, p.headroom), (60, Some(128 * M)));
        assert!(!p.beyond_cap);
        let p = AutosizePolicy::parse_spec("min=0,max=2G,beyond_cap=yes").unwrap();
        assert!(p.beyond_cap);
        assert!(
            !AutosizePolicy::parse_spec("beyond_cap=no,min=0,max=2G")
                .unwrap()
                .beyond_cap
        );
    }

    #[test]
    fn bad_specs_name_their_key() {
        for (spec, key) in [
            ("max=1G", "min"),
            ("min=1G", "max"),
            ("min=1G,max=2G,min=1G", "min given twice"),
            ("min=1G,max=2G,size=3G", "unknown key 'size'"),
            ("min=1X,max=2G", "min"),
            ("min=1G,max=2G,target=abc", "target"),
            ("min=1G,max", "'max'"),
            ("min=1G,max=2G,beyond_cap=maybe", "beyond_cap"),
            (
                "min=1G,max=2G,beyond_cap=no,beyond_cap=no",
                "beyond_cap given twice",
            ),
        ] {
            let e = AutosizePolicy::parse_spec(spec).unwrap_err().to_string();
            assert!(e.contains(key), "{spec}: {e}");
        }
    }

    #[test]
    fn check_refuses_min_above_max_and_odd_targets() {
        let mut p = AutosizePolicy::parse_spec("min=2G,max=1G").unwrap();
        assert!(p.check().unwrap_err().to_string().contains("above max"));
        p.min = 0;
        assert!(p.check().is_ok());
        for t in [0, 100, 255] {
            p.target_percent = t;
            assert!(p.check().is_err(), "{t}");
        }
    }

    #[test]
    fn request_bodies() {
        assert_eq!(
            AutosizeRequest::from_json(br#"{"enabled": false}"#).unwrap(),
            AutosizeRequest::Off
        );
        let on = AutosizeRequest::from_json(br#"{"min": 0, "max": 1024}"#).unwrap();
        let AutosizeRequest::On(p) = &on else {
            panic!("{on:?}")
        };
        assert_eq!((p.min, p.max, p.target_percent), (0, 1024, 75));
        assert_eq!(
            AutosizeRequest::from_json(on.to_json().as_bytes()).unwrap(),
            on
        );
        assert_eq!(
            AutosizeRequest::from_json(AutosizeRequest::Off.to_json().as_bytes()).unwrap(),
            AutosizeRequest::Off
        );
        let lifted =
            AutosizeRequest::from_json(br#"{"min": 0, "max": 1024, "beyond_cap": true}"#).unwrap();
        assert!(
            matches!(&lifted, AutosizeRequest::On(p) if p.beyond_cap),
            "{lifted:?}"
        );
        assert!(lifted.to_json().contains("\"beyond_cap\":true"));
        assert!(!on.to_json().contains("beyond_cap"));
        assert_eq!(
            AutosizeRequest::from_json(lifted.to_json().as_bytes()).unwrap(),
            lifted
        );
        for bad in [
            &br#"{"enabled": true}"#[..],
            br#"{"enabled": false, "beyond_cap": true}"#,
            br#"{"min": 0, "max": 4, "beyond_cap": 1}"#,
            br#"{"enabled": false, "min": 0}"#,
            br#"{"min": 5, "max": 4}"#,
            br#"{"min": 0, "max": 4, "target_percent": 100}"#,
            br#"{"min": 0, "max": 4, "colour": 1}"#,
            br#"[0, 4]"#,
            b"",
        ] {
            assert!(
                matches!(
                    AutosizeRequest::from_json(bad),
                    Err(AutosizeError::Invalid(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
