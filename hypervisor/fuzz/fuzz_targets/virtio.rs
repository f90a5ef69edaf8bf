//! The virtio devices on the emulated PCI bus, as a driver brings them up and as a hostile one
//! pokes them: a PCI host (configuration mechanism #1 on ports 0xcf8-0xcff, the BAR window)
//! with a read-write virtio-blk (16 KiB image, an 8 KiB overlay budget, or 12 KiB and an 8 KiB
//! host-wide page pool), a read-only one (an image of 4396 bytes, not whole sectors), two
//! virtio-net devices on one switch (so frames move between them) whose third port the target
//! feeds and drains, and a virtio-rng over a deterministic entropy source, all over 64 KiB of
//! guest memory, so that addresses from the fuzzer mostly land inside it.
//!
//! Operations: configuration reads and writes at any CONFIG_ADDRESS, lane and width, and raw
//! accesses to 0xcf8-0xcff; MMIO reads and writes in the window, at the structures the
//! capabilities describe (common configuration, ISR, device configuration, notify addresses,
//! MSI-X table and PBA) or anywhere; guest-memory writes; driver macros that lay descriptor
//! chains, requests of each device type and ring indices out in the queues' rings and notify,
//! and a whole bring-up (reset, features, queue sizes and rings, MSI-X, MSI or INTx,
//! DRIVER_OK) with fuzzer-chosen parameters, stopping after any step; frames into and out of
//! the switch's third port; the devices' memory work (`run_dma`), also right after each
//! notification as the run loop does it.
//!
//! Checked throughout: no device reads or writes guest memory outside its 64 KiB (every ring
//! and buffer was checked against that size); one access raises at most 3 MSIs (the pending
//! vectors of the largest MSI-X table, virtio-net's) and one INTx change, one `run_dma` call at
//! most one MSI per queue and one INTx change per function; INTx lines only toggle, only on the
//! functions' GSIs, and the status register's interrupt bit follows them; MSI addresses are
//! dword aligned; the status never shows DRIVER_OK without FEATURES_OK; the switch's port queues
//! and MAC table stay within its `Limits`; the page pool never holds more than it was given,
//! and has every page back once the disk is gone; without new notifications `dma_pending` clears
//! within 256 `run_dma` calls, one per chain a queue can hold (unless the devices' own writes fed
//! an available ring), and a call that wrote nothing and moved no frame leaves none pending.
//!
//! Input: a header (options: memory work after notifications, the page pool; entropy failure
//! period; switch limits), then a stream of operations (`Op`, decoded with `arbitrary`, every
//! field read from the front, so seeds can be written by hand: see `make_seeds.py`).
#![no_main]

use std::cell::Cell;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::devices::pci::{PciHost, CONFIG_ADDRESS, CONFIG_DATA, MMIO_WINDOW_BASE};
use hypervisor::devices::virtio::blk::{Block, OverlayPool, RamOverlay};
use hypervisor::devices::virtio::net::Net;
use hypervisor::devices::virtio::pci::VirtioPci;
use hypervisor::devices::virtio::rng::{Rng, MAX_REQUEST_BYTES};
use hypervisor::devices::virtio::{
    VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use hypervisor::devices::{ones, Bus, Events};
use hypervisor::loader::{GuestMemory, MemError, SliceMemory};
use hypervisor::net::{Limits, Mac, Switch};
use libfuzzer_sys::fuzz_target;

/// Guest memory: small, so that fuzzer addresses often hit rings and buffers.
const MEMORY: usize = 0x1_0000;

const MAC_A: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x0a];
const MAC_B: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x0b];
/// The switch's third port, which the target feeds and drains itself.
const MAC_SPARE: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x0c];
const SPARE_PORT: usize = 2;

/// What each queue of the five functions (slots 1 to 5) carries, in slot and queue order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Blk,
    NetRx,
    NetTx,
    Rng,
}

/// (function index, queue index, kind) of every queue.
const QUEUES: [(usize, u16, Kind); 7] = [
    (0, 0, Kind::Blk),
    (1, 0, Kind::Blk),
    (2, 0, Kind::NetRx),
    (2, 1, Kind::NetTx),
    (3, 0, Kind::NetRx),
    (3, 1, Kind::NetTx),
    (4, 0, Kind::Rng),
];
const FUNCTIONS: usize = 5;

/// Most MSIs one configuration or MMIO access raises: it reaches one function, whose
/// `deliver_unmasked` sends each pending vector once (virtio-net's table is the largest: two
/// queues and the configuration vector); a failure sends one.
const ACCESS_MSIS: usize = 3;
/// Most INTx changes one access makes: its function's line, once.
const ACCESS_LINES: usize = 1;
/// Most MSIs one `run_dma` call raises: each function serves each of its queues once, with at
/// most one interrupt each (a failure takes the place of its queue's and ends the function's
/// pass).
const DMA_MSIS: usize = QUEUES.len();
/// Most INTx changes one `run_dma` call makes: the ISR only gains bits there, so each
/// function's line can only go up, once.
const DMA_LINES: usize = FUNCTIONS;
/// `run_dma` calls after which, without notifications, no device has work left. A call serves
/// at least one chain of every notified queue that has one (a disk stops after about 1 MiB of
/// requests, never before its first chain; the others take all that is available), and the
/// available index is at most a queue size ahead (256 at most): after 256 calls every queue is
/// empty, and is not notified again. Frames need fewer: a transmit queue is emptied in the
/// first call, its frames reach the receive queues of the functions after it in slot order at
/// once and of those before it in the second, and a receive queue that finds no frames (or no
/// buffers) makes no progress in the third, so it is not notified again.
const MAX_DRAIN_CALLS: usize = 256;
/// `run_dma` calls a drain goes on for once the devices' own writes reached an available ring
/// (their output then adds work the driver never published): not checked, only bounded.
const FED_DRAIN_CALLS: usize = 2 * MAX_DRAIN_CALLS;

