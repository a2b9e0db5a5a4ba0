//! Host memory path benchmark (placeholder while being written).
fn main() {}
