//! The uplink: one port of a network's switch bridged to the machine's own NIC.
//!
//! The network named [`UPLINK_NETWORK`] gets one more port when the machine has a NIC: the
//! uplink port. Nothing runs behind it; instead [`Uplink::poll`], called often by the host
//! (between time slices, when a CPU is idle, and right after a VM sent a frame to the port),
//! moves frames both ways:
//!
//! - To the wire: the frames queued on the uplink port, oldest first, as long as the NIC can
//!   take them (at most [`TX_BATCH`] a poll). While the NIC is busy (its transmit ring is full,
//!   or another CPU is polling it), frames wait in the port's queue, which is bounded as every
//!   port's is ([`Limits`](super::Limits)): what does not fit is dropped and counted there
//!   (`dropped_queue_full` of the uplink port), so VMs sending faster than the wire slow no one
//!   and cost no more memory than any port. A frame the NIC refuses is dropped and counted
//!   ([`UplinkCounters::send_errors`]).
//! - From the wire: at most [`RX_BATCH`] frames a poll, each switched from the uplink port as a
//!   VM's frame is (source learning, unicast to the learned port, flooding otherwise, never
//!   back to the wire), into the receiving ports' bounded queues. A flood from the wire costs
//!   one bounded batch of work per poll and at most the ports' queues in memory; the rest stays
//!   in (or is dropped by) the NIC's own fixed receive ring.
//!
//! The caller wakes the VMs behind the ports [`Uplink::poll`] returns, once it holds no lock.

use alloc::vec::Vec;
use core::fmt;

use super::switch::{Mac, PortId, Switch};

/// The network whose switch is bridged to the machine's NIC (`net = uplink` in a VM's
/// configuration).
pub const UPLINK_NETWORK: &str = "uplink";

/// Most frames taken from the NIC in one poll.
pub const RX_BATCH: usize = 64;
/// Most frames handed to the NIC in one poll: a full port queue's worth.
pub const TX_BATCH: usize = super::switch::Limits::DEFAULT.queue_frames;

/// Why the NIC refused a frame (the driver's words, for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicError(pub &'static str);

impl fmt::Display for NicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The machine's NIC, polled: nothing here waits for the device.
pub trait HostNic {
    /// The NIC's own MAC address.
    fn mac(&self) -> Mac;
    /// Whether the NIC can take a frame to send right now (it reclaims the buffers of frames it
    /// finished sending first).
    fn can_send(&mut self) -> bool;
    /// Hands `frame` (plain Ethernet, no FCS) to the NIC to send, without waiting for it.
    fn send(&mut self, frame: &[u8]) -> Result<(), NicError>;
    /// Takes the oldest frame the NIC received, if there is one, and gives it to `deliver`
    /// (the slice is only valid during the call). Returns whether there was one.
    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8])) -> bool;
}

/// What the uplink moved, beyond the uplink port's own switch counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkCounters {
    /// Frames the NIC took to send.
    pub to_wire: u64,
    /// Bytes of those frames.
    pub to_wire_bytes: u64,
    /// Frames the NIC refused (dropped).
    pub send_errors: u64,
    /// Polls that left frames waiting because the NIC could take no more.
    pub nic_busy: u64,
    /// Frames received from the NIC (before the switch's length checks).
    pub from_wire: u64,
    /// Bytes of those frames.
    pub from_wire_bytes: u64,
    /// Polls that stopped at [`RX_BATCH`] frames with more perhaps waiting.
    pub rx_batches_full: u64,
}

impl fmt::Display for UplinkCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "to the wire {} frames ({} bytes), {} refused by the NIC, NIC busy in {} polls; from the wire {} frames \
             ({} bytes), {} full batches",
            self.to_wire,
            self.to_wire_bytes,
            self.send_errors,
            self.nic_busy,
            self.from_wire,
            self.from_wire_bytes,
            self.rx_batches_full
        )
    }
}

/// A NIC bridged to one port of a switch.
pub struct Uplink<N> {
    nic: N,
    port: PortId,
    counters: UplinkCounters,
    /// The first reason the NIC gave for refusing a frame, for the report.
    first_error: Option<NicError>,
}

