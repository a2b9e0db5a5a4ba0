//! The `vmm` binary: a thin command-line wrapper over the `vmm` library.

fn main() {}
