//! The VM-set file parser (`hypervisor::vm::config`): the `[host]` section, `[vm NAME]`
//! sections and every field, CPU lists, and the list of files a set refers to.
//!
//! Input: the file's text (invalid UTF-8 is replaced, as the parser takes `&str`).
#![no_main]

use hypervisor::vm::config::{self, CpuSet, MAX_CMDLINE, MAX_MEMORY, MAX_TIMEOUT_SECONDS, MIN_MEMORY, SLICE_MS};
use libfuzzer_sys::fuzz_target;

/// A CPU list prints back to a list that parses to the same set.
fn round_trip(set: &CpuSet) {
    let text = set.to_string();
    assert_eq!(CpuSet::parse(&text).as_ref(), Ok(set), "{text:?}");
    assert_eq!(set.iter().count(), set.count());
    assert_eq!(set.first(), set.iter().next());
    assert!(set.iter().all(|cpu| cpu < CpuSet::LIMIT && set.contains(cpu)));
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count();

    // Every line on its own as a CPU list too: `cpus = ...` values.
    for line in text.lines().take(8) {
        if let Ok(set) = CpuSet::parse(line) {
            round_trip(&set);
        }
    }

    let result = config::parse_set(&text);
    if hypervisor_fuzz::verbose() {
        eprintln!("parse_set: {result:?}");
    }
    let set = match result {
        Ok(set) => set,
        Err(e) => {
            assert!(e.line >= 1 && e.line <= lines.max(1), "error at line {} of {lines}", e.line);
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("line {}", e.line)), "{shown}");
            return;
        }
    };
    assert_eq!(config::parse(&text).as_ref(), Ok(&set.vms));
    assert!(SLICE_MS.contains(&(set.host.slice_us / 1000)) && set.host.slice_us % 1000 == 0, "{:?}", set.host);
    for (i, vm) in set.vms.iter().enumerate() {
        assert!(!vm.name.is_empty() && vm.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert!(set.vms[..i].iter().all(|other| other.name != vm.name), "VM {} twice", vm.name);
        assert!(!vm.kernel.is_empty());
        assert!(vm.initrd.as_ref().is_none_or(|i| !i.is_empty()));
        assert!(vm.modules.iter().all(|m| !m.is_empty() && m.trim() == m));
        assert!(vm.cmdline.len() <= MAX_CMDLINE);
        assert!((MIN_MEMORY..=MAX_MEMORY).contains(&vm.memory) && vm.memory % (2 << 20) == 0, "{}", vm.memory);
        assert!((1..=64).contains(&vm.vcpus));
        assert!(vm.timeout_seconds.is_none_or(|s| (1..=MAX_TIMEOUT_SECONDS).contains(&s)));
        if let Some(cpus) = &vm.cpus {
            assert!(!cpus.is_empty());
            round_trip(cpus);
        }
    }
    // Every kernel, initrd and module file, once each.
    let files = config::referenced_files(&set.vms);
    for (i, f) in files.iter().enumerate() {
        assert!(!files[..i].contains(f), "{f:?} twice");
    }
    for vm in &set.vms {
        assert!(files.contains(&vm.kernel.as_str()));
        assert!(vm.initrd.as_deref().is_none_or(|i| files.contains(&i)));
        for m in &vm.modules {
            let file = config::module_file(m).expect("modules are not empty");
            assert!(files.contains(&file));
        }
    }
});