/// Default ring layout of queue `q` of `QUEUES` (room for 64 entries): 2 KiB each from 0.
const RING_SLOT: u64 = 0x800;
/// Request headers and status bytes of queue `q`: 64 bytes each (data buffers, wherever the
/// fuzzer puts them; the seeds use 0x4000 on).
const HEADERS: u64 = 0x3800;
/// Host memory the read-write disk's page pool starts with.
const POOL: u64 = 0x2000;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Which CONFIG_ADDRESS an access uses.
#[derive(Arbitrary, Debug)]
enum Address {
    /// Slot `slot % 6` of bus 0 (0 is the host bridge, 1 to 5 the virtio functions).
    Slot { slot: u8, register: u8 },
    /// Any value: enable bit, reserved bits, bus, device, function, register.
    Raw(u32),
}

/// A place in a function's BAR.
#[derive(Arbitrary, Debug)]
enum Region {
    /// The common configuration (`offset % 0x40`: a little past its end).
    Common(u8),
    Isr,
    /// The device configuration (`offset % 0x20`).
    Device(u8),
    /// The notify addresses (`offset % 16`: each queue's and beyond).
    Notify(u8),
    /// The MSI-X table (`offset % 0x40`).
    MsixTable(u8),
    /// The pending bit array (`offset % 16`).
    Pba(u8),
    /// Anywhere from the BAR's start (past its end too).
    Bar(u16),
}

#[derive(Arbitrary, Debug)]
enum Gpa {
    /// In function `function % 5`'s BAR, where firmware put it.
    Function { function: u8, region: Region },
    /// The window at this offset (past the BARs and past the window too).
    Window(u32),
}

/// One buffer of a chain the driver lays out.
#[derive(Arbitrary, Debug)]
struct Buf {
    gpa: u16,
    len: u16,
    writable: bool,
}

#[derive(Arbitrary, Debug)]
enum Features {
    /// Everything the device offers.
    Offered,
    /// VIRTIO_F_VERSION_1 alone.
    Version1,
    /// Any 64 bits (refused at FEATURES_OK unless offered).
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Rings {
    /// The queue's default layout.
    Default,
    /// These addresses for the function's first queue, 2 KiB further for its second.
    At { desc: u16, avail: u16, used: u16 },
}

#[derive(Arbitrary, Debug)]
enum Irq {
    Intx,
    Msix,
    Msi,
}

#[derive(Arbitrary, Debug)]
enum MacPick {
    NetA,
    NetB,
    Spare,
    Broadcast,
    Multicast,
    Raw([u8; 6]),
}

impl MacPick {
    fn get(&self) -> Mac {
        match *self {
            MacPick::NetA => MAC_A,
            MacPick::NetB => MAC_B,
            MacPick::Spare => MAC_SPARE,
            MacPick::Broadcast => [0xff; 6],
            MacPick::Multicast => [0x01, 0, 0x5e, 0, 0, 1],
            MacPick::Raw(mac) => mac,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// CONFIG_ADDRESS, then CONFIG_DATA at `lane % 4`; `size` picks 1, 2 or 4 bytes.
    Config { address: Address, lane: u8, size: u8, write: bool, value: u32 },
    /// Port `0xcf8 + port % 8` as it is (byte and word accesses to 0xcf8 too).
    Port { port: u8, size: u8, write: bool, value: u32 },
    /// MMIO; `size` picks 1, 2, 4 or 8 bytes.
    Mmio { gpa: Gpa, size: u8, write: bool, value: u64 },
    /// Writes `len % 17` bytes of `data` to guest memory.
    Poke { gpa: u16, len: u8, data: [u8; 16] },
    /// Queue `queue % 7`: writes `count % 4 + 1` of `bufs` as a chain of free descriptors (or
    /// as an indirect table at `indirect`, behind one descriptor) and publishes it.
    Chain { queue: u8, count: u8, bufs: [Buf; 4], indirect: Option<u16>, notify: bool },
    /// Queue `queue % 7`: publishes `head` as it is (beyond the table too).
    Publish { queue: u8, head: u16, notify: bool },
    /// Queue `queue % 7`: the available ring's flags and index and `used_event`, as they are.
    Avail { queue: u8, flags: u16, idx: u16, used_event: u16 },
    /// Queue `queue % 7`: a request of its device type (block read, write, flush, GET_ID or
    /// another type by `kind`; a frame to send, a receive or entropy buffer) with its data at
    /// `data`, `len` bytes.
    Request { queue: u8, kind: u8, arg: u32, data: u16, len: u16, notify: bool },
    /// Writes queue `queue % 7`'s notify address.
    Notify { queue: u8 },
    /// Brings function `function % 5` up, as Linux's virtio_pci_modern does, for the first
    /// `steps` steps (of 7); `size` is a queue size `1 << size` (0 to 8) or any value.
    BringUp { function: u8, features: Features, size: u8, rings: Rings, irq: Irq, steps: u8 },
    /// A frame of `len % 1536` bytes from the switch's third port.
    Inject { dst: MacPick, src: MacPick, len: u16, tag: u8 },
    /// Takes up to `count % 8 + 1` frames waiting for the third port.
    Take { count: u8 },
    /// `calls % 4 + 1` calls of `run_dma`.
    RunDma { calls: u8 },
    /// `run_dma` until no device has work left, which must not take long.
    Drain,
    /// Queue `queue % 7`: writes descriptor `index` as it is (`flags` has NEXT, WRITE and
    /// INDIRECT in bits 0 to 2; `next` may be beyond the table, or loop).
    Desc { queue: u8, index: u8, addr: u16, len: u16, flags: u8, next: u8 },
}

/// Where a function's registers are, found as a driver finds them: its BAR and capabilities.
#[derive(Clone, Copy, Debug, Default)]
struct Function {
    slot: u8,
    bar: u64,
    gsi: u8,
    queues: u16,
    vectors: u16,
    msix_cap: u8,
    msi_cap: u8,
    common: u64,
    isr: u64,
    device: u64,
    notify: u64,
    notify_multiplier: u32,
    msix_table: u64,
    msix_pba: u64,
}

/// The driver's side of one queue: its rings and the positions it publishes at.
#[derive(Clone, Copy, Debug)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    avail_idx: u16,
    next_free: u16,
}

impl Ring {
    fn default_for(queue: usize) -> Self {
        let base = queue as u64 * RING_SLOT;
        Ring { desc: base, avail: base + 0x400, used: base + 0x500, size: 16, avail_idx: 0, next_free: 0 }
    }

