//! The operator side: the `Admin` service (inject, list, watch, restart,
//! reload, shutdown), gRPC health and reflection, and the admin-token check.
//!
//! As with the messenger, this adapter speaks the wire format and hands the
//! master domain values: the master implements [`Operator`] and never sees a
//! generated type. Injected JSON (`google.protobuf.Value`) becomes UTF-8
//! JSON text here, so the master forwards it like any other payload.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use prost_types::value::Kind;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::admin_server::{Admin, AdminServer};
use crate::types::{Role, Target, Undelivered};

/// The encoded descriptors of every Clutch service, for reflection.
const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/clutch_descriptor.bin"));

/// A message an operator injects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inject {
    /// The action.
    pub action: String,
    /// The payload as UTF-8 JSON text.
    pub data: Bytes,
    /// Where it goes.
    pub target: Target,
}

/// What became of an injected message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// Processes it was handed to.
    pub delivered: u32,
    /// Processes it is held for.
    pub held: u32,
    /// Targets it missed.
    pub undelivered: Vec<Undelivered>,
}

/// One slot and its current process, for `List`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Agent or app.
    pub role: Role,
    /// 0 for the agent, 1..=N for apps.
    pub worker_id: u32,
    /// The current pid, 0 if none.
    pub pid: u32,
    /// idle, spawned, registered, ready, detached, exited or failed.
    pub state: &'static str,
    /// Processes that have held the slot.
    pub incarnation: u32,
    /// Milliseconds since the current process was spawned.
    pub uptime_ms: u64,
    /// Frames held in its mailbox.
    pub pending: u64,
    /// Messages handed to it.
    pub delivered: u64,
    /// Frames its mailbox refused.
    pub dropped: u64,
}

/// A lifecycle event, for `Watch`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// spawned, registered, ready, egg-ready, exited, restarting, failed,
    /// shutdown or lagged.
    pub kind: &'static str,
    /// The process's role; `None` for cluster-wide events.
    pub role: Option<Role>,
    /// Its worker id.
    pub worker_id: u32,
    /// Its pid.
    pub pid: u32,
    /// Its incarnation.
    pub incarnation: u32,
    /// For exited: the exit code, or -1 for a signal.
    pub exit_code: i32,
    /// For exited: the signal, or 0.
    pub signal: i32,
    /// For restarting: the delay.
    pub delay_ms: u64,
    /// For lagged: the events missed.
    pub count: u64,
    /// A sentence for people.
    pub message: String,
}

/// Which process `Restart` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartTarget {
    /// The agent.
    Agent,
    /// An app worker by slot.
    Worker(u32),
    /// Whichever process has this pid.
    Pid(u32),
}

/// A process that `Restart` is replacing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restarting {
    /// Its role.
    pub role: Role,
    /// Its worker id.
    pub worker_id: u32,
    /// The pid being replaced.
    pub old_pid: u32,
}

/// One app worker replaced by `Reload`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replaced {
    /// The slot.
    pub worker_id: u32,
    /// The pid before.
    pub old_pid: u32,
    /// The pid after.
    pub new_pid: u32,
}

/// The events of `Watch`.
pub type EventStream = Pin<Box<dyn Stream<Item = LifecycleEvent> + Send>>;

/// What the master does for an operator.
#[tonic::async_trait]
pub trait Operator: Send + Sync + 'static {
    /// Routes an injected message.
    async fn inject(&self, inject: Inject) -> Result<Injected, Status>;
    /// Lists every slot.
    async fn list(&self) -> Result<Vec<ProcessInfo>, Status>;
    /// Follows lifecycle events.
    fn watch(&self) -> EventStream;
    /// Restarts one process.
    async fn restart(&self, target: RestartTarget) -> Result<Restarting, Status>;
    /// Rolling restart of every app worker.
    async fn reload(&self) -> Result<Vec<Replaced>, Status>;
    /// Begins a graceful stop.
    async fn shutdown(&self) -> Result<(), Status>;
}

/// Who presents a bearer credential on an admin RPC.
pub trait Gatekeeper: Send + Sync + 'static {
    /// `Ok` for the admin token; an UNAUTHENTICATED or PERMISSION_DENIED
    /// status otherwise.
    fn check(&self, bearer: &str) -> Result<(), Status>;
}

