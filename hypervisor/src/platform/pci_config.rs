//! The machine's PCI configuration space, through configuration mechanism #1 (ports 0xcf8 and
//! 0xcfc), which every PC chipset and both emulators have. Only the boot CPU uses it, while it
//! looks for the host disk and the host NIC; guests never reach these ports (their port I/O is
//! intercepted).

use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use x86_64::instructions::port::Port;

const ADDRESS_PORT: u16 = 0xcf8;
const DATA_PORT: u16 = 0xcfc;

/// An address/data pair must not be split by another access.
static LOCK: spin::Mutex<()> = spin::Mutex::new(());

fn address(at: DeviceFunction, offset: u8) -> u32 {
    1 << 31
        | u32::from(at.bus) << 16
        | u32::from(at.device & 0x1f) << 11
        | u32::from(at.function & 0x07) << 8
        | u32::from(offset & 0xfc)
}

/// Reads the dword at `offset` (rounded down to a multiple of 4) of function `at`.
pub fn read(at: DeviceFunction, offset: u8) -> u32 {
    let _guard = LOCK.lock();
    // SAFETY: mechanism #1 selects a configuration dword through 0xcf8 and reads it through
    // 0xcfc; neither has a side effect beyond the latch, which is only used under LOCK.
    unsafe {
        Port::<u32>::new(ADDRESS_PORT).write(address(at, offset));
        Port::<u32>::new(DATA_PORT).read()
    }
}

/// Writes the dword at `offset` (rounded down to a multiple of 4) of function `at`.
pub fn write(at: DeviceFunction, offset: u8, value: u32) {
    let _guard = LOCK.lock();
    // SAFETY: as in `read`; callers write only registers of the device they drive.
    unsafe {
        Port::<u32>::new(ADDRESS_PORT).write(address(at, offset));
        Port::<u32>::new(DATA_PORT).write(value);
    }
}

/// Configuration access for `virtio-drivers`' PCI transport.
pub struct PortAccess;

impl ConfigurationAccess for PortAccess {
    fn read_word(&self, at: DeviceFunction, offset: u8) -> u32 {
        read(at, offset)
    }

    fn write_word(&mut self, at: DeviceFunction, offset: u8, value: u32) {
        write(at, offset, value)
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortAccess
    }
}

/// Every function present on every bus, in bus/device/function order, with its vendor and
/// device ID. A brute-force scan: a few thousand port reads, once, at start-up.
pub fn functions() -> impl Iterator<Item = (DeviceFunction, u16, u16)> {
    (0..=255u8).flat_map(|bus| (0..32u8).map(move |device| (bus, device))).flat_map(|(bus, device)| {
        let first = DeviceFunction { bus, device, function: 0 };
        let id = read(first, 0);
        let functions = if id & 0xffff == 0xffff {
            0
        } else if read(first, 0x0c) >> 16 & 0x80 != 0 {
            8 // multi-function device
        } else {
            1
        };
        (0..functions).filter_map(move |function| {
            let at = DeviceFunction { bus, device, function };
            let id = read(at, 0);
            (id & 0xffff != 0xffff).then_some((at, id as u16, (id >> 16) as u16))
        })
    })
}
