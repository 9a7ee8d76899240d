//! Conversions between the generated wire types and the domain types.
//! This file and the two adapters (`server`, `client`) are the only places
//! that name a generated type.

use std::sync::Arc;

use crate::pb;
use crate::types::{
    Code, Delivery, Identity, Origin, Outbound, Registration, Role, SendRequest, SendResult,
    Target, Undelivered,
};

pub(crate) fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Agent => pb::Role::Agent,
        Role::App => pb::Role::App,
        Role::Master => pb::Role::Master,
    }
}

/// `None` for ROLE_UNSPECIFIED and for numbers this version does not know.
pub(crate) fn role_from_pb(raw: i32) -> Option<Role> {
    match pb::Role::try_from(raw).ok()? {
        pb::Role::Unspecified => None,
        pb::Role::Agent => Some(Role::Agent),
        pb::Role::App => Some(Role::App),
        pb::Role::Master => Some(Role::Master),
    }
}

/// The wire form of a target: a route and, for `sendTo`, a pid.
pub(crate) fn target_to_pb(target: Target) -> (pb::Route, u32) {
    match target {
        Target::Broadcast => (pb::Route::Broadcast, 0),
        Target::Apps => (pb::Route::Apps, 0),
        Target::Agent => (pb::Route::Agent, 0),
        Target::Random => (pb::Route::Random, 0),
        Target::Pid(pid) => (pb::Route::Pid, pid),
    }
}

pub(crate) fn target_from_pb(route: i32, pid: u32) -> Option<Target> {
    match pb::Route::try_from(route).ok()? {
        pb::Route::Unspecified => None,
        pb::Route::Broadcast => Some(Target::Broadcast),
        pb::Route::Apps => Some(Target::Apps),
        pb::Route::Agent => Some(Target::Agent),
        pb::Route::Random => Some(Target::Random),
        pb::Route::Pid => Some(Target::Pid(pid)),
    }
}

pub(crate) fn registration_from_pb(r: pb::Register) -> Registration {
    Registration {
        secret: r.secret,
        role: role_from_pb(r.role),
        acks: r.acks,
    }
}

pub(crate) fn send_from_pb(s: pb::Send) -> SendRequest {
    SendRequest {
        id: s.id,
        target: target_from_pb(s.route, s.pid),
        action: s.action,
        data: s.data,
        want_result: s.want_result,
    }
}

pub(crate) fn welcome_to_pb(id: &Identity) -> pb::ServerFrame {
    frame(pb::server_frame::Kind::Welcome(pb::Welcome {
        role: role_to_pb(id.role) as i32,
        worker_id: id.worker_id,
        pid: id.pid,
        master_pid: id.master_pid,
        workers: id.workers,
        incarnation: id.incarnation,
    }))
}

pub(crate) fn identity_from_pb(w: pb::Welcome) -> Option<Identity> {
    Some(Identity {
        role: role_from_pb(w.role)?,
        worker_id: w.worker_id,
        pid: w.pid,
        master_pid: w.master_pid,
        workers: w.workers,
        incarnation: w.incarnation,
    })
}

fn frame(kind: pb::server_frame::Kind) -> pb::ServerFrame {
    pb::ServerFrame { kind: Some(kind) }
}

pub(crate) fn outbound_to_pb(out: Outbound) -> pb::ServerFrame {
    use pb::server_frame::Kind;
    frame(match out {
        Outbound::Message { seq, delivery: d } => Kind::Message(pb::Message {
            action: d.action.as_ref().to_owned(),
            data: d.data,
            from_role: role_to_pb(d.from.role) as i32,
            from_pid: d.from.pid,
            from_worker_id: d.from.worker_id,
            seq,
        }),
        Outbound::EggReady => Kind::EggReady(pb::EggReady {}),
        Outbound::EggPids(pids) => Kind::EggPids(pb::EggPids {
            pids: pids.to_vec(),
        }),
        Outbound::AgentStart { pid } => Kind::AgentStart(pb::AgentStart { pid }),
        Outbound::SendResult(r) => Kind::SendResult(pb::SendResult {
            id: r.id,
            action: r.action.as_ref().to_owned(),
            delivered: r.delivered,
            held: r.held,
            undelivered: r.undelivered.into_iter().map(undelivered_to_pb).collect(),
        }),
        Outbound::Shutdown { grace_ms } => Kind::Shutdown(pb::Shutdown { grace_ms }),
    })
}

pub(crate) fn undelivered_to_pb(u: Undelivered) -> pb::Undelivered {
    pb::Undelivered {
        code: u.code as i32,
        message: u.message,
        pid: u.pid,
        worker_id: u.worker_id,
        role: u.role.map_or(pb::Role::Unspecified, role_to_pb) as i32,
    }
}

