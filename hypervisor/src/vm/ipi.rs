//! Where an interprocessor interrupt goes: the local APICs an ICR write names.
//!
//! Pure routing (Intel SDM Vol. 3, 11.6.2 "Determining IPI Destination", 11.12.9 for x2APIC):
//! physical and logical destinations (flat and cluster models, x2APIC clusters), the
//! broadcast IDs, the shorthands, and lowest-priority arbitration. Whether a target accepts
//! the message (a software-disabled APIC takes INIT, SIPI and NMI only) is its own business.

use alloc::vec::Vec;

/// How the message is delivered (ICR bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// The vector, to every destination.
    Fixed,
    /// The vector, to the destination with the lowest processor priority.
    LowestPriority,
    /// System management interrupt.
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT (assert) or INIT level de-assert.
    Init,
    /// Start-up IPI: the target starts in real mode at `vector << 12`.
    Startup,
    /// Reserved encodings (1 and 3 on newer CPUs, 7 on all).
    Reserved,
}

/// The ICR's destination shorthand (bits 19:18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    /// The destination field decides.
    None,
    /// The sender only.
    SelfOnly,
    /// Every APIC, the sender too.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

/// A decoded ICR write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icr {
    /// Vector (the start page for a SIPI).
    pub vector: u8,
    /// Delivery mode.
    pub delivery: DeliveryMode,
    /// Logical (true) or physical destination.
    pub logical: bool,
    /// Level: assert (true) or de-assert (only meaningful for INIT).
    pub assert: bool,
    /// Level-triggered (true) or edge.
    pub level_triggered: bool,
    /// Destination shorthand.
    pub shorthand: Shorthand,
    /// Destination: an 8-bit xAPIC ID or logical mask, or a 32-bit x2APIC one.
    pub destination: u32,
    /// Written in x2APIC mode (32-bit destinations and x2APIC logical clusters).
    pub x2apic: bool,
}

impl Icr {
    fn decode(low: u32, destination: u32, x2apic: bool) -> Self {
        let delivery = match (low >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::Startup,
            _ => DeliveryMode::Reserved,
        };
        let shorthand = match (low >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        Icr {
            vector: low as u8,
            delivery,
            logical: low & (1 << 11) != 0,
            assert: low & (1 << 14) != 0,
            level_triggered: low & (1 << 15) != 0,
            shorthand,
            destination,
            x2apic,
        }
    }

    /// An xAPIC ICR: the low word as written, the destination in bits 31:24 of the high word.
    pub fn from_xapic(low: u32, high: u32) -> Self {
        Icr::decode(low, high >> 24, false)
    }

    /// An x2APIC ICR (MSR 0x830): the destination is the upper 32 bits.
    pub fn from_x2apic(value: u64) -> Self {
        Icr::decode(value as u32, (value >> 32) as u32, true)
    }
}

/// What routing needs to know of one local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicView {
    /// APIC ID.
    pub apic_id: u32,
    /// Logical destination register as the guest sees it.
    pub ldr: u32,
    /// Destination format: flat model (DFR 0xF) rather than cluster (DFR 0x0). xAPIC only.
    pub flat: bool,
    /// Processor priority (PPR), for lowest-priority arbitration.
    pub ppr: u8,
}

/// xAPIC physical broadcast ID.
const XAPIC_BROADCAST: u32 = 0xff;
/// x2APIC broadcast ID (physical and logical).
const X2APIC_BROADCAST: u32 = 0xffff_ffff;

/// Whether `apic` is named by the destination field of `icr` (no shorthand).
fn named(icr: &Icr, apic: &ApicView) -> bool {
    match (icr.x2apic, icr.logical) {
        (false, false) => icr.destination == XAPIC_BROADCAST || icr.destination == apic.apic_id,
        (true, false) => icr.destination == X2APIC_BROADCAST || icr.destination == apic.apic_id,
        (false, true) => {
            let mda = icr.destination & 0xff;
            let ldr = apic.ldr >> 24;
            if apic.flat {
                mda & ldr != 0
            } else {
                // Cluster model: cluster 0xF is a broadcast to every cluster.
                let cluster_matches = mda >> 4 == 0xf || mda >> 4 == ldr >> 4;
                cluster_matches && (mda & ldr & 0xf) != 0
            }
        }
        (true, true) => {
            icr.destination == X2APIC_BROADCAST
                || (icr.destination >> 16 == apic.ldr >> 16 && icr.destination & apic.ldr & 0xffff != 0)
        }
    }
}

