//! The environment variables through which the master configures a child.
//! Every language's SDK reads the same names.

/// `host:port` of the master's gRPC listener.
pub const ADDR: &str = "CLUTCH_ADDR";
/// The per-child, single-use registration secret.
pub const SECRET: &str = "CLUTCH_SECRET";
/// `agent` or `app`.
pub const ROLE: &str = "CLUTCH_ROLE";
/// The app worker's slot, 1..=N (0 for the agent).
pub const WORKER_ID: &str = "CLUTCH_WORKER_ID";
/// How many processes have held this slot, counting this one.
pub const INCARNATION: &str = "CLUTCH_INCARNATION";
/// The number of app workers in the cluster.
pub const WORKERS: &str = "CLUTCH_WORKERS";
/// How long, in microseconds, the SDK's dispatcher keeps polling after a
/// frame before it sleeps (0: it sleeps at once). See the master's
/// `[latency] idle_spin_us`.
pub const IDLE_SPIN_US: &str = "CLUTCH_IDLE_SPIN_US";
