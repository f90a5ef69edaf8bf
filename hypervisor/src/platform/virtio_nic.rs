//! The machine's NIC on a virtio-net PCI device (QEMU's `-device virtio-net-pci`, transitional
//! 1af4:1000 or modern 1af4:1041), driven by the `virtio-drivers` crate's `VirtIONetRaw` over
//! its modern PCI transport, polled and never waiting: a frame to send is copied into a free
//! transmit buffer and queued; buffers come back when the device has used them. Receive
//! buffers are all posted at start-up and reposted as soon as their frame has been taken.
//!
//! Every buffer is a 2 KiB slice of frames allocated for the NIC at start-up and never freed,
//! so the device only ever sees memory we own and the NIC costs a fixed 256 KiB whatever the
//! wire does: a full receive ring makes the device drop (QEMU holds its frames back), a full
//! transmit ring makes [`HostNic::can_send`] say no.

use alloc::vec::Vec;

use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::pci::PciTransport;

use super::memory;
use super::pci_config;
use super::virtio_hal::{self, FrameHal, VIRTIO_VENDOR};
use crate::mm::frames::FRAME_SIZE;
use crate::net::{HostNic, Mac, NicError};

/// The PCI device IDs of a virtio network device (transitional and modern).
const NET_DEVICE_IDS: [u16; 2] = [0x1000, 0x1041];

/// Descriptors of each queue; every buffer is one descriptor, so also buffers per queue.
const QUEUE: usize = 64;
/// One buffer: the 12-byte header and a full frame (1518 bytes) with room to spare; the
/// driver wants at least 1526 for a receive buffer.
const BUFFER_LEN: usize = 2048;
const RING_BYTES: usize = QUEUE * BUFFER_LEN;
const RING_FRAMES: u64 = (RING_BYTES as u64).div_ceil(FRAME_SIZE);

type Buffer = &'static mut [u8];

/// A virtio-net device found on the host's PCI bus.
pub struct VirtioNic {
    net: VirtIONetRaw<FrameHal, PciTransport, QUEUE>,
    /// Where it sits, for the log.
    pub location: DeviceFunction,
    mac: Mac,
    /// Receive buffers the device holds, by the token it will return them with.
    rx_posted: [Option<Buffer>; QUEUE],
    /// Receive buffers that could not be reposted; tried again at the next receive.
    rx_spare: Vec<Buffer>,
    /// Transmit buffers the device holds, by token, with the length queued.
    tx_posted: [Option<(Buffer, usize)>; QUEUE],
    /// Transmit buffers free for the next frames.
    tx_free: Vec<Buffer>,
}

// SAFETY: the driver's MMIO pointers and the DMA buffers are valid on every CPU (one address
// space); the NIC is only used through the uplink's lock, one CPU at a time.
unsafe impl Send for VirtioNic {}

/// `QUEUE` buffers of [`BUFFER_LEN`] bytes in frames that stay the NIC's for good.
fn buffers() -> Result<Vec<Buffer>, &'static str> {
    let phys = memory::alloc_zeroed(RING_FRAMES, FRAME_SIZE).ok_or("no memory for its DMA buffers")?;
    // SAFETY: the frames were just allocated for this NIC and are never freed; each slice below
    // is handed to the device or kept by the driver, never both at once.
    let ring = unsafe { memory::phys_slice_mut(phys, RING_BYTES) };
    Ok(ring.as_chunks_mut::<BUFFER_LEN>().0.iter_mut().map(|buffer| buffer.as_mut_slice()).collect())
}

