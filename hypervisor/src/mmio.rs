//! Decoding the instruction behind an MMIO access (an EPT violation / NPF on an emulated
//! device's guest-physical address) and applying its register side.
//!
//! Only the plain moves that drivers use for device registers are supported: `MOV r, m`,
//! `MOV m, r`, `MOV m, imm`, the `MOV` accumulator/absolute-address forms (`A0`-`A3`), `MOVZX`,
//! `MOVSX` and `MOVSXD`. Everything else, including read-modify-write instructions and string
//! instructions (`MOVS`, `STOS`), is refused with [`MmioError::Unsupported`].
//!
//! The instruction bytes are untrusted guest memory; decoding never panics.

use core::fmt;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use crate::vcpu::{GuestMode, Segment};

/// A general-purpose register operand: which register and how wide the access is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpr {
    /// Register number in encoding order: 0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX, 4 = RSP, 5 = RBP,
    /// 6 = RSI, 7 = RDI, 8..=15 = R8..R15.
    pub num: u8,
    /// Access width in bytes: 1, 2, 4 or 8.
    pub width: u8,
    /// One of AH, CH, DH, BH (bits 15:8 of register `num` 0..=3); `width` is then 1.
    pub high_byte: bool,
}

impl Gpr {
    /// The low `width` bytes of register `num`.
    pub const fn new(num: u8, width: u8) -> Self {
        Gpr { num, width, high_byte: false }
    }

    /// AH (`num` 0), CH (1), DH (2) or BH (3).
    pub const fn high(num: u8) -> Self {
        Gpr { num, width: 1, high_byte: true }
    }
}

/// How a loaded value is widened into the destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Same size as the destination (`MOV`).
    None,
    /// Zero-extended (`MOVZX`).
    Zero,
    /// Sign-extended (`MOVSX`, `MOVSXD`).
    Sign,
}

/// The source of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// A register.
    Reg(Gpr),
    /// An immediate, already sign-extended to 64 bits where the instruction does so.
    Imm(u64),
}

/// What the instruction does with the MMIO location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioKind {
    /// Reads `size` bytes into `reg` (see [`loaded`]).
    Load {
        /// Destination register.
        reg: Gpr,
        /// Widening from `size` to the register width.
        extend: Extend,
    },
    /// Writes `size` bytes from `src` (see [`store_value`]).
    Store {
        /// Source register or immediate.
        src: Operand,
    },
}

/// A decoded MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioOp {
    /// Instruction length in bytes (advance RIP by this much once emulated).
    pub len: u8,
    /// Size of the memory access in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// Load or store.
    pub kind: MmioKind,
}

/// Why an MMIO instruction could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// The bytes end before the instruction does.
    Truncated {
        /// Number of bytes available.
        len: usize,
    },
    /// The bytes do not form a valid instruction in this mode.
    Invalid,
    /// A valid instruction this emulator does not handle.
    Unsupported {
        /// The instruction.
        mnemonic: Mnemonic,
    },
    /// A supported move whose operand is not memory (so it cannot have caused an MMIO exit).
    NoMemoryOperand {
        /// The instruction.
        mnemonic: Mnemonic,
    },
}

/// Writes a `Debug` rendering in lower case (`Movzx` -> `movzx`).
struct Lower<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for Lower<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            fmt::Write::write_char(self.0, c.to_ascii_lowercase())?;
        }
        Ok(())
    }
}

fn write_mnemonic(f: &mut fmt::Formatter<'_>, m: Mnemonic) -> fmt::Result {
    fmt::write(&mut Lower(f), format_args!("{m:?}"))
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MmioError::Truncated { len } => write!(f, "instruction bytes truncated ({len} bytes available)"),
            MmioError::Invalid => f.write_str("invalid instruction"),
            MmioError::Unsupported { mnemonic } => {
                f.write_str("unsupported MMIO instruction `")?;
                write_mnemonic(f, mnemonic)?;
                f.write_str("`")
            }
            MmioError::NoMemoryOperand { mnemonic } => {
                f.write_str("`")?;
                write_mnemonic(f, mnemonic)?;
                f.write_str("` without a memory operand cannot access MMIO")
            }
        }
    }
}

/// The decoder bitness for the guest's code segment.
fn bitness(mode: &GuestMode) -> u32 {
    if mode.long_code {
        64
    } else if mode.default_32 {
        32
    } else {
        16
    }
}

