//! A raw gRPC client for the cases the Rust SDK cannot produce: a stream
//! whose first frame is not `register`, a second `register`, a child that
//! registers and never reads, a thousand streams that never register, the
//! admin `List` call.
//!
//! The generated proto types are private to the `clutch` crate and `prost`
//! is not a dependency of the `master` package, so frames are encoded and
//! decoded here by hand, following the field numbers of
//! `proto/clutch/v1/messenger.proto` and `admin.proto`. Protobuf's wire
//! format is small: varints, and length-delimited fields. Calls go through
//! tonic's generic `Grpc` client with a codec that passes bytes through.

#![allow(dead_code)]

use std::time::Duration;

use bytes::{Buf, BufMut};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

// ---- the codec -------------------------------------------------------------------

/// Passes encoded messages through as bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

/// The encoder half of [`RawCodec`].
#[derive(Debug, Default)]
pub struct RawEncoder;

/// The decoder half of [`RawCodec`].
#[derive(Debug, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

// ---- protobuf wire format ------------------------------------------------------------

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

fn put_varint(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(buf, field, 0);
        varint(buf, v);
    }
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(buf, field, 2);
    varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// One decoded field.
#[derive(Clone, Debug)]
enum Value {
    Varint(u64),
    Bytes(Vec<u8>),
}

/// Splits a message into (field number, value) pairs.
fn fields(mut buf: &[u8]) -> Result<Vec<(u32, Value)>, String> {
    fn read_varint(buf: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some((&b, rest)) = buf.split_first() else {
                return Err("truncated varint".into());
            };
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let k = read_varint(&mut buf)?;
        let field = (k >> 3) as u32;
        match k & 7 {
            0 => out.push((field, Value::Varint(read_varint(&mut buf)?))),
            2 => {
                let len = read_varint(&mut buf)? as usize;
                if buf.len() < len {
                    return Err(format!("field {field}: truncated bytes"));
                }
                out.push((field, Value::Bytes(buf[..len].to_vec())));
                buf = &buf[len..];
            }
            1 => buf = buf.get(8..).ok_or("truncated fixed64")?,
            5 => buf = buf.get(4..).ok_or("truncated fixed32")?,
            w => return Err(format!("field {field}: unsupported wire type {w}")),
        }
    }
    Ok(out)
}

/// Field accessors over a decoded message.
struct Fields(Vec<(u32, Value)>);

impl Fields {
    fn parse(buf: &[u8]) -> Result<Fields, String> {
        fields(buf).map(Fields)
    }

    fn u64(&self, field: u32) -> u64 {
        self.0
            .iter()
            .rev()
            .find_map(|(f, v)| match v {
                Value::Varint(n) if *f == field => Some(*n),
                _ => None,
            })
            .unwrap_or(0)
    }

    fn u32(&self, field: u32) -> u32 {
        self.u64(field) as u32
    }

