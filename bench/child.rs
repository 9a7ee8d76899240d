//! Placeholder: the benchmark child is being written (see master/Cargo.toml).
fn main() {}