/// The indices in `apics` that receive `icr` sent by `apics[sender]`. Lowest priority
/// delivers to one of the named APICs: the lowest PPR, the lowest index among equals.
pub fn destinations(icr: &Icr, sender: usize, apics: &[ApicView]) -> Vec<usize> {
    let targets: Vec<usize> = (0..apics.len())
        .filter(|&i| match icr.shorthand {
            Shorthand::None => named(icr, &apics[i]),
            Shorthand::SelfOnly => i == sender,
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => i != sender,
        })
        .collect();
    if icr.delivery != DeliveryMode::LowestPriority {
        return targets;
    }
    targets.iter().copied().min_by_key(|&i| (apics[i].ppr, i)).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four xAPICs, IDs 0-3, flat logical IDs 1, 2, 4, 8.
    fn flat() -> Vec<ApicView> {
        (0..4).map(|i| ApicView { apic_id: i, ldr: (1 << i) << 24, flat: true, ppr: 0 }).collect()
    }

    #[test]
    fn icr_fields_decode() {
        let icr = Icr::from_xapic(0x000c_4630, 0x0300_0000);
        assert_eq!(icr.vector, 0x30);
        assert_eq!(icr.delivery, DeliveryMode::Startup);
        assert!(!icr.logical && icr.assert && !icr.level_triggered);
        assert_eq!((icr.shorthand, icr.destination), (Shorthand::AllExcludingSelf, 3));
        let x2 = Icr::from_x2apic(0x0000_0007_0000_0830 | 1 << 15);
        assert_eq!((x2.destination, x2.delivery, x2.logical, x2.level_triggered), (7, DeliveryMode::Fixed, true, true));
        assert_eq!(Icr::from_xapic(0x700, 0).delivery, DeliveryMode::Reserved);
    }

    #[test]
    fn physical_destinations_and_broadcast() {
        let apics = flat();
        assert_eq!(destinations(&Icr::from_xapic(0x40, 2 << 24), 0, &apics), [2]);
        assert_eq!(destinations(&Icr::from_xapic(0x40, 9 << 24), 0, &apics), [] as [usize; 0]);
        assert_eq!(destinations(&Icr::from_xapic(0x40, 0xff << 24), 0, &apics), [0, 1, 2, 3]);
        assert_eq!(destinations(&Icr::from_x2apic(3 << 32 | 0x40), 0, &apics), [3]);
        assert_eq!(
            destinations(&Icr::from_x2apic(0xff << 32 | 0x40), 0, &apics),
            [] as [usize; 0],
            "x2APIC: 0xff is an ID"
        );
        assert_eq!(destinations(&Icr::from_x2apic(0xffff_ffff << 32 | 0x40), 0, &apics), [0, 1, 2, 3]);
    }

    #[test]
    fn shorthands_ignore_the_destination() {
        let apics = flat();
        let with = |shorthand: u32| Icr::from_xapic(0x40 | shorthand << 18, 2 << 24);
        assert_eq!(destinations(&with(1), 1, &apics), [1]);
        assert_eq!(destinations(&with(2), 1, &apics), [0, 1, 2, 3]);
        assert_eq!(destinations(&with(3), 1, &apics), [0, 2, 3]);
    }

    #[test]
    fn logical_flat_cluster_and_x2apic_clusters() {
        let apics = flat();
        let logical = |mask: u32| Icr::from_xapic(0x40 | 1 << 11, mask << 24);
        assert_eq!(destinations(&logical(0b1010), 0, &apics), [1, 3]);
        assert_eq!(destinations(&logical(0xff), 0, &apics), [0, 1, 2, 3]);
        // Cluster model: cluster in bits 7:4, members in 3:0.
        let clusters: Vec<ApicView> = [(0x11, 0), (0x12, 1), (0x21, 2)]
            .iter()
            .map(|&(ldr, id)| ApicView { apic_id: id, ldr: ldr << 24, flat: false, ppr: 0 })
            .collect();
        assert_eq!(destinations(&logical(0x13), 0, &clusters), [0, 1]);
        assert_eq!(destinations(&logical(0x21), 0, &clusters), [2]);
        assert_eq!(destinations(&logical(0xf1), 0, &clusters), [0, 2], "cluster 0xF: every cluster");
        // x2APIC: LDR = cluster << 16 | 1 << (id % 16).
        let x2: Vec<ApicView> = (0..20u32)
            .map(|id| ApicView { apic_id: id, ldr: (id >> 4) << 16 | 1 << (id & 15), flat: false, ppr: 0 })
            .collect();
        let x2_logical = |destination: u64| Icr::from_x2apic(destination << 32 | 1 << 11 | 0x40);
        assert_eq!(destinations(&x2_logical(0x0000_0005), 0, &x2), [0, 2]);
        assert_eq!(destinations(&x2_logical(0x0001_0009), 0, &x2), [16, 19]);
    }

    #[test]
    fn lowest_priority_picks_one_by_ppr() {
        let mut apics = flat();
        apics[1].ppr = 0x20;
        apics[2].ppr = 0x10;
        apics[3].ppr = 0x10;
        let icr = Icr::from_xapic(0x40 | 1 << 8 | 1 << 11, 0b1110 << 24);
        assert_eq!(destinations(&icr, 0, &apics), [2], "lowest PPR, lowest index among equals");
        let none = Icr::from_xapic(0x40 | 1 << 8, 9 << 24);
        assert_eq!(destinations(&none, 0, &apics), [] as [usize; 0]);
    }
}