/// The admin-token interceptor: the one place that reads `authorization`.
#[derive(Clone)]
pub struct BearerAuth {
    /// Decides what a presented credential may do.
    gate: Arc<dyn Gatekeeper>,
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <admin token>` metadata")
        })?;
        let text = header
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata must be `Bearer <admin token>`")
            })?;
        self.gate.check(token.trim())?;
        Ok(request)
    }
}

/// The `Admin` service behind the bearer-token check.
pub fn service<O: Operator>(
    operator: O,
    gate: Arc<dyn Gatekeeper>,
    max_message: usize,
) -> InterceptedService<AdminServer<AdminAdapter<O>>, BearerAuth> {
    let server = AdminServer::new(AdminAdapter {
        operator: Arc::new(operator),
    })
    .max_decoding_message_size(max_message);
    InterceptedService::new(server, BearerAuth { gate })
}

/// Adds the services that need no token to `routes`: gRPC health and
/// server reflection in both v1 and v1alpha, so that every grpcurl version
/// can `list` and `describe` without the .proto files. Returns the handle
/// that sets the health status (NOT_SERVING until told otherwise).
pub async fn add_public_services(
    routes: &mut tonic::service::RoutesBuilder,
) -> Result<Health, tonic_reflection::server::Error> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTORS)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTORS)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let handle = Health { reporter };
    handle.set(false).await;
    routes
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(health);
    Ok(handle)
}

/// Sets the overall status ("") that probes read.
#[derive(Clone)]
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
}

impl Health {
    /// SERVING when `serving`, else NOT_SERVING, for the whole server and for
    /// each Clutch service.
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for name in ["", "clutch.v1.Messenger", "clutch.v1.Admin"] {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Implements the generated `Admin` trait over an [`Operator`].
pub struct AdminAdapter<O> {
    /// The master's side.
    operator: Arc<O>,
}

#[tonic::async_trait]
impl<O: Operator> Admin for AdminAdapter<O> {
    async fn inject(
        &self,
        request: Request<pb::InjectRequest>,
    ) -> Result<Response<pb::InjectReply>, Status> {
        let r = request.into_inner();
        let target = parse_target(&r.to, r.pid)?;
        let data = match r.data {
            None => Bytes::from_static(b"null"),
            Some(v) => Bytes::from(serde_json::to_vec(&json_of(v)?).map_err(|e| {
                Status::invalid_argument(format!("data cannot be written as JSON: {e}"))
            })?),
        };
        let out = self
            .operator
            .inject(Inject {
                action: r.action,
                data,
                target,
            })
            .await?;
        Ok(Response::new(pb::InjectReply {
            delivered: out.delivered,
            held: out.held,
            undelivered: out
                .undelivered
                .into_iter()
                .map(crate::convert::undelivered_to_pb)
                .collect(),
        }))
    }

    async fn list(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let processes = self
            .operator
            .list()
            .await?
            .into_iter()
            .map(|p| pb::Process {
                role: p.role.to_string(),
                worker_id: p.worker_id,
                pid: p.pid,
                state: p.state.to_owned(),
                incarnation: p.incarnation,
                restarts: p.incarnation.saturating_sub(1),
                uptime_ms: p.uptime_ms,
                pending: p.pending,
                delivered: p.delivered,
                dropped: p.dropped,
            })
            .collect();
        Ok(Response::new(pb::ListReply { processes }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let events = self.operator.watch().map(|e| {
            Ok(pb::Event {
                at_ms: e.at_ms,
                kind: e.kind.to_owned(),
                role: e.role.map(|r| r.to_string()).unwrap_or_default(),
                worker_id: e.worker_id,
                pid: e.pid,
                incarnation: e.incarnation,
                exit_code: e.exit_code,
                signal: e.signal,
                delay_ms: e.delay_ms,
                count: e.count,
                message: e.message,
            })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn restart(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::RestartReply>, Status> {
        let r = request.into_inner();
        let target = match (r.agent, r.worker_id, r.pid) {
            (true, 0, 0) => RestartTarget::Agent,
            (false, id, 0) if id > 0 => RestartTarget::Worker(id),
            (false, 0, pid) if pid > 0 => RestartTarget::Pid(pid),
            (false, 0, 0) => {
                return Err(Status::invalid_argument(
                    "say which process: set one of worker_id, pid or agent",
                ))
            }
            _ => {
                return Err(Status::invalid_argument(
                    "set only one of worker_id, pid or agent",
                ))
            }
        };
        let r = self.operator.restart(target).await?;
        Ok(Response::new(pb::RestartReply {
            role: r.role.to_string(),
            worker_id: r.worker_id,
            old_pid: r.old_pid,
        }))
    }

    async fn reload(
        &self,
        _: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadReply>, Status> {
        let replaced = self
            .operator
            .reload()
            .await?
            .into_iter()
            .map(|r| pb::Replaced {
                worker_id: r.worker_id,
                old_pid: r.old_pid,
                new_pid: r.new_pid,
            })
            .collect();
        Ok(Response::new(pb::ReloadReply { replaced }))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        self.operator.shutdown().await?;
        Ok(Response::new(pb::ShutdownReply {}))
    }
}

/// Reads `to` (and `pid`) of an inject request.
fn parse_target(to: &str, pid: u32) -> Result<Target, Status> {
    let target = match to {
        "broadcast" => Target::Broadcast,
        "apps" => Target::Apps,
        "agent" => Target::Agent,
        "random" => Target::Random,
        "pid" if pid > 0 => Target::Pid(pid),
        "pid" => {
            return Err(Status::invalid_argument(
                "`to` is \"pid\" but `pid` is not set",
            ))
        }
        "" => {
            return Err(Status::invalid_argument(
                "`to` is required: one of broadcast, apps, agent, random, pid",
            ))
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown `to` {other:?}: expected one of broadcast, apps, agent, random, pid"
            )))
        }
    };
    if pid > 0 && !matches!(target, Target::Pid(_)) {
        return Err(Status::invalid_argument(format!(
            "`pid` is only used with `to: \"pid\"`, not with {to:?}"
        )));
    }
    Ok(target)
}

