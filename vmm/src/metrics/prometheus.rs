//! A `stats` object (JSON) as a Prometheus text page (exposition format 0.0.4), generically:
//! every numeric field becomes a sample named after its path, so fields added to `stats`
//! later appear on `/metrics` without code here.
//!
//! - A number at `a.b.c` is `PREFIX_a_b_c`; a boolean is 0 or 1; other strings are dropped.
//! - The top-level `state` string is `PREFIX_state{state="running"} 1`.
//! - An array of objects (e.g. `virtio`) gives one sample per element, labelled by the
//!   element's string fields and `pid` (`fabvm_virtio_requests_total{device="block0",...}`).
//! - `vcpu_exits` maps a kind to a count: `fabvm_vcpu_exits_total{kind="io_out"}`.
//! - A name ending in `_total`, or a field known to only grow ([`COUNTER_FIELDS`]), is a
//!   counter; everything else a gauge.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

/// Content type of the page.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Fields that only grow, exported as counters under their own name.
pub const COUNTER_FIELDS: &[&str] = &[
    "harvests",
    "requested_harvests",
    "requested_syncs",
    "rehashed_pages",
    "cpu_ms",
    "full_scans",
];

/// Numeric fields of array elements that name the element (a label, not a sample).
const ID_FIELDS: &[&str] = &["pid"];

/// Objects whose keys are a label rather than part of the name: (field, label, metric name).
const LABELLED: &[(&str, &str, &str)] = &[("vcpu_exits", "kind", "vcpu_exits_total")];

/// Renders `stats` with every metric name starting `PREFIX_`.
pub fn render(stats: &Value, prefix: &str) -> String {
    let mut page = Page::default();
    if let Some(state) = stats.get("state").and_then(Value::as_str) {
        page.add(
            &format!("{prefix}_state"),
            "state",
            vec![("state".into(), state.into())],
            Number::Int(1),
        );
    }
    page.walk(prefix, "", stats, &[]);
    page.text()
}

#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

#[derive(Debug, Default)]
struct Family {
    help: String,
    samples: Vec<(Vec<(String, String)>, Number)>,
}

#[derive(Debug, Default)]
struct Page {
    families: BTreeMap<String, Family>,
}

impl Page {
    fn walk(&mut self, name: &str, path: &str, value: &Value, labels: &[(String, String)]) {
        match value {
            Value::Number(n) => {
                let number = match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => Number::Int(i.into()),
                    (_, Some(u), _) => Number::Int(u.into()),
                    (_, _, Some(f)) => Number::Float(f),
                    _ => return,
                };
                self.add(name, path, labels.to_vec(), number);
            }
            Value::Bool(b) => self.add(name, path, labels.to_vec(), Number::Int((*b).into())),
            Value::Object(map) => {
                let last = path.rsplit('.').next().unwrap_or("");
                if let Some((_, label, metric)) = LABELLED.iter().find(|(f, ..)| *f == last) {
                    let base = name.strip_suffix(last).unwrap_or(name);
                    for (key, v) in map {
                        let mut labels = labels.to_vec();
                        labels.push(((*label).into(), key.clone()));
                        self.walk(&format!("{base}{metric}"), path, v, &labels);
                    }
                    return;
                }
                for (key, v) in map {
                    let child = format!("{name}_{}", sanitize(key));
                    let path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    self.walk(&child, &path, v, labels);
                }
            }
            Value::Array(items) => {
                for map in items.iter().filter_map(Value::as_object) {
                    let mut labels = labels.to_vec();
                    let mut rest = map.clone();
                    for (key, v) in map {
                        let label = match v {
                            Value::String(s) => s.clone(),
                            Value::Number(n) if ID_FIELDS.contains(&key.as_str()) => n.to_string(),
                            _ => continue,
                        };
                        labels.push((sanitize(key), label));
                        rest.remove(key);
                    }
                    self.walk(name, path, &Value::Object(rest), &labels);
                }
            }
            Value::String(_) | Value::Null => {}
        }
    }

    fn add(&mut self, name: &str, path: &str, labels: Vec<(String, String)>, value: Number) {
        let family = self.families.entry(name.to_string()).or_default();
        if family.help.is_empty() {
            family.help = format!("stats field {path}");
        }
        family.samples.push((labels, value));
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for (name, family) in &self.families {
            let counter = name.ends_with("_total")
                || COUNTER_FIELDS
                    .iter()
                    .any(|f| name.ends_with(&format!("_{f}")));
            let kind = if counter { "counter" } else { "gauge" };
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in &family.samples {
                let _ = write!(out, "{name}");
                if !labels.is_empty() {
                    let rendered: Vec<String> = labels
                        .iter()
                        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                        .collect();
                    let _ = write!(out, "{{{}}}", rendered.join(","));
                }
                let _ = match value {
                    Number::Int(i) => writeln!(out, " {i}"),
                    Number::Float(f) => writeln!(out, " {f}"),
                };
            }
        }
        out
    }
}

