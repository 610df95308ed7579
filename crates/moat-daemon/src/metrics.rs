//! The daemon's metrics (`GET /metrics`, Prometheus text format 0.0.4).
//!
//! Events are counted where they happen: sandbox launches by kind with their latency, execs with
//! their duration, and each sandbox's network ([`moat_net::Traffic`]: bytes each way and refusals
//! by rule). What is a state rather than an event — sandboxes by phase, disk use, memory
//! committed — is measured at each scrape from the database and the disk, so it cannot drift.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `moat_sandboxes` | gauge | `phase` |
//! | `moat_sandbox_launches_total`, `moat_sandbox_launch_failures_total` | counter | `kind` |
//! | `moat_sandbox_launch_seconds` | histogram | `kind` |
//! | `moat_execs_total` | counter | |
//! | `moat_exec_seconds` | histogram | |
//! | `moat_net_refused_total` | counter | `rule` |
//! | `moat_sandbox_net_bytes_total` | counter | `sandbox` (name), `direction` (`from_guest`, `to_guest`) |
//! | `moat_disk_bytes`, `moat_disk_objects` | gauge | `kind` (images, layers, snapshots, templates, sandboxes, volumes) |
//! | `moat_disk_reclaimable_bytes` | gauge | `command` (prune, image_gc, gc) |
//! | `moat_memory_committed_bytes`, `moat_memory_budget_bytes`, `moat_host_memory_bytes` | gauge | |
//!
//! A launch's `kind` is `cold` (booted), `template` (restored from the image's template),
//! `snapshot` (a create from a snapshot; each sandbox of a fork counts as one) or `revert`. Its
//! latency runs from the record written to the sandbox running (an image pull before is not in
//! it). A per-sandbox series goes when its sandbox is removed; its refusals stay in the totals.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use moat_api::{DiskUsage, Phase, SandboxInfo};
use moat_net::{Traffic, RULES};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::ServiceError;
use crate::service::Service;

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// How a sandbox was brought up (the `kind` label of the launch metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchKind {
    Cold,
    Template,
    Snapshot,
    Revert,
    /// Claimed from a warm pool.
    Pool,
}

impl LaunchKind {
    pub const ALL: [LaunchKind; 5] =
        [LaunchKind::Cold, LaunchKind::Template, LaunchKind::Snapshot, LaunchKind::Revert, LaunchKind::Pool];

    pub fn as_str(self) -> &'static str {
        match self {
            LaunchKind::Cold => "cold",
            LaunchKind::Template => "template",
            LaunchKind::Snapshot => "snapshot",
            LaunchKind::Revert => "revert",
            LaunchKind::Pool => "pool",
        }
    }
}

type KindLabel = [(&'static str, &'static str); 1];
type Labels = Vec<(&'static str, String)>;

fn kind(k: LaunchKind) -> KindLabel {
    [("kind", k.as_str())]
}

/// The network counters of one sandbox, and its name for the label.
struct SandboxNet {
    name: String,
    traffic: Arc<Traffic>,
}

/// The daemon's counters and histograms; one per [`Service`].
pub struct Metrics {
    events: Registry,
    launches: Family<KindLabel, Counter>,
    launch_failures: Family<KindLabel, Counter>,
    launch_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    execs: Counter,
    exec_seconds: Histogram,
    nets: Mutex<HashMap<String, SandboxNet>>,
    /// Refusals by rule of the sandboxes that are gone (in the order of [`RULES`]).
    retired_refusals: Mutex<[u64; RULES.len()]>,
}

fn launch_histogram() -> Histogram {
    // 50 ms (a template restore under KVM) to about 7 minutes (a cold boot under TCG).
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut events = Registry::default();
        let launches = Family::<KindLabel, Counter>::default();
        let launch_failures = Family::<KindLabel, Counter>::default();
        let launch_seconds = Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(launch_histogram);
        let execs = Counter::default();
        // 10 ms to about 5 hours.
        let exec_seconds = Histogram::new(exponential_buckets(0.01, 3.0, 15));
        // Every kind from the start, so a rate over them never starts from nothing.
        for k in LaunchKind::ALL {
            drop(launches.get_or_create(&kind(k)));
            drop(launch_failures.get_or_create(&kind(k)));
            drop(launch_seconds.get_or_create(&kind(k)));
        }
        events.register("moat_sandbox_launches", "Sandboxes launched, by kind", launches.clone());
        events.register("moat_sandbox_launch_failures", "Launches that failed, by kind", launch_failures.clone());
        events.register(
            "moat_sandbox_launch_seconds",
            "Seconds from a sandbox's record to it running, by kind (successful launches)",
            launch_seconds.clone(),
        );
        events.register("moat_execs", "Commands started in sandboxes", execs.clone());
        events.register("moat_exec_seconds", "Seconds from a command's start to its exit", exec_seconds.clone());
        Metrics {
            events,
            launches,
            launch_failures,
            launch_seconds,
            execs,
            exec_seconds,
            nets: Mutex::default(),
            retired_refusals: Mutex::default(),
        }
    }
}

