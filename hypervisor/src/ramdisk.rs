//! The ramdisk archive that carries guest images and the VM configuration.
//!
//! The format is cpio "newc" (what `cpio -H newc` and Linux initramfs use), so an image can be
//! inspected with standard tools. `boot/` writes it with [`build`]; the hypervisor reads it with
//! [`parse`], which treats the bytes as untrusted and never reads out of bounds.

/// The fw_cfg file name under which QEMU runs hand the ramdisk to the hypervisor (read by
/// DMA instead of through the boot loader).
pub const FW_CFG_FILE: &str = "opt/rs-hypervisor/ramdisk";

use alloc::vec::Vec;
use core::fmt;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
const MODE_TYPE_MASK: u32 = 0o170000;
const MODE_REGULAR: u32 = 0o100000;

/// One regular file in the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct File<'a> {
    /// Path inside the archive, without a leading `./`.
    pub name: &'a str,
    /// Contents.
    pub data: &'a [u8],
}

/// Why an archive was refused; offsets are byte offsets into the ramdisk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveError {
    /// A header does not start with the newc magic.
    BadMagic {
        /// Offset of the header.
        offset: usize,
    },
    /// A header field is not 8 hexadecimal digits.
    BadField {
        /// Offset of the header.
        offset: usize,
    },
    /// A header, name or file body runs past the end of the ramdisk.
    Truncated {
        /// Offset of the entry.
        offset: usize,
    },
    /// A file name is empty, not NUL-terminated or not UTF-8.
    BadName {
        /// Offset of the entry.
        offset: usize,
    },
    /// The archive ends without the `TRAILER!!!` entry.
    MissingTrailer,
    /// Two files have the same name.
    Duplicate(alloc::string::String),
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveError::BadMagic { offset } => write!(f, "no cpio newc header at offset {offset:#x}"),
            ArchiveError::BadField { offset } => write!(f, "malformed cpio header field at offset {offset:#x}"),
            ArchiveError::Truncated { offset } => write!(f, "cpio entry at offset {offset:#x} runs past the end"),
            ArchiveError::BadName { offset } => write!(f, "bad file name in cpio entry at offset {offset:#x}"),
            ArchiveError::MissingTrailer => f.write_str("cpio archive has no TRAILER!!! entry"),
            ArchiveError::Duplicate(name) => write!(f, "file {name:?} appears twice"),
        }
    }
}

/// Parses a whole archive. An empty ramdisk is an empty archive.
pub fn parse(bytes: &[u8]) -> Result<Vec<File<'_>>, ArchiveError> {
    let mut files: Vec<File<'_>> = Vec::new();
    if bytes.is_empty() {
        return Ok(files);
    }
    let mut offset = 0;
    loop {
        let header = bytes.get(offset..offset + HEADER_LEN).ok_or(ArchiveError::Truncated { offset })?;
        if &header[..6] != MAGIC {
            return Err(ArchiveError::BadMagic { offset });
        }
        let field = |index: usize| -> Result<u32, ArchiveError> {
            let text = &header[6 + index * 8..6 + (index + 1) * 8];
            core::str::from_utf8(text)
                .ok()
                .and_then(|t| u32::from_str_radix(t, 16).ok())
                .ok_or(ArchiveError::BadField { offset })
        };
        let mode = field(1)?;
        let file_size = field(6)? as usize;
        let name_size = field(11)? as usize;

        let name_start = offset + HEADER_LEN;
        let name_end = name_start.checked_add(name_size).ok_or(ArchiveError::Truncated { offset })?;
        let raw_name = bytes.get(name_start..name_end).ok_or(ArchiveError::Truncated { offset })?;
        let name = match raw_name.split_last() {
            Some((0, name)) if !name.is_empty() => {
                core::str::from_utf8(name).map_err(|_| ArchiveError::BadName { offset })?
            }
            _ => return Err(ArchiveError::BadName { offset }),
        };
        let data_start = align4(name_end);
        let data_end = data_start.checked_add(file_size).ok_or(ArchiveError::Truncated { offset })?;
        let data = bytes.get(data_start..data_end).ok_or(ArchiveError::Truncated { offset })?;

        if name == TRAILER {
            return Ok(files);
        }
        if mode & MODE_TYPE_MASK == MODE_REGULAR {
            let name = name.strip_prefix("./").unwrap_or(name);
            if files.iter().any(|f| f.name == name) {
                return Err(ArchiveError::Duplicate(name.into()));
            }
            files.push(File { name, data });
        }
        offset = align4(data_end);
        if offset >= bytes.len() {
            return Err(ArchiveError::MissingTrailer);
        }
    }
}

