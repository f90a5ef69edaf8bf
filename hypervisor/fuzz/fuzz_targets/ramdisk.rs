//! The ramdisk reader (`hypervisor::ramdisk`: cpio newc): any bytes as an archive, and
//! archives the writer builds from fuzzer-chosen files, which must read back unchanged.
//!
//! Input: mode byte; mode even: the rest is the archive; mode odd: the rest describes up to 8
//! files (name length, name, data length, data) to build an archive from.
#![no_main]

use hypervisor::ramdisk::{self, ArchiveError};
use hypervisor_fuzz::Reader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mode = r.u8();
    if mode.is_multiple_of(2) {
        let bytes = r.rest();
        let result = ramdisk::parse(bytes);
        if hypervisor_fuzz::verbose() {
            eprintln!("parse: {result:?}");
        }
        match result {
            Ok(files) => {
                for (i, f) in files.iter().enumerate() {
                    assert!(!f.name.is_empty(), "empty name");
                    assert!(files[..i].iter().all(|g| g.name != f.name), "{:?} twice", f.name);
                    // Contents are a piece of the ramdisk.
                    let (start, end) = (f.data.as_ptr() as usize, f.data.as_ptr() as usize + f.data.len());
                    let (lo, hi) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
                    assert!(lo <= start && end <= hi, "{:?} outside the ramdisk", f.name);
                    assert_eq!(ramdisk::find(&files, f.name), Some(*f));
                }
            }
            Err(e) => {
                let _ = e.to_string();
                let offset = match e {
                    ArchiveError::BadMagic { offset }
                    | ArchiveError::BadField { offset }
                    | ArchiveError::Truncated { offset }
                    | ArchiveError::BadName { offset } => offset,
                    ArchiveError::MissingTrailer | ArchiveError::Duplicate(_) => 0,
                };
                assert!(offset < bytes.len().max(1), "error offset {offset} past {} bytes", bytes.len());
            }
        }
        return;
    }

    // Files the writer can represent: non-empty names without NUL and without a leading "./"
    // (the reader strips it), distinct, and not the trailer's.
    let count = usize::from(r.u8() % 9);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for _ in 0..count {
        let name = r.string(64).replace('\0', "");
        let len = usize::from(r.u16());
        let body = r.bytes(len).to_vec();
        if name.is_empty() || name.starts_with("./") || name == "TRAILER!!!" || files.iter().any(|(n, _)| *n == name) {
            continue;
        }
        files.push((name, body));
    }
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let archive = ramdisk::build(&refs);
    assert_eq!(archive.len() % 4, 0);
    let parsed = ramdisk::parse(&archive).expect("the writer's archives read back");
    assert_eq!(parsed.len(), files.len());
    for (f, (name, body)) in parsed.iter().zip(&files) {
        assert_eq!((f.name, f.data), (name.as_str(), body.as_slice()));
    }
});
