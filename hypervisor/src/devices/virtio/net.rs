//! Virtio network device (virtio 1.2, 5.1) on a port of an L2 [`Switch`].
//!
//! One receive queue and one transmit queue, no control queue. Frames are plain Ethernet: no
//! checksum or segmentation offloads are offered, so the guest computes its checksums and
//! every frame is at most [`MAX_FRAME_LEN`] bytes. Each frame in either direction is preceded
//! by the 12-byte `struct virtio_net_hdr` (VIRTIO_F_VERSION_1 makes `num_buffers` part of it).
//!
//! VIRTIO_NET_F_MRG_RXBUF is not offered: every frame the switch carries fits one receive
//! buffer of the size drivers post without it (1526 bytes by 5.1.6.3.1; Linux posts
//! `hdr_len + GOOD_PACKET_LEN` = 12 + 1518), so merging buffers would only make the device hold
//! popped chains while it waits for more. A frame that does not fit the buffer it is given is
//! dropped and the buffer returned empty. VIRTIO_NET_F_MTU tells the driver 1500, so a guest
//! cannot raise its MTU past what the switch carries.
//!
//! Transmitted frames go into the switch as they are popped; the ports that became non-empty
//! are kept for [`Net::take_wakeups`], since waking their VMs must wait until no lock is held.
//! Received frames wait in the device's switch port until the driver gives buffers for them;
//! [`VirtioDevice::pending_queues`] tells the transport when there is receive work, but not
//! while the receive queue was found without buffers and the driver has not notified it since.

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::{
    DescriptorChain, DeviceError, Queue, VirtioDevice, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::loader::GuestMemory;
use crate::net::{Mac, PortId, Switch, MAX_FRAME_LEN};

/// Virtio device ID of a network device (5.1.1).
pub const DEVICE_ID: u16 = 1;

// Feature bits (5.1.3).
/// `mtu` holds the largest MTU the driver may use.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// `mac` holds the device's MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The driver may post receive buffers a frame spans several of. Not offered.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// `status` holds the link state.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// `status`: the link is up (5.1.4).
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The MTU offered: a full Ethernet payload.
pub const MTU: u16 = 1500;

/// receiveq1.
pub const RX_QUEUE: u16 = 0;
/// transmitq1.
pub const TX_QUEUE: u16 = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_MAX_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

/// `struct virtio_net_hdr`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset and
/// num_buffers (5.1.6).
pub const HEADER_LEN: usize = 12;
/// The header in front of every received frame: no offloads, so flags, gso_type and the
/// checksum fields are 0; `num_buffers` (le16 at offset 10) is 1, one buffer per frame.
const RX_HEADER: [u8; HEADER_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// Bytes of `struct virtio_net_config` exposed: mac, status, max_virtqueue_pairs (read only with
/// VIRTIO_NET_F_MQ, which is not offered, but it sits before mtu) and mtu.
const CONFIG_LEN: usize = 12;

/// Wakes the VM behind a switch port (the platform kicks its vCPU).
pub type PortWaker = Arc<dyn Fn(PortId) + Send + Sync>;

/// A virtio network device on one port of a switch.
pub struct Net {
    mac: Mac,
    switch: Arc<spin::Mutex<Switch>>,
    port: PortId,
    config: [u8; CONFIG_LEN],
    active: bool,
    /// The last receive pass found frames waiting but no buffer for them. Only a driver
    /// notification brings buffers, so until the next pass there is no receive work to report.
    rx_starved: bool,
    /// A receive buffer popped when its frame was gone (someone else drained the port); the next
    /// frame goes there first.
    spare_rx: Option<DescriptorChain>,
    /// Ports that became non-empty through this device's frames, not yet woken.
    wakeups: Vec<PortId>,
    /// Wakes the VM behind a port; called once the switch lock is released.
    waker: Option<PortWaker>,
    rx_dropped_too_small: u64,
}

impl Net {
    /// A device with MAC `mac` on port `port` of `switch`.
    pub fn new(mac: Mac, switch: Arc<spin::Mutex<Switch>>, port: PortId) -> Self {
        let [m0, m1, m2, m3, m4, m5] = mac;
        let [s0, s1] = VIRTIO_NET_S_LINK_UP.to_le_bytes();
        let [p0, p1] = 1u16.to_le_bytes();
        let [u0, u1] = MTU.to_le_bytes();
        let config = [m0, m1, m2, m3, m4, m5, s0, s1, p0, p1, u0, u1];
        Net {
            mac,
            switch,
            port,
            config,
            active: false,
            rx_starved: false,
            spare_rx: None,
            wakeups: Vec::new(),
            waker: None,
            rx_dropped_too_small: 0,
        }
    }

    /// The device wakes the receiving ports' VMs itself, through `waker`, after each transmit
    /// pass (instead of leaving them to [`Net::take_wakeups`]).
    pub fn with_waker(mut self, waker: PortWaker) -> Self {
        self.waker = Some(waker);
        self
    }

    /// The device's MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The device's port on its switch.
    pub fn port(&self) -> PortId {
        self.port
    }

    /// The ports whose VMs must be woken for frames this device sent, each once; the caller
    /// wakes them once it holds no lock.
    pub fn take_wakeups(&mut self) -> Vec<PortId> {
        core::mem::take(&mut self.wakeups)
    }

    /// Frames dropped because the receive buffer given for them was too small.
    pub fn rx_dropped_too_small(&self) -> u64 {
        self.rx_dropped_too_small
    }

    /// Sends what the driver made available on the transmit queue.
    fn transmit(&mut self, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
        // One byte more than the longest frame: enough for the switch to see one is too long
        // without copying however much the guest claims to send.
        let mut frame = [0u8; MAX_FRAME_LEN + 1];
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop(mem)? else { break };
            let bad = |problem| DeviceError::BadRequest { head: chain.head(), problem };
            if !chain.writable().is_empty() {
                return Err(bad("a transmit chain has device-writable descriptors"));
            }
            let Some(len) = (chain.readable_len() as usize).checked_sub(HEADER_LEN) else {
                return Err(bad("the transmit chain is shorter than the 12-byte virtio_net_hdr"));
            };
            // The header is skipped: it can only ask for offloads that were not offered.
            let buf = frame.get_mut(..len.min(MAX_FRAME_LEN + 1)).unwrap_or(&mut []);
            let n = chain.read_at(mem, HEADER_LEN as u64, buf)?;
            let woken = self.switch.lock().send(self.port, buf.get(..n).unwrap_or(&[]));
            for port in woken {
                if !self.wakeups.contains(&port) {
                    self.wakeups.push(port);
                }
            }
            queue.push_used(mem, chain.head(), 0)?;
        }
        Ok(queue.should_interrupt(mem)?)
    }

    /// Moves frames waiting in the switch port into the buffers the driver made available.
    fn receive(&mut self, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
        self.rx_starved = false;
        for _ in 0..queue.size() {
            if !self.switch.lock().has_frames(self.port) {
                break;
            }
            let chain = match self.spare_rx.take() {
                Some(chain) => chain,
                None => match queue.pop(mem)? {
                    Some(chain) => chain,
                    None => {
                        // Frames stay in the port, which drops what does not fit its bound.
                        self.rx_starved = true;
                        break;
                    }
                },
            };
            if !chain.readable().is_empty() {
                return Err(DeviceError::BadRequest {
                    head: chain.head(),
                    problem: "a receive chain has device-readable descriptors",
                });
            }
            let Some(frame) = self.switch.lock().receive(self.port) else {
                self.spare_rx = Some(chain);
                break;
            };
            let used_len = self.fill(&chain, mem, &frame)?;
            queue.push_used(mem, chain.head(), used_len)?;
        }
        Ok(queue.should_interrupt(mem)?)
    }

    /// Writes a header and `frame` into a receive buffer; returns the used length, 0 if the
    /// frame does not fit (it is dropped: the driver sees an empty buffer and reuses it).
    fn fill(&mut self, chain: &DescriptorChain, mem: &mut dyn GuestMemory, frame: &[u8]) -> Result<u32, DeviceError> {
        let len = HEADER_LEN + frame.len();
        if (chain.writable_len() as usize) < len {
            self.rx_dropped_too_small += 1;
            return Ok(0);
        }
        chain.write_at(mem, 0, &RX_HEADER)?;
        chain.write_at(mem, HEADER_LEN as u64, frame)?;
        Ok(len as u32)
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u16 {
        DEVICE_ID
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_F_EVENT_IDX
            | VIRTIO_F_INDIRECT_DESC
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, _driver_features: u64) -> Result<(), DeviceError> {
        self.active = true;
        Ok(())
    }

    /// Frames already in the port stay there: they are the network's, not the device's.
    fn reset(&mut self) {
        self.active = false;
        self.rx_starved = false;
        self.spare_rx = None;
    }

    fn process(&mut self, queue_index: u16, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
        match queue_index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => {
                let interrupt = self.transmit(queue, mem);
                if let Some(waker) = &self.waker {
                    for port in core::mem::take(&mut self.wakeups) {
                        waker(port);
                    }
                }
                interrupt
            }
            _ => Err(DeviceError::NoSuchQueue(queue_index)),
        }
    }

    fn report(&self) -> Option<alloc::string::String> {
        let switch = self.switch.lock();
        let summary = switch.summary(self.port)?;
        Some(alloc::format!("{summary}, {} too large for their receive buffer", self.rx_dropped_too_small))
    }

    fn pending_queues(&self) -> u64 {
        if self.active && !self.rx_starved && self.switch.lock().has_frames(self.port) {
            1 << RX_QUEUE
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
    use crate::devices::virtio::test_driver::{
        indirect_table, memory, readable, writable, Buf, Driver, HugeMemory, DATA, MEM_SIZE,
    };
    use crate::devices::virtio::{QueueError, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED};
    use crate::loader::SliceMemory;
    use crate::net::{Limits, SharedSwitch, MIN_FRAME_LEN};
    use alloc::string::ToString;
    use alloc::vec;

    const FEATURES: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_F_EVENT_IDX
        | VIRTIO_F_INDIRECT_DESC
        | VIRTIO_NET_F_MTU
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_STATUS;
    const MAC_A: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0xa];
    const MAC_B: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0xb];
    const MAC_C: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0xc];
    const BROADCAST: Mac = [0xff; 6];
    /// What Linux posts without VIRTIO_NET_F_MRG_RXBUF: hdr_len + GOOD_PACKET_LEN.
    const LINUX_RX_BUF: u32 = 12 + 1518;
    /// Room for one buffer in the test layouts.
    const SLOT: u64 = 0x800;
    /// A transmit header asking for a checksum and TCP segmentation, which were not offered.
    const OFFLOAD_HEADER: [u8; HEADER_LEN] = [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0];

    fn shared_switch(limits: Limits) -> SharedSwitch {
        Arc::new(spin::Mutex::new(Switch::with_limits("lan", limits)))
    }

    fn frame(dst: Mac, src: Mac, payload_len: usize, tag: u8) -> Vec<u8> {
        let mut frame = dst.to_vec();
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend((0..payload_len).map(|i| tag.wrapping_add(i as u8)));
        frame
    }

    /// One VM with a network device, as its driver sees it. The test driver lays out a single
    /// queue per guest memory, so each queue has its own memory here; the device keeps no
    /// guest address between calls, so it cannot tell.
    struct Guest {
        net: Net,
        rx_mem: Vec<u8>,
        tx_mem: Vec<u8>,
        rx: Driver,
        tx: Driver,
        rxq: Queue,
        txq: Queue,
        /// Guest address of each posted receive buffer, by head.
        rx_bufs: Vec<(u16, u64)>,
        /// Used receive entries the driver has looked at.
        rx_seen: u16,
        next_rx_slot: u64,
        next_tx_slot: u64,
    }

    impl Guest {
        fn on(switch: &SharedSwitch, mac: Mac) -> Self {
            Guest::sized(switch, mac, 16)
        }

        fn sized(switch: &SharedSwitch, mac: Mac, size: u16) -> Self {
            let port = switch.lock().add_port();
            let mut net = Net::new(mac, switch.clone(), port);
            net.activate(FEATURES).unwrap();
            let (mut rx_mem, mut tx_mem) = (memory(), memory());
            let (rx, tx) = (Driver::new(size), Driver::new(size));
            let rxq = rx.queue(&SliceMemory(&mut rx_mem), FEATURES);
            let txq = tx.queue(&SliceMemory(&mut tx_mem), FEATURES);
            Guest {
                net,
                rx_mem,
                tx_mem,
                rx,
                tx,
                rxq,
                txq,
                rx_bufs: Vec::new(),
                rx_seen: 0,
                next_rx_slot: 0,
                next_tx_slot: 0,
            }
        }

        /// The driver notifies `queue`.
        fn process(&mut self, queue: u16) -> Result<bool, DeviceError> {
            match queue {
                RX_QUEUE => self.net.process(queue, &mut self.rxq, &mut SliceMemory(&mut self.rx_mem)),
                _ => self.net.process(queue, &mut self.txq, &mut SliceMemory(&mut self.tx_mem)),
            }
        }

        /// Addresses for `len` bytes in the next free slots of `next`.
        fn slot(next: &mut u64, len: usize) -> u64 {
            let gpa = DATA + *next * SLOT;
            *next = (*next + (len as u64).div_ceil(SLOT)) % 256;
            gpa
        }

        /// Publishes a transmit chain: the header, then `frame`, in one descriptor as Linux
        /// does when the header fits in front of the data.
        fn queue_frame(&mut self, frame: &[u8]) -> u16 {
            let gpa = Guest::slot(&mut self.next_tx_slot, HEADER_LEN + frame.len());
            let mut mem = SliceMemory(&mut self.tx_mem);
            mem.write(gpa, &OFFLOAD_HEADER).unwrap();
            mem.write(gpa + HEADER_LEN as u64, frame).unwrap();
            self.tx.chain(&mut mem, &[readable(gpa, (HEADER_LEN + frame.len()) as u32)])
        }

        /// Transmits `frame` and checks that the chain completed with used length 0. Returns
        /// whether the device signalled; the driver then asks for the next completion too.
        fn send(&mut self, frame: &[u8]) -> bool {
            let used = self.tx.used_idx(&SliceMemory(&mut self.tx_mem));
            let head = self.queue_frame(frame);
            let interrupt = self.process(TX_QUEUE).unwrap();
            let mut mem = SliceMemory(&mut self.tx_mem);
            assert_eq!(self.tx.used_idx(&mem), used.wrapping_add(1));
            assert_eq!(self.tx.used(&mem, used), (u32::from(head), 0));
            self.tx.set_used_event(&mut mem, used.wrapping_add(1));
            interrupt
        }

        /// Posts `count` receive buffers of `len` bytes each, without notifying.
        fn post_rx(&mut self, count: usize, len: u32) {
            for _ in 0..count {
                let gpa = Guest::slot(&mut self.next_rx_slot, len as usize);
                let head = self.rx.chain(&mut SliceMemory(&mut self.rx_mem), &[writable(gpa, len)]);
                self.rx_bufs.retain(|&(h, _)| h != head);
                self.rx_bufs.push((head, gpa));
            }
        }

        /// The buffers the device returned since the last call: (header, frame) each. Like
        /// Linux re-enabling its callback, asks for an interrupt at the next used buffer.
        fn received(&mut self) -> Vec<([u8; HEADER_LEN], Vec<u8>)> {
            let mut mem = SliceMemory(&mut self.rx_mem);
            let mut out = Vec::new();
            while self.rx_seen != self.rx.used_idx(&mem) {
                let (id, len) = self.rx.used(&mem, self.rx_seen);
                self.rx_seen = self.rx_seen.wrapping_add(1);
                let &(_, gpa) = self.rx_bufs.iter().find(|&&(head, _)| u32::from(head) == id).unwrap();
                let mut bytes = vec![0u8; len as usize];
                mem.read(gpa, &mut bytes).unwrap();
                let mut header = [0u8; HEADER_LEN];
                if let Some(h) = bytes.get(..HEADER_LEN) {
                    header.copy_from_slice(h);
                }
                out.push((header, bytes.get(HEADER_LEN..).unwrap_or(&[]).to_vec()));
            }
            self.rx.set_used_event(&mut mem, self.rx_seen);
            out
        }
    }

    /// The header the device writes in front of every received frame.
    fn rx_header() -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[10] = 1;
        header
    }

    #[test]
    fn the_configuration_space_and_features_describe_the_interface() {
        let switch = shared_switch(Limits::DEFAULT);
        let net = Net::new(MAC_A, switch, 0);
        assert_eq!(net.device_id(), 1);
        assert_eq!(net.queue_max_sizes(), [256, 256]);
        assert_eq!(net.config(), [0x52, 0x54, 0, 0x12, 0x34, 0xa, 1, 0, 1, 0, 0xdc, 0x05]);
        assert_eq!(net.read_config(6, 2), Some(u64::from(VIRTIO_NET_S_LINK_UP)));
        assert_eq!(net.read_config(10, 2), Some(1500), "mtu");
        assert_eq!(net.read_config(12, 1), None);
        let features = net.device_features();
        assert_eq!(features, FEATURES);
        assert_eq!(features & (VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_RING_PACKED), 0);
        assert_eq!(features & 0b111, 0, "no CSUM, GUEST_CSUM or CTRL_GUEST_OFFLOADS");
        assert_eq!(features & (0x1ff << 6), 0, "no GSO, TSO, UFO or ECN either way (bits 6 to 14)");
        assert_eq!((net.mac(), net.port()), (MAC_A, 0));
    }

    #[test]
    fn frames_cross_from_one_guests_transmit_queue_to_anothers_receive_queue() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut a = Guest::on(&switch, MAC_A);
        let mut b = Guest::on(&switch, MAC_B);
        b.post_rx(4, LINUX_RX_BUF);
        assert_eq!(b.process(RX_QUEUE), Ok(false), "nothing to receive yet");
        assert_eq!(b.net.pending_queues(), 0);

        let to_b = frame(MAC_B, MAC_A, 100, 1);
        assert!(a.send(&to_b), "the driver asked for the transmit completion");
        assert_eq!(a.net.take_wakeups(), [b.net.port()]);
        assert_eq!(a.net.take_wakeups(), Vec::<PortId>::new(), "each wakeup is taken once");
        assert_eq!(b.net.pending_queues(), 1 << RX_QUEUE);
        assert_eq!(a.net.pending_queues(), 0, "a frame never comes back to its sender");
        assert_eq!(b.process(RX_QUEUE), Ok(true));
        let received = b.received();
        assert_eq!(received, [(rx_header(), to_b.clone())], "a zeroed header and the frame, as sent");
        let mem = SliceMemory(&mut b.rx_mem);
        assert_eq!(b.rx.used(&mem, 0).1, 12 + 114);
        assert_eq!(b.net.pending_queues(), 0);

        // B answers in a chain of its own: the header split over two descriptors, the frame
        // over an indirect table.
        let reply = frame(MAC_A, MAC_B, 1500, 9);
        assert_eq!(reply.len(), 1514);
        let mut mem = SliceMemory(&mut b.tx_mem);
        mem.write(DATA, &OFFLOAD_HEADER).unwrap();
        mem.write(DATA + 0x1000, &reply).unwrap();
        let table = DATA + 0x4000;
        let len =
            indirect_table(&mut mem, table, &[readable(DATA + 0x1000, 1000), readable(DATA + 0x1000 + 1000, 514)]);
        b.tx.desc(&mut mem, 0, DATA, 5, VIRTQ_DESC_F_NEXT, 1);
        b.tx.desc(&mut mem, 1, DATA + 5, 7, VIRTQ_DESC_F_NEXT, 2);
        b.tx.desc(&mut mem, 2, table, len, VIRTQ_DESC_F_INDIRECT, 0);
        b.tx.publish(&mut mem, 0);
        assert_eq!(b.process(TX_QUEUE), Ok(true));
        assert_eq!(b.net.take_wakeups(), [a.net.port()], "A has no buffer yet, but its port was empty");
        // A was learned by its first frame: the reply is unicast to A's port only.
        assert_eq!(switch.lock().queued_frames(a.net.port()), 1);
        a.post_rx(1, LINUX_RX_BUF);
        assert_eq!(a.process(RX_QUEUE), Ok(true));
        assert_eq!(a.received(), [(rx_header(), reply)]);

        let lock = switch.lock();
        let (a_counters, b_counters) = (lock.counters(0).unwrap(), lock.counters(1).unwrap());
        assert_eq!((a_counters.frames_in, a_counters.frames_out), (1, 1));
        assert_eq!((b_counters.bytes_in, b_counters.bytes_out), (1514, 114));
    }

    #[test]
    fn broadcasts_reach_every_other_guest_and_wake_each_once() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut guests = [MAC_A, MAC_B, MAC_C].map(|mac| Guest::on(&switch, mac));
        for guest in guests.iter_mut() {
            guest.post_rx(4, LINUX_RX_BUF);
        }
        let arp = frame(BROADCAST, MAC_A, 28, 0);
        guests[0].send(&arp);
        guests[0].send(&arp);
        assert_eq!(guests[0].net.take_wakeups(), [1, 2]);
        assert_eq!(guests[0].net.pending_queues(), 0);
        assert_eq!(guests[0].process(RX_QUEUE), Ok(false));
        assert_eq!(guests[0].received(), []);
        for guest in &mut guests[1..] {
            assert_eq!(guest.net.pending_queues(), 1);
            assert_eq!(guest.process(RX_QUEUE), Ok(true));
            assert_eq!(guest.received(), [(rx_header(), arp.clone()), (rx_header(), arp.clone())]);
        }
    }

    #[test]
    fn a_full_port_queue_drops_and_counts() {
        let switch = shared_switch(Limits { queue_frames: 4, ..Limits::DEFAULT });
        let mut a = Guest::on(&switch, MAC_A);
        let mut b = Guest::on(&switch, MAC_B);
        for tag in 0..6 {
            a.send(&frame(MAC_B, MAC_A, 46, tag));
        }
        let counters = switch.lock().counters(b.net.port()).unwrap();
        assert_eq!(counters.dropped_queue_full, 2);
        assert_eq!(switch.lock().queued_frames(b.net.port()), 4);
        b.post_rx(8, LINUX_RX_BUF);
        b.process(RX_QUEUE).unwrap();
        let tags: Vec<u8> = b.received().iter().map(|(_, f)| f[MIN_FRAME_LEN]).collect();
        assert_eq!(tags, [0, 1, 2, 3], "the first four waited, the last two were dropped");
        assert_eq!(
            switch.lock().summary(b.net.port()).unwrap().to_string(),
            "network lan port 1: in 0 frames (0 bytes), out 4 frames (240 bytes), dropped 0 short, 0 long, 2 queue full"
        );
    }

    #[test]
    fn a_starved_receive_queue_reports_no_work_until_the_driver_notifies() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut a = Guest::on(&switch, MAC_A);
        let mut b = Guest::on(&switch, MAC_B);
        for tag in 0..5 {
            a.send(&frame(MAC_B, MAC_A, 46, tag));
        }
        assert_eq!(b.net.pending_queues(), 1, "frames wait and the queue was never found empty");
        assert_eq!(b.process(RX_QUEUE), Ok(false), "no buffers: nothing used");
        assert_eq!(b.net.pending_queues(), 0, "starved: reporting work would only spin");
        // The driver posts buffers but has not notified yet: still nothing to report.
        b.post_rx(2, LINUX_RX_BUF);
        assert_eq!(b.net.pending_queues(), 0);
        // With VIRTIO_F_EVENT_IDX the device asked to be notified of the next buffer.
        assert_eq!(b.rx.avail_event(&SliceMemory(&mut b.rx_mem)), 0);
        assert_eq!(b.process(RX_QUEUE), Ok(true));
        assert_eq!(b.received().len(), 2);
        assert_eq!(b.net.pending_queues(), 0, "three frames wait, and the buffers ran out again");
        assert_eq!(b.rx.avail_event(&SliceMemory(&mut b.rx_mem)), 2);
        b.post_rx(8, LINUX_RX_BUF);
        assert_eq!(b.process(RX_QUEUE), Ok(true));
        assert_eq!(b.received().len(), 3);
        assert_eq!(b.net.pending_queues(), 0, "nothing waits");
        // New frames with buffers still posted: work to report without a notification.
        a.send(&frame(MAC_B, MAC_A, 46, 9));
        assert_eq!(b.net.pending_queues(), 1);
        assert_eq!(b.process(RX_QUEUE), Ok(true));
        assert_eq!(b.received().len(), 1);
    }

    #[test]
    fn a_device_without_a_live_driver_reports_no_work() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut a = Guest::on(&switch, MAC_A);
        let mut b = Guest::on(&switch, MAC_B);
        a.send(&frame(BROADCAST, MAC_A, 46, 0));
        assert_eq!(b.net.pending_queues(), 1);
        b.net.reset();
        assert_eq!(b.net.pending_queues(), 0);
        assert_eq!(switch.lock().queued_frames(1), 1, "the frame stays in the port");
        b.net.activate(FEATURES).unwrap();
        assert_eq!(b.net.pending_queues(), 1);
        assert_eq!(b.process(2), Err(DeviceError::NoSuchQueue(2)));
    }

    #[test]
    fn transmit_chains_that_are_not_packets_are_device_errors() {
        let switch = shared_switch(Limits::DEFAULT);
        let cases: [(&[Buf], &str); 3] = [
            (&[readable(DATA, 11)], "the transmit chain is shorter than the 12-byte virtio_net_hdr"),
            (
                &[readable(DATA, 4), readable(DATA + 4, 7)],
                "the transmit chain is shorter than the 12-byte virtio_net_hdr",
            ),
            (&[readable(DATA, 74), writable(DATA + 0x100, 4)], "a transmit chain has device-writable descriptors"),
        ];
        for (bufs, problem) in cases {
            let mut a = Guest::on(&switch, MAC_A);
            let head = a.tx.chain(&mut SliceMemory(&mut a.tx_mem), bufs);
            assert_eq!(a.process(TX_QUEUE), Err(DeviceError::BadRequest { head, problem }));
            assert_eq!(a.tx.used_idx(&SliceMemory(&mut a.tx_mem)), 0, "nothing was completed");
        }
        // Exactly a header is a frame of no bytes, which the switch drops as too short.
        let mut a = Guest::on(&switch, MAC_A);
        a.tx.chain(&mut SliceMemory(&mut a.tx_mem), &[readable(DATA, 12)]);
        assert_eq!(a.process(TX_QUEUE), Ok(true));
        assert_eq!(switch.lock().counters(a.net.port()).unwrap().dropped_short, 1);

        let mut a = Guest::on(&switch, MAC_A);
        let beyond = MEM_SIZE as u64 - 8;
        a.tx.chain(&mut SliceMemory(&mut a.tx_mem), &[readable(DATA, 12), readable(beyond, 60)]);
        let error = a.process(TX_QUEUE).unwrap_err();
        assert!(
            matches!(error, DeviceError::Queue(QueueError::BufferOutsideMemory { addr, len: 60, .. }) if addr == beyond),
            "{error:?}"
        );
        assert_eq!(a.process(TX_QUEUE), Err(error), "the queue stays failed");
        assert_eq!(switch.lock().counters(a.net.port()).unwrap().frames_in, 0);
    }

    #[test]
    fn receive_chains_with_readable_descriptors_are_device_errors() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut a = Guest::on(&switch, MAC_A);
        let mut b = Guest::on(&switch, MAC_B);
        let head = b.rx.chain(&mut SliceMemory(&mut b.rx_mem), &[readable(DATA, 12), writable(DATA + 12, 1518)]);
        assert_eq!(b.process(RX_QUEUE), Ok(false), "no frame waits: the chain is not looked at");
        a.send(&frame(MAC_B, MAC_A, 46, 0));
        let error = b.process(RX_QUEUE).unwrap_err();
        assert_eq!(error, DeviceError::BadRequest { head, problem: "a receive chain has device-readable descriptors" });
        assert_eq!(switch.lock().queued_frames(b.net.port()), 1, "the frame was not taken");
    }

    #[test]
    fn the_longest_frame_fits_linux_buffers_and_longer_ones_are_dropped() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut a = Guest::on(&switch, MAC_A);
        let mut b = Guest::on(&switch, MAC_B);
        b.post_rx(2, LINUX_RX_BUF);
        // 1500 bytes of payload behind an 802.1Q tag.
        let mut tagged = frame(MAC_B, MAC_A, 1504, 3);
        tagged[12..16].copy_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        assert_eq!(tagged.len(), MAX_FRAME_LEN);
        a.send(&tagged);
        let mut too_long = frame(MAC_B, MAC_A, 1505, 4);
        too_long[12..16].copy_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        a.send(&too_long);
        b.process(RX_QUEUE).unwrap();
        let received = b.received();
        assert_eq!(received, [(rx_header(), tagged)]);
        let mem = SliceMemory(&mut b.rx_mem);
        assert_eq!(b.rx.used(&mem, 0).1, LINUX_RX_BUF, "the buffer is filled exactly");
        assert_eq!(switch.lock().counters(a.net.port()).unwrap().dropped_long, 1);

        // A guest claiming a transmit buffer of nearly 4 GiB: only one byte past the longest
        // frame is read, and the switch drops it.
        let mut huge = HugeMemory { low: memory() };
        let driver_features = FEATURES;
        let mut tx = Driver::new(8);
        let mut txq = tx.queue(&huge, driver_features);
        tx.chain(&mut huge, &[readable(DATA, 12), readable(0x1_0000_0000, u32::MAX - 12)]);
        assert_eq!(a.net.process(TX_QUEUE, &mut txq, &mut huge), Ok(true));
        assert_eq!(tx.used(&huge, 0), (0, 0));
        assert_eq!(switch.lock().counters(a.net.port()).unwrap().dropped_long, 2);
    }

    #[test]
    fn a_frame_that_does_not_fit_its_buffer_is_dropped_and_the_buffer_returned_empty() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut a = Guest::on(&switch, MAC_A);
        let mut b = Guest::on(&switch, MAC_B);
        b.post_rx(1, 100);
        b.post_rx(1, 10);
        b.post_rx(1, 100);
        let small = frame(MAC_B, MAC_A, 46, 1);
        let large = frame(MAC_B, MAC_A, 500, 2);
        a.send(&large);
        a.send(&small);
        a.send(&small);
        assert_eq!(b.process(RX_QUEUE), Ok(true));
        let received = b.received();
        assert_eq!(received.len(), 3);
        assert_eq!(received[0].1, [] as [u8; 0], "too small for 512 bytes and a header");
        assert_eq!(received[1].1, [] as [u8; 0], "too small even for a header");
        assert_eq!(received[2], (rx_header(), small));
        assert_eq!(b.net.rx_dropped_too_small(), 2);
        let mem = SliceMemory(&mut b.rx_mem);
        assert_eq!((b.rx.used(&mem, 0).1, b.rx.used(&mem, 1).1), (0, 0));
    }

    #[test]
    fn a_guest_sending_from_random_macs_cannot_grow_the_mac_table() {
        let switch = shared_switch(Limits::DEFAULT);
        let mut a = Guest::sized(&switch, MAC_A, 256);
        let mut b = Guest::on(&switch, MAC_B);
        b.send(&frame(BROADCAST, MAC_B, 46, 0));
        for batch in 0..20u32 {
            for n in 0..200u32 {
                let [_, x, y, z] = (batch * 200 + n).to_be_bytes();
                a.queue_frame(&frame(BROADCAST, [0x02, 0x42, 0, x, y, z], 46, 0));
            }
            a.process(TX_QUEUE).unwrap();
        }
        let lock = switch.lock();
        assert_eq!(lock.counters(a.net.port()).unwrap().frames_in, 4000);
        assert_eq!(lock.learned_macs(), Limits::DEFAULT.macs_per_port + 1);
        assert_eq!(lock.port_of(&MAC_B), Some(b.net.port()), "the neighbour's entry survived");
        assert_eq!(lock.queued_frames(b.net.port()), Limits::DEFAULT.queue_frames, "and its queue stayed bounded");
    }
}