    fn bytes(&self, field: u32) -> Vec<u8> {
        self.0
            .iter()
            .rev()
            .find_map(|(f, v)| match v {
                Value::Bytes(b) if *f == field => Some(b.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn string(&self, field: u32) -> String {
        String::from_utf8_lossy(&self.bytes(field)).into_owned()
    }

    fn all_bytes(&self, field: u32) -> Vec<Vec<u8>> {
        self.0
            .iter()
            .filter_map(|(f, v)| match v {
                Value::Bytes(b) if *f == field => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    /// A repeated uint32, packed or not.
    fn packed_u32(&self, field: u32) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        for (f, v) in &self.0 {
            if *f != field {
                continue;
            }
            match v {
                Value::Varint(n) => out.push(*n as u32),
                Value::Bytes(b) => {
                    // A packed run is a concatenation of varints; decode it
                    // as fields of a fake message would not work, so by hand.
                    let mut rest: &[u8] = b;
                    while !rest.is_empty() {
                        let mut n = 0u64;
                        let mut shift = 0;
                        loop {
                            let (&byte, tail) = rest.split_first().ok_or("truncated packed")?;
                            rest = tail;
                            n |= u64::from(byte & 0x7f) << shift;
                            shift += 7;
                            if byte < 0x80 {
                                break;
                            }
                        }
                        out.push(n as u32);
                    }
                }
            }
        }
        Ok(out)
    }
}

// ---- messenger.proto -------------------------------------------------------------------

/// `Role`.
pub const ROLE_AGENT: u64 = 1;
/// `Role`.
pub const ROLE_APP: u64 = 2;
/// `Role`.
pub const ROLE_MASTER: u64 = 3;

/// `Route`.
pub const ROUTE_BROADCAST: u64 = 1;
/// `Route`.
pub const ROUTE_APPS: u64 = 2;
/// `Route`.
pub const ROUTE_AGENT: u64 = 3;
/// `Route`.
pub const ROUTE_RANDOM: u64 = 4;
/// `Route`.
pub const ROUTE_PID: u64 = 5;

/// `ClientFrame{register{secret, role, acks}}`.
pub fn register(secret: &str, role: u64, acks: bool) -> Vec<u8> {
    let mut inner = Vec::new();
    if !secret.is_empty() {
        put_bytes(&mut inner, 1, secret.as_bytes());
    }
    put_varint(&mut inner, 2, role);
    put_varint(&mut inner, 3, u64::from(acks));
    let mut frame = Vec::new();
    put_bytes(&mut frame, 1, &inner);
    frame
}

/// `ClientFrame{ready{}}`.
pub fn ready() -> Vec<u8> {
    let mut frame = Vec::new();
    put_bytes(&mut frame, 2, &[]);
    frame
}

/// `ClientFrame{ack{seq}}`.
pub fn ack(seq: u64) -> Vec<u8> {
    let mut inner = Vec::new();
    put_varint(&mut inner, 1, seq);
    let mut frame = Vec::new();
    put_bytes(&mut frame, 4, &inner);
    frame
}

/// `ClientFrame{}`: no kind set.
pub fn empty() -> Vec<u8> {
    Vec::new()
}

/// A `Send`.
#[derive(Clone, Debug)]
pub struct Send {
    /// `Send.id`.
    pub id: u64,
    /// `Send.route` (0: unspecified).
    pub route: u64,
    /// `Send.pid`.
    pub pid: u32,
    /// `Send.action`.
    pub action: String,
    /// `Send.data`.
    pub data: Vec<u8>,
    /// `Send.want_result`.
    pub want_result: bool,
}

impl Send {
    /// A send with a result, of `data` along `route`.
    pub fn new(id: u64, route: u64, action: &str, data: &[u8]) -> Send {
        Send {
            id,
            route,
            pid: 0,
            action: action.to_owned(),
            data: data.to_vec(),
            want_result: true,
        }
    }

    /// `ClientFrame{send{…}}`.
    pub fn frame(&self) -> Vec<u8> {
        let mut inner = Vec::new();
        put_varint(&mut inner, 1, self.id);
        put_varint(&mut inner, 2, self.route);
        put_varint(&mut inner, 3, u64::from(self.pid));
        if !self.action.is_empty() {
            put_bytes(&mut inner, 4, self.action.as_bytes());
        }
        if !self.data.is_empty() {
            put_bytes(&mut inner, 5, &self.data);
        }
        put_varint(&mut inner, 6, u64::from(self.want_result));
        let mut frame = Vec::new();
        put_bytes(&mut frame, 3, &inner);
        frame
    }
}

/// `Welcome`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub role: u64,
    pub worker_id: u32,
    pub pid: u32,
    pub master_pid: u32,
    pub workers: u32,
    pub incarnation: u32,
}

/// `Undelivered`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undelivered {
    /// A gRPC code number.
    pub code: i32,
    pub message: String,
    pub pid: u32,
    pub worker_id: u32,
    pub role: u64,
}

/// `SendResult`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendResult {
    pub id: u64,
    pub action: String,
    pub delivered: u32,
    pub held: u32,
    pub undelivered: Vec<Undelivered>,
}

/// A decoded `ServerFrame`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    Welcome(Welcome),
    Message {
        action: String,
        data: Vec<u8>,
        from_role: u64,
        from_pid: u32,
        from_worker_id: u32,
        seq: u64,
    },
    EggReady,
    EggPids(Vec<u32>),
    AgentStart(u32),
    SendResult(SendResult),
    Shutdown(u32),
    /// No kind, or a kind this decoder does not know.
    Other,
}

/// Decodes a `ServerFrame`.
pub fn decode(frame: &[u8]) -> Result<ServerFrame, String> {
    let top = Fields::parse(frame)?;
    let Some((field, Value::Bytes(body))) = top.0.last().cloned() else {
        return Ok(ServerFrame::Other);
    };
    let f = Fields::parse(&body)?;
    Ok(match field {
        1 => ServerFrame::Welcome(Welcome {
            role: f.u64(1),
            worker_id: f.u32(2),
            pid: f.u32(3),
            master_pid: f.u32(4),
            workers: f.u32(5),
            incarnation: f.u32(6),
        }),
        2 => ServerFrame::Message {
            action: f.string(1),
            data: f.bytes(2),
            from_role: f.u64(3),
            from_pid: f.u32(4),
            from_worker_id: f.u32(5),
            seq: f.u64(6),
        },
        3 => ServerFrame::EggReady,
        4 => ServerFrame::EggPids(f.packed_u32(1)?),
        5 => ServerFrame::AgentStart(f.u32(1)),
        6 => {
            let mut undelivered = Vec::new();
            for u in f.all_bytes(5) {
                let u = Fields::parse(&u)?;
                undelivered.push(Undelivered {
                    code: u.u64(1) as i32,
                    message: u.string(2),
                    pid: u.u32(3),
                    worker_id: u.u32(4),
                    role: u.u64(5),
                });
            }
            ServerFrame::SendResult(SendResult {
                id: f.u64(1),
                action: f.string(2),
                delivered: f.u32(3),
                held: f.u32(4),
                undelivered,
            })
        }
        7 => ServerFrame::Shutdown(f.u32(1)),
        _ => ServerFrame::Other,
    })
}

// ---- calls ------------------------------------------------------------------------------

/// A new HTTP/2 connection to the master.
pub async fn connect(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid endpoint")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the master at {addr}: {e}"))
}