/// Times one exec: made when the command starts, told when its exit is read.
pub(crate) struct ExecMeter {
    started: Instant,
    seconds: Histogram,
}

impl ExecMeter {
    /// The command exited.
    pub(crate) fn exited(self) {
        self.seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Run a launch of `kind`, counting it and timing it when it succeeds.
    pub(crate) async fn launch<T, E>(&self, k: LaunchKind, launch: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let started = Instant::now();
        self.launches.get_or_create(&kind(k)).inc();
        let result = launch.await;
        match &result {
            Ok(_) => self.launch_seconds.get_or_create(&kind(k)).observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                self.launch_failures.get_or_create(&kind(k)).inc();
            }
        }
        result
    }

    /// A command started.
    pub(crate) fn exec_started(&self) -> ExecMeter {
        self.execs.inc();
        ExecMeter { started: Instant::now(), seconds: self.exec_seconds.clone() }
    }

    /// The network counters of sandbox `id` (named `name`), made on first use: every stack the
    /// sandbox gets in this daemon's life counts into them.
    pub(crate) fn traffic(&self, id: &str, name: &str) -> Arc<Traffic> {
        let mut nets = self.nets.lock().expect("no panics while held");
        let net = nets
            .entry(id.to_string())
            .or_insert_with(|| SandboxNet { name: name.to_string(), traffic: Arc::default() });
        net.traffic.clone()
    }

    /// Bytes from and to sandbox `id`'s guest since this daemon started, if it has a network.
    pub fn net_bytes(&self, id: &str) -> Option<(u64, u64)> {
        self.nets.lock().expect("no panics while held").get(id).map(|n| n.traffic.bytes())
    }

    /// Drop the series of a sandbox that is gone; its refusals stay counted.
    pub(crate) fn forget(&self, id: &str) {
        let Some(net) = self.nets.lock().expect("no panics while held").remove(id) else { return };
        let mut retired = self.retired_refusals.lock().expect("no panics while held");
        for (i, (_, n)) in net.traffic.refusals().into_iter().enumerate() {
            retired[i] = retired[i].saturating_add(n);
        }
    }

    /// Forget every sandbox not in `known` (a removal that did not pass through
    /// [`Metrics::forget`], such as a record dropped by a reset).
    fn forget_unknown(&self, known: &[SandboxInfo]) {
        let gone: Vec<String> = {
            let nets = self.nets.lock().expect("no panics while held");
            nets.keys().filter(|id| !known.iter().any(|s| &s.id == *id)).cloned().collect()
        };
        for id in gone {
            self.forget(&id);
        }
    }

    /// Refusals by rule, of every sandbox this daemon has run.
    fn refusals(&self) -> [(&'static str, u64); RULES.len()] {
        let mut counts: [(&'static str, u64); RULES.len()] = std::array::from_fn(|i| {
            (RULES[i].as_str(), self.retired_refusals.lock().expect("no panics while held")[i])
        });
        for net in self.nets.lock().expect("no panics while held").values() {
            for (i, (_, n)) in net.traffic.refusals().into_iter().enumerate() {
                counts[i].1 = counts[i].1.saturating_add(n);
            }
        }
        counts
    }

    /// The text of a scrape: the counted events, then `state` measured now.
    pub(crate) fn render(&self, state: &State) -> Result<String, std::fmt::Error> {
        self.forget_unknown(&state.sandboxes);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.events)?;
        prometheus_text::encode(&mut text, &self.measured(state))?;
        Ok(text)
    }