impl VirtioNic {
    /// The first virtio-net device on the host's PCI buses, set up for polling; `Some(Err)`
    /// says why a device that is there cannot be used. Runs on the boot CPU before the others
    /// start (its BARs may need mapping).
    pub fn probe() -> Option<Result<Self, &'static str>> {
        let (location, _, _) = pci_config::functions()
            .find(|&(_, vendor, device)| vendor == VIRTIO_VENDOR && NET_DEVICE_IDS.contains(&device))?;
        Some(Self::open(location))
    }

    fn open(location: DeviceFunction) -> Result<Self, &'static str> {
        let transport = virtio_hal::transport(location)?;
        let mut net = VirtIONetRaw::<FrameHal, _, QUEUE>::new(transport)
            .map_err(|_| "the virtio-net device did not initialise (it needs 64-entry queues)")?;
        // Polled: the device need not interrupt (the host's interrupt handlers only acknowledge).
        net.disable_interrupts();
        let mac = net.mac_address();
        let mut nic = VirtioNic {
            net,
            location,
            mac,
            rx_posted: [const { None }; QUEUE],
            rx_spare: buffers()?,
            tx_posted: [const { None }; QUEUE],
            tx_free: buffers()?,
        };
        nic.repost_receive_buffers();
        if nic.rx_posted.iter().all(Option::is_none) {
            return Err("the virtio-net device took no receive buffer");
        }
        Ok(nic)
    }

    /// Gives the device every receive buffer it does not hold.
    fn repost_receive_buffers(&mut self) {
        while let Some(buffer) = self.rx_spare.pop() {
            if let Err(buffer) = self.post_receive(buffer) {
                self.rx_spare.push(buffer);
                return;
            }
        }
    }

    fn post_receive(&mut self, buffer: Buffer) -> Result<(), Buffer> {
        // SAFETY: the buffer is the NIC's own DMA memory; it is kept in `rx_posted` under the
        // token and not touched until the device returns that token.
        match unsafe { self.net.receive_begin(buffer) } {
            Ok(token) => match self.rx_posted.get_mut(usize::from(token)) {
                Some(slot @ None) => {
                    *slot = Some(buffer);
                    Ok(())
                }
                // A token the queue cannot hand out: the buffer stays with the device for good.
                _ => Ok(()),
            },
            Err(_) => Err(buffer),
        }
    }

    /// Takes back the transmit buffers the device is done with.
    fn reclaim_transmit_buffers(&mut self) {
        for _ in 0..QUEUE {
            let Some(token) = self.net.poll_transmit() else { return };
            let Some((buffer, len)) = self.tx_posted.get_mut(usize::from(token)).and_then(Option::take) else {
                // Not a frame we queued: leave the queue alone rather than loop on it.
                return;
            };
            let sent = buffer.get(..len).unwrap_or_default();
            // SAFETY: `sent` is the slice `transmit_begin` was given for this token.
            if unsafe { self.net.transmit_complete(token, sent) }.is_err() {
                log::warn!("host NIC: the device returned transmit buffer {token} out of order");
            }
            self.tx_free.push(buffer);
        }
    }
}

impl HostNic for VirtioNic {
    fn mac(&self) -> Mac {
        self.mac
    }

    fn can_send(&mut self) -> bool {
        self.reclaim_transmit_buffers();
        !self.tx_free.is_empty() && self.net.can_send()
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), NicError> {
        self.reclaim_transmit_buffers();
        let buffer = self.tx_free.pop().ok_or(NicError("the transmit ring is full"))?;
        let header = match self.net.fill_buffer_header(buffer) {
            Ok(header) => header,
            Err(_) => {
                self.tx_free.push(buffer);
                return Err(NicError("no room for the virtio-net header"));
            }
        };
        let len = header + frame.len();
        let Some(payload) = buffer.get_mut(header..len) else {
            self.tx_free.push(buffer);
            return Err(NicError("the frame is longer than a transmit buffer"));
        };
        payload.copy_from_slice(frame);
        let queued = buffer.get(..len).unwrap_or_default();
        // SAFETY: the buffer is the NIC's own DMA memory; it is kept in `tx_posted` under the
        // token and not touched until the device returns that token.
        match unsafe { self.net.transmit_begin(queued) } {
            Ok(token) => {
                if let Some(slot @ None) = self.tx_posted.get_mut(usize::from(token)) {
                    *slot = Some((buffer, len));
                }
                Ok(())
            }
            Err(_) => {
                self.tx_free.push(buffer);
                Err(NicError("the device's transmit queue took no frame"))
            }
        }
    }

    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8])) -> bool {
        self.repost_receive_buffers();
        let Some(token) = self.net.poll_receive() else { return false };
        let Some(buffer) = self.rx_posted.get_mut(usize::from(token)).and_then(Option::take) else {
            return false;
        };
        // SAFETY: `buffer` is the slice `receive_begin` was given for this token.
        if let Ok((header, len)) = unsafe { self.net.receive_complete(token, buffer) } {
            if let Some(frame) = header.checked_add(len).and_then(|end| buffer.get(header..end)) {
                deliver(frame);
            }
        }
        if let Err(buffer) = self.post_receive(buffer) {
            self.rx_spare.push(buffer);
        }
        true
    }
}