const GPR8: [Register; 16] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::SPL,
    Register::BPL,
    Register::SIL,
    Register::DIL,
    Register::R8L,
    Register::R9L,
    Register::R10L,
    Register::R11L,
    Register::R12L,
    Register::R13L,
    Register::R14L,
    Register::R15L,
];
const GPR16: [Register; 16] = [
    Register::AX,
    Register::CX,
    Register::DX,
    Register::BX,
    Register::SP,
    Register::BP,
    Register::SI,
    Register::DI,
    Register::R8W,
    Register::R9W,
    Register::R10W,
    Register::R11W,
    Register::R12W,
    Register::R13W,
    Register::R14W,
    Register::R15W,
];
const GPR32: [Register; 16] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBX,
    Register::ESP,
    Register::EBP,
    Register::ESI,
    Register::EDI,
    Register::R8D,
    Register::R9D,
    Register::R10D,
    Register::R11D,
    Register::R12D,
    Register::R13D,
    Register::R14D,
    Register::R15D,
];
const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];
const HIGH8: [Register; 4] = [Register::AH, Register::CH, Register::DH, Register::BH];

/// Maps an iced register to a [`Gpr`]; `None` for anything that is not a general-purpose register.
fn gpr(reg: Register) -> Option<Gpr> {
    let find = |table: &[Register]| table.iter().position(|&r| r == reg).and_then(|i| u8::try_from(i).ok());
    if let Some(i) = find(&HIGH8) {
        return Some(Gpr::high(i));
    }
    for (table, width) in [(&GPR8, 1), (&GPR16, 2), (&GPR32, 4), (&GPR64, 8)] {
        if let Some(i) = find(table) {
            return Some(Gpr::new(i, width));
        }
    }
    None
}

/// The register operand `op` of `insn`.
fn reg_operand(insn: &Instruction, op: u32) -> Result<Gpr, MmioError> {
    let reg = match op {
        0 => insn.op0_register(),
        _ => insn.op1_register(),
    };
    gpr(reg).ok_or(MmioError::Invalid)
}

/// The length of the instruction in `bytes` (fetched at the guest's RIP), prefixes included;
/// `None` if they hold no valid instruction.
pub fn instruction_length(bytes: &[u8], mode: &GuestMode) -> Option<usize> {
    let insn = Decoder::new(bitness(mode), bytes, DecoderOptions::NONE).decode();
    (!insn.is_invalid()).then(|| insn.len())
}

/// Where the value of a control-register write comes from (for backends that do not say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrWriteSource {
    /// `MOV CRn, reg`: the register (its width: 8 in 64-bit code, else 4).
    Register(Gpr),
    /// `CLTS`: CR0 with TS cleared.
    Clts,
    /// `LMSW reg`: CR0 bits 3:0 from the register's low word (PE cannot be cleared).
    Lmsw(Gpr),
}

/// Decodes the control-register write in `bytes`; `None` if it is none or takes its operand
/// from memory (`LMSW m16`, which no kernel of ours uses).
pub fn cr_write_source(bytes: &[u8], mode: &GuestMode) -> Option<CrWriteSource> {
    let insn = Decoder::new(bitness(mode), bytes, DecoderOptions::NONE).decode();
    match insn.mnemonic() {
        Mnemonic::Mov if matches!(insn.op0_register(), Register::CR0 | Register::CR4) => {
            gpr(insn.op1_register()).map(CrWriteSource::Register)
        }
        Mnemonic::Clts => Some(CrWriteSource::Clts),
        Mnemonic::Lmsw if insn.op_kind(0) == OpKind::Register => gpr(insn.op0_register()).map(CrWriteSource::Lmsw),
        _ => None,
    }
}

/// The memory operand of a string I/O instruction (INS, OUTS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringIoOperand {
    /// Address size in bits (16, 32, 64): the width of (R/E)SI or (R/E)DI and of (R/E)CX.
    pub address_bits: u32,
    /// The segment of the buffer: ES for INS, DS or an override for OUTS.
    pub segment: Segment,
}