/// The client side: a wire frame from the master, in domain terms. `None`
/// for an empty frame (a newer master's frame kind this SDK does not know).
pub(crate) fn outbound_from_pb(f: pb::ServerFrame) -> Option<Inbound> {
    use pb::server_frame::Kind;
    Some(match f.kind? {
        Kind::Welcome(w) => Inbound::Welcome(identity_from_pb(w)),
        Kind::Message(m) => Inbound::Outbound(Outbound::Message {
            seq: m.seq,
            delivery: Delivery {
                action: Arc::from(m.action),
                data: m.data,
                from: Origin {
                    role: role_from_pb(m.from_role).unwrap_or(Role::Master),
                    pid: m.from_pid,
                    worker_id: m.from_worker_id,
                },
            },
        }),
        Kind::EggReady(_) => Inbound::Outbound(Outbound::EggReady),
        Kind::EggPids(p) => Inbound::Outbound(Outbound::EggPids(Arc::from(p.pids))),
        Kind::AgentStart(a) => Inbound::Outbound(Outbound::AgentStart { pid: a.pid }),
        Kind::SendResult(r) => Inbound::Outbound(Outbound::SendResult(SendResult {
            id: r.id,
            action: Arc::from(r.action),
            delivered: r.delivered,
            held: r.held,
            undelivered: r
                .undelivered
                .into_iter()
                .map(|u| Undelivered {
                    code: Code::from_i32(u.code),
                    message: u.message,
                    pid: u.pid,
                    worker_id: u.worker_id,
                    role: role_from_pb(u.role),
                })
                .collect(),
        })),
        Kind::Shutdown(s) => Inbound::Outbound(Outbound::Shutdown {
            grace_ms: s.grace_ms,
        }),
    })
}

/// What a client reads off its stream.
pub(crate) enum Inbound {
    /// The first frame; `None` when it named no valid role.
    Welcome(Option<Identity>),
    /// Any later frame.
    Outbound(Outbound),
}

pub(crate) fn register_to_pb(secret: &str, role: Role, acks: bool) -> pb::ClientFrame {
    pb::ClientFrame {
        kind: Some(pb::client_frame::Kind::Register(pb::Register {
            secret: secret.to_owned(),
            role: role_to_pb(role) as i32,
            acks,
        })),
    }
}

pub(crate) fn ack_to_pb(seq: u64) -> pb::ClientFrame {
    pb::ClientFrame {
        kind: Some(pb::client_frame::Kind::Ack(pb::Ack { seq })),
    }
}

pub(crate) fn ready_to_pb() -> pb::ClientFrame {
    pb::ClientFrame {
        kind: Some(pb::client_frame::Kind::Ready(pb::Ready {})),
    }
}

pub(crate) fn send_to_pb(req: SendRequest) -> pb::ClientFrame {
    let (route, pid) = req.target.map_or((pb::Route::Unspecified, 0), target_to_pb);
    pb::ClientFrame {
        kind: Some(pb::client_frame::Kind::Send(pb::Send {
            id: req.id,
            route: route as i32,
            pid,
            action: req.action,
            data: req.data,
            want_result: req.want_result,
        })),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;

    proptest! {
        /// Untrusted bytes from a child's stream: decoding either fails
        /// cleanly or yields a frame whose conversion never panics.
        #[test]
        fn arbitrary_client_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(frame) = pb::ClientFrame::decode(bytes.as_slice()) {
                match frame.kind {
                    Some(pb::client_frame::Kind::Register(r)) => { let _ = registration_from_pb(r); }
                    Some(pb::client_frame::Kind::Send(s)) => { let _ = send_from_pb(s); }
                    _ => {}
                }
            }
        }

        /// And the same for what a client reads from the master.
        #[test]
        fn arbitrary_server_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(frame) = pb::ServerFrame::decode(bytes.as_slice()) {
                let _ = outbound_from_pb(frame);
            }
        }
    }

    #[test]
    fn every_target_survives_the_wire() {
        for t in [
            Target::Broadcast,
            Target::Apps,
            Target::Agent,
            Target::Random,
            Target::Pid(4242),
        ] {
            let (route, pid) = target_to_pb(t);
            assert_eq!(target_from_pb(route as i32, pid), Some(t));
        }
        assert_eq!(target_from_pb(0, 0), None);
        assert_eq!(target_from_pb(99, 0), None);
    }

    #[test]
    fn roles_survive_the_wire_and_unspecified_is_none() {
        for r in [Role::Agent, Role::App, Role::Master] {
            assert_eq!(role_from_pb(role_to_pb(r) as i32), Some(r));
        }
        assert_eq!(role_from_pb(0), None);
        assert_eq!(role_from_pb(-3), None);
    }
}
