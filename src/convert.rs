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

#[cfg(test)]
pub(crate) fn send_from_pb(s: pb::Send) -> SendRequest {
    SendRequest {
        id: s.id,
        target: target_from_pb(s.route, s.pid),
        action: Arc::from(s.action),
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

#[cfg(test)]
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

#[cfg(test)]
pub(crate) fn send_to_pb(req: SendRequest) -> pb::ClientFrame {
    let (route, pid) = req.target.map_or((pb::Route::Unspecified, 0), target_to_pb);
    pb::ClientFrame {
        kind: Some(pb::client_frame::Kind::Send(pb::Send {
            id: req.id,
            route: route as i32,
            pid,
            action: req.action.to_string(),
            data: req.data,
            want_result: req.want_result,
        })),
    }
}

// ---------------------------------------------------------------------------
// The stream codecs.
//
// Both ends of `Messenger.Attach` use these instead of the generated prost
// codec, for the two frames that carry messages (`Send` and `Message`):
// decoding reads their `action` as bytes (the same wire format as `string`)
// and turns it into an `Arc<str>` that a small per-stream cache shares
// between consecutive frames, so a stream of messages with the same action
// allocates nothing for it; encoding writes a domain `Outbound` or send
// straight into tonic's buffer, so the master copies no action per receiver
// and builds no intermediate proto value. Every other frame goes through
// the generated types. `wire_tests` checks the bytes against prost's.
// ---------------------------------------------------------------------------

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encoded_len_varint, key_len, WireType};
use prost::Message as _;
use tonic::codec::{BufferSettings, EncodeBuf, Encoder};
use tonic::Status;

use crate::grpc_body::PREFIX;

/// Encode buffer settings: tonic sends its buffer once it holds
/// [`CHUNK_BYTES`] (many frames per write under load); starting the buffer
/// larger than that saves growing it by reallocation (see
/// [`BATCH_RESERVE`]).
fn encode_buffer() -> BufferSettings {
    BufferSettings::new(BATCH_RESERVE + 8 * 1024, CHUNK_BYTES)
}

/// Action names recently seen on one stream, so that a run of messages
/// with the same action shares one `Arc<str>`.
#[derive(Default)]
pub(crate) struct Actions {
    recent: [Option<Arc<str>>; 4],
    next: usize,
}

impl Actions {
    /// The action for these bytes; an error when they are not UTF-8 (a
    /// `string` field must be).
    pub(crate) fn get(&mut self, bytes: &[u8]) -> Result<Arc<str>, Status> {
        for a in self.recent.iter().flatten() {
            if a.as_bytes() == bytes {
                return Ok(a.clone());
            }
        }
        let text = std::str::from_utf8(bytes).map_err(|_| {
            Status::internal(
                "failed to decode Protobuf message: invalid string value: data is not UTF-8 encoded",
            )
        })?;
        let action: Arc<str> = Arc::from(text);
        self.recent[self.next] = Some(action.clone());
        self.next = (self.next + 1) % self.recent.len();
        Ok(action)
    }
}

fn decode_error(e: prost::DecodeError) -> Status {
    Status::internal(e.to_string())
}

/// `ClientFrame` as the master decodes it: `Send.action` as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ClientFrameIn {
    #[prost(oneof = "ClientKindIn", tags = "1, 2, 3, 4")]
    pub kind: Option<ClientKindIn>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum ClientKindIn {
    #[prost(message, tag = "1")]
    Register(pb::Register),
    #[prost(message, tag = "2")]
    Ready(pb::Ready),
    #[prost(message, tag = "3")]
    Send(SendIn),
    #[prost(message, tag = "4")]
    Ack(pb::Ack),
}

/// `Send` with its action as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SendIn {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int32, tag = "2")]
    pub route: i32,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
    #[prost(bytes = "bytes", tag = "4")]
    pub action: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub data: Bytes,
    #[prost(bool, tag = "6")]
    pub want_result: bool,
}

/// A frame from a child, as the master reads it.
#[derive(Debug)]
pub(crate) enum FromChild {
    Register(Registration),
    Ready,
    Send(SendRequest),
    Ack(u64),
    /// A frame with no kind set.
    Empty,
}