impl<N: HostNic> Uplink<N> {
    /// Bridges `nic` to port `port` (added for it) of the network's switch.
    pub fn new(nic: N, port: PortId) -> Self {
        Uplink { nic, port, counters: UplinkCounters::default(), first_error: None }
    }

    /// The NIC.
    pub fn nic(&self) -> &N {
        &self.nic
    }

    /// The uplink port on the switch.
    pub fn port(&self) -> PortId {
        self.port
    }

    /// What the uplink moved so far.
    pub fn counters(&self) -> UplinkCounters {
        self.counters
    }

    /// The first reason the NIC gave for refusing a frame, if it ever did.
    pub fn first_error(&self) -> Option<NicError> {
        self.first_error
    }

    /// One pass both ways: the uplink port's queue to the NIC, then up to [`RX_BATCH`] frames
    /// from the NIC into the switch. Takes the switch lock one frame at a time. Returns the
    /// ports that became non-empty, each once: the caller wakes their VMs.
    pub fn poll(&mut self, switch: &spin::Mutex<Switch>) -> Vec<PortId> {
        self.transmit(switch);
        self.receive(switch)
    }

    fn transmit(&mut self, switch: &spin::Mutex<Switch>) {
        for _ in 0..TX_BATCH {
            if !switch.lock().has_frames(self.port) {
                return;
            }
            if !self.nic.can_send() {
                // The frames wait in the port's bounded queue for the next poll.
                self.counters.nic_busy += 1;
                return;
            }
            let Some(frame) = switch.lock().receive(self.port) else { return };
            match self.nic.send(&frame) {
                Ok(()) => {
                    self.counters.to_wire += 1;
                    self.counters.to_wire_bytes += frame.len() as u64;
                }
                Err(e) => {
                    self.counters.send_errors += 1;
                    self.first_error.get_or_insert(e);
                }
            }
        }
    }