/// Finds a file by name.
pub fn find<'a>(files: &[File<'a>], name: &str) -> Option<File<'a>> {
    files.iter().copied().find(|f| f.name == name)
}

/// Writes an archive of regular files (mode 0644) followed by the trailer.
pub fn build(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ino, (name, data)) in files.iter().enumerate() {
        push_entry(&mut out, ino as u32 + 1, MODE_REGULAR | 0o644, name, data);
    }
    push_entry(&mut out, 0, 0, TRAILER, &[]);
    out
}

fn push_entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(MAGIC);
    for value in fields {
        for shift in (0..8).rev() {
            out.push(b"0123456789abcdef"[(value >> (shift * 4)) as usize & 0xf]);
        }
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(align4(out.len()), 0);
    out.extend_from_slice(data);
    out.resize(align4(out.len()), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_then_parse_round_trips() {
        let image = [0xAAu8; 13];
        let bytes = build(&[("vms.conf", b"# none\n"), ("images/k.bin", &image)]);
        assert_eq!(bytes.len() % 4, 0);
        let files = parse(&bytes).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(find(&files, "vms.conf").unwrap().data, b"# none\n");
        assert_eq!(find(&files, "images/k.bin").unwrap().data, &image);
        assert_eq!(find(&files, "missing"), None);
    }

    #[test]
    fn empty_ramdisk_is_an_empty_archive() {
        assert_eq!(parse(&[]).unwrap(), []);
        assert_eq!(parse(&build(&[])).unwrap(), []);
    }

    #[test]
    fn matches_the_cpio_tool_layout() {
        // Header of `printf hi > a; echo a | cpio -o -H newc` with inode/mtime/uid zeroed.
        let bytes = build(&[("a", b"hi")]);
        let header = core::str::from_utf8(&bytes[..HEADER_LEN]).unwrap();
        assert_eq!(
            header,
            "07070100000001000081a40000000000000000000000010000000000000002000000000000000000000000000000000000000200000000"
        );
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 2], b"a\0");
        assert_eq!(&bytes[HEADER_LEN + 2..HEADER_LEN + 4], b"hi");
    }

    #[test]
    fn malformed_archives_are_refused_with_the_offset() {
        let good = build(&[("x", b"1234")]);
        let mut bad_magic = good.clone();
        bad_magic[0] = b'1';
        assert_eq!(parse(&bad_magic), Err(ArchiveError::BadMagic { offset: 0 }));

        let mut bad_field = good.clone();
        bad_field[6 + 6 * 8] = b'z';
        assert_eq!(parse(&bad_field), Err(ArchiveError::BadField { offset: 0 }));

        let mut huge = good.clone();
        huge[6 + 6 * 8..6 + 7 * 8].copy_from_slice(b"ffffffff");
        assert_eq!(parse(&huge), Err(ArchiveError::Truncated { offset: 0 }));

        let first_entry_len = align4(align4(HEADER_LEN + 2) + 4);
        assert_eq!(parse(&good[..first_entry_len]), Err(ArchiveError::MissingTrailer));
        assert_eq!(parse(&good[..50]), Err(ArchiveError::Truncated { offset: 0 }));

        let mut no_nul = good.clone();
        no_nul[HEADER_LEN + 1] = b'y';
        assert_eq!(parse(&no_nul), Err(ArchiveError::BadName { offset: 0 }));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let bytes = build(&[("a", b"1"), ("./a", b"2")]);
        assert_eq!(parse(&bytes), Err(ArchiveError::Duplicate("a".into())));
    }
}
