//! Operator surface end-to-end tests with the real grpcurl (being written).
