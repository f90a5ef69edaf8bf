//! An Ethernet L2 switch for one network.
//!
//! Frames are plain Ethernet without the FCS: destination MAC, source MAC, EtherType (or an
//! 802.1Q tag and then the EtherType), payload. The switch learns which port each unicast
//! source MAC sits behind, sends a unicast frame for a learned MAC to that port only, and
//! floods broadcast, multicast and unknown-unicast frames to every port but the sender's.
//!
//! Everything a guest sends is bounded here: each port's receive queue holds at most
//! [`Limits::queue_frames`] frames and [`Limits::queue_bytes`] bytes and drops (and counts) what
//! does not fit, rather than making the sender wait; the MAC table holds at most
//! [`Limits::macs_per_port`] entries per port and [`Limits::mac_entries`] in all.
//!
//! MAC learning follows the latest source, as a physical switch without port security does:
//! a MAC seen on another port moves there (a guest moving an address between interfaces is
//! legitimate), which also means a guest can draw a neighbour's unicast traffic by sending
//! with its MAC until the neighbour sends again. That gives it no more than sharing the
//! network already does: it sees frames on this network, never another VM's memory.
//!
//! When a port already has its quota of MACs, learning a new one evicts that port's least
//! recently seen MAC, so a guest sending from random source MACs only churns its own entries
//! and cannot push its neighbours' out. When the whole table is full, the least recently seen
//! MAC of any port goes. An evicted MAC is flooded until it is learned again.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// An Ethernet MAC address.
pub type Mac = [u8; 6];

/// A port of a switch, as [`Switch::add_port`] numbers them.
pub type PortId = usize;

/// Destination and source MAC and the EtherType: the shortest frame carried.
pub const MIN_FRAME_LEN: usize = 14;
/// A 1500-byte payload behind a 14-byte header and an 802.1Q tag: the longest frame carried.
pub const MAX_FRAME_LEN: usize = 1514 + 4;

/// How much a switch holds on behalf of its guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Frames waiting in one port's receive queue.
    pub queue_frames: usize,
    /// Bytes of frames waiting in one port's receive queue.
    pub queue_bytes: usize,
    /// MACs in the table, all ports together.
    pub mac_entries: usize,
    /// MACs learned on one port.
    pub macs_per_port: usize,
}

impl Limits {
    /// 256 frames (a virtio queue's worth) or 1 MiB per port; 1024 MACs, 64 per port.
    pub const DEFAULT: Limits =
        Limits { queue_frames: 256, queue_bytes: 1 << 20, mac_entries: 1024, macs_per_port: 64 };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// What one port did: "in" is what it sent into the switch, "out" what it took from its
/// receive queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames accepted from the port.
    pub frames_in: u64,
    /// Bytes of the frames accepted from the port.
    pub bytes_in: u64,
    /// Frames the port received.
    pub frames_out: u64,
    /// Bytes of the frames the port received.
    pub bytes_out: u64,
    /// Frames from the port shorter than [`MIN_FRAME_LEN`].
    pub dropped_short: u64,
    /// Frames from the port longer than [`MAX_FRAME_LEN`].
    pub dropped_long: u64,
    /// Frames for the port that found its receive queue full.
    pub dropped_queue_full: u64,
}

/// One line for a VM's end report: a port's counters, named by network and port.
#[derive(Clone, Copy, Debug)]
pub struct PortSummary<'a> {
    network: &'a str,
    port: PortId,
    counters: PortCounters,
}

impl fmt::Display for PortSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counters;
        write!(
            f,
            "network {} port {}: in {} frames ({} bytes), out {} frames ({} bytes), dropped {} short, {} long, \
             {} queue full",
            self.network,
            self.port,
            c.frames_in,
            c.bytes_in,
            c.frames_out,
            c.bytes_out,
            c.dropped_short,
            c.dropped_long,
            c.dropped_queue_full
        )
    }
}