/// One `Messenger.Attach` stream opened by the test.
pub struct Attached {
    /// Frames to the master.
    pub tx: mpsc::Sender<Vec<u8>>,
    /// Frames from the master.
    pub rx: Streaming<Vec<u8>>,
}

impl Attached {
    /// Sends one frame.
    pub async fn send(&self, frame: Vec<u8>) {
        self.tx
            .send(frame)
            .await
            .expect("the request stream is open");
    }

    /// The next frame, decoded; `Err` with the status the stream ended with
    /// (or `Status::ok` text "the stream ended" if it ended cleanly).
    pub async fn next(&mut self) -> Result<ServerFrame, Status> {
        match tokio::time::timeout(Duration::from_secs(30), self.rx.message()).await {
            Err(_) => Err(Status::deadline_exceeded(
                "the test waited 30 s for a frame from the master",
            )),
            Ok(Ok(Some(bytes))) => {
                decode(&bytes).map_err(|e| Status::internal(format!("undecodable frame: {e}")))
            }
            Ok(Ok(None)) => Err(Status::ok("the stream ended")),
            Ok(Err(status)) => Err(status),
        }
    }

    /// Reads frames until one matches; fails on the end of the stream.
    pub async fn until(&mut self, what: &str, pred: impl Fn(&ServerFrame) -> bool) -> ServerFrame {
        loop {
            match self.next().await {
                Ok(frame) if pred(&frame) => return frame,
                Ok(_) => {}
                Err(status) => panic!("waiting for {what}: the stream ended with {status:?}"),
            }
        }
    }
}

/// Opens `Messenger.Attach` on `channel` with these frames queued first
/// (the master answers only after it read the first frame), keeping the
/// request stream open. `Err` is the status the call was refused with.
pub async fn attach(channel: &Channel, first: Vec<Vec<u8>>) -> Result<Attached, Status> {
    attach_with(channel, first, Vec::new()).await
}

