//! The i8254 programmable interval timer at ports 0x40-0x43 and system control port B (0x61).
//!
//! Counters are not ticked: each channel remembers when it started counting and computes its
//! count and OUT from guest time, so latched reads decrease at exactly 1.193182 MHz however
//! often the guest polls. Channel 0's OUT drives ISA IRQ 0; channel 2's gate and OUT are wired
//! to port 0x61 as on the PC/AT, which is what Linux calibrates the TSC against.
//!
//! Not modelled: BCD counting (the BCD bit is kept in the status byte but counts are binary),
//! and new counts in modes 2 and 3 take effect at once rather than at the end of the period.

use super::{Device, Events, Span};

/// Input clock of every channel, in Hz (8254 on the PC/AT: 14.31818 MHz / 12).
pub const PIT_HZ: u64 = 1_193_182;
/// Channel 0 counter port; channels 1 and 2 follow.
pub const CHANNEL0_PORT: u16 = 0x40;
/// Mode/command register.
pub const COMMAND_PORT: u16 = 0x43;
/// System control port B (channel 2 gate and speaker, channel 2 OUT, refresh toggle).
pub const PORT_B: u16 = 0x61;

/// ISA line of channel 0.
const IRQ0: u8 = 0;
const NS_PER_S: u128 = 1_000_000_000;

// Port B bits (PC/AT technical reference, system control port B).
const PORT_B_GATE2: u8 = 1 << 0;
const PORT_B_WRITABLE: u8 = 0x0f;
const PORT_B_REFRESH: u8 = 1 << 4;
const PORT_B_OUT2: u8 = 1 << 5;

// Access modes (8254 data sheet, control word bits 5:4).
const ACCESS_LATCH: u8 = 0;
const ACCESS_LO: u8 = 1;
const ACCESS_HI: u8 = 2;
const ACCESS_LOHI: u8 = 3;

/// Whole input-clock ticks in `ns` nanoseconds.
fn ticks(ns: u64) -> u64 {
    (ns as u128 * PIT_HZ as u128 / NS_PER_S) as u64
}

