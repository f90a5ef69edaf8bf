//! Exit counts by reason and time spent, printed as a table when a VM ends.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

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
}