    /// What a scrape measures, as a registry of its own.
    fn measured(&self, state: &State) -> Registry {
        let mut r = Registry::default();
        let phases = Family::<Labels, Gauge>::default();
        for phase in Phase::ALL {
            let n = state.sandboxes.iter().filter(|s| s.phase == phase).count();
            phases.get_or_create(&vec![("phase", phase.as_str().to_string())]).set(n as i64);
        }
        r.register("moat_sandboxes", "Sandboxes, by phase", phases);

        let refused = Family::<Labels, Counter>::default();
        for (rule, n) in self.refusals() {
            refused.get_or_create(&vec![("rule", rule.to_string())]).inc_by(n);
        }
        r.register("moat_net_refused", "Connections and DNS queries refused, by rule", refused);

        let bytes = Family::<Labels, Counter>::default();
        for net in self.nets.lock().expect("no panics while held").values() {
            let (from_guest, to_guest) = net.traffic.bytes();
            for (direction, n) in [("from_guest", from_guest), ("to_guest", to_guest)] {
                bytes.get_or_create(&vec![("sandbox", net.name.clone()), ("direction", direction.into())]).inc_by(n);
            }
        }
        r.register("moat_sandbox_net_bytes", "Bytes of Ethernet frames a sandbox's network carried", bytes);

        let (disk_bytes, disk_objects) = (Family::<Labels, Gauge>::default(), Family::<Labels, Gauge>::default());
        for (kind, usage) in state.disk.kinds() {
            disk_bytes.get_or_create(&vec![("kind", kind.to_string())]).set(gauge(usage.bytes));
            disk_objects.get_or_create(&vec![("kind", kind.to_string())]).set(gauge(usage.count));
        }
        r.register("moat_disk_bytes", "Bytes allocated on disk under the daemon's home, by kind", disk_bytes);
        r.register("moat_disk_objects", "Things on disk under the daemon's home, by kind", disk_objects);
        let reclaimable = Family::<Labels, Gauge>::default();
        let rc = state.disk.reclaimable;
        for (command, usage) in [("prune", rc.prune), ("image_gc", rc.image_gc), ("gc", rc.gc)] {
            reclaimable.get_or_create(&vec![("command", command.to_string())]).set(gauge(usage.bytes));
        }
        r.register("moat_disk_reclaimable_bytes", "Bytes each cleaning command would free now", reclaimable);

        let memory = [
            (
                "moat_memory_committed_bytes",
                "Memory committed to live sandboxes (guest RAM and QEMU's overhead), as admission counts it",
                state.memory.committed,
            ),
            (
                "moat_memory_budget_bytes",
                "Memory sandboxes may commit: the host's RAM times the overcommit",
                state.memory.budget,
            ),
            ("moat_host_memory_bytes", "The host's RAM", state.memory.host),
        ];
        for (name, help, value) in memory {
            let g = Gauge::<i64>::default();
            g.set(gauge(value));
            r.register(name, help, g);
        }
        r
    }
}

/// A byte count as a gauge value (a home of 8 EiB does not happen).
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Memory as admission control counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Memory {
    pub committed: u64,
    pub budget: u64,
    pub host: u64,
}

/// What a scrape measures.
pub(crate) struct State {
    pub sandboxes: Vec<SandboxInfo>,
    pub disk: DiskUsage,
    pub memory: Memory,
}

impl Service {
    /// `GET /metrics`: the metrics text.
    pub async fn metrics(self: &Arc<Self>) -> Result<String, ServiceError> {
        let sandboxes = self.list()?;
        let disk = self.disk_usage().await?;
        let host = self.limits.host.read(&self.rt.config.home)?.memory_bytes;
        let per_sandbox = |s: &SandboxInfo| {
            (u64::from(s.memory_mib) + u64::from(moat_vmm::QEMU_OVERHEAD_MIB)).saturating_mul(1 << 20)
        };
        let memory = Memory {
            committed: sandboxes.iter().filter(|s| s.phase.is_live()).map(per_sandbox).sum(),
            budget: (host as f64 * self.limits.memory_overcommit) as u64,
            host,
        };
        let state = State { sandboxes, disk, memory };
        self.metrics.render(&state).map_err(|_| ServiceError::internal("encoding the metrics failed"))
    }

