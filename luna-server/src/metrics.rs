//! The server's Prometheus metrics: one registry, one struct, served as text by `GET /metrics`
//! (`web/`).
//!
//! Every part of the server counts into the same process-wide [`Metrics`] ([`global`]; the HTTP
//! state holds it too): the DHCP loop, the tracker, the store and the pack jobs are far from
//! the HTTP state, and threading a handle through each of them would touch every constructor.
//! Adding a metric is one line in the [`metrics!`] list below (its field, type, name, help and
//! constructor); counting into it is one line where the event happens.
//!
//! This module depends on nothing else of the server, so any part can use it.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One label.
pub type Label = (&'static str, String);
/// Counters by one label.
pub type Counter1 = Family<[Label; 1], Counter>;
/// Counters by two labels.
pub type Counter2 = Family<[Label; 2], Counter>;
/// Gauges by one label.
pub type Gauge1 = Family<[Label; 1], Gauge>;
/// Gauges by two labels.
pub type Gauge2 = Family<[Label; 2], Gauge>;
/// A constructor of histograms (a plain `fn`, so the family type can be named).
pub type HistogramFn = fn() -> Histogram;

fn seconds_buckets() -> Histogram {
    // 0.5 ms .. about 4 s: store commits and small pack jobs.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

fn pack_buckets() -> Histogram {
    // 1 s .. about 68 min.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Declares the [`Metrics`] struct and registers each field under its name. One line per metric:
/// `field: Type = "name", "help", constructor;` (counters get Prometheus's `_total` suffix).
macro_rules! metrics {
    ($( $field:ident : $ty:ty = $name:literal, $help:literal, $ctor:expr; )*) => {
        /// Every metric of the server, registered in one registry.
        pub struct Metrics {
            registry: Registry,
            $( #[doc = $help] pub $field: $ty, )*
        }

        impl Metrics {
            pub fn new() -> Self {
                let mut registry = Registry::default();
                $(
                    let $field: $ty = $ctor;
                    registry.register($name, $help, $field.clone());
                )*
                Metrics { registry, $( $field, )* }
            }
        }
    };
}

metrics! {
    dhcp_packets: Counter2 = "luna_dhcp_packets", "DHCP packets received, by message type and outcome (answered, ignored, refused, error)", Family::default();
    boot_scripts: Counter1 = "luna_boot_scripts", "iPXE scripts served by /boot/ipxe, by kind (node, discovery, refused, error)", Family::default();
    plan_requests: Counter1 = "luna_plan_requests", "install plan requests (/boot/plan), by outcome (served, refused)", Family::default();
    status_reports: Counter1 = "luna_status_reports", "node status reports (boot path and agents), by step", Family::default();
    nodes_by_step: Gauge1 = "luna_nodes", "nodes by their current status step (none: never reported)", Family::default();
    tracker_announces: Counter1 = "luna_tracker_announces", "tracker announces, by event (none, started, completed, stopped, refused)", Family::default();
    tracker_peers: Gauge2 = "luna_tracker_peers", "peers the tracker lists per torrent, by info hash and kind (seeders, leechers)", Family::default();
    seeder_uploaded_bytes: Gauge2 = "luna_seeder_uploaded_bytes", "bytes the server's seeder sent per image revision since it started seeding it", Family::default();
    http_fallback_bytes: Counter = "luna_http_fallback_bytes", "bytes of image files sent over HTTP (agents' fallback and plain downloads)", Counter::default();
    pack_jobs: Counter1 = "luna_pack_jobs", "image pack jobs finished, by outcome (done, failed)", Family::default();
    pack_seconds: Family<[Label; 1], Histogram, HistogramFn> = "luna_pack_duration_seconds", "duration of image pack jobs, by outcome", Family::new_with_constructor(pack_buckets as HistogramFn);
    store_commit_seconds: Histogram = "luna_store_commit_seconds", "latency of store commits (one batch each)", seconds_buckets();
    power_actions: Counter2 = "luna_power_actions", "power actions sent to BMCs, by action and outcome (ok, failed)", Family::default();
    live_clients: Gauge = "luna_live_clients", "open live-view event streams (web page and luna node watch)", Gauge::default();
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The registry in the Prometheus text exposition format (OpenMetrics flavour, `# EOF` last).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

/// One label set of one label.
pub fn l1(k: &'static str, v: impl Into<String>) -> [Label; 1] {
    [(k, v.into())]
}

/// One label set of two labels.
pub fn l2(k1: &'static str, v1: impl Into<String>, k2: &'static str, v2: impl Into<String>) -> [Label; 2] {
    [(k1, v1.into()), (k2, v2.into())]
}

/// The process's metrics.
pub fn global() -> &'static Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(|| Arc::new(Metrics::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` with a real Prometheus text parser and returns the value of `name` with
    /// the given labels.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        // prometheus-parse reads the classic text format; the OpenMetrics `# EOF` is a comment to it.
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
        scrape.samples.iter().find_map(|s| {
            let matches = s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
            if !matches {
                return None;
            }
            match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => Some(v),
                prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            }
        })
    }

    #[test]
    fn metrics_encode_as_parseable_text() {
        let m = Metrics::new();
        m.dhcp_packets.get_or_create(&l2("type", "discover", "outcome", "answered")).inc_by(3);
        m.status_reports.get_or_create(&l1("step", "download")).inc();
        m.nodes_by_step.get_or_create(&l1("step", "installed")).set(7);
        m.http_fallback_bytes.inc_by(4096);
        m.store_commit_seconds.observe(0.002);
        m.pack_seconds.get_or_create(&l1("outcome", "done")).observe(12.0);
        let text = m.encode();
        assert_eq!(
            value(&text, "luna_dhcp_packets_total", &[("type", "discover"), ("outcome", "answered")]),
            Some(3.0)
        );
        assert_eq!(value(&text, "luna_status_reports_total", &[("step", "download")]), Some(1.0));
        assert_eq!(value(&text, "luna_nodes", &[("step", "installed")]), Some(7.0));
        assert_eq!(value(&text, "luna_http_fallback_bytes_total", &[]), Some(4096.0));
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("the whole text parses");
        let hist = scrape.samples.iter().find(|s| s.metric == "luna_store_commit_seconds").expect("histogram");
        let prometheus_parse::Value::Histogram(buckets) = &hist.value else { panic!("not a histogram: {hist:?}") };
        // 2 ms falls into every bucket from 2 ms up.
        assert!(buckets.iter().any(|b| b.less_than >= 0.002 && b.count == 1.0), "{buckets:?}");
        assert!(buckets.iter().any(|b| b.less_than < 0.002 && b.count == 0.0), "{buckets:?}");
        assert!(text.contains("# TYPE luna_pack_duration_seconds histogram"), "{text}");
        assert!(text.contains("# TYPE luna_live_clients gauge"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
