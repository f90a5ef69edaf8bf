//! The MMIO instruction decoder (`hypervisor::mmio`): guest instruction bytes in any code
//! mode, then the register side of the decoded access.
//!
//! Input: mode byte (bits 1:0: 64-, 32- or 16-bit code), RIP (8 bytes), a 64-bit device value,
//! then the instruction bytes (the decoder is given at most 15, as the run loop fetches).
#![no_main]

use hypervisor::mmio::{self, Extend, Gpr, MmioKind, Operand};
use hypervisor::vcpu::{Gprs, GuestMode};
use hypervisor_fuzz::Reader;
use libfuzzer_sys::fuzz_target;

fn mode(selector: u8) -> GuestMode {
    let (long_code, default_32) = match selector & 3 {
        0 | 3 => (true, false),
        1 => (false, true),
        _ => (false, false),
    };
    GuestMode { long_code, default_32, ..GuestMode::default() }
}

fn check_gpr(reg: Gpr) {
    assert!(reg.num <= 15, "{reg:?}");
    assert!(matches!(reg.width, 1 | 2 | 4 | 8), "{reg:?}");
    if reg.high_byte {
        assert!(reg.num <= 3 && reg.width == 1, "{reg:?}");
    }
}

fn all(value: u64) -> Gprs {
    Gprs {
        rax: value,
        rbx: value,
        rcx: value,
        rdx: value,
        rsi: value,
        rdi: value,
        rbp: value,
        r8: value,
        r9: value,
        r10: value,
        r11: value,
        r12: value,
        r13: value,
        r14: value,
        r15: value,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let selector = r.u8();
    let mode = mode(selector);
    let rip = r.u64();
    let value = r.u64();
    let bytes = r.rest();
    let bytes = &bytes[..bytes.len().min(15)];

    let result = mmio::decode(bytes, &mode, rip);
    if hypervisor_fuzz::verbose() {
        eprintln!("decode {bytes:02x?} in {mode:?}: {result:?}");
    }
    let op = match result {
        Ok(op) => op,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(op.len >= 1 && usize::from(op.len) <= bytes.len(), "{op:?} from {} bytes", bytes.len());
    assert!(matches!(op.size, 1 | 2 | 4 | 8), "{op:?}");
    // The run loop may fetch fewer bytes (up to the end of a mapped page): the instruction's
    // own bytes decode the same.
    assert_eq!(mmio::decode(&bytes[..usize::from(op.len)], &mode, rip), Ok(op));

    // The register side, from a state where every register holds a marker.
    let marker = value.rotate_left(17) ^ 0x5a5a_5a5a_5a5a_5a5a;
    match op.kind {
        MmioKind::Load { reg, extend } => {
            check_gpr(reg);
            match extend {
                Extend::None => assert!(reg.width == op.size, "{op:?}"),
                Extend::Zero | Extend::Sign => assert!(reg.width >= op.size, "{op:?}"),
            }
            // `loaded` computes the register's new value from its old one alone, so nothing
            // else can change; RSP (outside Gprs) holds the marker too.
            let mut before = all(marker);
            let old = before.slot(reg.num).map_or(marker, |r| *r);
            let new = mmio::loaded(old, reg, op.size, extend, value);
            let size_mask = if op.size == 8 { u64::MAX } else { (1u64 << (op.size * 8)) - 1 };
            if reg.high_byte {
                assert_eq!(new & !0xff00, old & !0xff00);
                assert_eq!((new >> 8) & 0xff, value & 0xff);
            } else {
                let width_mask = if reg.width == 8 { u64::MAX } else { (1u64 << (reg.width * 8)) - 1 };
                // The loaded bytes arrive unchanged in the low `size` bytes.
                assert_eq!(new & size_mask, value & size_mask, "{op:?}");
                match reg.width {
                    // A 32-bit write zeroes bits 63:32.
                    4 => assert_eq!(new >> 32, 0, "{op:?}"),
                    8 => {}
                    // 8- and 16-bit writes keep the rest.
                    _ => assert_eq!(new & !width_mask, old & !width_mask, "{op:?}"),
                }
                let widened = new & width_mask;
                let high_bits = widened & !size_mask;
                match extend {
                    Extend::None => {}
                    Extend::Zero => assert_eq!(high_bits, 0, "{op:?}"),
                    Extend::Sign => {
                        let negative = value & (1 << (op.size * 8 - 1)) != 0;
                        let expected = if negative { width_mask & !size_mask } else { 0 };
                        assert_eq!(high_bits, expected, "{op:?}");
                    }
                }
            }
        }
        MmioKind::Store { src } => {
            if let Operand::Reg(reg) = src {
                check_gpr(reg);
                assert_eq!(reg.width, op.size, "{op:?}");
            }
            // Every register holds `value`, RSP (outside Gprs) too.
            let mut gprs = all(value);
            let stored = mmio::store_value(src, op.size, |num| gprs.slot(num).map_or(value, |r| *r));
            if op.size < 8 {
                assert_eq!(stored >> (op.size * 8), 0, "{op:?}: {stored:#x} wider than the access");
            }
            if let Operand::Reg(reg) = src {
                let expected = if reg.high_byte { (value >> 8) & 0xff } else { value };
                let mask = if op.size == 8 { u64::MAX } else { (1u64 << (op.size * 8)) - 1 };
                assert_eq!(stored, expected & mask, "{op:?}");
            }
        }
    }
});
