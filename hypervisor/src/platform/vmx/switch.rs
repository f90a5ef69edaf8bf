//! The world switch: host -> guest (VMLAUNCH/VMRESUME) and back (VM exit to HOST_RIP).
//!
//! The host's callee-saved registers and a pointer to the [`SwitchState`] are pushed on the
//! host stack; HOST_RSP is rewritten with that stack pointer on every entry, so a VM exit lands
//! on `hv_vmx_exit` with the pointer at `[rsp]`. Extended state is swapped around this call by
//! `platform::xstate` (the hypervisor is built soft-float, so no compiled code touches it).

use core::arch::global_asm;
use core::mem::offset_of;

use crate::vcpu::Gprs;

/// What the world switch reads and writes. `gprs` must stay first (offset 0).
#[repr(C)]
pub struct SwitchState {
    /// Guest general-purpose registers.
    pub gprs: Gprs,
}

/// World-switch result: the guest ran and exited.
pub const SWITCH_EXITED: u64 = 0;
/// VMLAUNCH/VMRESUME (or the HOST_RSP write) failed with CF set (VMfailInvalid).
pub const SWITCH_FAIL_INVALID: u64 = 1;
/// VMLAUNCH/VMRESUME failed with ZF set (VMfailValid): see the VM-instruction error field.
pub const SWITCH_FAIL_VALID: u64 = 2;

unsafe extern "sysv64" {
    /// Enters the guest of the current VMCS with VMRESUME (`launched != 0`) or VMLAUNCH and
    /// returns after the VM exit with one of the `SWITCH_*` codes.
    pub fn hv_vmx_run(state: *mut SwitchState, launched: u64) -> u64;
    /// Where VM exits land (HOST_RIP).
    pub static hv_vmx_exit: u8;
}

global_asm!(
    ".pushsection .text.hv_vmx_switch, \"ax\"",
    ".global hv_vmx_run",
    ".global hv_vmx_exit",
    "hv_vmx_run:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov r12, rdi",
    "mov r13, rsi",
    // HOST_RSP: the stack as it is now, with the state pointer on top.
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "jbe 5f",
    // Guest registers; the flags of this test survive the moves and pick the instruction.
    "test r13, r13",
    "mov rax, r12",
    "mov rbx, [rax + {rbx}]",
    "mov rcx, [rax + {rcx}]",
    "mov rdx, [rax + {rdx}]",
    "mov rsi, [rax + {rsi}]",
    "mov rdi, [rax + {rdi}]",
    "mov rbp, [rax + {rbp}]",
    "mov r8, [rax + {r8}]",
    "mov r9, [rax + {r9}]",
    "mov r10, [rax + {r10}]",
    "mov r11, [rax + {r11}]",
    "mov r12, [rax + {r12}]",
    "mov r13, [rax + {r13}]",
    "mov r14, [rax + {r14}]",
    "mov r15, [rax + {r15}]",
    "mov rax, [rax + {rax}]",
    "jnz 4f",
    "vmlaunch",
    "jmp 5f",
    "4:",
    "vmresume",
    // Only reached when the entry instruction failed: CF or ZF tells which way.
    "5:",
    "jc 6f",
    "mov r13d, {fail_valid}",
    "jmp 7f",
    "6:",
    "mov r13d, {fail_invalid}",
    "7:",
    "mov r12, [rsp]",
    "jmp 8f",
    // VM exit: every register but RSP/RIP is the guest's.
    "hv_vmx_exit:",
    "push rax",
    "mov rax, [rsp + 8]",
    "mov [rax + {rbx}], rbx",
    "mov [rax + {rcx}], rcx",
    "mov [rax + {rdx}], rdx",
    "mov [rax + {rsi}], rsi",
    "mov [rax + {rdi}], rdi",
    "mov [rax + {rbp}], rbp",
    "mov [rax + {r8}], r8",
    "mov [rax + {r9}], r9",
    "mov [rax + {r10}], r10",
    "mov [rax + {r11}], r11",
    "mov [rax + {r12}], r12",
    "mov [rax + {r13}], r13",
    "mov [rax + {r14}], r14",
    "mov [rax + {r15}], r15",
    "pop qword ptr [rax + {rax}]",
    "mov r12, rax",
    "xor r13d, r13d",
    "8:",
    "mov rax, r13",
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".popsection",
    host_rsp = const 0x6c14,
    fail_valid = const SWITCH_FAIL_VALID,
    fail_invalid = const SWITCH_FAIL_INVALID,
    rax = const offset_of!(Gprs, rax),
    rbx = const offset_of!(Gprs, rbx),
    rcx = const offset_of!(Gprs, rcx),
    rdx = const offset_of!(Gprs, rdx),
    rsi = const offset_of!(Gprs, rsi),
    rdi = const offset_of!(Gprs, rdi),
    rbp = const offset_of!(Gprs, rbp),
    r8 = const offset_of!(Gprs, r8),
    r9 = const offset_of!(Gprs, r9),
    r10 = const offset_of!(Gprs, r10),
    r11 = const offset_of!(Gprs, r11),
    r12 = const offset_of!(Gprs, r12),
    r13 = const offset_of!(Gprs, r13),
    r14 = const offset_of!(Gprs, r14),
    r15 = const offset_of!(Gprs, r15),
);

const _: () = assert!(offset_of!(SwitchState, gprs) == 0);
const _: () = assert!(super::fields::natural::HOST_RSP.encoding() == 0x6c14);