#[derive(Debug, Default)]
struct Port {
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    counters: PortCounters,
    /// The MACs learned on this port by when they were last seen, oldest first.
    learned: BTreeMap<u64, Mac>,
}

/// Where a MAC was last seen as a source, and when (the switch's learning clock).
#[derive(Clone, Copy, Debug)]
struct Learned {
    port: PortId,
    seen: u64,
}

/// An L2 switch for one named network.
#[derive(Debug)]
pub struct Switch {
    name: String,
    limits: Limits,
    ports: Vec<Port>,
    table: BTreeMap<Mac, Learned>,
    /// Ticks once per learned source; orders entries by when they were last seen.
    clock: u64,
}

fn mac_at(frame: &[u8], offset: usize) -> Mac {
    let mut mac = [0u8; 6];
    if let Some(bytes) = frame.get(offset..offset + 6) {
        mac.copy_from_slice(bytes);
    }
    mac
}

/// Broadcast and multicast addresses have the I/G bit, the low bit of the first octet, set.
fn is_unicast(mac: &Mac) -> bool {
    mac[0] & 1 == 0
}

impl Switch {
    /// A switch without ports for network `name`, with the default [`Limits`].
    pub fn new(name: &str) -> Self {
        Switch::with_limits(name, Limits::DEFAULT)
    }

