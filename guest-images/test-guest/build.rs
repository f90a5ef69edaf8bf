//! Gives each guest binary its linker script and makes the output a plain (non-PIE) static ELF
//! executable, so the hypervisor can load its PT_LOAD segments at their physical addresses as is.

use std::env;
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    for (bin, script) in [
        ("test-guest", "link.ld"),
        ("real-mode-guest", "real-mode.ld"),
        ("multiboot-guest", "multiboot.ld"),
        ("bench-guest", "multiboot.ld"),
    ] {
        let script = dir.join(script);
        println!("cargo:rerun-if-changed={}", script.display());
        println!("cargo:rustc-link-arg-bin={bin}=-T{}", script.display());
        // x86_64-unknown-none links static PIEs by default; the guests run at fixed addresses with
        // nothing to apply relocations, so ask for a fixed-address executable (the last flag wins).
        println!("cargo:rustc-link-arg-bin={bin}=--no-pie");
        println!("cargo:rustc-link-arg-bin={bin}=-znorelro");
        println!("cargo:rustc-link-arg-bin={bin}=--build-id=none");
    }
}
