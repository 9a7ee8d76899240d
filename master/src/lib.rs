//! # master — the Clutch master
//!
//! Launches one agent and N app workers as subprocesses, supervises them and
//! routes their messages with Egg.js's messenger semantics. The modules, from
//! the pure core outwards:
//!
//! - [`mailbox`]: a slot's bounded queue of outbound frames (held messages and
//!   frames waiting for the stream are one mechanism);
//! - [`router`]: the pure state machine: routing, the egg-ready barrier,
//!   egg-pids, registration checks. No I/O;
//! - [`listener`]: the TCP or Unix socket the master serves on, and who may
//!   connect (connection limit, handshake deadline);
//! - [`metadata_limit`]: the tower layer that refuses oversized metadata
//!   with a precise status;
//! - [`hub`]: the edge between the gRPC streams and the router;
//! - [`restart`]: when to restart a crashed child (backoff, intensity limit);
//! - [`supervisor`]: child processes: launch, output relay, exit, signals;
//! - [`admin`]: the operator API (inject, list, watch, restart, reload,
//!   shutdown) over the router and the main loop;
//! - [`auth`]: the admin token and who may use admin RPCs;
//! - [`events`]: lifecycle events for `Watch`;
//! - [`systemd`]: the notify protocol (READY, STOPPING, WATCHDOG);
//! - [`cluster`]: the main loop tying listener, router and children together;
//! - [`config`]: the TOML file and CLI flags;
//! - [`demo`]: the built-in demo agent and workers.
//!
//! The wire protocol is the `clutch` crate's; this crate never names a
//! generated proto type.

// `deny`, not `forbid`: one function needs a syscall between fork and exec
// (the parent-death signal, in `supervisor.rs`), and says why there.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod events;
pub mod hub;
pub mod listener;
pub mod mailbox;
pub mod metadata_limit;
pub mod restart;
pub mod router;
pub mod supervisor;
pub mod systemd;
