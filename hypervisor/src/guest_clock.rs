//! Guest time.

/// Guest time: the host TSC minus the time the hypervisor spent handling exits.
///
/// Hiding exit handling makes an exit cost the guest nothing on its own clocks (TSC, PIT,
/// APIC timer, PM timer), so calibration loops that poll a device port see the same rates as
/// on hardware even when each exit is slow (nested or emulated). Time spent halted is not
/// hidden: a sleeping guest's clocks keep running.
#[derive(Clone, Copy, Debug)]
pub struct GuestClock {
    start: u64,
    hidden: u64,
    frozen_at: Option<u64>,
    tsc_hz: u64,
    /// False for the clocks of a VM with several vCPUs: their TSCs must agree, so none may
    /// hide its own exits (each vCPU keeps a copy, all with the same start and offset).
    hides_exits: bool,
}

impl GuestClock {
    /// A clock starting now (`host_tsc`) at guest time 0.
    pub fn new(host_tsc: u64, tsc_hz: u64) -> Self {
        GuestClock { start: host_tsc, hidden: 0, frozen_at: None, tsc_hz, hides_exits: true }
    }

    /// A clock that never freezes: copies of it in several vCPUs read the same at any time.
    pub fn shared(host_tsc: u64, tsc_hz: u64) -> Self {
        GuestClock { hides_exits: false, ..Self::new(host_tsc, tsc_hz) }
    }

    /// Whether exits are hidden (the TSC offset then changes at every entry).
    pub fn hides_exits(&self) -> bool {
        self.hides_exits
    }

    /// The guest's TSC at host TSC `host_tsc`.
    pub fn tsc(&self, host_tsc: u64) -> u64 {
        self.frozen_at.unwrap_or(host_tsc).wrapping_sub(self.hidden)
    }

    /// Guest nanoseconds since the start.
    pub fn ns(&self, host_tsc: u64) -> u64 {
        if self.tsc_hz == 0 {
            return 0;
        }
        let ticks = self.tsc(host_tsc).wrapping_sub(self.start) as u128;
        (ticks * 1_000_000_000 / self.tsc_hz as u128) as u64
    }

    /// Stops guest time (an exit is being handled).
    pub fn freeze(&mut self, host_tsc: u64) {
        if !self.hides_exits {
            return;
        }
        self.frozen_at.get_or_insert(host_tsc);
    }

    /// Lets guest time run again, hiding the time since [`Self::freeze`].
    pub fn resume(&mut self, host_tsc: u64) {
        if !self.hides_exits {
            return;
        }
        if let Some(at) = self.frozen_at.take() {
            self.hidden += host_tsc.saturating_sub(at);
        }
    }

    /// For world switches that read the TSC themselves right before entry: freezes the clock
    /// if it runs and returns `(hidden, frozen_at)`. Resuming at entry TSC `t` means a TSC offset
    /// of `-(hidden + t - frozen_at)`; the caller then reports `t` to [`Self::resume`].
    pub fn entry_base(&mut self, host_tsc: u64) -> (u64, u64) {
        if !self.hides_exits {
            return (self.hidden, host_tsc);
        }
        let at = *self.frozen_at.get_or_insert(host_tsc);
        (self.hidden, at)
    }

    /// The guest TSC's frequency.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// The TSC offset that makes the hardware count guest time.
    pub fn tsc_offset(&self) -> u64 {
        self.hidden.wrapping_neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_handling_is_hidden_but_halts_are_not() {
        let mut clock = GuestClock::new(1_000, 1_000_000_000);
        assert_eq!(clock.ns(3_000), 2_000);
        clock.freeze(3_000);
        assert_eq!(clock.ns(9_000), 2_000, "frozen while an exit is handled");
        clock.resume(9_000);
        assert_eq!(clock.tsc_offset(), 6_000u64.wrapping_neg());
        assert_eq!(clock.tsc(10_000), 4_000);
        assert_eq!(clock.ns(10_000), 3_000);
        // A halt: resume first (hides nothing new), then real time passes.
        clock.freeze(10_000);
        clock.resume(10_000);
        assert_eq!(clock.ns(20_000), 13_000);
    }

    #[test]
    fn shared_clocks_never_freeze() {
        let mut clock = GuestClock::shared(1_000, 1_000_000_000);
        clock.freeze(3_000);
        clock.resume(9_000);
        let _ = clock.entry_base(9_500);
        clock.resume(9_700);
        assert_eq!((clock.ns(10_000), clock.tsc_offset()), (9_000, 0));
        assert!(!clock.hides_exits());
    }

    #[test]
    fn entry_base_matches_resume() {
        let mut by_base = GuestClock::new(0, 1);
        by_base.freeze(100);
        let (hidden, at) = by_base.entry_base(500);
        assert_eq!((hidden, at), (0, 100), "already frozen: the freeze time stays");
        let offset = (hidden + 400 - at).wrapping_neg();
        by_base.resume(400);
        assert_eq!(by_base.tsc_offset(), offset);
        let mut running = GuestClock::new(0, 1);
        assert_eq!(running.entry_base(700), (0, 700));
    }
}