/// The master's frames for one child, encoded as the body of its `Attach`
/// response: each frame a gRPC message (a 5-byte prefix, then the
/// `ServerFrame`). The master writes frames straight from its mailboxes
/// into this buffer — `Message` frames by hand from the domain values, the
/// rest through prost — and the response body sends what has gathered as
/// one chunk, so a burst of messages costs one body frame, not one each.
#[derive(Debug)]
pub(crate) struct ServerFrames {
    buf: BytesMut,
}

/// How much a body chunk gathers before it is sent, in both directions:
/// tonic's own figure (it measured best on these machines; 128 KiB gained
/// nothing), many frames per write under load and one when idle.
const CHUNK_BYTES: usize = 32 * 1024;

impl ServerFrames {
    pub(crate) fn new() -> Self {
        ServerFrames {
            buf: BytesMut::new(),
        }
    }

    /// Whether another frame fits in this chunk.
    pub(crate) fn has_room(&self) -> bool {
        self.buf.len() < CHUNK_BYTES
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The first frame of the stream.
    pub(crate) fn welcome(&mut self, identity: &Identity) {
        self.framed(|dst| welcome_to_pb(identity).encode_raw(dst));
    }

    /// Any later frame.
    pub(crate) fn outbound(&mut self, frame: &Outbound) {
        match frame {
            Outbound::Message { seq, delivery } => {
                self.framed(|dst| encode_message(*seq, delivery, dst))
            }
            other => self.framed(|dst| outbound_to_pb(other.clone()).encode_raw(dst)),
        }
    }

    /// What has gathered, leaving the buffer empty.
    pub(crate) fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    fn framed(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        if self.buf.is_empty() {
            // A fresh chunk: room for a whole one up front, so it grows
            // without reallocating (`BytesMut` reuses the old allocation
            // once h2 has written every chunk cut from it).
            self.buf.reserve(BATCH_RESERVE);
        }
        let at = self.buf.len();
        self.buf.put_bytes(0, PREFIX);
        encode(&mut self.buf);
        // Frames are far below 4 GiB: the hub bounds payloads.
        let len = u32::try_from(self.buf.len() - at - PREFIX).unwrap_or(u32::MAX);
        self.buf[at + 1..at + PREFIX].copy_from_slice(&len.to_be_bytes());
    }
}

#[derive(Default)]
pub(crate) struct ServerDecoder {
    actions: Actions,
}

impl crate::grpc_body::DecodeMessage for ServerDecoder {
    type Item = FromChild;
    /// Decodes one message of a child's stream (the bytes after its gRPC
    /// prefix, as `grpc_body` hands them out).
    fn decode_message(&mut self, message: Bytes) -> Result<FromChild, Status> {
        // The fast path: a frame holding one `Send` (field 3), action and
        // data its fields 4 and 5, read in place; the data is a slice of
        // the message, not a copy.
        if let Some(f) = parse_one(&message, 3, 4) {
            let action = self.actions.get(&message[f.first.clone()])?;
            let [_, id, route, pid, _, _, want_result] = f.numbers;
            return Ok(FromChild::Send(SendRequest {
                id,
                target: target_from_pb(route as i32, pid as u32),
                action,
                data: message.slice(f.second),
                want_result: want_result != 0,
            }));
        }
        let frame = <ClientFrameIn as prost::Message>::decode(message).map_err(decode_error)?;
        self.frame_from_child(frame)
    }
}

impl ServerDecoder {
    fn frame_from_child(&mut self, frame: ClientFrameIn) -> Result<FromChild, Status> {
        Ok(match frame.kind {
            None => FromChild::Empty,
            Some(ClientKindIn::Register(r)) => FromChild::Register(registration_from_pb(r)),
            Some(ClientKindIn::Ready(_)) => FromChild::Ready,
            Some(ClientKindIn::Ack(a)) => FromChild::Ack(a.seq),
            Some(ClientKindIn::Send(s)) => FromChild::Send(SendRequest {
                id: s.id,
                target: target_from_pb(s.route, s.pid),
                action: self.actions.get(&s.action)?,
                data: s.data,
                want_result: s.want_result,
            }),
        })
    }
}

fn encode_pb<M: prost::Message>(m: &M, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
    m.encode(dst)
        .map_err(|e| Status::internal(format!("cannot encode a frame: {e}")))
}

fn len_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn varint_field_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

/// An `int32` (or enum) field's value as prost encodes it: negative
/// numbers sign-extended to ten bytes.
fn int32(v: i32) -> u64 {
    i64::from(v) as u64
}

/// A frame being written: small pieces (keys, lengths, numbers, short
/// actions and payloads) are gathered on the stack and copied into the
/// destination together, so a typical frame is one copy instead of one per
/// field. Every field number here is below 16, so a key is one byte.
struct Head<'a, B: BufMut> {
    dst: &'a mut B,
    buf: [u8; 128],
    len: usize,
}

