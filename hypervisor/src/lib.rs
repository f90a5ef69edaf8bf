//! The hypervisor core.
//!
//! Everything outside [`platform`] is hardware-independent and compiles for the host as well, so it
//! is unit-tested with `cargo test`. [`platform`] is the bare-metal layer: it exists only when the
//! crate is built for `x86_64-unknown-none`.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", feature(abi_x86_interrupt))]

extern crate alloc;

pub mod acpi;
pub mod console;
pub mod devices;
pub mod exit_decode;
pub mod guest_clock;
pub mod host_acpi;
pub mod host_disk;
pub mod loader;
pub mod mm;
pub mod mmio;
pub mod net;
pub mod ramdisk;
pub mod sched;
pub mod status;
pub mod vcpu;
pub mod virt;
pub mod vm;

#[cfg(target_os = "none")]
pub mod platform;