/// The first time offset (ns) at which `ticks` reaches `target`.
fn ns_for_ticks(target: u64) -> u64 {
    let ns = (target as u128 * NS_PER_S).div_ceil(PIT_HZ as u128);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// One of the three counters.
#[derive(Clone, Debug)]
struct Channel {
    /// Mode 0-5 (6 and 7 are aliases of 2 and 3).
    mode: u8,
    access: u8,
    bcd: bool,
    /// Initial count, 1..=65536 (a written 0 means 65536).
    count: u32,
    /// A count has been written since the last control word.
    loaded: bool,
    /// Modes 1 and 5 only count after a gate trigger.
    triggered: bool,
    /// Counting has run since this guest time (None: stopped by the gate or not loaded).
    running_since: Option<u64>,
    /// Ticks counted in earlier runs (modes 0 and 4 pause while the gate is low).
    banked: u64,
    gate: bool,
    /// Low byte of a lo-then-hi count waiting for its high byte.
    write_lo: Option<u8>,
    /// The next unlatched read of a lo-then-hi counter returns the high byte.
    read_hi: bool,
    /// Counter latch: value and whether its low byte has been read.
    latched: Option<(u16, bool)>,
    status_latch: Option<u8>,
    /// Channel 0 edges already raised since the count was loaded.
    edges_raised: u64,
    /// Channel 0's IRQ line is held asserted (mode 0 after terminal count).
    line_high: bool,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            access: ACCESS_LOHI,
            bcd: false,
            count: 0x1_0000,
            loaded: false,
            triggered: false,
            running_since: None,
            banked: 0,
            gate,
            write_lo: None,
            read_hi: false,
            latched: None,
            status_latch: None,
            edges_raised: 0,
            line_high: false,
        }
    }

    /// Ticks counted since the count was loaded (or the gate triggered).
    fn elapsed(&self, now_ns: u64) -> u64 {
        let running = self.running_since.map_or(0, |since| ticks(now_ns.saturating_sub(since)));
        self.banked.saturating_add(running)
    }

    fn counting(&self) -> bool {
        self.loaded && (!matches!(self.mode, 1 | 5) || self.triggered)
    }

    /// The counting element's current value.
    fn value(&self, now_ns: u64) -> u16 {
        let n = self.count as u64;
        if !self.counting() {
            return n as u16;
        }
        let d = self.elapsed(now_ns);
        let v = match self.mode {
            // Modes 0, 1, 4, 5 keep counting down through zero (wrapping at 16 bits).
            0 | 1 | 4 | 5 => n.wrapping_sub(d),
            2 => n - d % n,
            // Mode 3 decrements by two each half period.
            _ => n - d.wrapping_mul(2) % n,
        };
        v as u16
    }

    /// The OUT pin (8254 data sheet, mode descriptions).
    fn out(&self, now_ns: u64) -> bool {
        if !self.loaded {
            // A control word sets OUT low in mode 0, high in every other mode.
            return self.mode != 0;
        }
        if !self.counting() {
            return true;
        }
        let n = self.count as u64;
        let d = self.elapsed(now_ns);
        match self.mode {
            0 | 1 => d >= n,
            2 => !self.gate || n == 1 || d % n != n - 1,
            3 => !self.gate || d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    /// The guest-time of the elapsed-tick mark `target` while counting, if it can be reached.
    fn time_of(&self, target: u64) -> Option<u64> {
        let since = self.running_since?;
        Some(since.saturating_add(ns_for_ticks(target.saturating_sub(self.banked))))
    }

    fn control(&mut self, word: u8) {
        let mode = (word >> 1) & 7;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.access = (word >> 4) & 3;
        self.bcd = word & 1 != 0;
        self.loaded = false;
        self.triggered = false;
        self.running_since = None;
        self.banked = 0;
        self.write_lo = None;
        self.read_hi = false;
        self.latched = None;
        self.status_latch = None;
    }

    /// Starts counting a freshly written count.
    fn load(&mut self, count: u16, now_ns: u64) {
        self.count = if count == 0 { 0x1_0000 } else { count as u32 };
        self.loaded = true;
        self.banked = 0;
        self.edges_raised = 0;
        let gated = matches!(self.mode, 0 | 2 | 3 | 4) && !self.gate;
        self.running_since = if gated || matches!(self.mode, 1 | 5) && !self.triggered { None } else { Some(now_ns) };
    }

    fn write(&mut self, byte: u8, now_ns: u64) {
        match self.access {
            ACCESS_LO => self.load(byte as u16, now_ns),
            ACCESS_HI => self.load((byte as u16) << 8, now_ns),
            _ => match self.write_lo.take() {
                Some(lo) => self.load(u16::from_le_bytes([lo, byte]), now_ns),
                None => {
                    self.write_lo = Some(byte);
                    // Writing the first byte of a new count stops a mode 0 count.
                    if self.mode == 0 && self.loaded {
                        self.banked = self.elapsed(now_ns);
                        self.running_since = None;
                        self.loaded = false;
                    }
                }
            },
        }
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if let Some(status) = self.status_latch.take() {
            return status;
        }
        if let Some((value, lo_read)) = self.latched {
            let [lo, hi] = value.to_le_bytes();
            return match self.access {
                ACCESS_LO => {
                    self.latched = None;
                    lo
                }
                ACCESS_HI => {
                    self.latched = None;
                    hi
                }
                _ if !lo_read => {
                    self.latched = Some((value, true));
                    lo
                }
                _ => {
                    self.latched = None;
                    hi
                }
            };
        }
        let [lo, hi] = self.value(now_ns).to_le_bytes();
        match self.access {
            ACCESS_LO => lo,
            ACCESS_HI => hi,
            _ => {
                self.read_hi = !self.read_hi;
                if self.read_hi {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn latch_count(&mut self, now_ns: u64) {
        // A second latch before the first is read is ignored (8254 data sheet, counter latch).
        if self.latched.is_none() {
            self.latched = Some((self.value(now_ns), false));
        }
    }

    fn latch_status(&mut self, now_ns: u64) {
        if self.status_latch.is_none() {
            let out = (self.out(now_ns) as u8) << 7;
            let null_count = (!self.loaded as u8) << 6;
            self.status_latch = Some(out | null_count | self.access << 4 | self.mode << 1 | self.bcd as u8);
        }
    }

    fn set_gate(&mut self, gate: bool, now_ns: u64) {
        let rising = gate && !self.gate;
        let falling = !gate && self.gate;
        self.gate = gate;
        if !self.loaded {
            return;
        }
        match self.mode {
            0 | 4 if falling => {
                self.banked = self.elapsed(now_ns);
                self.running_since = None;
            }
            0 | 4 if rising => self.running_since = Some(now_ns),
            2 | 3 if falling => {
                self.banked = 0;
                self.running_since = None;
            }
            // A rising gate restarts modes 1, 2, 3 and 5 from the initial count.
            1 | 2 | 3 | 5 if rising => {
                self.triggered = true;
                self.banked = 0;
                self.edges_raised = 0;
                self.running_since = Some(now_ns);
            }
            _ => {}
        }
    }
}

/// The i8254 PIT with port 0x61.
pub struct Pit {
    channels: [Channel; 3],
    /// Port B bits 0-3 as written (gate 2, speaker data, parity and I/O check enables).
    port_b: u8,
    refresh: bool,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

const PORTS: [Span; 2] = [Span { start: CHANNEL0_PORT as u64, len: 4 }, Span { start: PORT_B as u64, len: 1 }];

impl Pit {
    /// A PIT after reset: no counts loaded, channel 2's gate low.
    pub fn new() -> Self {
        Pit { channels: [Channel::new(true), Channel::new(true), Channel::new(false)], port_b: 0, refresh: false }
    }

    /// Raises channel 0's IRQ edges that fell due by `now_ns` (several missed periods raise one).
    fn raise_due(&mut self, now_ns: u64, events: &mut Events) {
        let ch = &mut self.channels[0];
        if !ch.counting() || ch.running_since.is_none() {
            return;
        }
        let n = ch.count as u64;
        let d = ch.elapsed(now_ns);
        match ch.mode {
            2 | 3 => {
                // OUT rises when the counter reloads, every `n` ticks.
                let due = d / n;
                if due > ch.edges_raised {
                    ch.edges_raised = due;
                    events.pulse(IRQ0);
                }
            }
            0 | 1 if d >= n && ch.edges_raised == 0 => {
                ch.edges_raised = 1;
                ch.line_high = true;
                events.irq_lines.push((IRQ0, true));
            }
            // OUT strobes low for one tick at terminal count; the IRQ is its rising edge.
            4 | 5 if d > n && ch.edges_raised == 0 => {
                ch.edges_raised = 1;
                events.pulse(IRQ0);
            }
            _ => {}
        }
    }

    /// Drops IRQ 0 if mode 0 left it asserted (reprogramming sets OUT low).
    fn lower_irq0(&mut self, events: &mut Events) {
        if self.channels[0].line_high {
            self.channels[0].line_high = false;
            events.irq_lines.push((IRQ0, false));
        }
    }

    fn command(&mut self, word: u8, now_ns: u64, events: &mut Events) {
        let select = word >> 6;
        if select == 3 {
            // Read-back (8254 data sheet): bit 5 clear latches counts, bit 4 clear latches status.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if word & (2 << i) != 0 {
                    if word & 0x10 == 0 {
                        ch.latch_status(now_ns);
                    }
                    if word & 0x20 == 0 {
                        ch.latch_count(now_ns);
                    }
                }
            }
            return;
        }
        let Some(ch) = self.channels.get_mut(select as usize) else { return };
        if (word >> 4) & 3 == ACCESS_LATCH {
            ch.latch_count(now_ns);
            return;
        }
        ch.control(word);
        if select == 0 {
            self.lower_irq0(events);
        }
    }

    fn read_port_b(&mut self, now_ns: u64) -> u8 {
        // The refresh bit toggles so loops waiting for it to change see it move.
        self.refresh = !self.refresh;
        let out2 = if self.channels[2].out(now_ns) { PORT_B_OUT2 } else { 0 };
        let refresh = if self.refresh { PORT_B_REFRESH } else { 0 };
        self.port_b | out2 | refresh
    }
}

impl Device for Pit {
    fn name(&self) -> &'static str {
        "pit"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn io_read(&mut self, port: u16, _size: u8, now_ns: u64, _events: &mut Events) -> u32 {
        let value = match port {
            PORT_B => self.read_port_b(now_ns),
            0x40..=0x42 => match self.channels.get_mut((port - CHANNEL0_PORT) as usize) {
                Some(ch) => ch.read(now_ns),
                None => 0xff,
            },
            // The command register is write-only.
            _ => 0xff,
        };
        value as u32
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, now_ns: u64, events: &mut Events) {
        // Edges that fell due before the guest reprograms channel 0 must not be lost.
        self.raise_due(now_ns, events);
        let byte = value as u8;
        match port {
            PORT_B => {
                self.port_b = byte & PORT_B_WRITABLE;
                self.channels[2].set_gate(byte & PORT_B_GATE2 != 0, now_ns);
            }
            COMMAND_PORT => self.command(byte, now_ns, events),
            0x40..=0x42 => {
                if port == CHANNEL0_PORT {
                    self.lower_irq0(events);
                }
                if let Some(ch) = self.channels.get_mut((port - CHANNEL0_PORT) as usize) {
                    ch.write(byte, now_ns);
                }
            }
            _ => {}
        }
    }

    fn poll(&mut self, now_ns: u64, events: &mut Events) {
        self.raise_due(now_ns, events);
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        let ch = &self.channels[0];
        if !ch.counting() {
            return None;
        }
        let n = ch.count as u64;
        let target = match ch.mode {
            2 | 3 => ch.edges_raised.saturating_add(1).saturating_mul(n),
            0 | 1 if ch.edges_raised == 0 => n,
            4 | 5 if ch.edges_raised == 0 => n.saturating_add(1),
            _ => return None,
        };
        ch.time_of(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn write(pit: &mut Pit, port: u16, value: u8, now: u64) -> Events {
        let mut events = Events::default();
        pit.io_write(port, 1, value as u32, now, &mut events);
        events
    }

    fn read(pit: &mut Pit, port: u16, now: u64) -> u8 {
        pit.io_read(port, 1, now, &mut Events::default()) as u8
    }

    fn poll(pit: &mut Pit, now: u64) -> Vec<(u8, bool)> {
        let mut events = Events::default();
        pit.poll(now, &mut events);
        events.irq_lines
    }

    /// Counter-latches channel `ch` and reads it lo then hi.
    fn latched(pit: &mut Pit, ch: u16, now: u64) -> u16 {
        write(pit, COMMAND_PORT, (ch as u8) << 6, now);
        let lo = read(pit, 0x40 + ch, now);
        let hi = read(pit, 0x40 + ch, now);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn mode2_raises_irq0_every_period_and_coalesces_missed_ones() {
        let mut pit = Pit::new();
        write(&mut pit, COMMAND_PORT, 0x34, 0); // channel 0, lo/hi, mode 2
        write(&mut pit, 0x40, 0xa9, 1000); // 1193 = 0x04a9: ~1 ms
        write(&mut pit, 0x40, 0x04, 1000);
        // Edge k at 1000 + ceil(k * 1193e9 / 1193182) ns.
        assert_eq!(pit.next_deadline_ns(), Some(1000 + 999_848));
        assert!(poll(&mut pit, 1000 + 999_847).is_empty());
        assert_eq!(poll(&mut pit, 1000 + 999_848), vec![(0, true), (0, false)]);
        assert!(poll(&mut pit, 1000 + 999_848).is_empty(), "one edge is raised once");
        assert_eq!(pit.next_deadline_ns(), Some(1000 + 1_999_695));
        // Ten periods late: one edge, and the next deadline is the next period boundary.
        assert_eq!(poll(&mut pit, 1000 + 10_000_000), vec![(0, true), (0, false)]);
        assert_eq!(pit.next_deadline_ns(), Some(1000 + 10_998_323));
        assert!(poll(&mut pit, 1000 + 10_998_322).is_empty());
        assert_eq!(poll(&mut pit, 1000 + 10_998_323).len(), 2);
        // Mode 2 counts down from n to 1: 100 ticks in, the count is 1093.
        assert_eq!(latched(&mut pit, 0, 1000 + ns_for_ticks(11 * 1193 + 100)), 1093);
    }

    #[test]
    fn mode3_square_wave_period_and_out() {
        let mut pit = Pit::new();
        write(&mut pit, COMMAND_PORT, 0x36, 0); // channel 0, lo/hi, mode 3
        write(&mut pit, 0x40, 100, 0);
        write(&mut pit, 0x40, 0, 0);
        assert_eq!(pit.next_deadline_ns(), Some(ns_for_ticks(100)));
        assert_eq!(ns_for_ticks(100), 83_810);
        assert!(poll(&mut pit, 83_809).is_empty());
        assert_eq!(poll(&mut pit, 83_810), vec![(0, true), (0, false)]);
        // OUT high for the first half, low for the second; status bit 7 shows it.
        write(&mut pit, COMMAND_PORT, 0xe2, ns_for_ticks(149)); // read-back status of channel 0
        assert_eq!(read(&mut pit, 0x40, ns_for_ticks(149)), 0x80 | 0x36);
        write(&mut pit, COMMAND_PORT, 0xe2, ns_for_ticks(150));
        assert_eq!(read(&mut pit, 0x40, ns_for_ticks(150)), 0x36);
        // The count drops by two per tick: 10 ticks into a period it is 80.
        assert_eq!(latched(&mut pit, 0, ns_for_ticks(210)), 80);
    }

    #[test]
    fn mode4_strobe_raises_one_edge_after_terminal_count() {
        let mut pit = Pit::new();
        write(&mut pit, COMMAND_PORT, 0x38, 0); // Linux's one-shot clockevent setup
        write(&mut pit, 0x40, 10, 0);
        write(&mut pit, 0x40, 0, 0);
        assert_eq!(pit.next_deadline_ns(), Some(ns_for_ticks(11)));
        assert!(poll(&mut pit, ns_for_ticks(11) - 1).is_empty());
        assert_eq!(poll(&mut pit, ns_for_ticks(11)), vec![(0, true), (0, false)]);
        assert!(poll(&mut pit, 1_000_000_000).is_empty());
        assert_eq!(pit.next_deadline_ns(), None);
    }

    #[test]
    fn mode0_channel0_asserts_irq0_until_reprogrammed() {
        let mut pit = Pit::new();
        write(&mut pit, COMMAND_PORT, 0x30, 0);
        write(&mut pit, 0x40, 50, 0);
        write(&mut pit, 0x40, 0, 0);
        assert_eq!(poll(&mut pit, ns_for_ticks(50)), vec![(0, true)]);
        assert!(poll(&mut pit, ns_for_ticks(500)).is_empty());
        assert_eq!(write(&mut pit, COMMAND_PORT, 0x30, ns_for_ticks(600)).irq_lines, vec![(0, false)]);
        assert_eq!(pit.next_deadline_ns(), None);
    }

    #[test]
    fn latched_reads_decrease_at_the_pit_rate() {
        let mut pit = Pit::new();
        write(&mut pit, PORT_B, 0x01, 0);
        write(&mut pit, COMMAND_PORT, 0xb0, 0); // channel 2, lo/hi, mode 0
        write(&mut pit, 0x42, 0xff, 0);
        write(&mut pit, 0x42, 0xff, 0);
        let mut last = 0xffff;
        for us in 1..200u64 {
            let now = us * 1000;
            let v = latched(&mut pit, 2, now);
            assert_eq!(v as u64, 0xffff - ticks(now));
            assert!(v < last);
            last = v;
        }
        // 1 ms is 1193 ticks; 50 ms is 59659.
        assert_eq!(latched(&mut pit, 2, 1_000_000), 0xffff - 1193);
        assert_eq!(latched(&mut pit, 2, 50_000_000), 0xffff - 59_659);
        // A second latch before reading keeps the first value.
        write(&mut pit, COMMAND_PORT, 0x80, 2_000_000);
        write(&mut pit, COMMAND_PORT, 0x80, 3_000_000);
        assert_eq!(read(&mut pit, 0x42, 4_000_000), (0xffff - 2386u16) as u8);
        assert_eq!(read(&mut pit, 0x42, 4_000_000), ((0xffff - 2386u16) >> 8) as u8);
        // Unlatched reads (quick_pit_calibrate's LSB-then-MSB) see the live count.
        assert_eq!(read(&mut pit, 0x42, 5_000_000), (0xffff - 5965u16) as u8);
        assert_eq!(read(&mut pit, 0x42, 5_000_000), ((0xffff - 5965u16) >> 8) as u8);
    }

    #[test]
    fn channel2_out_in_port_b_rises_after_the_count_with_the_gate_set() {
        let mut pit = Pit::new();
        // pit_calibrate_tsc: gate on, speaker off, channel 2 mode 0, 50 ms.
        write(&mut pit, PORT_B, 0x01, 0);
        write(&mut pit, COMMAND_PORT, 0xb0, 0);
        let latch = 59_659u16; // CLOCK_TICK_RATE / (1000 / 50)
        write(&mut pit, 0x42, latch as u8, 500);
        write(&mut pit, 0x42, (latch >> 8) as u8, 500);
        let rise = 500 + ns_for_ticks(latch as u64);
        assert_eq!(rise, 500 + 49_999_917);
        assert_eq!(read(&mut pit, PORT_B, rise - 1) & 0x21, 0x01);
        assert_eq!(read(&mut pit, PORT_B, rise) & 0x21, 0x21);
        assert_eq!(read(&mut pit, PORT_B, rise + 1_000_000_000) & 0x20, 0x20, "OUT stays high in mode 0");
        // The refresh bit flips on every read.
        let a = read(&mut pit, PORT_B, rise) & 0x10;
        let b = read(&mut pit, PORT_B, rise) & 0x10;
        assert_ne!(a, b);
    }

    #[test]
    fn channel2_does_not_count_with_the_gate_clear() {
        let mut pit = Pit::new();
        write(&mut pit, PORT_B, 0x00, 0);
        write(&mut pit, COMMAND_PORT, 0xb0, 0);
        write(&mut pit, 0x42, 0x00, 0);
        write(&mut pit, 0x42, 0x10, 0); // 4096
        assert_eq!(latched(&mut pit, 2, 10_000_000), 4096);
        assert_eq!(read(&mut pit, PORT_B, 10_000_000) & 0x20, 0);
        // Raising the gate at 10 ms starts the count; lowering it at 11 ms pauses it.
        write(&mut pit, PORT_B, 0x01, 10_000_000);
        assert_eq!(latched(&mut pit, 2, 11_000_000), 4096 - 1193);
        write(&mut pit, PORT_B, 0x00, 11_000_000);
        assert_eq!(latched(&mut pit, 2, 50_000_000), 4096 - 1193);
        write(&mut pit, PORT_B, 0x01, 50_000_000);
        assert_eq!(latched(&mut pit, 2, 51_000_000), 4096 - 2386);
        assert_eq!(pit.next_deadline_ns(), None, "channel 2 raises no interrupt");
    }

    #[test]
    fn byte_access_modes_sequence_reads_and_writes() {
        let mut pit = Pit::new();
        // Channel 1, lobyte only, mode 2: count 0x0080.
        write(&mut pit, COMMAND_PORT, 0x54, 0);
        write(&mut pit, 0x41, 0x80, 0);
        assert_eq!(read(&mut pit, 0x41, 0), 0x80);
        assert_eq!(read(&mut pit, 0x41, 0), 0x80, "lobyte mode reads the low byte every time");
        // Hibyte only: writing 0x12 loads 0x1200.
        write(&mut pit, COMMAND_PORT, 0x64, 0);
        write(&mut pit, 0x41, 0x12, 0);
        write(&mut pit, COMMAND_PORT, 0x40, 0);
        assert_eq!(read(&mut pit, 0x41, 0), 0x12);
        // Lo-then-hi: the first byte alone does not load a count.
        write(&mut pit, COMMAND_PORT, 0x74, 0);
        write(&mut pit, 0x41, 0x34, 0);
        write(&mut pit, COMMAND_PORT, 0xe4, 0); // read-back status of channel 1
        assert_eq!(read(&mut pit, 0x41, 0), 0x80 | 0x40 | 0x34, "null count until the high byte");
        write(&mut pit, 0x41, 0x12, 0);
        write(&mut pit, COMMAND_PORT, 0xc4, 0); // read-back status and count of channel 1
        assert_eq!(read(&mut pit, 0x41, 0), 0x80 | 0x34);
        assert_eq!(read(&mut pit, 0x41, 0), 0x34);
        assert_eq!(read(&mut pit, 0x41, 0), 0x12);
        // Count 0 means 65536: the counter reads 0 right after loading, then 65535.
        write(&mut pit, COMMAND_PORT, 0x70, 0);
        write(&mut pit, 0x41, 0, 0);
        write(&mut pit, 0x41, 0, 0);
        assert_eq!(latched(&mut pit, 1, 0), 0);
        assert_eq!(latched(&mut pit, 1, ns_for_ticks(1)), 0xffff);
        // Mode 2 with 65536: one period is 54.9 ms.
        write(&mut pit, COMMAND_PORT, 0x34, 0);
        write(&mut pit, 0x40, 0, 0);
        write(&mut pit, 0x40, 0, 0);
        assert_eq!(pit.next_deadline_ns(), Some(54_925_402));
    }
}
