//! Exit counts by reason and time spent, printed as a table when a VM ends.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

/// What one exit was about, for the top lists after the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitTarget {
    Port(u16),
    Msr(u32),
    /// A nested-paging fault's guest-physical page (its address >> 12).
    Page(u64),
    None,
}

/// Distinct keys a [`TopCounts`] keeps; accesses to others are only summed, so a guest
/// sweeping every port or page grows nothing.
const TRACKED_KEYS: usize = 128;
/// How many of the most frequent keys the report lists.
const LISTED_KEYS: usize = 8;

/// Exit counts by port, MSR or page: the first [`TRACKED_KEYS`] distinct keys, then "others".
#[derive(Default)]
pub struct TopCounts {
    counts: BTreeMap<u64, u64>,
    others: u64,
}

impl TopCounts {
    pub fn count(&mut self, key: u64) {
        if let Some(count) = self.counts.get_mut(&key) {
            *count += 1;
        } else if self.counts.len() < TRACKED_KEYS {
            self.counts.insert(key, 1);
        } else {
            self.others += 1;
        }
    }

    /// `0x3f8 1200, 0x3fd 1100, ... (N others)`, most frequent first; `None` if empty.
    fn summary(&self, show: impl Fn(u64) -> String) -> Option<String> {
        if self.counts.is_empty() {
            return None;
        }
        let mut top: Vec<(u64, u64)> = self.counts.iter().map(|(&k, &c)| (k, c)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let rest: u64 = top.iter().skip(LISTED_KEYS).map(|(_, c)| c).sum::<u64>() + self.others;
        let mut out = String::new();
        for (i, (key, count)) in top.iter().take(LISTED_KEYS).enumerate() {
            let _ = write!(out, "{}{} {count}", if i == 0 { "" } else { ", " }, show(*key));
        }
        if rest > 0 {
            let _ = write!(out, ", others {rest}");
        }
        Some(out)
    }
}

/// Counters for one VM.
#[derive(Default)]
pub struct ExitStats {
    rows: Vec<Row>,
    /// Microseconds spent inside the guest.
    pub guest_micros: u64,
    /// Microseconds spent handling exits.
    pub handling_micros: u64,
    /// Host time (microseconds) when the VM started and when it ended, for its wall time.
    pub started_us: Option<u64>,
    pub ended_us: Option<u64>,
    /// MSR accesses refused with #GP, reported after the table.
    pub msr_refusals: super::msr::MsrRefusals,
    /// Accesses to ports no device claims (reads float high), reported after the table.
    pub unclaimed_port_accesses: u64,
    /// Data accesses to guest-physical addresses with neither RAM nor a device (reads float
    /// high, writes are dropped), reported after the table.
    pub unclaimed_mmio_accesses: u64,
    /// Message-signalled interrupts whose address is not the local APICs' (a device the guest
    /// pointed elsewhere): dropped, reported after the table.
    pub stray_msis: u64,
    ports: TopCounts,
    msrs: TopCounts,
    pages: TopCounts,
}

struct Row {
    kind: &'static str,
    count: u64,
    micros: u64,
}

impl ExitStats {
    /// Counts one exit of `kind` whose handling took `micros`.
    pub fn record(&mut self, kind: &'static str, micros: u64) {
        match self.rows.iter_mut().find(|r| r.kind == kind) {
            Some(row) => {
                row.count += 1;
                row.micros += micros;
            }
            None => self.rows.push(Row { kind, count: 1, micros }),
        }
        self.handling_micros += micros;
    }

    /// Counts what an exit was about, for the top lists.
    pub fn record_target(&mut self, target: ExitTarget) {
        match target {
            ExitTarget::Port(port) => self.ports.count(port.into()),
            ExitTarget::Msr(msr) => self.msrs.count(msr.into()),
            ExitTarget::Page(page) => self.pages.count(page),
            ExitTarget::None => {}
        }
    }

    /// Total exits.
    pub fn total(&self) -> u64 {
        self.rows.iter().map(|r| r.count).sum()
    }

    /// Count for one kind.
    pub fn count(&self, kind: &str) -> u64 {
        self.rows.iter().find(|r| r.kind == kind).map_or(0, |r| r.count)
    }

