//! kvm-clock, the paravirtual clock Linux (and other guests) use under KVM: each vCPU names a
//! guest-physical address through an MSR, and the hypervisor writes there how to turn the TSC
//! into nanoseconds. It gives the guest the TSC's frequency without calibrating it.
//!
//! Guest time is the TSC scaled by a constant, so one write per MSR write is enough: the
//! structure stays true as long as the TSC's rate and offset do not change. The wall clock
//! (MSR_KVM_WALL_CLOCK_NEW) is the RTC's time at guest time 0.

/// MSR_KVM_WALL_CLOCK_NEW: the guest-physical address of a `pvclock_wall_clock`.
pub const MSR_WALL_CLOCK: u32 = 0x4b56_4d00;
/// MSR_KVM_SYSTEM_TIME_NEW: the guest-physical address of this vCPU's
/// `pvclock_vcpu_time_info`, bit 0 the enable bit.
pub const MSR_SYSTEM_TIME: u32 = 0x4b56_4d01;
/// Bit 0 of MSR_SYSTEM_TIME: the structure is kept.
pub const SYSTEM_TIME_ENABLE: u64 = 1;
/// PVCLOCK_TSC_STABLE_BIT: every vCPU's clock reads the same at the same moment.
pub const FLAG_TSC_STABLE: u8 = 1;
/// `pvclock_vcpu_time_info` is 32 bytes; `pvclock_wall_clock` 12.
pub const TIME_INFO_SIZE: u64 = 32;
pub const WALL_CLOCK_SIZE: u64 = 12;

/// How the guest turns a TSC delta into nanoseconds: `((delta << shift) * mul) >> 32`, a
/// negative shift shifting right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeScale {
    pub mul: u32,
    pub shift: i8,
}

impl TimeScale {
    /// The scale for a TSC of `tsc_hz`: the smallest shift that keeps `mul` below 2^32, which
    /// keeps it at or above 2^31 and so gives it 31 significant bits. `None` for 0 Hz.
    pub fn for_tsc_hz(tsc_hz: u64) -> Option<Self> {
        if tsc_hz == 0 {
            return None;
        }
        const NS: u128 = 1_000_000_000;
        let mut shift: i32 = 0;
        let scaled = |shift: i32| {
            if shift >= 0 {
                u128::from(tsc_hz) << shift
            } else {
                u128::from(tsc_hz) >> -shift
            }
        };
        // mul = NS * 2^32 / (tsc_hz * 2^shift) < 2^32  <=>  tsc_hz * 2^shift > NS.
        while scaled(shift) <= NS {
            shift += 1;
        }
        while shift > -31 && scaled(shift - 1) > NS {
            shift -= 1;
        }
        let mul = (NS << 32) / scaled(shift);
        Some(TimeScale { mul: u32::try_from(mul).ok()?, shift: shift as i8 })
    }

    /// Nanoseconds in `delta` TSC ticks, as the guest computes them.
    pub fn ns(&self, delta: u64) -> u64 {
        let delta = if self.shift >= 0 { delta << self.shift } else { delta >> -self.shift };
        ((u128::from(delta) * u128::from(self.mul)) >> 32) as u64
    }
}

/// A `pvclock_vcpu_time_info` saying that guest time was `ns` at guest TSC `tsc`.
/// `version` must be even: the guest retries while it is odd or changes under it.
pub fn time_info(version: u32, tsc: u64, ns: u64, scale: TimeScale, flags: u8) -> [u8; TIME_INFO_SIZE as usize] {
    let mut info = [0u8; TIME_INFO_SIZE as usize];
    info[0..4].copy_from_slice(&version.to_le_bytes());
    info[8..16].copy_from_slice(&tsc.to_le_bytes());
    info[16..24].copy_from_slice(&ns.to_le_bytes());
    info[24..28].copy_from_slice(&scale.mul.to_le_bytes());
    info[28] = scale.shift as u8;
    info[29] = flags;
    info
}

/// A `pvclock_wall_clock`: the wall-clock time (seconds since 1970, UTC) at guest time 0.
pub fn wall_clock(version: u32, epoch_seconds: u64) -> [u8; WALL_CLOCK_SIZE as usize] {
    let mut clock = [0u8; WALL_CLOCK_SIZE as usize];
    clock[0..4].copy_from_slice(&version.to_le_bytes());
    clock[4..8].copy_from_slice(&(epoch_seconds.min(u32::MAX.into()) as u32).to_le_bytes());
    clock
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's pvclock_tsc_khz: the frequency it takes from the structure.
    fn guest_tsc_khz(scale: TimeScale) -> u64 {
        let khz = (1_000_000u64 << 32) / u64::from(scale.mul);
        if scale.shift < 0 {
            khz << -scale.shift
        } else {
            khz >> scale.shift
        }
    }

    #[test]
    fn scales_keep_31_bits_and_give_back_the_frequency() {
        for hz in [
            1u64,
            999_999_999,
            1_000_000_000,
            1_000_000_001,
            2_100_000_000,
            3_700_123_456,
            12_000_000,
            5_000_000_000_000,
        ] {
            let scale = TimeScale::for_tsc_hz(hz).unwrap();
            assert!(scale.mul >= 1 << 31, "{hz} Hz: mul {:#x}", scale.mul);
            let khz = guest_tsc_khz(scale);
            assert!(khz.abs_diff(hz / 1000) <= 1 + hz / 1000 / 1_000_000, "{hz} Hz read back as {khz} kHz");
            // A second of ticks is a second, within a part per million.
            let second = scale.ns(hz);
            assert!(second.abs_diff(1_000_000_000) <= 1_000, "{hz} Hz: a second is {second} ns");
        }
        assert_eq!(TimeScale::for_tsc_hz(0), None);
    }

    #[test]
    fn layouts_match_the_abi() {
        let scale = TimeScale { mul: 0x8000_0001, shift: -1 };
        let info = time_info(2, 0x1122_3344_5566_7788, 99, scale, FLAG_TSC_STABLE);
        assert_eq!(&info[0..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(u64::from_le_bytes(info[8..16].try_into().unwrap()), 0x1122_3344_5566_7788);
        assert_eq!(u64::from_le_bytes(info[16..24].try_into().unwrap()), 99);
        assert_eq!(&info[24..32], &[1, 0, 0, 0x80, 0xff, 1, 0, 0]);
        assert_eq!(wall_clock(4, 1_700_000_000), [4, 0, 0, 0, 0x00, 0xf1, 0x53, 0x65, 0, 0, 0, 0]);
    }
}