    fn take_descriptor(&mut self) -> u16 {
        let index = self.next_free;
        self.next_free = (self.next_free + 1) % self.size.max(1);
        index
    }
}

/// What the devices wrote while a drain watched, and whether a 2-byte read (an available
/// index, ring entry or event) saw any of it.
struct Watch {
    on: bool,
    written: Vec<u64>,
    fed: Cell<bool>,
    /// Device writes so far.
    writes: u64,
}

impl Watch {
    fn new() -> Self {
        Watch { on: false, written: vec![0; MEMORY / 64], fed: Cell::new(false), writes: 0 }
    }

    fn start(&mut self) {
        self.on = true;
        self.written.fill(0);
        self.fed.set(false);
    }

    fn bytes(gpa: u64, len: usize) -> impl Iterator<Item = usize> {
        (gpa as usize..gpa as usize + len).filter(|&at| at < MEMORY)
    }
}

/// Guest memory for the devices: a `SliceMemory` that fails the input on any access outside it,
/// since every ring and buffer was checked against its size before use.
struct Guarded<'a> {
    memory: SliceMemory<'a>,
    watch: &'a mut Watch,
}

impl Guarded<'_> {
    fn check(&self, what: &str, gpa: u64, len: usize) {
        let inside = gpa.checked_add(len as u64).is_some_and(|end| end <= self.memory.size());
        assert!(inside, "a device {what} {len:#x} bytes at {gpa:#x}, outside the {MEMORY:#x} bytes of guest memory");
    }
}

impl GuestMemory for Guarded<'_> {
    fn size(&self) -> u64 {
        self.memory.size()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.check("reads", gpa, buf.len());
        if self.watch.on
            && buf.len() == 2
            && Watch::bytes(gpa, 2).any(|at| self.watch.written[at / 64] & 1 << (at % 64) != 0)
        {
            self.watch.fed.set(true);
        }
        self.memory.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.check("writes", gpa, data.len());
        self.watch.writes += 1;
        if self.watch.on {
            for at in Watch::bytes(gpa, data.len()) {
                self.watch.written[at / 64] |= 1 << (at % 64);
            }
        }
        self.memory.write(gpa, data)
    }
}

struct Machine {
    bus: Bus,
    memory: Vec<u8>,
    watch: Watch,
    switch: Arc<spin::Mutex<Switch>>,
    limits: Limits,
    pool: Option<Arc<OverlayPool>>,
    functions: [Function; FUNCTIONS],
    rings: [Ring; QUEUES.len()],
    /// Each function's INTx level, as its line changes said.
    levels: [bool; FUNCTIONS],
    /// Run the memory work right after an access that asked for it, as the run loop does.
    auto_dma: bool,
    events: Events,
}

fn verbose() -> bool {
    hypervisor_fuzz::verbose()
}

/// Formats every log line, as the hypervisor's serial log does (so the device errors' messages
/// run too); prints them with `FUZZ_VERBOSE`.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = record.args().to_string();
        if verbose() {
            eprintln!("    log: {line}");
        }
    }

    fn flush(&self) {}
}