impl<'a, B: BufMut> Head<'a, B> {
    fn new(dst: &'a mut B) -> Self {
        Head {
            dst,
            buf: [0; 128],
            len: 0,
        }
    }

    /// Makes room for `n` more bytes on the stack.
    #[inline(always)]
    fn room(&mut self, n: usize) {
        if self.len + n > self.buf.len() {
            self.finish();
        }
    }

    #[inline(always)]
    fn varint(&mut self, mut v: u64) {
        self.room(10);
        while v >= 0x80 {
            self.buf[self.len] = (v as u8) | 0x80;
            self.len += 1;
            v >>= 7;
        }
        self.buf[self.len] = v as u8;
        self.len += 1;
    }

    #[inline(always)]
    fn key(&mut self, tag: u32, wire_type: WireType) {
        debug_assert!(tag < 16);
        self.room(1);
        self.buf[self.len] = ((tag << 3) | wire_type as u32) as u8;
        self.len += 1;
    }

    /// A varint field, left out when zero (proto3).
    #[inline(always)]
    fn number(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.key(tag, WireType::Varint);
            self.varint(v);
        }
    }

    /// A length-delimited field, left out when empty (proto3).
    #[inline(always)]
    fn field(&mut self, tag: u32, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.key(tag, WireType::LengthDelimited);
        self.varint(bytes.len() as u64);
        if self.len + bytes.len() <= self.buf.len() {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            self.finish();
            self.dst.put_slice(bytes);
        }
    }

    /// Writes what is gathered.
    #[inline(always)]
    fn finish(&mut self) {
        self.dst.put_slice(&self.buf[..self.len]);
        self.len = 0;
    }
}

/// Room reserved when an encoder starts a new batch (its buffer holds only
/// this frame's 5-byte gRPC header): a batch is sent once it holds
/// [`CHUNK_BYTES`], so reserving that and a frame's worth more up front lets
/// it grow without the buffer being reallocated and copied on the way
/// (`BytesMut` reuses the old allocation when h2 has written it, and
/// allocates a fresh one when not). Sizing this from the previous batch
/// instead measured no better at 32 and 128 workers.
const BATCH_RESERVE: usize = CHUNK_BYTES + 8 * 1024;

fn reserve_batch(dst: &mut EncodeBuf<'_>) {
    let used = (isize::MAX as usize).saturating_sub(dst.remaining_mut());
    if used <= 5 {
        dst.reserve(BATCH_RESERVE);
    }
}

/// `ServerFrame { message: Message { … } }`, byte for byte as prost writes it.
pub(crate) fn encode_message(seq: u64, d: &Delivery, dst: &mut impl BufMut) {
    let role = int32(role_to_pb(d.from.role) as i32);
    let (pid, worker_id) = (u64::from(d.from.pid), u64::from(d.from.worker_id));
    let len = len_field_len(1, d.action.len())
        + len_field_len(2, d.data.len())
        + varint_field_len(3, role)
        + varint_field_len(4, pid)
        + varint_field_len(5, worker_id)
        + varint_field_len(6, seq);
    let mut h = Head::new(dst);
    h.key(2, WireType::LengthDelimited);
    h.varint(len as u64);
    h.field(1, d.action.as_bytes());
    h.field(2, &d.data);
    h.number(3, role);
    h.number(4, pid);
    h.number(5, worker_id);
    h.number(6, seq);
    h.finish();
}

/// Reads a varint at `*pos` of `buf`. `None` when it is cut short or longer
/// than nine bytes: the fast paths below leave such frames to prost.
#[inline(always)]
fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let b = *buf.get(*pos)?;
    *pos += 1;
    if b < 0x80 {
        Some(u64::from(b))
    } else {
        get_long_varint(buf, pos, b)
    }
}

fn get_long_varint(buf: &[u8], pos: &mut usize, first: u8) -> Option<u64> {
    let mut v = u64::from(first & 0x7f);
    let mut shift = 7;
    while shift < 63 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
        shift += 7;
    }
    None
}