    /// The table, most frequent first, one line per reason.
    pub fn table(&self, vm: &str) -> String {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(b.kind)));
        let mut out = String::new();
        let _ = write!(
            out,
            "vm {vm}: {} exits; {} in guest, {} handling exits",
            self.total(),
            seconds(self.guest_micros),
            seconds(self.handling_micros)
        );
        if let (Some(start), Some(end)) = (self.started_us, self.ended_us) {
            let _ = write!(out, ", {} from start to end", seconds(end.saturating_sub(start)));
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "  {:<20} {:>10} {:>12} {:>10}", "exit reason", "count", "handling", "avg us");
        for row in rows {
            let _ = writeln!(
                out,
                "  {:<20} {:>10} {:>12} {:>10}",
                row.kind,
                row.count,
                seconds(row.micros),
                row.micros / row.count.max(1)
            );
        }
        for (what, counts, page_numbers) in
            [("ports", &self.ports, false), ("MSRs", &self.msrs, false), ("nested-fault pages", &self.pages, true)]
        {
            let show = |key: u64| alloc::format!("{:#x}", if page_numbers { key << 12 } else { key });
            if let Some(summary) = counts.summary(show) {
                let _ = writeln!(out, "  top {what}: {summary}");
            }
        }
        if let Some(summary) = self.msr_refusals.summary() {
            let _ = writeln!(out, "  {summary}");
        }
        if self.unclaimed_port_accesses > 0 {
            let _ = writeln!(out, "  accesses to ports without a device: {}", self.unclaimed_port_accesses);
        }
        if self.unclaimed_mmio_accesses > 0 {
            let _ = writeln!(
                out,
                "  accesses to guest-physical addresses without RAM or a device: {}",
                self.unclaimed_mmio_accesses
            );
        }
        if self.stray_msis > 0 {
            let _ = writeln!(
                out,
                "  device interrupt messages to addresses other than the local APICs: {}",
                self.stray_msis
            );
        }
        out
    }
}

fn seconds(micros: u64) -> String {
    alloc::format!("{}.{:06} s", micros / 1_000_000, micros % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_reasons_by_count_with_times() {
        let mut stats = ExitStats::default();
        stats.record("io", 10);
        stats.record("cpuid", 3);
        stats.record("io", 30);
        stats.guest_micros = 1_500_000;
        assert_eq!(stats.total(), 3);
        assert_eq!(stats.count("io"), 2);
        let table = stats.table("t");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "vm t: 3 exits; 1.500000 s in guest, 0.000043 s handling exits");
        stats.started_us = Some(1_000_000);
        stats.ended_us = Some(3_500_000);
        let with_wall = stats.table("t");
        assert!(with_wall.starts_with(
            "vm t: 3 exits; 1.500000 s in guest, 0.000043 s handling exits, 2.500000 s from start to end\n"
        ));
        assert!(lines[2].split_whitespace().eq(["io", "2", "0.000040", "s", "20"]));
        assert!(lines[3].split_whitespace().eq(["cpuid", "1", "0.000003", "s", "3"]));
    }

    #[test]
    fn top_lists_name_the_busiest_ports_msrs_and_pages_and_stay_bounded() {
        let mut stats = ExitStats::default();
        for _ in 0..3 {
            stats.record_target(ExitTarget::Port(0x3fd));
        }
        stats.record_target(ExitTarget::Port(0x3f8));
        stats.record_target(ExitTarget::Msr(0x6e0));
        stats.record_target(ExitTarget::Page(0xfee00));
        stats.record_target(ExitTarget::None);
        let table = stats.table("t");
        assert!(table.contains("  top ports: 0x3fd 3, 0x3f8 1\n"), "{table}");
        assert!(table.contains("  top MSRs: 0x6e0 1\n"), "{table}");
        assert!(table.contains("  top nested-fault pages: 0xfee00000 1\n"), "{table}");
        // A sweep of every port keeps 128 keys and sums the rest.
        for port in 0..=u16::MAX {
            stats.record_target(ExitTarget::Port(port));
        }
        assert_eq!(stats.ports.counts.len(), TRACKED_KEYS);
        assert!(stats
            .table("t")
            .contains("  top ports: 0x3fd 4, 0x3f8 2, 0x0 1, 0x1 1, 0x2 1, 0x3 1, 0x4 1, 0x5 1, others 65528\n"));
    }
}
