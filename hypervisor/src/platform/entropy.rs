//! Random bytes from the CPU's own generator (RDRAND), for virtio-rng.

use alloc::boxed::Box;

use crate::devices::virtio::rng::EntropySource;

/// RDRAND may fail transiently (its buffer drained); Intel suggests 10 tries (DRNG guide, 5.2.1).
const RDRAND_RETRIES: usize = 10;

/// A source drawing 64 bits at a time from RDRAND; `None` if the CPU has no RDRAND.
pub fn rdrand_source() -> Option<EntropySource> {
    let has_rdrand = raw_cpuid::CpuId::new().get_feature_info().is_some_and(|f| f.has_rdrand());
    has_rdrand.then(|| Box::new(fill) as EntropySource)
}

/// Fills `buf`; false if RDRAND kept failing.
fn fill(buf: &mut [u8]) -> bool {
    for chunk in buf.chunks_mut(8) {
        let Some(value) = rdrand64() else { return false };
        chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
    }
    true
}

fn rdrand64() -> Option<u64> {
    for _ in 0..RDRAND_RETRIES {
        let value: u64;
        let ok: u8;
        // SAFETY: RDRAND only writes its destination register and CF; the CPU has it (checked
        // by `rdrand_source` before this can run).
        unsafe {
            core::arch::asm!("rdrand {value}", "setc {ok}", value = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack));
        }
        if ok != 0 {
            return Some(value);
        }
    }
    None
}
