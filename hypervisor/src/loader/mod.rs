//! Loading guest images into guest memory: a static ELF64 loader, identity-mapped long-mode page
//! tables, and a software walk of the guest's own page tables.
//!
//! Guest memory is reached only through [`GuestMemory`], so all of this compiles and is tested on
//! the host against [`SliceMemory`]. Every value that comes from a guest image or from guest
//! memory is untrusted: all arithmetic on it is checked and every access is bounds-checked.

use core::fmt;

pub mod bzimage;
pub mod elf;
pub mod guest_walk;
pub mod multiboot;
pub mod page_tables;

/// A guest-physical memory access that does not fit in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// `[gpa, gpa + len)` is not inside guest memory (or overflows the address space).
    OutOfRange {
        /// First guest-physical address of the access.
        gpa: u64,
        /// Length of the access in bytes.
        len: u64,
    },
    /// `gpa` is not a multiple of `align`.
    Unaligned {
        /// The misaligned guest-physical address.
        gpa: u64,
        /// Required alignment in bytes.
        align: u64,
    },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::OutOfRange { gpa, len } => {
                write!(f, "guest-physical access at {gpa:#x}+{len:#x} is outside guest memory")
            }
            MemError::Unaligned { gpa, align } => {
                write!(f, "guest-physical address {gpa:#x} is not aligned to {align:#x}")
            }
        }
    }
}

/// Guest-physical memory.
pub trait GuestMemory {
    /// Size of guest memory in bytes; valid guest-physical addresses are `[0, size)`.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes starting at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Writes `data` starting at `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError>;

    /// Fills `[gpa, gpa + len)` with zeroes.
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), MemError> {
        const CHUNK: [u8; 512] = [0; 512];
        let end = gpa.checked_add(len).ok_or(MemError::OutOfRange { gpa, len })?;
        if end > self.size() {
            return Err(MemError::OutOfRange { gpa, len });
        }
        let mut at = gpa;
        while at < end {
            let n = (end - at).min(CHUNK.len() as u64);
            // `n <= 512`, so the conversion and the slice are in range.
            self.write(at, &CHUNK[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// Reads a little-endian `u64` at `gpa`.
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian `u32` at `gpa`.
    fn read_u32(&self, gpa: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u16` at `gpa`.
    fn read_u16(&self, gpa: u64) -> Result<u16, MemError> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a little-endian `u64` at `gpa`.
    fn write_u64(&mut self, gpa: u64, value: u64) -> Result<(), MemError> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Writes a little-endian `u32` at `gpa`.
    fn write_u32(&mut self, gpa: u64, value: u32) -> Result<(), MemError> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Writes a little-endian `u16` at `gpa`.
    fn write_u16(&mut self, gpa: u64, value: u16) -> Result<(), MemError> {
        self.write(gpa, &value.to_le_bytes())
    }
}

/// Guest memory backed by a byte slice: guest-physical address 0 is `self.0[0]`.
#[derive(Debug)]
pub struct SliceMemory<'a>(pub &'a mut [u8]);

impl SliceMemory<'_> {
    /// The byte range of `[gpa, gpa + len)` inside the slice, if it fits.
    fn range(&self, gpa: u64, len: usize) -> Result<core::ops::Range<usize>, MemError> {
        let err = MemError::OutOfRange { gpa, len: len as u64 };
        let start = usize::try_from(gpa).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > self.0.len() {
            return Err(err);
        }
        Ok(start..end)
    }
}

impl GuestMemory for SliceMemory<'_> {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        let src = self.0.get(r).ok_or(MemError::OutOfRange { gpa, len: buf.len() as u64 })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let r = self.range(gpa, data.len())?;
        let dst = self.0.get_mut(r).ok_or(MemError::OutOfRange { gpa, len: data.len() as u64 })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// Formats a byte count as "64 MiB", "4 KiB", "1 GiB" when exact, else in bytes.
pub(crate) struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// Guest memory after a load in tests; its `Debug` does not print megabytes.
#[cfg(test)]
pub(crate) struct TestMemory(pub alloc::vec::Vec<u8>);

#[cfg(test)]
impl core::fmt::Debug for TestMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "<{} bytes of guest memory>", self.0.len())
    }
}

#[cfg(test)]
impl core::ops::Deref for TestMemory {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn slice_memory_bounds() {
        let mut backing = [0u8; 16];
        let mut mem = SliceMemory(&mut backing);
        assert_eq!(mem.size(), 16);
        mem.write(14, &[1, 2]).unwrap();
        let mut b = [0u8; 2];
        mem.read(14, &mut b).unwrap();
        assert_eq!(b, [1, 2]);
        assert_eq!(mem.write(15, &[1, 2]), Err(MemError::OutOfRange { gpa: 15, len: 2 }));
        assert_eq!(mem.read(u64::MAX, &mut b), Err(MemError::OutOfRange { gpa: u64::MAX, len: 2 }));
        assert_eq!(mem.read(16, &mut []), Ok(()));
        assert!(mem.read(17, &mut []).is_err());
        assert!(mem.zero(u64::MAX, 2).is_err());
        mem.zero(14, 2).unwrap();
        mem.read(14, &mut b).unwrap();
        assert_eq!(b, [0, 0]);
        mem.write_u32(0, 0x0403_0201).unwrap();
        mem.write_u16(4, 0x0605).unwrap();
        assert_eq!(mem.read_u64(0).unwrap(), 0x0000_0605_0403_0201);
        assert_eq!(mem.read_u16(1).unwrap(), 0x0302);
        assert!(mem.read_u16(15).is_err() && mem.write_u16(15, 0).is_err() && mem.write_u32(13, 0).is_err());
        assert_eq!(
            MemError::OutOfRange { gpa: 0x1000, len: 8 }.to_string(),
            "guest-physical access at 0x1000+0x8 is outside guest memory"
        );
    }

    #[test]
    fn size_display() {
        assert_eq!(Size(64 << 20).to_string(), "64 MiB");
        assert_eq!(Size(4 << 30).to_string(), "4 GiB");
        assert_eq!(Size(4096).to_string(), "4 KiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
        assert_eq!(Size(0).to_string(), "0 bytes");
    }
}