/// A JSON key as part of a metric or label name: `[a-zA-Z0-9_]`, anything else `_`.
fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_lines(page: &str) -> Vec<&str> {
        page.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn identities_fields_appear_generically() {
        let stats = json!({
            "state": "running",
            "vcpus": 2,
            "kernel": "/x",
            "identities": {"pages": 65536, "stale": 3, "budget_percent": 12.5, "harvests": 9,
                           "some_future_field": 7},
            "sharing": {"mode": null, "leader": false, "ksm": {"merging_pages": 4}},
        });
        let page = render(&stats, "fabvm");
        let lines = sample_lines(&page);
        for want in [
            "fabvm_state{state=\"running\"} 1",
            "fabvm_vcpus 2",
            "fabvm_identities_pages 65536",
            "fabvm_identities_stale 3",
            "fabvm_identities_budget_percent 12.5",
            "fabvm_identities_harvests 9",
            "fabvm_identities_some_future_field 7",
            "fabvm_sharing_leader 0",
            "fabvm_sharing_ksm_merging_pages 4",
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{page}");
        }
        assert!(page.contains("# TYPE fabvm_identities_harvests counter"));
        assert!(page.contains("# TYPE fabvm_identities_pages gauge"));
        assert!(!page.contains("kernel"), "strings are not samples:\n{page}");
    }

    #[test]
    fn arrays_and_labelled_maps_become_labels() {
        let stats = json!({
            "vcpu_exits": {"io_out": 5, "hlt": 0},
            "virtio": [
                {"device": "block0", "backend": "/d\"x", "requests_total": 3},
                {"device": "rng0", "backend": "", "requests_total": 1},
            ],
            "snapshots": {"total": 2, "last_duration_ms": 40},
        });
        let page = render(&stats, "fabvm");
        let lines = sample_lines(&page);
        for want in [
            "fabvm_vcpu_exits_total{kind=\"io_out\"} 5",
            "fabvm_vcpu_exits_total{kind=\"hlt\"} 0",
            "fabvm_virtio_requests_total{backend=\"/d\\\"x\",device=\"block0\"} 3",
            "fabvm_virtio_requests_total{backend=\"\",device=\"rng0\"} 1",
            "fabvm_snapshots_total 2",
            "fabvm_snapshots_last_duration_ms 40",
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{page}");
        }
        assert!(page.contains("# TYPE fabvm_vcpu_exits_total counter"));
        assert!(page.contains("# TYPE fabvm_snapshots_last_duration_ms gauge"));
        // One TYPE line per family, however many samples.
        assert_eq!(
            page.matches("# TYPE fabvm_virtio_requests_total").count(),
            1
        );
    }

    #[test]
    fn every_line_is_well_formed() {
        let stats = json!({"a b": {"c-d": 1}, "big": u64::MAX, "neg": -3, "nested": [[1]]});
        let page = render(&stats, "fabvm_host");
        for line in sample_lines(&page) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_{}=\",/\\".contains(c)),
                "{line}"
            );
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(page.contains("fabvm_host_a_b_c_d 1"));
        let host = json!({"vms": [{"pid": 42, "mode": "guided", "mem_bytes": 4096}]});
        let host_page = render(&host, "fabvm_host");
        assert!(
            host_page.contains("fabvm_host_vms_mem_bytes{mode=\"guided\",pid=\"42\"} 4096"),
            "{host_page}"
        );
        assert!(!host_page.contains("vms_pid"), "{host_page}");
        assert!(
            page.contains(&format!("fabvm_host_big {}", u64::MAX)),
            "{page}"
        );
    }
}