impl Machine {
    fn new(auto_dma: bool, pool: bool, fail_every: u8, limits: Limits) -> Self {
        let switch = Arc::new(spin::Mutex::new(Switch::with_limits("fuzz", limits)));
        let ports: Vec<usize> = (0..3).map(|_| switch.lock().add_port()).collect();
        assert_eq!(ports, [0, 1, SPARE_PORT]);

        let mut image = vec![0u8; 0x4000];
        for (i, byte) in image.iter_mut().enumerate() {
            *byte = (i / 512) as u8 ^ i as u8;
        }
        let pool = pool.then(|| Arc::new(OverlayPool::new(POOL)));
        let rw = match &pool {
            Some(pool) => RamOverlay::new(image).with_budget(0x3000).with_pool(pool.clone()),
            None => RamOverlay::new(image).with_budget(0x2000),
        };
        let rw = Block::new(rw, "fuzz-rw");
        let ro = Block::new(RamOverlay::new(&[0xa5u8; 0x1000][..]).with_capacity(0x1000 + 300).write_protected(), "ro");
        let mut calls = 0u32;
        let mut next = 0u8;
        let source = Box::new(move |buf: &mut [u8]| {
            assert!(buf.len() <= MAX_REQUEST_BYTES, "{} bytes of entropy asked for at once", buf.len());
            calls = calls.wrapping_add(1);
            if fail_every != 0 && calls.is_multiple_of(u32::from(fail_every)) {
                return false;
            }
            for byte in buf {
                next = next.wrapping_add(1);
                *byte = next;
            }
            true
        });
        let mut host = PciHost::new();
        fn plug<D: VirtioDevice + 'static>(host: &mut PciHost, device: D, name: &str) {
            let function = VirtioPci::new(device, "fuzz", name, MEMORY as u64).expect("the transport takes the device");
            host.add_function(Box::new(function)).expect("a slot and room in the window");
        }
        plug(&mut host, rw, "vda");
        plug(&mut host, ro, "vdb");
        plug(&mut host, Net::new(MAC_A, switch.clone(), 0), "eth0");
        plug(&mut host, Net::new(MAC_B, switch.clone(), 1), "eth1");
        plug(&mut host, Rng::new(source), "rng");
        let mut bus = Bus::new();
        bus.add(Box::new(host)).expect("an empty bus");
        let mut machine = Machine {
            bus,
            memory: vec![0; MEMORY],
            watch: Watch::new(),
            switch,
            limits,
            pool,
            functions: [Function::default(); FUNCTIONS],
            rings: std::array::from_fn(Ring::default_for),
            levels: [false; FUNCTIONS],
            auto_dma,
            events: Events::default(),
        };
        for index in 0..FUNCTIONS {
            machine.functions[index] = machine.discover(index as u8 + 1);
            if verbose() {
                eprintln!("function {:x?}", machine.functions[index]);
            }
        }
        machine
    }

    /// Finds function `slot`'s BAR, interrupt line and capabilities, as a driver does.
    fn discover(&mut self, slot: u8) -> Function {
        let mut f = Function { slot, ..Function::default() };
        f.bar = u64::from(self.cfg_read(slot, 0x10, 4) & !0xf);
        f.gsi = self.cfg_read(slot, 0x3c, 1) as u8;
        let mut at = self.cfg_read(slot, 0x34, 1) as u8;
        let mut seen = 0;
        while at != 0 && seen < 16 {
            seen += 1;
            let header = self.cfg_read(slot, at, 4);
            match header as u8 {
                0x11 => {
                    f.msix_cap = at;
                    f.vectors = (header >> 16) as u16 % 2048 + 1;
                    f.msix_table = u64::from(self.cfg_read(slot, at + 4, 4) & !7);
                    f.msix_pba = u64::from(self.cfg_read(slot, at + 8, 4) & !7);
                }
                0x05 => f.msi_cap = at,
                0x09 => {
                    let offset = u64::from(self.cfg_read(slot, at + 8, 4));
                    match (header >> 24) as u8 {
                        1 => f.common = offset,
                        2 => {
                            f.notify = offset;
                            f.notify_multiplier = self.cfg_read(slot, at + 16, 4);
                        }
                        3 => f.isr = offset,
                        4 => f.device = offset,
                        _ => {}
                    }
                }
                _ => {}
            }
            at = (header >> 8) as u8;
        }
        assert!(f.msix_cap != 0 && f.msi_cap != 0 && f.notify != 0, "function {slot}: capabilities {f:x?}");
        f.queues = self.mmio_read(f.bar + f.common + 0x12, 2) as u16;
        f
    }

    /// Checks and clears what the last access (or `run_dma` call, if `dma`) raised.
    fn settle(&mut self, dma: bool) {
        let events = std::mem::take(&mut self.events);
        if verbose() && events != Events::default() {
            eprintln!("    {} {events:x?}", if dma { "dma" } else { "->" });
        }
        let (msis, lines) = if dma { (DMA_MSIS, DMA_LINES) } else { (ACCESS_MSIS, ACCESS_LINES) };
        assert!(events.msi.len() <= msis, "{} MSIs at once: {:x?}", events.msi.len(), events.msi);
        for msi in &events.msi {
            assert_eq!(msi.address & 3, 0, "MSI to an address that is not dword aligned: {msi:x?}");
        }
        assert!(
            events.irq_lines.len() <= lines,
            "{} line changes at once: {:?}",
            events.irq_lines.len(),
            events.irq_lines
        );
        for &(gsi, level) in &events.irq_lines {
            let f = self.functions.iter().position(|f| f.gsi == gsi);
            let f = f.unwrap_or_else(|| panic!("GSI {gsi} changed, which no function is wired to"));
            assert_ne!(self.levels[f], level, "function {} set its line {gsi} to {level} again", f + 1);
            self.levels[f] = level;
        }
        assert!(
            events.console.is_empty()
                && events.interrupts.is_empty()
                && events.exit_status.is_none()
                && events.power.is_none()
                && events.host_nmi.is_none(),
            "a PCI function asked for more than interrupts: {events:x?}"
        );
        if dma {
            assert!(!events.dma, "memory work asked for more memory work");
        } else if events.dma && self.auto_dma {
            self.run_dma();
        }
    }

    fn run_dma(&mut self) {
        let mut memory = Guarded { memory: SliceMemory(&mut self.memory), watch: &mut self.watch };
        self.bus.run_dma(&mut memory, 0, &mut self.events);
        if verbose() {
            // The used indices of the rings the driver side knows, and the last used element.
            let used: Vec<String> = self
                .rings
                .iter()
                .map(|ring| {
                    let word = |at: u64| {
                        let at = usize::try_from(at).unwrap_or(usize::MAX);
                        let bytes = self.memory.get(at..at.saturating_add(4)).unwrap_or(&[0; 4]);
                        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
                    };
                    let idx = word(ring.used + 2) as u16;
                    let last = ring.used + 4 + 8 * u64::from(idx.wrapping_sub(1) % ring.size.max(1));
                    format!("{idx}:{}+{}", word(last), word(last + 4))
                })
                .collect();
            eprintln!("    used {}", used.join(" "));
        }
        self.settle(true);
    }

    /// `run_dma` until nothing is pending; without new notifications that takes at most
    /// `MAX_DRAIN_CALLS` calls.
    fn drain(&mut self) {
        self.watch.start();
        let mut calls = 0;
        while self.bus.dma_pending() {
            if calls == MAX_DRAIN_CALLS {
                assert!(self.watch.fed.get(), "memory work still pending after {calls} run_dma calls");
            }
            if calls == FED_DRAIN_CALLS {
                if verbose() {
                    eprintln!("    the devices keep feeding their own rings: stopped after {calls} calls");
                }
                break;
            }
            let (writes, frames) = (self.watch.writes, self.frames_moved());
            self.run_dma();
            calls += 1;
            // A call that used no buffer (wrote nothing) and moved no frame found nothing to do,
            // and must not leave work pending: it would find nothing the next time either.
            let progress = self.watch.writes != writes || self.frames_moved() != frames;
            assert!(progress || !self.bus.dma_pending(), "run_dma did nothing and left work pending");
        }
        self.watch.on = false;
    }

    /// Frames in and out of the switch's ports so far, dropped ones included.
    fn frames_moved(&self) -> u64 {
        let switch = self.switch.lock();
        (0..switch.port_count())
            .filter_map(|port| switch.counters(port))
            .map(|c| c.frames_in + c.frames_out + c.dropped_short + c.dropped_long + c.dropped_queue_full)
            .sum()
    }

    fn port_write(&mut self, port: u16, size: u8, value: u32) {
        self.bus.io_write(port, size, value & ones(size) as u32, 0, &mut self.events);
        self.settle(false);
    }

    fn port_read(&mut self, port: u16, size: u8) -> u32 {
        let value = self.bus.io_read(port, size, 0, &mut self.events).unwrap_or(ones(size) as u32);
        self.settle(false);
        value
    }

    fn cfg_address(slot: u8, register: u8) -> u32 {
        0x8000_0000 | u32::from(slot) << 11 | u32::from(register & 0xfc)
    }

    fn cfg_read(&mut self, slot: u8, register: u8, size: u8) -> u32 {
        self.port_write(CONFIG_ADDRESS, 4, Self::cfg_address(slot, register));
        self.port_read(CONFIG_DATA + u16::from(register & 3), size)
    }

    fn cfg_write(&mut self, slot: u8, register: u8, size: u8, value: u32) {
        self.port_write(CONFIG_ADDRESS, 4, Self::cfg_address(slot, register));
        self.port_write(CONFIG_DATA + u16::from(register & 3), size, value);
    }

    /// What a configuration read at CONFIG_ADDRESS `address` returned, checked against what
    /// is known: the interrupt bit of a function's status follows its line.
    fn check_config_read(&self, address: u32, lane: u8, size: u8, value: u32) {
        let slot = (address >> 11 & 0x1f) as u8;
        if address & 0x80ff_07fc != 0x8000_0004 || !(1..=FUNCTIONS as u8).contains(&slot) {
            return;
        }
        // Status (bytes 6 and 7 of the dword); bit 3 is the interrupt status.
        if lane <= 2 && 2 < lane + size.min(4 - lane) {
            let interrupt = value >> (8 * (2 - lane)) & 0x08 != 0;
            let level = self.levels[usize::from(slot - 1)];
            assert_eq!(interrupt, level, "function {slot}: status interrupt bit {interrupt}, line {level}");
        }
    }

    fn mmio_read(&mut self, gpa: u64, size: u8) -> u64 {
        let value = self.bus.mmio_read(gpa, size, 0, &mut self.events).unwrap_or(ones(size));
        self.settle(false);
        // All ones is a master abort: the guest moved the BAR or turned decoding off. Any BAR
        // that decodes the address instead is a virtio function's, at the same offset (BARs
        // are aligned to their size), so the checks hold for it too.
        if value == ones(size) {
            return value;
        }
        for f in &self.functions {
            if gpa == f.bar + f.common + 0x14 && size == 1 {
                let status = value as u8;
                assert!(
                    status & STATUS_DRIVER_OK == 0 || status & STATUS_FEATURES_OK != 0,
                    "function {}: status {status:#x}, DRIVER_OK without FEATURES_OK",
                    f.slot
                );
            }
            if gpa == f.bar + f.isr && size == 1 {
                assert!(value <= 3, "function {}: ISR {value:#x}", f.slot);
            }
            if gpa == f.bar + f.common + 0x18 && size == 2 {
                assert!(
                    value == 0 || (value.is_power_of_two() && value <= 256),
                    "function {}: queue size {value}",
                    f.slot
                );
            }
        }
        value
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) {
        self.bus.mmio_write(gpa, size, value & ones(size), 0, &mut self.events);
        self.settle(false);
    }

    fn common_write(&mut self, f: usize, offset: u64, size: u8, value: u64) {
        let at = self.functions[f].bar + self.functions[f].common + offset;
        self.mmio_write(at, size, value);
    }

    fn common_read(&mut self, f: usize, offset: u64, size: u8) -> u64 {
        let at = self.functions[f].bar + self.functions[f].common + offset;
        self.mmio_read(at, size)
    }

    /// The driver's own writes to its memory: whatever fits.
    fn poke(&mut self, gpa: u64, bytes: &[u8]) {
        let Ok(start) = usize::try_from(gpa) else { return };
        if let Some(room) = self.memory.get_mut(start..) {
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
        }
    }

    fn poke_u16(&mut self, gpa: u64, value: u16) {
        self.poke(gpa, &value.to_le_bytes());
    }

    fn desc(&mut self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        bytes[12..14].copy_from_slice(&flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&next.to_le_bytes());
        self.poke(gpa, &bytes);
    }

    /// Puts `head` in queue `q`'s next available entry and publishes it.
    fn publish(&mut self, q: usize, head: u16, notify: bool) {
        let ring = self.rings[q];
        let slot = u64::from(ring.avail_idx % ring.size.max(1));
        self.poke_u16(ring.avail + 4 + 2 * slot, head);
        let idx = ring.avail_idx.wrapping_add(1);
        self.rings[q].avail_idx = idx;
        self.poke_u16(ring.avail + 2, idx);
        if notify {
            self.notify(q);
        }
    }

    fn notify(&mut self, q: usize) {
        let (function, queue, _) = QUEUES[q];
        let f = self.functions[function];
        let at = f.bar + f.notify + u64::from(queue) * u64::from(f.notify_multiplier);
        self.mmio_write(at, 2, u64::from(queue));
    }

    /// Writes `bufs` (address, length, device-writable) as a chain of free descriptors, or as
    /// an indirect table at `indirect` behind one descriptor; publishes it.
    fn chain(&mut self, q: usize, bufs: &[(u64, u32, bool)], indirect: Option<u64>, notify: bool) {
        let flags = |i: usize, writable: bool| {
            let next = if i + 1 < bufs.len() { VIRTQ_DESC_F_NEXT } else { 0 };
            next | if writable { VIRTQ_DESC_F_WRITE } else { 0 }
        };
        let head = if let Some(table) = indirect {
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                self.desc(table + 16 * i as u64, addr, len, flags(i, writable), i as u16 + 1);
            }
            let head = self.rings[q].take_descriptor();
            let at = self.rings[q].desc + 16 * u64::from(head);
            self.desc(at, table, 16 * bufs.len() as u32, VIRTQ_DESC_F_INDIRECT, 0);
            head
        } else {
            let indices: Vec<u16> = bufs.iter().map(|_| self.rings[q].take_descriptor()).collect();
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                let next = indices.get(i + 1).copied().unwrap_or(0);
                let at = self.rings[q].desc + 16 * u64::from(indices[i]);
                self.desc(at, addr, len, flags(i, writable), next);
            }
            indices[0]
        };
        self.publish(q, head, notify);
    }

    /// A request of queue `q`'s device type.
    fn request(&mut self, q: usize, kind: u8, arg: u32, data: u64, len: u16, notify: bool) {
        let header = HEADERS + 0x40 * q as u64;
        let len32 = u32::from(len);
        let bufs: Vec<(u64, u32, bool)> = match QUEUES[q].2 {
            Kind::Blk => {
                // In, out, flush, GET_ID or any type; a sector on the disks, or far beyond.
                let request = [0, 1, 4, 8, arg][usize::from(kind % 5)];
                let sector = if kind & 0x80 != 0 { u64::from(arg) << 20 } else { u64::from(arg % 48) };
                let mut bytes = [0u8; 16];
                bytes[0..4].copy_from_slice(&request.to_le_bytes());
                bytes[8..16].copy_from_slice(&sector.to_le_bytes());
                self.poke(header, &bytes);
                self.poke(header + 16, &[0xff]);
                let mut bufs = vec![(header, 16, false)];
                if len != 0 {
                    bufs.push((data, len32, request != 1));
                }
                bufs.push((header + 16, 1, true));
                bufs
            }
            Kind::NetTx => {
                // A frame to the other device, itself, the third port, everyone or a group.
                let own = if QUEUES[q].0 == 2 { MAC_A } else { MAC_B };
                let dst = [MAC_A, MAC_B, MAC_SPARE, [0xff; 6], [0x33, 0x33, 0, 0, 0, 1], own][usize::from(kind % 6)];
                let src = if kind & 0x80 != 0 { [0x02, 0, 0, 0, (arg >> 8) as u8, arg as u8] } else { own };
                let mut frame = dst.to_vec();
                frame.extend_from_slice(&src);
                frame.extend_from_slice(&[0x08, 0x00]);
                frame.extend((0..usize::from(len)).map(|i| (arg as u8).wrapping_add(i as u8)));
                frame.truncate(usize::from(len));
                self.poke(data, &frame);
                self.poke(header, &[0; 12]);
                vec![(header, 12, false), (data, len32, false)]
            }
            Kind::NetRx | Kind::Rng => vec![(data, len32, true)],
        };
        self.chain(q, &bufs, None, notify);
    }

    /// Linux's virtio_pci_modern bring-up of function `f`, its first `steps` steps.
    fn bring_up(&mut self, f: usize, features: &Features, size: u8, rings: &Rings, irq: &Irq, steps: u8) {
        let func = self.functions[f];
        let slot = func.slot;
        let msix = matches!(irq, Irq::Msix);
        // 1: memory decoding and bus mastering (INTx allowed).
        if steps < 1 {
            return;
        }
        self.cfg_write(slot, 0x04, 2, 0x0006);
        // 2: the interrupts.
        if steps < 2 {
            return;
        }
        match irq {
            Irq::Intx => {}
            Irq::Msix => {
                self.cfg_write(slot, func.msix_cap + 2, 2, 0x8000);
                for vector in 0..u64::from(func.vectors) {
                    let entry = func.bar + func.msix_table + 16 * vector;
                    self.mmio_write(entry, 4, 0xfee0_0000);
                    self.mmio_write(entry + 4, 4, 0);
                    self.mmio_write(entry + 8, 4, 0x40 + 8 * f as u64 + vector);
                    self.mmio_write(entry + 12, 4, 0);
                }
            }
            Irq::Msi => {
                self.cfg_write(slot, func.msi_cap + 4, 4, 0xfee0_0000);
                self.cfg_write(slot, func.msi_cap + 8, 4, 0);
                self.cfg_write(slot, func.msi_cap + 12, 2, 0x60 + f as u32);
                self.cfg_write(slot, func.msi_cap + 2, 2, 1);
            }
        }
        // 3: reset, ACKNOWLEDGE, DRIVER.
        if steps < 3 {
            return;
        }
        self.common_write(f, 0x14, 1, 0);
        self.common_write(f, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE));
        self.common_write(f, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        // 4: features.
        if steps < 4 {
            return;
        }
        let mut offered = 0u64;
        for select in 0..2 {
            self.common_write(f, 0x00, 4, select);
            offered |= self.common_read(f, 0x04, 4) << (32 * select);
        }
        let wanted = match *features {
            Features::Offered => offered,
            Features::Version1 => VIRTIO_F_VERSION_1,
            Features::Raw(bits) => bits,
        };
        for select in 0..2 {
            self.common_write(f, 0x08, 4, select);
            self.common_write(f, 0x0c, 4, wanted >> (32 * select) & 0xffff_ffff);
        }
        // 5: FEATURES_OK, read back.
        if steps < 5 {
            return;
        }
        self.common_write(f, 0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
        self.common_read(f, 0x14, 1);
        // 6: vectors, queue sizes and rings, enable.
        if steps < 6 {
            return;
        }
        if msix {
            self.common_write(f, 0x10, 2, 0);
            self.common_read(f, 0x10, 2);
        }
        let wanted_size = match size % 16 {
            s @ 0..=8 => 1u16 << s,
            _ => u16::from(size),
        };
        for queue in 0..func.queues {
            let Some(q) = QUEUES.iter().position(|&(g, i, _)| g == f && i == queue) else { continue };
            self.common_write(f, 0x16, 2, u64::from(queue));
            self.common_read(f, 0x18, 2);
            self.common_write(f, 0x18, 2, u64::from(wanted_size));
            let size = self.common_read(f, 0x18, 2) as u16;
            if msix {
                self.common_write(f, 0x1a, 2, u64::from(queue) + 1);
            }
            let mut ring = match *rings {
                Rings::Default => Ring::default_for(q),
                Rings::At { desc, avail, used } => {
                    let shift = RING_SLOT * u64::from(queue);
                    let at = |gpa: u16| u64::from(gpa) + shift;
                    Ring { desc: at(desc), avail: at(avail), used: at(used), size: 0, avail_idx: 0, next_free: 0 }
                }
            };
            ring.size = size;
            self.rings[q] = ring;
            // Fresh rings, as a driver allocates them.
            let size = u64::from(size);
            for (gpa, len) in [(ring.desc, 16 * size), (ring.avail, 6 + 2 * size), (ring.used, 6 + 8 * size)] {
                self.poke(gpa, &vec![0; len as usize]);
            }
            for (offset, gpa) in [(0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)] {
                self.common_write(f, offset, 4, gpa & 0xffff_ffff);
                self.common_write(f, offset + 4, 4, gpa >> 32);
            }
            self.common_write(f, 0x1c, 2, 1);
        }
        // 7: DRIVER_OK.
        if steps < 7 {
            return;
        }
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.common_write(f, 0x14, 1, u64::from(ok));
        self.common_read(f, 0x14, 1);
    }

    fn gpa(&self, gpa: &Gpa) -> u64 {
        match *gpa {
            Gpa::Function { function, ref region } => {
                let f = &self.functions[usize::from(function) % FUNCTIONS];
                let offset = match *region {
                    Region::Common(o) => f.common + u64::from(o % 0x40),
                    Region::Isr => f.isr,
                    Region::Device(o) => f.device + u64::from(o % 0x20),
                    Region::Notify(o) => f.notify + u64::from(o % 16),
                    Region::MsixTable(o) => f.msix_table + u64::from(o % 0x40),
                    Region::Pba(o) => f.msix_pba + u64::from(o % 16),
                    Region::Bar(o) => u64::from(o),
                };
                f.bar + offset
            }
            Gpa::Window(offset) => MMIO_WINDOW_BASE + u64::from(offset),
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Config { ref address, lane, size, write, value } => {
                let address = match *address {
                    Address::Slot { slot, register } => Self::cfg_address(slot % 6, register),
                    Address::Raw(raw) => raw,
                };
                let lane = lane % 4;
                let size = [1, 2, 4][usize::from(size % 3)];
                self.port_write(CONFIG_ADDRESS, 4, address);
                if write {
                    self.port_write(CONFIG_DATA + u16::from(lane), size, value);
                } else {
                    let value = self.port_read(CONFIG_DATA + u16::from(lane), size);
                    if verbose() {
                        eprintln!("    read {value:#x}");
                    }
                    self.check_config_read(address, lane, size, value);
                }
            }
            Op::Port { port, size, write, value } => {
                let port = CONFIG_ADDRESS + u16::from(port % 8);
                let size = [1, 2, 4][usize::from(size % 3)];
                if write {
                    self.port_write(port, size, value);
                } else {
                    let value = self.port_read(port, size);
                    if verbose() {
                        eprintln!("    read {value:#x}");
                    }
                }
            }
            Op::Mmio { ref gpa, size, write, value } => {
                let gpa = self.gpa(gpa);
                let size = [1, 2, 4, 8][usize::from(size % 4)];
                if write {
                    self.mmio_write(gpa, size, value);
                } else {
                    let value = self.mmio_read(gpa, size);
                    if verbose() {
                        eprintln!("    read {value:#x} at {gpa:#x}");
                    }
                }
            }
            Op::Poke { gpa, len, ref data } => self.poke(u64::from(gpa), &data[..usize::from(len % 17)]),
            Op::Chain { queue, count, ref bufs, indirect, notify } => {
                let bufs: Vec<(u64, u32, bool)> = bufs[..usize::from(count % 4) + 1]
                    .iter()
                    .map(|b| (u64::from(b.gpa), u32::from(b.len), b.writable))
                    .collect();
                self.chain(usize::from(queue) % QUEUES.len(), &bufs, indirect.map(u64::from), notify);
            }
            Op::Publish { queue, head, notify } => self.publish(usize::from(queue) % QUEUES.len(), head, notify),
            Op::Avail { queue, flags, idx, used_event } => {
                let q = usize::from(queue) % QUEUES.len();
                let ring = self.rings[q];
                self.rings[q].avail_idx = idx;
                self.poke_u16(ring.avail, flags);
                self.poke_u16(ring.avail + 2, idx);
                self.poke_u16(ring.avail + 4 + 2 * u64::from(ring.size), used_event);
            }
            Op::Request { queue, kind, arg, data, len, notify } => {
                self.request(usize::from(queue) % QUEUES.len(), kind, arg, u64::from(data), len, notify)
            }
            Op::Notify { queue } => self.notify(usize::from(queue) % QUEUES.len()),
            Op::BringUp { function, ref features, size, ref rings, ref irq, steps } => {
                self.bring_up(usize::from(function) % FUNCTIONS, features, size, rings, irq, steps)
            }
            Op::Inject { ref dst, ref src, len, tag } => {
                let mut frame = dst.get().to_vec();
                frame.extend_from_slice(&src.get());
                frame.extend_from_slice(&[0x08, 0x00]);
                let len = usize::from(len) % 1536;
                frame.resize(len.max(frame.len()), tag);
                frame.truncate(len);
                let woken = self.switch.lock().send(SPARE_PORT, &frame);
                assert!(!woken.contains(&SPARE_PORT), "a frame came back to its own port");
            }
            Op::Take { count } => {
                for _ in 0..=count % 8 {
                    let Some(frame) = self.switch.lock().receive(SPARE_PORT) else { break };
                    assert!((14..=1518).contains(&frame.len()), "a {}-byte frame was switched", frame.len());
                }
            }
            Op::RunDma { calls } => {
                for _ in 0..=calls % 4 {
                    self.run_dma();
                }
            }
            Op::Drain => self.drain(),
            Op::Desc { queue, index, addr, len, flags, next } => {
                let ring = self.rings[usize::from(queue) % QUEUES.len()];
                let at = ring.desc + 16 * u64::from(index);
                self.desc(at, u64::from(addr), u32::from(len), u16::from(flags), u16::from(next));
            }
        }
        let switch = self.switch.lock();
        for port in 0..switch.port_count() {
            let (frames, bytes) = (switch.queued_frames(port), switch.queued_bytes(port));
            assert!(
                frames <= self.limits.queue_frames && bytes <= self.limits.queue_bytes,
                "port {port} holds {frames} frames, {bytes} bytes, over {:?}",
                self.limits
            );
        }
        assert!(switch.learned_macs() <= self.limits.mac_entries, "{} MACs learned", switch.learned_macs());
        if let Some(pool) = &self.pool {
            assert!(pool.free_bytes() <= POOL, "the page pool has {:#x} bytes free of {POOL:#x}", pool.free_bytes());
        }
    }
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    if log::set_logger(&Logger).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    let mut u = Unstructured::new(data);
    let options: u8 = u.arbitrary()?;
    let fail_every: u8 = u.arbitrary()?;
    let limits: [u8; 4] = u.arbitrary()?;
    let limits = Limits {
        queue_frames: usize::from(limits[0] % 17),
        queue_bytes: [64, 1518, 4096, 1 << 20][usize::from(limits[1] % 4)],
        mac_entries: usize::from(limits[2] % 9),
        macs_per_port: usize::from(limits[3] % 5),
    };
    let mut machine = Machine::new(options & 1 != 0, options & 2 != 0, fail_every, limits);
    while !u.is_empty() {
        let Ok(op) = u.arbitrary::<Op>() else { break };
        if verbose() {
            eprintln!("{op:x?}");
        }
        machine.step(&op);
    }
    // Whatever the input left, the devices finish it; then the VM's end report.
    machine.drain();
    for line in machine.bus.reports() {
        if verbose() {
            eprintln!("{line}");
        }
    }
    // The disk's written pages go back to the pool with it.
    let pool = machine.pool.take();
    drop(machine);
    if let Some(pool) = pool {
        assert_eq!(pool.free_bytes(), POOL, "pages of a dropped disk were not given back");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