    /// A switch without ports for network `name`.
    pub fn with_limits(name: &str, limits: Limits) -> Self {
        Switch { name: String::from(name), limits, ports: Vec::new(), table: BTreeMap::new(), clock: 0 }
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limits the switch enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Adds a port with an empty receive queue.
    pub fn add_port(&mut self) -> PortId {
        self.ports.push(Port::default());
        self.ports.len() - 1
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// Switches `frame` from port `from`: learns its source and queues it on its destination
    /// port, or on every other port. Returns the ports whose receive queue was empty and now is
    /// not: their owners need waking (after the switch lock is released). A frame from a port
    /// the switch does not have is ignored.
    pub fn send(&mut self, from: PortId, frame: &[u8]) -> Vec<PortId> {
        let mut woken = Vec::new();
        let Some(port) = self.ports.get_mut(from) else { return woken };
        if frame.len() < MIN_FRAME_LEN {
            port.counters.dropped_short += 1;
            return woken;
        }
        if frame.len() > MAX_FRAME_LEN {
            port.counters.dropped_long += 1;
            return woken;
        }
        port.counters.frames_in += 1;
        port.counters.bytes_in += frame.len() as u64;

        let destination = mac_at(frame, 0);
        self.learn(mac_at(frame, 6), from);
        let learned = if is_unicast(&destination) { self.table.get(&destination).map(|e| e.port) } else { None };
        match learned {
            // Both ends are behind the sending port: nothing to forward.
            Some(to) if to == from => {}
            Some(to) => self.enqueue(to, frame, &mut woken),
            None => {
                for to in (0..self.ports.len()).filter(|&to| to != from) {
                    self.enqueue(to, frame, &mut woken);
                }
            }
        }
        woken
    }

    fn enqueue(&mut self, to: PortId, frame: &[u8], woken: &mut Vec<PortId>) {
        let limits = self.limits;
        let Some(port) = self.ports.get_mut(to) else { return };
        if port.queue.len() >= limits.queue_frames || port.queued_bytes + frame.len() > limits.queue_bytes {
            port.counters.dropped_queue_full += 1;
            return;
        }
        if port.queue.is_empty() {
            woken.push(to);
        }
        port.queue.push_back(frame.to_vec());
        port.queued_bytes += frame.len();
    }

    /// Records that `mac` was just seen as a source on `port`.
    fn learn(&mut self, mac: Mac, port: PortId) {
        // Only unicast addresses identify a station, and all-zero is no address at all.
        if !is_unicast(&mac) || mac == [0; 6] || self.limits.mac_entries == 0 || self.limits.macs_per_port == 0 {
            return;
        }
        self.clock += 1;
        match self.table.get(&mac).copied() {
            Some(entry) => {
                if let Some(old) = self.ports.get_mut(entry.port) {
                    old.learned.remove(&entry.seen);
                }
                if entry.port != port {
                    self.make_room(port, false);
                }
            }
            None => self.make_room(port, true),
        }
        let seen = self.clock;
        self.table.insert(mac, Learned { port, seen });
        if let Some(at) = self.ports.get_mut(port) {
            at.learned.insert(seen, mac);
        }
    }

    /// Evicts what must go before `port` learns one more MAC: its own least recently seen MAC
    /// when it has its quota, otherwise (for a MAC new to the table) the least recently seen
    /// MAC of any port when the table is full.
    fn make_room(&mut self, port: PortId, new_entry: bool) {
        let port_full = self.ports.get(port).is_some_and(|p| p.learned.len() >= self.limits.macs_per_port);
        let victim = if port_full {
            Some(port)
        } else if new_entry && self.table.len() >= self.limits.mac_entries {
            let oldest = self.ports.iter().enumerate().filter_map(|(i, p)| Some((*p.learned.keys().next()?, i)));
            oldest.min().map(|(_, i)| i)
        } else {
            None
        };
        if let Some((_, mac)) = victim.and_then(|v| self.ports.get_mut(v)).and_then(|p| p.learned.pop_first()) {
            self.table.remove(&mac);
        }
    }

    /// Takes the oldest frame waiting for `port`.
    pub fn receive(&mut self, port: PortId) -> Option<Vec<u8>> {
        let port = self.ports.get_mut(port)?;
        let frame = port.queue.pop_front()?;
        port.queued_bytes = port.queued_bytes.saturating_sub(frame.len());
        port.counters.frames_out += 1;
        port.counters.bytes_out += frame.len() as u64;
        Some(frame)
    }

    /// Whether frames wait for `port`.
    pub fn has_frames(&self, port: PortId) -> bool {
        self.ports.get(port).is_some_and(|p| !p.queue.is_empty())
    }

    /// Frames waiting for `port`.
    pub fn queued_frames(&self, port: PortId) -> usize {
        self.ports.get(port).map_or(0, |p| p.queue.len())
    }

    /// Bytes of the frames waiting for `port`.
    pub fn queued_bytes(&self, port: PortId) -> usize {
        self.ports.get(port).map_or(0, |p| p.queued_bytes)
    }

    /// The port's counters.
    pub fn counters(&self, port: PortId) -> Option<PortCounters> {
        self.ports.get(port).map(|p| p.counters)
    }

    /// The port's counters as one line for a report.
    pub fn summary(&self, port: PortId) -> Option<PortSummary<'_>> {
        Some(PortSummary { network: &self.name, port, counters: self.counters(port)? })
    }

    /// The port `mac` was last seen on as a source, if the table still has it.
    pub fn port_of(&self, mac: &Mac) -> Option<PortId> {
        self.table.get(mac).map(|e| e.port)
    }

    /// MACs in the table.
    pub fn learned_macs(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    const A: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
    const B: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
    const C: Mac = [0x52, 0x54, 0, 0, 0, 0xc];
    const BROADCAST: Mac = [0xff; 6];
    /// An IPv4 multicast MAC (224.0.0.1).
    const ALL_HOSTS: Mac = [0x01, 0, 0x5e, 0, 0, 1];

    /// A frame from `src` to `dst` with `payload_len` bytes after the header; every payload
    /// byte is `tag`, so frames can be told apart.
    fn frame(dst: Mac, src: Mac, payload_len: usize, tag: u8) -> Vec<u8> {
        let mut frame = dst.to_vec();
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.resize(MIN_FRAME_LEN + payload_len, tag);
        frame
    }

    fn switch(ports: usize, limits: Limits) -> Switch {
        let mut switch = Switch::with_limits("lan", limits);
        for i in 0..ports {
            assert_eq!(switch.add_port(), i);
        }
        switch
    }

    fn drain(switch: &mut Switch, port: PortId) -> Vec<Vec<u8>> {
        core::iter::from_fn(|| switch.receive(port)).collect()
    }

    #[test]
    fn unknown_unicast_floods_until_the_destination_is_learned() {
        let mut switch = switch(3, Limits::DEFAULT);
        let to_b = frame(B, A, 50, 1);
        assert_eq!(switch.send(0, &to_b), vec![1, 2], "B is unknown: flooded, never back to port 0");
        assert!(!switch.has_frames(0));
        assert_eq!(drain(&mut switch, 1), vec![to_b.clone()]);
        assert_eq!(drain(&mut switch, 2), [to_b]);
        assert_eq!(switch.port_of(&A), Some(0));

        // B answers: A is known, so only port 0 gets it, and B is learned on port 1.
        let to_a = frame(A, B, 60, 2);
        assert_eq!(switch.send(1, &to_a), vec![0]);
        assert_eq!((switch.queued_frames(0), switch.queued_frames(2)), (1, 0));
        assert_eq!(switch.port_of(&B), Some(1));
        let to_b = frame(B, A, 70, 3);
        assert_eq!(switch.send(0, &to_b), vec![1]);
        assert!(!switch.has_frames(2), "port 2 does not see unicast between A and B");
        assert_eq!(drain(&mut switch, 1), [to_b]);
        assert_eq!(drain(&mut switch, 0), [to_a]);
    }

    #[test]
    fn broadcast_and_multicast_reach_every_port_but_the_sender() {
        let mut switch = switch(4, Limits::DEFAULT);
        for destination in [BROADCAST, ALL_HOSTS] {
            let flood = frame(destination, C, 28, 7);
            assert_eq!(switch.send(2, &flood), vec![0, 1, 3]);
            for port in [0, 1, 3] {
                assert_eq!(drain(&mut switch, port), vec![flood.clone()], "port {port}");
            }
            assert!(!switch.has_frames(2));
        }
        switch.send(1, &frame(BROADCAST, BROADCAST, 10, 0));
        assert_eq!(switch.port_of(&BROADCAST), None, "multicast sources are not learned");
        switch.send(1, &frame(BROADCAST, [0; 6], 10, 0));
        assert_eq!(switch.learned_macs(), 1, "nor is the all-zero address; C is");
    }

    #[test]
    fn only_ports_that_were_empty_need_waking() {
        let mut switch = switch(2, Limits::DEFAULT);
        assert_eq!(switch.send(0, &frame(BROADCAST, A, 10, 1)), vec![1]);
        assert_eq!(switch.send(0, &frame(BROADCAST, A, 10, 2)), Vec::<PortId>::new(), "port 1 is already awake");
        drain(&mut switch, 1);
        assert_eq!(switch.send(0, &frame(BROADCAST, A, 10, 3)), vec![1]);
    }

    #[test]
    fn a_unicast_frame_for_a_mac_behind_the_sender_goes_nowhere() {
        let mut switch = switch(2, Limits::DEFAULT);
        switch.send(0, &frame(BROADCAST, B, 10, 0));
        assert_eq!(switch.send(0, &frame(B, A, 10, 0)), Vec::<PortId>::new());
        assert_eq!(switch.queued_frames(1), 1, "only the broadcast");
    }

    #[test]
    fn a_mac_moves_to_the_port_it_was_last_seen_on() {
        let mut switch = switch(3, Limits::DEFAULT);
        switch.send(0, &frame(BROADCAST, A, 10, 0));
        assert_eq!(switch.port_of(&A), Some(0));
        switch.send(2, &frame(BROADCAST, A, 10, 0));
        assert_eq!(switch.port_of(&A), Some(2));
        assert_eq!(switch.learned_macs(), 1);
        for port in 0..3 {
            drain(&mut switch, port);
        }
        switch.send(1, &frame(A, B, 10, 9));
        assert_eq!((switch.queued_frames(0), switch.queued_frames(2)), (0, 1));
    }

    #[test]
    fn frames_outside_the_ethernet_sizes_are_dropped_and_counted() {
        let mut switch = switch(2, Limits::DEFAULT);
        let shortest = frame(BROADCAST, A, 0, 0);
        let longest = frame(BROADCAST, A, MAX_FRAME_LEN - MIN_FRAME_LEN, 0);
        assert_eq!(longest.len(), 1518);
        assert_eq!(switch.send(0, &shortest), vec![1]);
        switch.send(0, &longest);
        assert!(switch.send(0, &shortest[..13]).is_empty());
        assert!(switch.send(0, &[]).is_empty());
        let mut too_long = longest.clone();
        too_long.push(0);
        assert!(switch.send(0, &too_long).is_empty());
        assert!(switch.send(0, &vec![0xff; 65536]).is_empty());
        let counters = switch.counters(0).unwrap();
        assert_eq!((counters.frames_in, counters.bytes_in), (2, 14 + 1518));
        assert_eq!((counters.dropped_short, counters.dropped_long), (2, 2));
        assert_eq!(drain(&mut switch, 1), [shortest, longest]);
    }

    #[test]
    fn a_full_receive_queue_drops_and_counts_by_frames_and_by_bytes() {
        let limits = Limits { queue_frames: 4, queue_bytes: 1000, ..Limits::DEFAULT };
        let mut switch = switch(3, limits);
        for tag in 0..6 {
            switch.send(0, &frame(BROADCAST, A, 50, tag));
        }
        assert_eq!(switch.queued_frames(1), 4);
        assert_eq!(switch.counters(1).unwrap().dropped_queue_full, 2);
        let kept: Vec<u8> = drain(&mut switch, 1).iter().map(|f| f[MIN_FRAME_LEN]).collect();
        assert_eq!(kept, [0, 1, 2, 3], "the oldest frames stay, the newest are dropped");
        assert_eq!(switch.counters(1).unwrap().frames_out, 4);

        // 2 × 400 bytes fit in 1000, a third does not; a small one still does.
        let mut switch = switch_with(limits);
        for _ in 0..3 {
            switch.send(0, &frame(BROADCAST, A, 386, 0));
        }
        assert_eq!((switch.queued_frames(1), switch.queued_bytes(1)), (2, 800));
        assert_eq!(switch.counters(1).unwrap().dropped_queue_full, 1);
        switch.send(0, &frame(BROADCAST, A, 186, 0));
        assert_eq!((switch.queued_frames(1), switch.queued_bytes(1)), (3, 1000));
        drain(&mut switch, 1);
        assert_eq!(switch.queued_bytes(1), 0);
        assert_eq!(switch.counters(0).unwrap().frames_in, 4, "drops are the receiver's");
    }

    fn switch_with(limits: Limits) -> Switch {
        switch(2, limits)
    }

    /// A locally administered unicast MAC made from `n`.
    fn spoofed(n: u32) -> Mac {
        let [a, b, c, d] = n.to_be_bytes();
        [0x02, 0x99, a, b, c, d]
    }

    #[test]
    fn random_source_macs_only_churn_the_senders_own_entries() {
        let mut switch = switch(3, Limits::DEFAULT);
        switch.send(1, &frame(BROADCAST, B, 10, 0));
        switch.send(2, &frame(BROADCAST, C, 10, 0));
        for n in 0..100_000 {
            switch.send(0, &frame(A, spoofed(n), 10, 0));
        }
        assert_eq!(switch.learned_macs(), 64 + 2);
        assert_eq!((switch.port_of(&B), switch.port_of(&C)), (Some(1), Some(2)), "the neighbours stay learned");
        assert_eq!(switch.port_of(&spoofed(99_999)), Some(0));
        assert_eq!(switch.port_of(&spoofed(99_999 - 64)), None, "the port's oldest went first");
        // Unicast between the neighbours is still not flooded to the spoofer.
        drain(&mut switch, 0);
        drain(&mut switch, 2);
        switch.send(1, &frame(C, B, 10, 0));
        assert!(!switch.has_frames(0));
        assert_eq!(switch.queued_frames(2), 1);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_seen_mac() {
        let limits = Limits { mac_entries: 4, macs_per_port: 3, ..Limits::DEFAULT };
        let mut switch = switch(3, limits);
        switch.send(0, &frame(BROADCAST, spoofed(1), 10, 0));
        switch.send(1, &frame(BROADCAST, spoofed(2), 10, 0));
        switch.send(1, &frame(BROADCAST, spoofed(3), 10, 0));
        switch.send(2, &frame(BROADCAST, spoofed(4), 10, 0));
        // Seeing 1 again makes 2 the least recently seen.
        switch.send(0, &frame(BROADCAST, spoofed(1), 10, 0));
        switch.send(2, &frame(BROADCAST, spoofed(5), 10, 0));
        assert_eq!(switch.learned_macs(), 4);
        assert_eq!(switch.port_of(&spoofed(2)), None);
        for (n, port) in [(1, 0), (3, 1), (4, 2), (5, 2)] {
            assert_eq!(switch.port_of(&spoofed(n)), Some(port), "MAC {n}");
        }
        // A port at its quota evicts its own oldest, even with room in the table.
        let mut switch = switch_with(Limits { mac_entries: 100, macs_per_port: 2, ..Limits::DEFAULT });
        for n in 1..=3 {
            switch.send(0, &frame(BROADCAST, spoofed(n), 10, 0));
        }
        assert_eq!((switch.port_of(&spoofed(1)), switch.learned_macs()), (None, 2));
        // Moving a MAC onto a port at its quota also makes room there.
        switch.send(1, &frame(BROADCAST, spoofed(7), 10, 0));
        switch.send(1, &frame(BROADCAST, spoofed(8), 10, 0));
        switch.send(1, &frame(BROADCAST, spoofed(3), 10, 0));
        assert_eq!(switch.port_of(&spoofed(3)), Some(1));
        assert_eq!(switch.port_of(&spoofed(7)), None);
        assert_eq!(switch.learned_macs(), 3, "spoofed 2 on port 0, 8 and 3 on port 1");
        // No table at all: everything floods.
        let mut switch = switch_with(Limits { mac_entries: 0, ..Limits::DEFAULT });
        switch.send(0, &frame(BROADCAST, A, 10, 0));
        assert_eq!(switch.learned_macs(), 0);
    }

    #[test]
    fn ports_the_switch_does_not_have_are_ignored() {
        let mut switch = switch(2, Limits::DEFAULT);
        assert!(switch.send(2, &frame(BROADCAST, A, 10, 0)).is_empty());
        assert!(switch.send(usize::MAX, &frame(BROADCAST, A, 10, 0)).is_empty());
        assert_eq!(switch.receive(5), None);
        assert!(!switch.has_frames(5));
        assert_eq!((switch.counters(2), switch.summary(2).map(|s| s.to_string())), (None, None));
        assert_eq!((switch.queued_frames(0), switch.queued_frames(1), switch.learned_macs()), (0, 0, 0));
    }

    #[test]
    fn the_summary_names_the_network_and_the_port() {
        let mut switch = switch(2, Limits { queue_frames: 1, ..Limits::DEFAULT });
        switch.send(0, &frame(BROADCAST, A, 86, 0));
        switch.send(0, &frame(BROADCAST, A, 86, 0));
        switch.send(0, &[0; 3]);
        switch.receive(1);
        assert_eq!(
            switch.summary(0).unwrap().to_string(),
            "network lan port 0: in 2 frames (200 bytes), out 0 frames (0 bytes), dropped 1 short, 0 long, 0 queue full"
        );
        assert_eq!(
            switch.summary(1).unwrap().to_string(),
            "network lan port 1: in 0 frames (0 bytes), out 1 frames (100 bytes), dropped 0 short, 0 long, 1 queue full"
        );
    }
}