/// Decodes the string I/O instruction in `bytes`; `None` if it is none.
pub fn string_io_operand(bytes: &[u8], mode: &GuestMode) -> Option<StringIoOperand> {
    let insn = Decoder::new(bitness(mode), bytes, DecoderOptions::NONE).decode();
    let (memory, input) = match insn.mnemonic() {
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => (insn.op_kind(0), true),
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => (insn.op_kind(1), false),
        _ => return None,
    };
    let address_bits = match memory {
        OpKind::MemoryESDI | OpKind::MemorySegSI => 16,
        OpKind::MemoryESEDI | OpKind::MemorySegESI => 32,
        OpKind::MemoryESRDI | OpKind::MemorySegRSI => 64,
        _ => return None,
    };
    // INS always stores through ES; OUTS reads through DS unless a prefix says otherwise.
    let segment = match insn.memory_segment() {
        _ if input => Segment::Es,
        Register::ES => Segment::Es,
        Register::CS => Segment::Cs,
        Register::SS => Segment::Ss,
        Register::FS => Segment::Fs,
        Register::GS => Segment::Gs,
        _ => Segment::Ds,
    };
    Some(StringIoOperand { address_bits, segment })
}

/// Decodes the instruction at `rip` that made an MMIO access. `bytes` are the instruction bytes
/// fetched from the guest (up to 15; fewer near the end of a mapping).
pub fn decode(bytes: &[u8], mode: &GuestMode, rip: u64) -> Result<MmioOp, MmioError> {
    let mut decoder = Decoder::with_ip(bitness(mode), bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => MmioError::Truncated { len: bytes.len() },
            _ => MmioError::Invalid,
        });
    }
    let mnemonic = insn.mnemonic();
    let load = |size: u8, extend: Extend| -> Result<(u8, MmioKind), MmioError> {
        if insn.op_kind(1) != OpKind::Memory {
            return Err(MmioError::NoMemoryOperand { mnemonic });
        }
        Ok((size, MmioKind::Load { reg: reg_operand(&insn, 0)?, extend }))
    };
    let store_reg = |size: u8| -> Result<(u8, MmioKind), MmioError> {
        if insn.op_kind(0) != OpKind::Memory {
            return Err(MmioError::NoMemoryOperand { mnemonic });
        }
        Ok((size, MmioKind::Store { src: Operand::Reg(reg_operand(&insn, 1)?) }))
    };
    let store_imm = |size: u8| -> Result<(u8, MmioKind), MmioError> {
        if insn.op_kind(0) != OpKind::Memory {
            return Err(MmioError::NoMemoryOperand { mnemonic });
        }
        let imm = match insn.op_kind(1) {
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => insn.immediate(1),
            _ => return Err(MmioError::Invalid),
        };
        Ok((size, MmioKind::Store { src: Operand::Imm(imm) }))
    };

    let (size, kind) = match insn.code() {
        Code::Mov_r8_rm8 | Code::Mov_AL_moffs8 => load(1, Extend::None)?,
        Code::Mov_r16_rm16 | Code::Mov_AX_moffs16 => load(2, Extend::None)?,
        Code::Mov_r32_rm32 | Code::Mov_EAX_moffs32 => load(4, Extend::None)?,
        Code::Mov_r64_rm64 | Code::Mov_RAX_moffs64 => load(8, Extend::None)?,
        Code::Movzx_r16_rm8 | Code::Movzx_r32_rm8 | Code::Movzx_r64_rm8 => load(1, Extend::Zero)?,
        Code::Movzx_r16_rm16 | Code::Movzx_r32_rm16 | Code::Movzx_r64_rm16 => load(2, Extend::Zero)?,
        Code::Movsx_r16_rm8 | Code::Movsx_r32_rm8 | Code::Movsx_r64_rm8 => load(1, Extend::Sign)?,
        Code::Movsx_r16_rm16 | Code::Movsx_r32_rm16 | Code::Movsx_r64_rm16 => load(2, Extend::Sign)?,
        Code::Movsxd_r16_rm16 => load(2, Extend::Sign)?,
        Code::Movsxd_r32_rm32 | Code::Movsxd_r64_rm32 => load(4, Extend::Sign)?,
        Code::Mov_rm8_r8 | Code::Mov_moffs8_AL => store_reg(1)?,
        Code::Mov_rm16_r16 | Code::Mov_moffs16_AX => store_reg(2)?,
        Code::Mov_rm32_r32 | Code::Mov_moffs32_EAX => store_reg(4)?,
        Code::Mov_rm64_r64 | Code::Mov_moffs64_RAX => store_reg(8)?,
        Code::Mov_rm8_imm8 => store_imm(1)?,
        Code::Mov_rm16_imm16 => store_imm(2)?,
        Code::Mov_rm32_imm32 => store_imm(4)?,
        Code::Mov_rm64_imm32 => store_imm(8)?,
        _ => return Err(MmioError::Unsupported { mnemonic }),
    };
    let len = u8::try_from(insn.len()).map_err(|_| MmioError::Invalid)?;
    Ok(MmioOp { len, size, kind })
}

