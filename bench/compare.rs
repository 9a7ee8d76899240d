//! Placeholder: the benchmark harness is being written (see master/Cargo.toml).
fn main() {}