    fn receive(&mut self, switch: &spin::Mutex<Switch>) -> Vec<PortId> {
        let mut woken: Vec<PortId> = Vec::new();
        let (port, counters) = (self.port, &mut self.counters);
        let mut deliver = |frame: &[u8]| {
            counters.from_wire += 1;
            counters.from_wire_bytes += frame.len() as u64;
            for to in switch.lock().send(port, frame) {
                if !woken.contains(&to) {
                    woken.push(to);
                }
            }
        };
        let mut taken = 0;
        while taken < RX_BATCH && self.nic.receive(&mut deliver) {
            taken += 1;
        }
        if taken == RX_BATCH {
            self.counters.rx_batches_full += 1;
        }
        woken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::switch::{Limits, MIN_FRAME_LEN};
    use alloc::collections::VecDeque;
    use alloc::string::ToString;
    use alloc::vec;

    const VM_A: Mac = [0x52, 0x54, 0, 0x12, 0, 0];
    /// QEMU's user network's gateway, as it appears on the wire.
    const GATEWAY: Mac = [0x52, 0x55, 10, 0, 2, 2];
    const NIC_MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const BROADCAST: Mac = [0xff; 6];

    fn frame(dst: Mac, src: Mac, payload_len: usize, tag: u8) -> Vec<u8> {
        let mut frame = dst.to_vec();
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.resize(MIN_FRAME_LEN + payload_len, tag);
        frame
    }

    /// A NIC whose wire is two queues: what it was given to send, and what it will receive.
    #[derive(Default)]
    struct FakeNic {
        sent: Vec<Vec<u8>>,
        arriving: VecDeque<Vec<u8>>,
        /// Frames it can take before it is busy (`usize::MAX`: never busy).
        room: usize,
        /// Every send fails with this.
        failing: Option<NicError>,
    }

    impl HostNic for FakeNic {
        fn mac(&self) -> Mac {
            NIC_MAC
        }

        fn can_send(&mut self) -> bool {
            self.room > 0
        }

        fn send(&mut self, frame: &[u8]) -> Result<(), NicError> {
            if let Some(e) = self.failing {
                return Err(e);
            }
            self.room -= 1;
            self.sent.push(frame.to_vec());
            Ok(())
        }

        fn receive(&mut self, deliver: &mut dyn FnMut(&[u8])) -> bool {
            match self.arriving.pop_front() {
                Some(frame) => {
                    deliver(&frame);
                    true
                }
                None => false,
            }
        }
    }

    /// A switch with two VM ports (0 and 1) and the uplink port (2) behind a fake NIC.
    fn bridged(limits: Limits) -> (spin::Mutex<Switch>, Uplink<FakeNic>) {
        let mut switch = Switch::with_limits(UPLINK_NETWORK, limits);
        let (_, _, uplink) = (switch.add_port(), switch.add_port(), switch.add_port());
        let nic = FakeNic { room: usize::MAX, ..FakeNic::default() };
        (spin::Mutex::new(switch), Uplink::new(nic, uplink))
    }

    fn drain(switch: &spin::Mutex<Switch>, port: PortId) -> Vec<Vec<u8>> {
        core::iter::from_fn(|| switch.lock().receive(port)).collect()
    }

    #[test]
    fn frames_cross_both_ways_with_learning() {
        let (switch, mut uplink) = bridged(Limits::DEFAULT);
        assert_eq!(uplink.nic().mac(), NIC_MAC);
        // A's ARP request floods: to B and to the wire.
        let arp = frame(BROADCAST, VM_A, 28, 1);
        assert_eq!(switch.lock().send(0, &arp), vec![1, 2]);
        assert_eq!(uplink.poll(&switch), Vec::<PortId>::new());
        assert_eq!(uplink.nic().sent, vec![arp.clone()]);
        assert!(!switch.lock().has_frames(2));
        assert_eq!(drain(&switch, 1), [arp]);

        // The gateway answers A: A was learned on port 0, so only A gets it, and A is woken.
        let reply = frame(VM_A, GATEWAY, 28, 2);
        uplink.nic.arriving.push_back(reply.clone());
        assert_eq!(uplink.poll(&switch), vec![0]);
        assert_eq!(drain(&switch, 0), [reply]);
        assert!(!switch.lock().has_frames(1), "B does not see unicast for A");
        assert_eq!(switch.lock().port_of(&GATEWAY), Some(2), "the gateway is learned behind the uplink");

        // A's unicast to the gateway now goes to the wire only.
        let to_gateway = frame(GATEWAY, VM_A, 100, 3);
        assert_eq!(switch.lock().send(0, &to_gateway), vec![2]);
        uplink.poll(&switch);
        assert_eq!(uplink.nic().sent.last(), Some(&to_gateway));
        assert!(!switch.lock().has_frames(1));

        let c = uplink.counters();
        assert_eq!((c.to_wire, c.to_wire_bytes, c.from_wire, c.from_wire_bytes), (2, 42 + 114, 1, 42));
        assert_eq!((c.send_errors, c.nic_busy, c.rx_batches_full), (0, 0, 0));
        assert_eq!(
            c.to_string(),
            "to the wire 2 frames (156 bytes), 0 refused by the NIC, NIC busy in 0 polls; from the wire 1 frames \
             (42 bytes), 0 full batches"
        );
    }

    #[test]
    fn wire_frames_for_unknown_macs_flood_to_the_vms_but_never_back_to_the_wire() {
        let (switch, mut uplink) = bridged(Limits::DEFAULT);
        let unknown = frame([0x52, 0x54, 0, 0x99, 0, 1], GATEWAY, 40, 0);
        let broadcast = frame(BROADCAST, GATEWAY, 40, 1);
        uplink.nic.arriving.extend([unknown.clone(), broadcast.clone()]);
        assert_eq!(uplink.poll(&switch), vec![0, 1], "each port woken once");
        for port in [0, 1] {
            assert_eq!(drain(&switch, port), [unknown.clone(), broadcast.clone()]);
        }
        assert!(!switch.lock().has_frames(2));
        uplink.poll(&switch);
        assert!(uplink.nic().sent.is_empty());
    }

    #[test]
    fn a_flood_from_the_wire_is_taken_in_bounded_batches_into_bounded_queues() {
        let limits = Limits { queue_frames: 100, queue_bytes: 64 * 1024, ..Limits::DEFAULT };
        let (switch, mut uplink) = bridged(limits);
        uplink.nic.arriving.extend((0..10_000).map(|n| frame(BROADCAST, GATEWAY, 500, n as u8)));
        uplink.poll(&switch);
        assert_eq!(uplink.nic().arriving.len(), 10_000 - RX_BATCH, "one batch a poll");
        assert_eq!(uplink.counters().rx_batches_full, 1);
        // Nobody takes the frames: the ports' queues stay at their bounds, the rest is dropped.
        while !uplink.nic().arriving.is_empty() {
            uplink.poll(&switch);
        }
        let s = switch.lock();
        for port in [0, 1] {
            assert!(s.queued_bytes(port) <= 64 * 1024 && s.queued_frames(port) <= 100, "port {port}");
            let dropped = s.counters(port).unwrap().dropped_queue_full;
            assert_eq!(dropped as usize + s.queued_frames(port), 10_000, "port {port}");
        }
        assert_eq!(uplink.counters().from_wire, 10_000);
        assert!(uplink.nic().sent.is_empty());
    }

    #[test]
    fn frames_for_a_busy_nic_wait_in_the_bounded_port_queue_and_overflow_is_dropped_and_counted() {
        let (switch, mut uplink) = bridged(Limits::DEFAULT);
        uplink.nic.room = 0;
        for n in 0..300u32 {
            switch.lock().send(0, &frame(GATEWAY, VM_A, 60, n as u8));
        }
        assert!(uplink.poll(&switch).is_empty());
        assert_eq!(uplink.counters().nic_busy, 1);
        let queue = Limits::DEFAULT.queue_frames;
        assert_eq!(switch.lock().queued_frames(2), queue);
        assert_eq!(switch.lock().counters(2).unwrap().dropped_queue_full, (300 - queue) as u64);

        // The NIC takes 10, then is busy again: the rest still waits, in order.
        uplink.nic.room = 10;
        uplink.poll(&switch);
        assert_eq!(uplink.nic().sent.len(), 10);
        assert_eq!(switch.lock().queued_frames(2), queue - 10);
        uplink.nic.room = usize::MAX;
        uplink.poll(&switch);
        let tags: Vec<u8> = uplink.nic().sent.iter().map(|f| f[MIN_FRAME_LEN]).collect();
        assert_eq!(tags, (0..queue).map(|n| n as u8).collect::<Vec<_>>(), "the oldest frames, in order");
        assert_eq!(uplink.counters().to_wire, queue as u64);
        assert!(!switch.lock().has_frames(2));
    }

    #[test]
    fn frames_the_nic_refuses_are_dropped_and_counted() {
        let (switch, mut uplink) = bridged(Limits::DEFAULT);
        uplink.nic.failing = Some(NicError("the transmit queue is broken"));
        for n in 0..5 {
            switch.lock().send(0, &frame(GATEWAY, VM_A, 60, n));
        }
        uplink.poll(&switch);
        let c = uplink.counters();
        assert_eq!((c.send_errors, c.to_wire), (5, 0));
        assert_eq!(uplink.first_error(), Some(NicError("the transmit queue is broken")));
        assert!(!switch.lock().has_frames(2), "not retried for ever");
    }

    #[test]
    fn malformed_wire_frames_are_dropped_by_the_switch() {
        let (switch, mut uplink) = bridged(Limits::DEFAULT);
        uplink.nic.arriving.extend([vec![0xff; 10], vec![0xff; 4000], frame(BROADCAST, GATEWAY, 10, 0)]);
        uplink.poll(&switch);
        let c = switch.lock().counters(2).unwrap();
        assert_eq!((c.dropped_short, c.dropped_long, c.frames_in), (1, 1, 1));
        assert_eq!(switch.lock().queued_frames(0), 1);
    }
}
