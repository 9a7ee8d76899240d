//! # clutch — the protocol layer
//!
//! Clutch runs Egg.js's master / agent / worker cluster model as a gRPC
//! control plane. This crate is its protocol layer, and the only crate that
//! knows the generated proto types:
//!
//! - [`types`]: the domain values (roles, targets, deliveries, frames) that
//!   the master and the SDKs exchange with this crate;
//! - [`env`]: the environment variables a child is configured with;
//! - [`server`]: the master side of the `Messenger` stream, over a
//!   [`server::Hub`] that the master implements;
//! - [`admin`]: the operator side: the `Admin` service (inject, list,
//!   watch, restart, reload, shutdown), health, reflection and the
//!   admin-token interceptor, over an [`admin::Operator`] the master
//!   implements;
//! - [`client`]: the child side, the core that `agent-sdk` and `worker-sdk`
//!   wrap;
//! - `convert` (private): wire ⇄ domain conversions;
//! - `grpc_body` (private): a gRPC body split into its messages, no copy;
//! - `send_queue` (private): the client's bounded queue of frames to write;
//! - `spin` (private): the polling window after a frame.
//!
//! The wire format is `proto/clutch/v1/messenger.proto`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod client;
mod convert;
pub mod env;
mod grpc_body;
mod send_queue;
pub mod server;
mod spin;
pub mod types;

/// The largest HTTP/2 frame either end of a `Messenger` stream accepts
/// (HTTP/2's default is 16 KiB): each end writes frames in chunks of up to
/// 32 KiB, and each chunk going as one DATA frame halves the frames to
/// parse and lets sockets be read in larger pieces (fewer system calls per
/// message). The master's listener and the SDK's channel both set it.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// The generated code. Private: everything outside this crate uses [`types`].
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("clutch.v1");
}

/// Path of the protoc binary this crate was built with (from the
/// `protoc-bin-vendored` crate). The conformance suite uses it to generate
/// the Go client, so no system protoc is needed.
#[doc(hidden)]
pub const VENDORED_PROTOC: &str = env!("CLUTCH_VENDORED_PROTOC");

pub use client::{Client, ConnectError, ConnectOptions, DecodeError, Message, Receipt, SendError};
pub use types::{
    Code, Delivery, Identity, Origin, Outbound, RegisterError, Registration, Role, SendRequest,
    SendResult, Target, Undelivered,
};