/// Reads the length of a length-delimited field at `*pos` and returns its
/// range, or `None` if it runs past `end`.
fn get_len(buf: &[u8], pos: &mut usize, end: usize) -> Option<std::ops::Range<usize>> {
    let len = usize::try_from(get_varint(buf, pos)?).ok()?;
    let start = *pos;
    let stop = start.checked_add(len).filter(|&e| e <= end)?;
    *pos = stop;
    Some(start..stop)
}

/// The fields of a frame that holds one `Send` (or one `Message`): the
/// numbers by field number (1 to 6) and the ranges of its two
/// length-delimited fields.
#[derive(Default)]
struct Fields {
    numbers: [u64; 7],
    first: std::ops::Range<usize>,
    second: std::ops::Range<usize>,
}

/// Parses `frame` if it is exactly one oneof field `kind` holding a message
/// whose fields are the varint and length-delimited ones expected for it
/// (`first_len` and `first_len + 1` length-delimited, the others varints).
/// Anything else — another kind, unknown or repeated top-level fields,
/// long varints — returns `None`, and the caller decodes it with prost, so
/// what is accepted and refused stays exactly prost's.
fn parse_one(frame: &[u8], kind: u32, first_len: u32) -> Option<Fields> {
    let mut pos = 0;
    if get_varint(frame, &mut pos)? != u64::from((kind << 3) | 2) {
        return None;
    }
    let body = get_len(frame, &mut pos, frame.len())?;
    if body.end != frame.len() {
        return None;
    }
    pos = body.start;
    let mut f = Fields::default();
    while pos < body.end {
        let key = get_varint(frame, &mut pos)?;
        if key >= 0x80 {
            return None;
        }
        let (tag, wire_type) = ((key >> 3) as u32, key & 7);
        match wire_type {
            0 if (1..=6).contains(&tag) && tag != first_len && tag != first_len + 1 => {
                f.numbers[tag as usize] = get_varint(frame, &mut pos)?;
            }
            2 if tag == first_len => f.first = get_len(frame, &mut pos, body.end)?,
            2 if tag == first_len + 1 => f.second = get_len(frame, &mut pos, body.end)?,
            _ => return None,
        }
    }
    Some(f)
}

/// `ServerFrame` as a child decodes it: `Message.action` as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ServerFrameIn {
    #[prost(oneof = "ServerKindIn", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub kind: Option<ServerKindIn>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum ServerKindIn {
    #[prost(message, tag = "1")]
    Welcome(pb::Welcome),
    #[prost(message, tag = "2")]
    Message(MessageIn),
    #[prost(message, tag = "3")]
    EggReady(pb::EggReady),
    #[prost(message, tag = "4")]
    EggPids(pb::EggPids),
    #[prost(message, tag = "5")]
    AgentStart(pb::AgentStart),
    #[prost(message, tag = "6")]
    SendResult(pb::SendResult),
    #[prost(message, tag = "7")]
    Shutdown(pb::Shutdown),
}

/// `Message` with its action as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MessageIn {
    #[prost(bytes = "bytes", tag = "1")]
    pub action: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub data: Bytes,
    #[prost(int32, tag = "3")]
    pub from_role: i32,
    #[prost(uint32, tag = "4")]
    pub from_pid: u32,
    #[prost(uint32, tag = "5")]
    pub from_worker_id: u32,
    #[prost(uint64, tag = "6")]
    pub seq: u64,
}

/// An action name a child sends, owned without a heap allocation when it
/// is short (as action names are).
#[derive(Clone, Debug)]
pub(crate) enum ActionText {
    Inline {
        len: u8,
        bytes: [u8; ActionText::INLINE],
    },
    Heap(Box<str>),
}

impl ActionText {
    const INLINE: usize = 46;