/// Like [`attach`], with extra request metadata (`key`, `value`).
pub async fn attach_with(
    channel: &Channel,
    first: Vec<Vec<u8>>,
    metadata: Vec<(&'static str, String)>,
) -> Result<Attached, Status> {
    let (tx, rx) = mpsc::channel(1024);
    for frame in first {
        tx.send(frame).await.expect("the channel has room");
    }
    let mut request = Request::new(ReceiverStream::new(rx));
    for (k, v) in metadata {
        request
            .metadata_mut()
            .insert(k, v.parse().expect("an ASCII metadata value"));
    }
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let response = grpc
        .streaming(
            request,
            PathAndQuery::from_static("/clutch.v1.Messenger/Attach"),
            RawCodec,
        )
        .await?;
    Ok(Attached {
        tx,
        rx: response.into_inner(),
    })
}

/// Opens `Messenger.Attach` and sends nothing, ever; returns how the master
/// ended the call.
pub async fn attach_silent(channel: Channel) -> Status {
    let request = Request::new(futures_util::stream::pending::<Vec<u8>>());
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Status::unavailable(format!("channel not ready: {e}"));
    }
    let call = grpc.streaming(
        request,
        PathAndQuery::from_static("/clutch.v1.Messenger/Attach"),
        RawCodec,
    );
    match call.await {
        Err(status) => status,
        Ok(mut response) => match response.get_mut().message().await {
            Err(status) => status,
            Ok(_) => Status::ok("the master accepted a stream that never registered"),
        },
    }
}

/// Opens `Messenger.Attach` and ends the request side at once, before any
/// frame; returns how the master ended the call.
pub async fn attach_closed(channel: Channel) -> Status {
    let request = Request::new(futures_util::stream::empty::<Vec<u8>>());
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Status::unavailable(format!("channel not ready: {e}"));
    }
    let call = grpc.streaming(
        request,
        PathAndQuery::from_static("/clutch.v1.Messenger/Attach"),
        RawCodec,
    );
    match call.await {
        Err(status) => status,
        Ok(_) => Status::ok("the master accepted a stream that closed before registering"),
    }
}

/// One process in the admin `List` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub role: String,
    pub worker_id: u32,
    pub pid: u32,
    pub state: String,
    pub incarnation: u32,
    pub restarts: u32,
    pub uptime_ms: u64,
    pub pending: u64,
    pub delivered: u64,
    pub dropped: u64,
}

/// A unary admin call with an empty request and this admin token; the
/// reply's bytes.
async fn admin_call(channel: &Channel, token: &str, path: &'static str) -> Result<Vec<u8>, Status> {
    let mut request = Request::new(Vec::new());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("an ASCII token"),
    );
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    Ok(grpc
        .unary(request, PathAndQuery::from_static(path), RawCodec)
        .await?
        .into_inner())
}

/// `Admin.List` with this admin token.
pub async fn admin_list(channel: &Channel, token: &str) -> Result<Vec<Process>, Status> {
    let reply = admin_call(channel, token, "/clutch.v1.Admin/List").await?;
    let top = Fields::parse(&reply).map_err(Status::internal)?;
    top.all_bytes(1)
        .iter()
        .map(|p| {
            let f = Fields::parse(p).map_err(Status::internal)?;
            Ok(Process {
                role: f.string(1),
                worker_id: f.u32(2),
                pid: f.u32(3),
                state: f.string(4),
                incarnation: f.u32(5),
                restarts: f.u32(6),
                uptime_ms: f.u64(7),
                pending: f.u64(8),
                delivered: f.u64(9),
                dropped: f.u64(10),
            })
        })
        .collect()
}

/// One slot replaced by `Admin.Reload`: (worker id, old pid, new pid).
pub type Replaced = (u32, u32, u32);

/// `Admin.Reload` with this admin token; returns when the reload is done.
pub async fn admin_reload(channel: &Channel, token: &str) -> Result<Vec<Replaced>, Status> {
    let reply = admin_call(channel, token, "/clutch.v1.Admin/Reload").await?;
    let top = Fields::parse(&reply).map_err(Status::internal)?;
    top.all_bytes(1)
        .iter()
        .map(|r| {
            let f = Fields::parse(r).map_err(Status::internal)?;
            Ok((f.u32(1), f.u32(2), f.u32(3)))
        })
        .collect()
}