    /// Bytes from and to sandbox `sandbox_id`'s guest (Ethernet frames) since this daemon
    /// started, or `None` when it has had no network in that time. Both only grow: a caller
    /// tells whether a sandbox had traffic by comparing two readings.
    pub fn net_bytes(&self, sandbox_id: &str) -> Option<(u64, u64)> {
        self.metrics.net_bytes(sandbox_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str, phase: Phase) -> SandboxInfo {
        SandboxInfo { phase, ..crate::state::tests::sample(id, name) }
    }

    /// Samples of a scrape, by name and labels, as `name{k="v",…} value` lines.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (key, value) = l.rsplit_once(' ').expect("a sample line has a value");
                (key.to_string(), value.parse().expect("a number"))
            })
            .collect()
    }

    fn state(sandboxes: Vec<SandboxInfo>) -> State {
        let mut disk = DiskUsage::default();
        disk.images.add(1000);
        disk.reclaimable.prune.add(70);
        State { sandboxes, disk, memory: Memory { committed: 5, budget: 15, host: 10 } }
    }

    #[tokio::test]
    async fn a_scrape_counts_what_happened_and_measures_the_rest() {
        let m = Metrics::default();
        m.launch(LaunchKind::Cold, async { Ok::<_, ()>(()) }).await.unwrap();
        m.launch(LaunchKind::Snapshot, async { Ok::<_, ()>(()) }).await.unwrap();
        m.launch(LaunchKind::Snapshot, async { Err::<(), _>(()) }).await.unwrap_err();
        m.exec_started().exited();
        m.exec_started();
        let a = sample("aaaaaaaaaaaa", "a", Phase::Running);
        let b = sample("bbbbbbbbbbbb", "b", Phase::Stopped);
        let text = m.render(&state(vec![a.clone(), b])).unwrap();
        let s = samples(&text);
        assert_eq!(s["moat_sandbox_launches_total{kind=\"cold\"}"], 1.0);
        assert_eq!(s["moat_sandbox_launches_total{kind=\"snapshot\"}"], 2.0);
        assert_eq!(s["moat_sandbox_launches_total{kind=\"template\"}"], 0.0);
        assert_eq!(s["moat_sandbox_launch_failures_total{kind=\"snapshot\"}"], 1.0);
        assert_eq!(s["moat_sandbox_launch_seconds_count{kind=\"snapshot\"}"], 1.0);
        assert_eq!(s["moat_execs_total"], 2.0);
        assert_eq!(s["moat_exec_seconds_count"], 1.0);
        assert_eq!(s["moat_sandboxes{phase=\"running\"}"], 1.0);
        assert_eq!(s["moat_sandboxes{phase=\"stopped\"}"], 1.0);
        assert_eq!(s["moat_sandboxes{phase=\"paused\"}"], 0.0);
        assert_eq!(s["moat_disk_bytes{kind=\"images\"}"], 1000.0);
        assert_eq!(s["moat_disk_objects{kind=\"images\"}"], 1.0);
        assert_eq!(s["moat_disk_reclaimable_bytes{command=\"prune\"}"], 70.0);
        assert_eq!(s["moat_memory_committed_bytes"], 5.0);
        assert_eq!(s["moat_memory_budget_bytes"], 15.0);
        assert_eq!(s["moat_host_memory_bytes"], 10.0);
        assert_eq!(s["moat_net_refused_total{rule=\"loopback\"}"], 0.0);
    }

    /// A removed sandbox's series goes, its refusals stay in the totals.
    #[test]
    fn per_sandbox_series_end_with_the_sandbox() {
        let m = Metrics::default();
        let a = sample("aaaaaaaaaaaa", "a", Phase::Running);
        let b = sample("bbbbbbbbbbbb", "b", Phase::Running);
        let ta = m.traffic(&a.id, &a.name);
        let tb = m.traffic(&b.id, &b.name);
        assert!(Arc::ptr_eq(&ta, &m.traffic(&a.id, &a.name)), "a restarted sandbox counts on");
        drop((ta, tb));
        let text = m.render(&state(vec![a.clone(), b.clone()])).unwrap();
        assert!(text.contains("sandbox=\"a\"") && text.contains("sandbox=\"b\""), "{text}");
        assert_eq!(m.net_bytes(&a.id), Some((0, 0)));
        m.forget(&a.id);
        // b's record is gone without a removal through the service: the scrape notices.
        let text = m.render(&state(vec![])).unwrap();
        assert!(!text.contains("sandbox=\"a\"") && !text.contains("sandbox=\"b\""), "{text}");
        assert_eq!(m.net_bytes(&a.id), None);
    }
}