    pub(crate) fn new(action: &str) -> ActionText {
        if action.len() <= Self::INLINE {
            let mut bytes = [0u8; Self::INLINE];
            bytes[..action.len()].copy_from_slice(action.as_bytes());
            ActionText::Inline {
                len: action.len() as u8,
                bytes,
            }
        } else {
            ActionText::Heap(action.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            ActionText::Inline { len, bytes } => &bytes[..usize::from(*len)],
            ActionText::Heap(s) => s.as_bytes(),
        }
    }
}

/// A frame from a child to the master.
#[derive(Debug)]
pub(crate) enum ToMaster {
    /// Other frames, in their generated form.
    Pb(pb::ClientFrame),
    Send {
        id: u64,
        target: Target,
        action: ActionText,
        data: Bytes,
        want_result: bool,
    },
    Ack(u64),
}

/// A child's codec for `Attach`.
pub(crate) struct ClientEncoder;

impl Encoder for ClientEncoder {
    type Item = ToMaster;
    type Error = Status;
    fn encode(&mut self, item: ToMaster, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        reserve_batch(dst);
        match item {
            ToMaster::Pb(frame) => encode_pb(&frame, dst),
            ToMaster::Send {
                id,
                target,
                action,
                data,
                want_result,
            } => {
                encode_send(id, target, action.as_bytes(), &data, want_result, dst);
                Ok(())
            }
            ToMaster::Ack(seq) => {
                encode_ack(seq, dst);
                Ok(())
            }
        }
    }
    fn buffer_settings(&self) -> BufferSettings {
        encode_buffer()
    }
}

/// `ClientFrame { send: Send { … } }`, byte for byte as prost writes it.
pub(crate) fn encode_send(
    id: u64,
    target: Target,
    action: &[u8],
    data: &[u8],
    want_result: bool,
    dst: &mut impl BufMut,
) {
    let (route, pid) = target_to_pb(target);
    let (route, pid) = (int32(route as i32), u64::from(pid));
    let len = varint_field_len(1, id)
        + varint_field_len(2, route)
        + varint_field_len(3, pid)
        + len_field_len(4, action.len())
        + len_field_len(5, data.len())
        + varint_field_len(6, want_result.into());
    let mut h = Head::new(dst);
    h.key(3, WireType::LengthDelimited);
    h.varint(len as u64);
    h.number(1, id);
    h.number(2, route);
    h.number(3, pid);
    h.field(4, action);
    h.field(5, data);
    h.number(6, want_result.into());
    h.finish();
}

/// `ClientFrame { ack: Ack { seq } }`.
pub(crate) fn encode_ack(seq: u64, dst: &mut impl BufMut) {
    let mut h = Head::new(dst);
    h.key(4, WireType::LengthDelimited);
    h.varint(varint_field_len(1, seq) as u64);
    h.number(1, seq);
    h.finish();
}

#[derive(Default)]
pub(crate) struct ClientDecoder {
    actions: Actions,
}

impl crate::grpc_body::DecodeMessage for ClientDecoder {
    type Item = Option<Inbound>;
    /// Decodes one message from the master (the bytes after its gRPC
    /// prefix, as `grpc_body` hands them out). `None`: a frame of a kind
    /// this client does not know, skipped.
    fn decode_message(&mut self, message: Bytes) -> Result<Option<Inbound>, Status> {
        // The fast path: a frame holding one `Message` (field 2), action and
        // data its fields 1 and 2, read in place (see the master's decoder).
        if let Some(f) = parse_one(&message, 2, 1) {
            let action = self.actions.get(&message[f.first.clone()])?;
            let [_, _, _, role, pid, worker_id, seq] = f.numbers;
            return Ok(Some(Inbound::Outbound(Outbound::Message {
                seq,
                delivery: Delivery {
                    action,
                    data: message.slice(f.second),
                    from: Origin {
                        role: role_from_pb(role as i32).unwrap_or(Role::Master),
                        pid: pid as u32,
                        worker_id: worker_id as u32,
                    },
                },
            })));
        }
        let frame = <ServerFrameIn as prost::Message>::decode(message).map_err(decode_error)?;
        self.inbound(frame)
    }
}

impl ClientDecoder {
    fn inbound(&mut self, f: ServerFrameIn) -> Result<Option<Inbound>, Status> {
        use pb::server_frame::Kind;
        let kind = match f.kind {
            None => return Ok(None),
            Some(ServerKindIn::Message(m)) => {
                return Ok(Some(Inbound::Outbound(Outbound::Message {
                    seq: m.seq,
                    delivery: Delivery {
                        action: self.actions.get(&m.action)?,
                        data: m.data,
                        from: Origin {
                            role: role_from_pb(m.from_role).unwrap_or(Role::Master),
                            pid: m.from_pid,
                            worker_id: m.from_worker_id,
                        },
                    },
                })))
            }
            Some(ServerKindIn::Welcome(w)) => Kind::Welcome(w),
            Some(ServerKindIn::EggReady(e)) => Kind::EggReady(e),
            Some(ServerKindIn::EggPids(p)) => Kind::EggPids(p),
            Some(ServerKindIn::AgentStart(a)) => Kind::AgentStart(a),
            Some(ServerKindIn::SendResult(r)) => Kind::SendResult(r),
            Some(ServerKindIn::Shutdown(s)) => Kind::Shutdown(s),
        };
        Ok(outbound_from_pb(frame(kind)))
    }
}

#[cfg(test)]
mod wire_tests {
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Agent), Just(Role::App), Just(Role::Master)]
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            Just(Target::Broadcast),
            Just(Target::Apps),
            Just(Target::Agent),
            Just(Target::Random),
            any::<u32>().prop_map(Target::Pid),
        ]
    }

    proptest! {
        /// A response body chunk is the gRPC messages tonic would write:
        /// per frame an uncompressed 5-byte prefix with the length, then
        /// exactly prost's bytes, in order.
        #[test]
        fn body_chunks_are_grpc_messages_of_prost_bytes(
            messages in prop::collection::vec((".{0,20}", prop::collection::vec(any::<u8>(), 0..200), any::<u64>()), 0..20),
            pid in any::<u32>(),
        ) {
            let mut frames = ServerFrames::new();
            let identity = Identity {
                role: Role::App,
                worker_id: 1,
                pid,
                master_pid: 1,
                incarnation: 2,
                workers: 2,
            };
            frames.welcome(&identity);
            let mut expected = vec![welcome_to_pb(&identity).encode_to_vec()];
            for (i, (action, data, seq)) in messages.into_iter().enumerate() {
                let delivery = Delivery {
                    action: Arc::from(action.as_str()),
                    data: Bytes::from(data),
                    from: Origin { role: Role::Agent, pid, worker_id: 0 },
                };
                let out = if i % 3 == 2 {
                    Outbound::EggPids(Arc::from(vec![pid, 7]))
                } else {
                    Outbound::Message { seq, delivery }
                };
                frames.outbound(&out);
                expected.push(outbound_to_pb(out).encode_to_vec());
            }
            let chunk = frames.take();
            prop_assert!(frames.is_empty());
            let mut rest = &chunk[..];
            for body in expected {
                prop_assert!(rest.len() >= 5);
                prop_assert_eq!(rest[0], 0, "not compressed");
                let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                prop_assert_eq!(&rest[5..5 + len], &body[..]);
                rest = &rest[5 + len..];
            }
            prop_assert!(rest.is_empty());
        }

        /// The hand-written `Message` frame is the bytes prost writes for
        /// the generated type, and a child reads it back unchanged.
        #[test]
        fn message_frames_match_prost(
            action in ".{0,40}",
            data in prop::collection::vec(any::<u8>(), 0..300),
            role in role(),
            pid in any::<u32>(),
            worker_id in prop_oneof![Just(0u32), any::<u32>()],
            seq in prop_oneof![Just(0u64), any::<u64>()],
        ) {
            let delivery = Delivery {
                action: Arc::from(action.as_str()),
                data: Bytes::from(data),
                from: Origin { role, pid, worker_id },
            };
            let mut ours = Vec::new();
            encode_message(seq, &delivery, &mut ours);
            let generated = outbound_to_pb(Outbound::Message { seq, delivery: delivery.clone() });
            prop_assert_eq!(&ours, &generated.encode_to_vec());
            let back = ServerFrameIn::decode(ours.as_slice()).expect("decodes");
            match ClientDecoder::default().inbound(back) {
                Ok(Some(Inbound::Outbound(Outbound::Message { seq: s, delivery: d }))) => {
                    prop_assert_eq!(s, seq);
                    prop_assert_eq!(d, delivery);
                }
                _ => prop_assert!(false, "not a message"),
            }
        }

        /// The same for `Send`, read back by the master.
        #[test]
        fn send_frames_match_prost(
            id in prop_oneof![Just(0u64), any::<u64>()],
            target in target(),
            action in ".{0,60}",
            data in prop::collection::vec(any::<u8>(), 0..300),
            want_result in any::<bool>(),
        ) {
            let mut ours = Vec::new();
            encode_send(id, target, action.as_bytes(), &data, want_result, &mut ours);
            let generated = send_to_pb(SendRequest {
                id,
                target: Some(target),
                action: Arc::from(action.as_str()),
                data: Bytes::from(data.clone()),
                want_result,
            });
            prop_assert_eq!(&ours, &generated.encode_to_vec());
            let back = ClientFrameIn::decode(ours.as_slice()).expect("decodes");
            match back.kind {
                Some(ClientKindIn::Send(s)) => {
                    prop_assert_eq!(s.id, id);
                    prop_assert_eq!(target_from_pb(s.route, s.pid), Some(target));
                    prop_assert_eq!(&s.action[..], action.as_bytes());
                    prop_assert_eq!(&s.data[..], &data[..]);
                    prop_assert_eq!(s.want_result, want_result);
                }
                _ => prop_assert!(false, "not a send"),
            }
        }

        /// And for `Ack`.
        #[test]
        fn ack_frames_match_prost(seq in prop_oneof![Just(0u64), any::<u64>()]) {
            let mut ours = Vec::new();
            encode_ack(seq, &mut ours);
            prop_assert_eq!(ours, ack_to_pb(seq).encode_to_vec());
        }

        /// Whatever a client sends, the master's decoder reads the frames
        /// the generated type reads, and refuses the others.
        #[test]
        fn the_master_reads_what_the_generated_type_reads(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let generated = pb::ClientFrame::decode(bytes.as_slice());
            let ours = ClientFrameIn::decode(bytes.as_slice());
            match (generated, ours) {
                (Ok(g), Ok(o)) => match (g.kind, o.kind) {
                    (Some(pb::client_frame::Kind::Send(g)), Some(ClientKindIn::Send(o))) => {
                        prop_assert_eq!(g.action.as_bytes(), &o.action[..]);
                        prop_assert_eq!(g.data, o.data);
                    }
                    (g, o) => prop_assert_eq!(g.is_some(), o.is_some()),
                },
                // A non-UTF-8 action: prost refuses it, the master's decoder
                // refuses it after reading the bytes.
                (Err(_), Ok(o)) => match o.kind {
                    Some(ClientKindIn::Send(s)) => prop_assert!(Actions::default().get(&s.action).is_err()),
                    _ => prop_assert!(false, "only a bad action may differ"),
                },
                (Ok(_), Err(e)) => prop_assert!(false, "ours refused what prost read: {}", e),
                (Err(_), Err(_)) => {}
            }
        }
    }

    /// A frame made of arbitrary fields (numbers 0 to 8, varint or
    /// length-delimited), nested one level, so that the fast decoding paths
    /// meet both well-formed and odd frames.
    /// Mostly with the wire type the message's field has (`first_len` and
    /// the next one length-delimited), sometimes not.
    fn fields(max: usize, first_len: u32) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            (
                0u32..9,
                any::<u8>(),
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 0..12),
            ),
            0..max,
        )
        .prop_map(move |fields| {
            let mut out = Vec::new();
            for (tag, odd, n, bytes) in fields {
                let expected = tag != first_len && tag != first_len + 1;
                let varint = if odd < 240 { expected } else { odd % 2 == 0 };
                if varint {
                    prost::encoding::encode_key(tag.max(1), WireType::Varint, &mut out);
                    prost::encoding::encode_varint([0, n & 0xff, n][(n % 3) as usize], &mut out);
                } else {
                    prost::encoding::encode_key(tag.max(1), WireType::LengthDelimited, &mut out);
                    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
                    out.extend(bytes);
                }
            }
            out
        })
    }

    fn framed(kind: u32, body: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_key(kind, WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(body.len() as u64, &mut out);
        out.extend(body);
        out
    }

    proptest! {
        /// Whatever the fast path reads from a `Send` frame, prost reads the
        /// same; a frame the fast path leaves alone goes to prost anyway.
        #[test]
        fn the_fast_send_path_reads_what_prost_reads(
            body in fields(8, 4),
            kind in prop_oneof![Just(3u32), 1u32..6],
            tail in prop_oneof![Just(Vec::new()), fields(2, 4)],
        ) {
            let mut frame = framed(kind, body);
            frame.extend(tail);
            if let Some(f) = parse_one(&frame, 3, 4) {
                let prost = ClientFrameIn::decode(frame.as_slice());
                match prost.map(|p| p.kind) {
                    Ok(Some(ClientKindIn::Send(s))) => {
                        let [_, id, route, pid, _, _, want] = f.numbers;
                        prop_assert_eq!(s.id, id);
                        prop_assert_eq!(s.route, route as i32);
                        prop_assert_eq!(s.pid, pid as u32);
                        prop_assert_eq!(&s.action[..], &frame[f.first.clone()]);
                        prop_assert_eq!(&s.data[..], &frame[f.second.clone()]);
                        prop_assert_eq!(s.want_result, want != 0);
                    }
                    other => prop_assert!(false, "fast path read a frame prost reads as {:?}", other),
                }
            }
        }

        /// The same for `Message` frames on the child's side.
        #[test]
        fn the_fast_message_path_reads_what_prost_reads(
            body in fields(8, 1),
            kind in prop_oneof![Just(2u32), 1u32..8],
            tail in prop_oneof![Just(Vec::new()), fields(2, 1)],
        ) {
            let mut frame = framed(kind, body);
            frame.extend(tail);
            if let Some(f) = parse_one(&frame, 2, 1) {
                let prost = ServerFrameIn::decode(frame.as_slice());
                match prost.map(|p| p.kind) {
                    Ok(Some(ServerKindIn::Message(m))) => {
                        let [_, _, _, role, pid, worker_id, seq] = f.numbers;
                        prop_assert_eq!(&m.action[..], &frame[f.first.clone()]);
                        prop_assert_eq!(&m.data[..], &frame[f.second.clone()]);
                        prop_assert_eq!(m.from_role, role as i32);
                        prop_assert_eq!(m.from_pid, pid as u32);
                        prop_assert_eq!(m.from_worker_id, worker_id as u32);
                        prop_assert_eq!(m.seq, seq);
                    }
                    other => prop_assert!(false, "fast path read a frame prost reads as {:?}", other),
                }
            }
        }
    }

    #[test]
    fn the_fast_paths_take_the_frames_the_encoders_write() {
        let delivery = Delivery {
            action: Arc::from("tick"),
            data: Bytes::from_static(b"{\"n\":1}"),
            from: Origin {
                role: Role::App,
                pid: 4242,
                worker_id: 2,
            },
        };
        let mut frame = Vec::new();
        encode_message(7, &delivery, &mut frame);
        let f = parse_one(&frame, 2, 1).expect("fast path");
        assert_eq!(&frame[f.first.clone()], b"tick");
        assert_eq!(&frame[f.second.clone()], b"{\"n\":1}");
        assert_eq!(f.numbers[3..], [2, 4242, 2, 7]);
        let mut frame = Vec::new();
        encode_send(9, Target::Pid(77), b"tock", b"[]", true, &mut frame);
        let f = parse_one(&frame, 3, 4).expect("fast path");
        assert_eq!(&frame[f.first.clone()], b"tock");
        assert_eq!(&frame[f.second.clone()], b"[]");
        assert_eq!(f.numbers[1..4], [9, 5, 77]);
        assert_eq!(f.numbers[6], 1);
    }

    #[test]
    fn actions_are_shared_and_checked() {
        let mut a = Actions::default();
        let x = a.get(b"tick").expect("utf-8");
        let y = a.get(b"tick").expect("utf-8");
        assert!(Arc::ptr_eq(&x, &y));
        for other in ["a", "b", "c", "d", "e"] {
            a.get(other.as_bytes()).expect("utf-8");
        }
        assert_eq!(&*a.get(b"tick").expect("utf-8"), "tick");
        assert!(a.get(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn long_and_short_actions_keep_their_text() {
        for s in ["", "a", &"x".repeat(46), &"y".repeat(47), &"z".repeat(300)] {
            assert_eq!(ActionText::new(s).as_bytes(), s.as_bytes());
        }
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
            if let Ok(frame) = ClientFrameIn::decode(bytes.as_slice()) {
                let _ = ServerDecoder::default().frame_from_child(frame);
            }
            if let Ok(frame) = pb::ClientFrame::decode(bytes.as_slice()) {
                if let Some(pb::client_frame::Kind::Send(s)) = frame.kind {
                    let _ = send_from_pb(s);
                }
            }
        }

        /// And the same for what a client reads from the master.
        #[test]
        fn arbitrary_server_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(frame) = pb::ServerFrame::decode(bytes.as_slice()) {
                let _ = outbound_from_pb(frame);
            }
            if let Ok(frame) = ServerFrameIn::decode(bytes.as_slice()) {
                let _ = ClientDecoder::default().inbound(frame);
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