/// `google.protobuf.Value` as JSON. Numbers are doubles on the wire;
/// integral ones are written without a fraction, so `42` stays `42`.
fn json_of(v: prost_types::Value) -> Result<serde_json::Value, Status> {
    Ok(match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::NumberValue(n)) => number(n)?,
        Some(Kind::ListValue(l)) => serde_json::Value::Array(
            l.values
                .into_iter()
                .map(json_of)
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| Ok((k, json_of(v)?)))
                .collect::<Result<BTreeMap<_, _>, Status>>()?
                .into_iter()
                .collect(),
        ),
    })
}

fn number(n: f64) -> Result<serde_json::Value, Status> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: doubles are exact integers below it
    if n.fract() == 0.0 && n.abs() <= EXACT {
        return Ok(serde_json::Value::from(n as i64));
    }
    serde_json::Number::from_f64(n)
        .map(serde_json::Value::Number)
        .ok_or_else(|| {
            Status::invalid_argument(format!("data holds {n}, which JSON cannot represent"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    #[test]
    fn injected_json_keeps_integers_nesting_and_unicode() {
        let mut fields = BTreeMap::new();
        fields.insert("n".to_string(), v(Kind::NumberValue(42.0)));
        fields.insert("x".to_string(), v(Kind::NumberValue(1.5)));
        fields.insert("s".to_string(), v(Kind::StringValue("héllo ✓".into())));
        fields.insert("z".to_string(), v(Kind::NullValue(0)));
        fields.insert(
            "l".to_string(),
            v(Kind::ListValue(prost_types::ListValue {
                values: vec![v(Kind::BoolValue(true))],
            })),
        );
        let json = json_of(v(Kind::StructValue(prost_types::Struct { fields }))).expect("valid");
        assert_eq!(
            json,
            serde_json::json!({"n": 42, "x": 1.5, "s": "héllo ✓", "z": null, "l": [true]})
        );
        assert!(json_of(v(Kind::NumberValue(f64::NAN))).is_err());
    }

    #[test]
    fn targets_are_read_with_precise_errors() {
        assert_eq!(parse_target("apps", 0).ok(), Some(Target::Apps));
        assert_eq!(parse_target("pid", 7).ok(), Some(Target::Pid(7)));
        assert!(parse_target("pid", 0).is_err_and(|s| s.message().contains("pid")));
        assert!(parse_target("everyone", 0).is_err_and(|s| s.message().contains("everyone")));
        assert!(parse_target("", 0).is_err_and(|s| s.code() == tonic::Code::InvalidArgument));
        assert!(parse_target("apps", 3).is_err());
    }
}
