//! Links the `vigil` binary as a position-dependent executable (`-no-pie`).
//!
//! A position-independent executable is relocated by the dynamic loader at every
//! start: it reads `.rela.dyn` (1.1 MB of it here) and writes every pointer of
//! `.data.rel.ro` (vtables, static string tables, time-zone names: 1.3 MB), which
//! turns those pages into private anonymous memory that vigil holds for life and the
//! kernel can never page out (measured: 1.3 MiB of vigil's 9.5 MiB steady resident
//! memory, and 2.4 MiB of its start-up peak). Linked at a fixed address they need no
//! relocation: the pages stay clean, file-backed, and resident only when used.
//!
//! The cost is address-space randomisation of the binary's own image (libraries, heap
//! and stacks stay randomised); Go makes the same choice by default for its Linux
//! binaries, node_exporter among them. The code itself is still compiled
//! position-independent: only the link differs.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
