//! Memory management that does not touch hardware: physical frame bookkeeping and second-level
//! page tables.

pub mod frames;
pub mod second_level;
pub mod tlb_tags;
