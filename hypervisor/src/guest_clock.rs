//! Guest time.

/// Guest time is real time: the guest's TSC is the host's (no offset), exits included, so a
/// guest second is a wall-clock second and every vCPU of a VM reads the same TSC. Guests take
/// the TSC's rate from kvm-clock or CPUID rather than calibrating it against emulated timers.
#[derive(Clone, Copy, Debug)]
pub struct GuestClock {
    start: u64,
    tsc_hz: u64,
}

impl GuestClock {
    /// A clock whose guest time 0 is host TSC `host_tsc`.
    pub fn new(host_tsc: u64, tsc_hz: u64) -> Self {
        GuestClock { start: host_tsc, tsc_hz }
    }

    /// The guest's TSC at host TSC `host_tsc`.
    pub fn tsc(&self, host_tsc: u64) -> u64 {
        host_tsc
    }

    /// Guest nanoseconds since the start.
    pub fn ns(&self, host_tsc: u64) -> u64 {
        if self.tsc_hz == 0 {
            return 0;
        }
        let ticks = host_tsc.wrapping_sub(self.start) as u128;
        (ticks * 1_000_000_000 / self.tsc_hz as u128) as u64
    }

    /// The guest TSC's frequency.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_time_runs_with_the_host() {
        let clock = GuestClock::new(1_000, 1_000_000_000);
        assert_eq!(clock.tsc(3_000), 3_000);
        assert_eq!(clock.ns(3_000), 2_000);
        assert_eq!(GuestClock::new(0, 0).ns(5), 0, "no rate known: no time");
    }
}