/// A mask of the low `size` bytes (`size` >= 8 gives all ones).
fn mask(size: u8) -> u64 {
    match size {
        0 => 0,
        1..=7 => (1u64 << (u32::from(size) * 8)) - 1,
        _ => u64::MAX,
    }
}

/// Completes a load: the register that held `old` holds the result. `value` holds the
/// `size` bytes read from the device; it is widened per `extend` to `reg.width` and written
/// with x86 semantics (a 32-bit write zeroes bits 63:32, 8- and 16-bit writes keep the other
/// bits, AH/CH/DH/BH write bits 15:8).
pub fn loaded(old: u64, reg: Gpr, size: u8, extend: Extend, value: u64) -> u64 {
    let size = size.min(8);
    let value = value & mask(size);
    let value = match extend {
        Extend::Sign if size > 0 && size < 8 => {
            let shift = 64 - u32::from(size) * 8;
            (((value << shift) as i64) >> shift) as u64
        }
        _ => value,
    };
    let width = if reg.high_byte { 1 } else { reg.width.min(8) };
    let value = value & mask(width);
    if reg.high_byte {
        (old & !0xff00) | (value << 8)
    } else {
        match width {
            4 | 8 => value,
            w => (old & !mask(w)) | value,
        }
    }
}

/// The value a store writes: the register (or bits 15:8 for AH..BH; `register` reads one by
/// number) or immediate, masked to `size` bytes.
pub fn store_value(op: Operand, size: u8, register: impl FnOnce(u8) -> u64) -> u64 {
    let value = match op {
        Operand::Imm(v) => v,
        Operand::Reg(reg) => {
            let full = register(reg.num);
            if reg.high_byte {
                (full >> 8) & 0xff
            } else {
                full & mask(reg.width)
            }
        }
    };
    value & mask(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::elf::load_elf64;
    use crate::loader::elf::tests::{build_elf, Ph};
    use crate::loader::guest_walk::{read_virt_access, translate, Access};
    use crate::loader::SliceMemory;
    use crate::vcpu::Gprs;
    use alloc::string::ToString;
    use alloc::vec;

    /// A load into `g` (RSP and invalid numbers have no slot there and are left alone).
    fn apply_load(g: &mut Gprs, reg: Gpr, size: u8, extend: Extend, value: u64) {
        if let Some(r) = g.slot(reg.num) {
            *r = loaded(*r, reg, size, extend, value);
        }
    }

    fn read_operand(g: &Gprs, op: Operand, size: u8) -> u64 {
        let mut copy = *g;
        store_value(op, size, |num| copy.slot(num).map_or(0, |r| *r))
    }
    use alloc::vec::Vec;

    const M64: GuestMode = GuestMode {
        cr0: 0x8000_0011,
        cr3: 0,
        cr4: 0x20,
        efer: 0x500,
        long_code: true,
        default_32: false,
        cs_base: 0,
        cpl: 0,
    };
    const M32: GuestMode =
        GuestMode { cr0: 0x11, cr3: 0, cr4: 0, efer: 0, long_code: false, default_32: true, cs_base: 0, cpl: 0 };
    const M16: GuestMode =
        GuestMode { cr0: 0x10, cr3: 0, cr4: 0, efer: 0, long_code: false, default_32: false, cs_base: 0, cpl: 0 };

    const ONES: u64 = u64::MAX;

    fn load_op(len: u8, size: u8, reg: Gpr, extend: Extend) -> MmioOp {
        MmioOp { len, size, kind: MmioKind::Load { reg, extend } }
    }

    fn store_op(len: u8, size: u8, src: Operand) -> MmioOp {
        MmioOp { len, size, kind: MmioKind::Store { src } }
    }

    /// Decodes a load and applies `value` to registers that start as `init` in RAX..R15.
    fn run_load(bytes: &[u8], mode: &GuestMode, init: u64, value: u64) -> (MmioOp, Gprs) {
        let op = decode(bytes, mode, 0x1000).unwrap();
        let MmioKind::Load { reg, extend } = op.kind else { panic!("not a load: {op:?}") };
        let mut g = Gprs {
            rax: init,
            rbx: init,
            rcx: init,
            rdx: init,
            rsi: init,
            rdi: init,
            rbp: init,
            r8: init,
            r9: init,
            r10: init,
            r11: init,
            r12: init,
            r13: init,
            r14: init,
            r15: init,
        };
        apply_load(&mut g, reg, op.size, extend, value);
        (op, g)
    }

    #[test]
    fn mov_eax_from_memory_zeroes_upper_half() {
        let (op, g) = run_load(&[0x8b, 0x03], &M64, ONES, 0x1234_5678);
        assert_eq!(op, load_op(2, 4, Gpr::new(0, 4), Extend::None));
        assert_eq!(g.rax, 0x1234_5678);
        assert_eq!(g.rbx, ONES);
    }

    #[test]
    fn mov_to_memory_from_ecx() {
        let op = decode(&[0x89, 0x0f], &M64, 0).unwrap();
        assert_eq!(op, store_op(2, 4, Operand::Reg(Gpr::new(1, 4))));
        let g = Gprs { rcx: 0xaaaa_bbbb_cccc_dddd, ..Default::default() };
        assert_eq!(read_operand(&g, Operand::Reg(Gpr::new(1, 4)), op.size), 0xcccc_dddd);
    }

    #[test]
    fn mov_immediates() {
        let op = decode(&[0xc6, 0x00, 0x99], &M64, 0).unwrap();
        assert_eq!(op, store_op(3, 1, Operand::Imm(0x99)));
        assert_eq!(read_operand(&Gprs::default(), Operand::Imm(0x99), 1), 0x99);
        // mov qword [rax], -2: imm32 sign-extended to 64 bits.
        let op = decode(&[0x48, 0xc7, 0x00, 0xfe, 0xff, 0xff, 0xff], &M64, 0).unwrap();
        assert_eq!(op, store_op(7, 8, Operand::Imm(0xffff_ffff_ffff_fffe)));
        // mov dword [rax], 0x80000000 is not sign-extended past 32 bits.
        let op = decode(&[0xc7, 0x00, 0x00, 0x00, 0x00, 0x80], &M64, 0).unwrap();
        let MmioKind::Store { src } = op.kind else { panic!() };
        assert_eq!(read_operand(&Gprs::default(), src, op.size), 0x8000_0000);
        // mov word [bx], 0x1234 in 16-bit mode.
        assert_eq!(decode(&[0xc7, 0x07, 0x34, 0x12], &M16, 0).unwrap(), store_op(4, 2, Operand::Imm(0x1234)));
    }

    #[test]
    fn movzx_and_movsx() {
        let (op, g) = run_load(&[0x0f, 0xb7, 0x02], &M64, ONES, 0xfffe);
        assert_eq!(op, load_op(3, 2, Gpr::new(0, 4), Extend::Zero));
        assert_eq!(g.rax, 0xfffe);
        let (op, g) = run_load(&[0x48, 0x0f, 0xbe, 0x01], &M64, 0, 0x80);
        assert_eq!(op, load_op(4, 1, Gpr::new(0, 8), Extend::Sign));
        assert_eq!(g.rax, 0xffff_ffff_ffff_ff80);
        // movsx ax, byte [rcx]: 16-bit destination keeps bits 63:16.
        let (op, g) = run_load(&[0x66, 0x0f, 0xbe, 0x01], &M64, 0x1111_2222_3333_4444, 0xff);
        assert_eq!(op, load_op(4, 1, Gpr::new(0, 2), Extend::Sign));
        assert_eq!(g.rax, 0x1111_2222_3333_ffff);
        // movsxd rax, dword [rcx]
        let (op, g) = run_load(&[0x48, 0x63, 0x01], &M64, 0, 0x8000_0000);
        assert_eq!(op, load_op(3, 4, Gpr::new(0, 8), Extend::Sign));
        assert_eq!(g.rax, 0xffff_ffff_8000_0000);
    }

    #[test]
    fn byte_registers() {
        let (op, g) = run_load(&[0x8a, 0x23], &M64, 0x1122_3344_5566_7788, 0xab);
        assert_eq!(op, load_op(2, 1, Gpr::high(0), Extend::None));
        assert_eq!(g.rax, 0x1122_3344_5566_ab88);
        // mov al, [rbx] keeps everything else.
        let (_, g) = run_load(&[0x8a, 0x03], &M64, 0x1122_3344_5566_7788, 0xab);
        assert_eq!(g.rax, 0x1122_3344_5566_77ab);
        // mov [rax], bh reads bits 15:8 of RBX.
        let op = decode(&[0x88, 0x38], &M64, 0).unwrap();
        assert_eq!(op, store_op(2, 1, Operand::Reg(Gpr::high(3))));
        let g = Gprs { rbx: 0x1234, ..Default::default() };
        assert_eq!(read_operand(&g, Operand::Reg(Gpr::high(3)), 1), 0x12);
        // With REX, encoding 6 is SIL rather than DH.
        assert_eq!(decode(&[0x40, 0x88, 0x30], &M64, 0).unwrap(), store_op(3, 1, Operand::Reg(Gpr::new(6, 1))));
        assert_eq!(decode(&[0x88, 0x30], &M64, 0).unwrap(), store_op(2, 1, Operand::Reg(Gpr::high(2))));
    }

    #[test]
    fn extended_registers_and_displacements() {
        let (op, g) = run_load(&[0x4d, 0x8b, 0x4a, 0x08], &M64, 0, 0x0123_4567_89ab_cdef);
        assert_eq!(op, load_op(4, 8, Gpr::new(9, 8), Extend::None));
        assert_eq!(g.r9, 0x0123_4567_89ab_cdef);
        // mov [r15+rax*4+0x12345678], r11w
        let op = decode(&[0x66, 0x45, 0x89, 0x9c, 0x87, 0x78, 0x56, 0x34, 0x12], &M64, 0).unwrap();
        assert_eq!(op, store_op(9, 2, Operand::Reg(Gpr::new(11, 2))));
        // mov al, [moffs64]
        let (op, _) = run_load(&[0xa0, 0, 0, 0xe0, 0xfe, 0, 0, 0, 0], &M64, 0, 0);
        assert_eq!(op, load_op(9, 1, Gpr::new(0, 1), Extend::None));
        // mov [moffs32], eax in 32-bit mode
        assert_eq!(decode(&[0xa3, 0, 0, 0xe0, 0xfe], &M32, 0).unwrap(), store_op(5, 4, Operand::Reg(Gpr::new(0, 4))));
    }

    #[test]
    fn sixteen_and_thirty_two_bit_modes() {
        let (op, g) = run_load(&[0x8b, 0x07], &M16, ONES, 0x1234);
        assert_eq!(op, load_op(2, 2, Gpr::new(0, 2), Extend::None));
        assert_eq!(g.rax, 0xffff_ffff_ffff_1234);
        // Operand-size prefix in 16-bit mode gives EAX.
        let (op, _) = run_load(&[0x66, 0x8b, 0x07], &M16, ONES, 0);
        assert_eq!(op, load_op(3, 4, Gpr::new(0, 4), Extend::None));
        let (op, g) = run_load(&[0x8b, 0x03], &M32, ONES, 0xdead_beef);
        assert_eq!(op, load_op(2, 4, Gpr::new(0, 4), Extend::None));
        assert_eq!(g.rax, 0xdead_beef);
        // 0x48 is DEC EAX outside long mode, not REX.W.
        assert_eq!(decode(&[0x48, 0x8b, 0x03], &M32, 0), Err(MmioError::Unsupported { mnemonic: Mnemonic::Dec }));
    }

    #[test]
    fn refusals() {
        let e = decode(&[0x01, 0x08], &M64, 0).unwrap_err();
        assert_eq!(e, MmioError::Unsupported { mnemonic: Mnemonic::Add });
        assert_eq!(e.to_string(), "unsupported MMIO instruction `add`");
        let e = decode(&[0xf3, 0xa4], &M64, 0).unwrap_err();
        assert_eq!(e, MmioError::Unsupported { mnemonic: Mnemonic::Movsb });
        assert_eq!(e.to_string(), "unsupported MMIO instruction `movsb`");
        assert_eq!(decode(&[0xab], &M64, 0), Err(MmioError::Unsupported { mnemonic: Mnemonic::Stosd }));
        let e = decode(&[0x89, 0xd8], &M64, 0).unwrap_err();
        assert_eq!(e, MmioError::NoMemoryOperand { mnemonic: Mnemonic::Mov });
        assert_eq!(e.to_string(), "`mov` without a memory operand cannot access MMIO");
        // RSP as the register operand, and as an address register.
        assert_eq!(decode(&[0x8b, 0x20], &M64, 0).unwrap(), load_op(2, 4, Gpr::new(4, 4), Extend::None));
        assert_eq!(decode(&[0x48, 0x89, 0x20], &M64, 0).unwrap(), store_op(3, 8, Operand::Reg(Gpr::new(4, 8))));
        assert_eq!(decode(&[0x89, 0x04, 0x24], &M64, 0).unwrap(), store_op(3, 4, Operand::Reg(Gpr::new(0, 4))));
        assert_eq!(decode(&[0x06, 0x90, 0x90], &M64, 0), Err(MmioError::Invalid));
    }

    #[test]
    fn instruction_lengths_count_redundant_prefixes() {
        assert_eq!(instruction_length(&[0x0f, 0xa2, 0x90], &M64), Some(2), "cpuid");
        assert_eq!(instruction_length(&[0x2e, 0x3e, 0x0f, 0xa2], &M64), Some(4), "cpuid with two segment prefixes");
        assert_eq!(instruction_length(&[0x66, 0x0f, 0x32], &M64), Some(3), "rdmsr with an operand-size prefix");
        assert_eq!(instruction_length(&[0x3e, 0xf4], &M32), Some(2), "hlt with a segment prefix");
        assert_eq!(instruction_length(&[0x0f, 0x01, 0xd1], &M16), Some(3), "xsetbv");
        assert_eq!(instruction_length(&[0x2e; 15], &M64), None, "prefixes only");
        assert_eq!(instruction_length(&[], &M64), None);
    }

    #[test]
    fn control_register_write_sources() {
        // mov cr4, rax; mov cr0, r9; mov cr0, eax (32-bit); clts; lmsw dx; lmsw [rax]
        assert_eq!(cr_write_source(&[0x0f, 0x22, 0xe0], &M64), Some(CrWriteSource::Register(Gpr::new(0, 8))));
        assert_eq!(cr_write_source(&[0x41, 0x0f, 0x22, 0xc1], &M64), Some(CrWriteSource::Register(Gpr::new(9, 8))));
        assert_eq!(cr_write_source(&[0x0f, 0x22, 0xc0], &M32), Some(CrWriteSource::Register(Gpr::new(0, 4))));
        assert_eq!(cr_write_source(&[0x0f, 0x06], &M64), Some(CrWriteSource::Clts));
        assert_eq!(cr_write_source(&[0x0f, 0x01, 0xf2], &M16), Some(CrWriteSource::Lmsw(Gpr::new(2, 2))));
        assert_eq!(cr_write_source(&[0x0f, 0x01, 0x30], &M64), None);
        assert_eq!(cr_write_source(&[0x0f, 0x20, 0xc0], &M64), None, "mov rax, cr0 reads");
    }

    #[test]
    fn string_io_operands() {
        let op = |address_bits, segment| Some(StringIoOperand { address_bits, segment });
        assert_eq!(string_io_operand(&[0xf3, 0x6c], &M64), op(64, Segment::Es), "rep insb");
        assert_eq!(string_io_operand(&[0x67, 0xf3, 0x6e], &M64), op(32, Segment::Ds), "rep outsb, 32-bit addresses");
        assert_eq!(string_io_operand(&[0x64, 0x6f], &M32), op(32, Segment::Fs), "outsd with FS");
        assert_eq!(string_io_operand(&[0xf3, 0x6d], &M16), op(16, Segment::Es), "rep insw");
        assert_eq!(string_io_operand(&[0x67, 0x6e], &M16), op(32, Segment::Ds));
        assert_eq!(string_io_operand(&[0xee], &M64), None, "out dx, al");
    }

    #[test]
    fn truncated_bytes() {
        assert_eq!(decode(&[], &M64, 0), Err(MmioError::Truncated { len: 0 }));
        assert_eq!(decode(&[0x8b], &M64, 0), Err(MmioError::Truncated { len: 1 }));
        assert_eq!(decode(&[0x48, 0xc7, 0x00, 0xfe, 0xff], &M64, 0), Err(MmioError::Truncated { len: 5 }));
        assert_eq!(decode(&[0x8b, 0x04], &M64, 0), Err(MmioError::Truncated { len: 2 }));
        assert_eq!(MmioError::Truncated { len: 2 }.to_string(), "instruction bytes truncated (2 bytes available)");
    }

    #[test]
    fn apply_load_and_read_operand_edges() {
        let mut g = Gprs { rax: ONES, ..Default::default() };
        apply_load(&mut g, Gpr::new(0, 2), 2, Extend::None, 0xffff_0000_1234);
        assert_eq!(g.rax, 0xffff_ffff_ffff_1234, "value masked to size");
        apply_load(&mut g, Gpr::new(200, 8), 8, Extend::None, 1); // invalid: ignored
        apply_load(&mut g, Gpr::new(0, 0), 0, Extend::Sign, 1);
        assert_eq!(g.rax, 0xffff_ffff_ffff_1234, "a zero-width write changes nothing");
        assert_eq!(store_value(Operand::Reg(Gpr::new(4, 4)), 4, |n| u64::from(n) << 32 | 0x55), 0x55);
        assert_eq!(read_operand(&g, Operand::Imm(ONES), 2), 0xffff);
        assert_eq!(read_operand(&g, Operand::Imm(ONES), 200), ONES);
    }

    /// xorshift64: a small deterministic generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn fuzz_decode_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut decoded = 0;
        for _ in 0..30_000 {
            let n = (rng.next() % 17) as usize;
            let mut bytes = rng.bytes(n);
            // Bias towards the supported opcodes so the success paths are exercised too.
            if let Some(b) = bytes.get_mut(0) {
                if rng.next().is_multiple_of(2) {
                    *b = [0x88, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0xa0, 0xa3, 0x0f, 0x63, 0x66, 0x48]
                        [(rng.next() % 12) as usize];
                }
            }
            for mode in [&M64, &M32, &M16] {
                if let Ok(op) = decode(&bytes, mode, rng.next()) {
                    decoded += 1;
                    assert!(usize::from(op.len) <= bytes.len() && op.len > 0);
                    assert!(matches!(op.size, 1 | 2 | 4 | 8));
                    let mut g = Gprs::default();
                    match op.kind {
                        MmioKind::Load { reg, extend } => apply_load(&mut g, reg, op.size, extend, rng.next()),
                        MmioKind::Store { src } => {
                            let v = read_operand(&g, src, op.size);
                            assert!(op.size == 8 || v >> (u32::from(op.size) * 8) == 0);
                        }
                    }
                }
            }
        }
        assert!(decoded > 1000, "only {decoded} decoded");
    }

    #[test]
    fn fuzz_elf_never_panics() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut backing = vec![0u8; 0x10000];
        let phs = [Ph::load(0x100, 0x1000, 0x40, 0x80), Ph::load(0x140, 0x2000, 0x10, 0x10)];
        let valid = build_elf(2, 62, 0x1000, &phs, 0x200);
        assert!(load_elf64(&valid, &mut SliceMemory(&mut backing)).is_ok());
        let mut loaded = 0;
        for i in 0..20_000 {
            let image = if i % 4 == 0 {
                let n = (rng.next() % 600) as usize;
                rng.bytes(n)
            } else {
                // Mutate a few header / program-header bytes of a valid image, sometimes truncating.
                let mut image = valid.clone();
                for _ in 0..1 + rng.next() % 4 {
                    let at = (rng.next() % 176) as usize;
                    image[at] = rng.next() as u8;
                }
                if rng.next().is_multiple_of(8) {
                    image.truncate((rng.next() % 0x200) as usize);
                }
                image
            };
            if load_elf64(&image, &mut SliceMemory(&mut backing)).is_ok() {
                loaded += 1;
            }
        }
        assert!(loaded > 100, "only {loaded} loaded");
    }

    #[test]
    fn fuzz_walk_never_panics() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let mut backing = rng.bytes(0x8000);
        // Make entries often present and pointing inside memory.
        for (i, b) in backing.iter_mut().enumerate() {
            match i % 8 {
                0 => *b |= 1,
                1 => *b &= 0x7f,
                2 => *b = 0,
                3..=6 => *b = 0,
                _ => *b &= 0x80,
            }
        }
        let mem = SliceMemory(&mut backing);
        for _ in 0..20_000 {
            let mode = GuestMode {
                cr0: rng.next() & 0x8001_0001,
                cr3: rng.next() & 0x7fff,
                cr4: rng.next() & 0x0010_1030,
                efer: rng.next() & 0xd00,
                long_code: rng.next().is_multiple_of(2),
                default_32: rng.next().is_multiple_of(2),
                cs_base: 0,
                cpl: 0,
            };
            let r = rng.next();
            let access = Access { write: r & 1 != 0, fetch: r & 2 != 0, user: r & 4 != 0 };
            let gva = if rng.next().is_multiple_of(2) { rng.next() } else { rng.next() & 0x7fff };
            let _ = translate(&mem, &mode, gva, access);
            let mut buf = [0u8; 15];
            let _ = read_virt_access(&mem, &mode, gva, access, &mut buf);
        }
    }
}
