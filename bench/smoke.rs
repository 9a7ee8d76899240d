//! Placeholder: the benchmark smoke test is being written.
