//! The client core that both Rust SDKs wrap.
//!
//! A [`Client`] is one child's attachment to the master: it registers, keeps
//! the stream open, dispatches incoming messages to handlers in arrival
//! order, and matches the master's send results to the sends that asked for
//! them. The SDK crates put a role-specific face on it.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;

use futures_util::{FutureExt, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::EncodeBody;
use tonic::codegen::http;
use tonic::transport::Endpoint;
use tower::Service as _;

use crate::convert::{self, ActionText, ClientDecoder, ClientEncoder, Inbound, ToMaster};
use crate::grpc_body::Messages;
use crate::send_queue::{self, TrySendError};
use crate::types::{Code, Identity, Origin, Outbound, Role, SendResult, Target, Undelivered};

/// The action name under which `egg-ready` reaches `on` handlers.
pub const EGG_READY: &str = "egg-ready";
/// The action name under which `egg-pids` reaches `on` handlers (data: a JSON list of pids).
pub const EGG_PIDS: &str = "egg-pids";
/// The action name under which `agent-start` reaches `on` handlers.
pub const AGENT_START: &str = "agent-start";

/// Handled messages after which an ack goes out even if more are waiting.
const ACK_EVERY: u64 = 64;
/// How long the stream must stay quiet before an ack covers the messages
/// handled since the last one. Under a flow of messages acks go out every
/// [`ACK_EVERY`]; acking each time the dispatcher catches up instead cost
/// an ack frame per few messages (and the master a router lock each).
/// tokio's timer rounds this up to its 1 ms tick.
const ACK_IDLE: Duration = Duration::from_millis(1);

/// How many messages without a handler are kept, before `ready()`, for
/// handlers registered later. Past this the oldest are dropped with a warning.
const EARLY_BUFFER: usize = 4096;
/// Capacity of a `subscribe` stream. A full stream makes the dispatcher wait,
/// which in turn slows the master's delivery to this process.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// How to reach the master and who to register as.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `host:port` of the master.
    pub addr: String,
    /// The single-use secret the master issued for this process.
    pub secret: String,
    /// The role to register as.
    pub role: Role,
    /// Exit the process when the master lets it go, as Egg's children do:
    /// code 0 once the shutdown hooks have run after a shutdown notice, and
    /// code 1 when the stream to the master breaks. On by default.
    pub exit_on_disconnect: bool,
    /// Acknowledge handled messages, so that the master re-delivers to this
    /// slot's next process whatever this one had not handled when it died.
    /// On by default.
    pub acks: bool,
    /// Frames that may wait to be written to the master before a send waits
    /// (at least 1). The batch the request stream is encoding is held
    /// besides, so at most twice this many frames are in the process.
    pub send_buffer: usize,
    /// After a frame from the master, how long the dispatcher keeps polling
    /// for the next one before it sleeps (zero: at once). It trades CPU
    /// time right after traffic for not paying a wake-up per message; the
    /// master passes its `[latency] idle_spin_us` in `CLUTCH_IDLE_SPIN_US`.
    pub idle_spin: Duration,
}

impl ConnectOptions {
    /// Reads `CLUTCH_ADDR`, `CLUTCH_SECRET` and `CLUTCH_ROLE`, and checks that
    /// the role is the one this program expects to be.
    pub fn from_env(expected: Role) -> Result<Self, ConnectError> {
        let var =
            |name: &'static str| std::env::var(name).map_err(|_| ConnectError::MissingEnv(name));
        let addr = var(crate::env::ADDR)?;
        let secret = var(crate::env::SECRET)?;
        let role_text = var(crate::env::ROLE)?;
        let role: Role =
            role_text
                .parse()
                .map_err(|e: crate::types::UnknownRole| ConnectError::BadEnv {
                    var: crate::env::ROLE,
                    reason: e.to_string(),
                })?;
        if role != expected {
            return Err(ConnectError::BadEnv {
                var: crate::env::ROLE,
                reason: format!(
                    "this program is a {expected}, but the master launched it as {role}"
                ),
            });
        }
        let idle_spin = match std::env::var(crate::env::IDLE_SPIN_US) {
            Err(_) => Duration::ZERO,
            Ok(text) => text
                .trim()
                .parse()
                .map(Duration::from_micros)
                .map_err(|_| ConnectError::BadEnv {
                    var: crate::env::IDLE_SPIN_US,
                    reason: format!("{text:?} is not a whole number of microseconds"),
                })?,
        };
        Ok(ConnectOptions {
            addr,
            secret,
            role,
            exit_on_disconnect: true,
            acks: true,
            send_buffer: 1024,
            idle_spin,
        })
    }
}

/// Why connecting to the master failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A variable the master always sets is missing: not started by a master?
    #[error(
        "environment variable {0} is not set: is this process running under the Clutch master?"
    )]
    MissingEnv(&'static str),
    /// A variable has a value this SDK cannot use.
    #[error("environment variable {var}: {reason}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The master could not be reached.
    #[error("cannot reach the master: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The master refused the registration.
    #[error("the master refused the registration ({code:?}): {message}")]
    Rejected {
        /// The gRPC status code.
        code: Code,
        /// The master's explanation.
        message: String,
    },
    /// The master answered something this SDK does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The data could not be encoded as JSON.
    #[error("cannot encode the data of {action:?} as JSON: {source}")]
    Encode {
        /// The action being sent.
        action: String,
        /// serde_json's reason.
        source: serde_json::Error,
    },
    /// At least one target did not get the message (see each reason).
    #[error("{action:?} did not reach {} target(s): {}", failures.len(), describe(failures))]
    Undelivered {
        /// The action sent.
        action: String,
        /// Processes it did reach.
        delivered: u32,
        /// Processes it is held for.
        held: u32,
        /// The targets it missed, each with a code and a reason.
        failures: Vec<Undelivered>,
    },
    /// The stream to the master is gone.
    #[error("the connection to the master is closed")]
    Disconnected,
}

fn describe(failures: &[Undelivered]) -> String {
    failures
        .iter()
        .map(|f| format!("{:?}: {}", f.code, f.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl SendError {
    /// The gRPC code of the first failure, if the master reported one.
    pub fn code(&self) -> Option<Code> {
        match self {
            SendError::Undelivered { failures, .. } => failures.first().map(|f| f.code),
            _ => None,
        }
    }

    /// True when the target pid does not exist (Egg's silent `sendTo` loss).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }
}

/// Why a received message could not be read as the requested type.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode the data of {action:?}: {source}")]
pub struct DecodeError {
    /// The message's action.
    pub action: String,
    /// serde_json's reason.
    pub source: serde_json::Error,
}

/// What the master did with a send that asked for a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Processes the message was handed to.
    pub delivered: u32,
    /// Processes it is held for until they register.
    pub held: u32,
}

/// A message delivered to this process.
#[derive(Clone, Debug)]
pub struct Message {
    /// The action name.
    pub action: Arc<str>,
    /// The payload as sent: UTF-8 JSON by convention.
    pub data: Bytes,
    /// Who sent it.
    pub from: Origin,
}

impl Message {
    /// Reads the payload as JSON into `T`. Empty data reads as JSON `null`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let text: &[u8] = if self.data.is_empty() {
            b"null"
        } else {
            &self.data
        };
        serde_json::from_slice(text).map_err(|source| DecodeError {
            action: self.action.to_string(),
            source,
        })
    }
}

type OnHandler = Arc<dyn Fn(Message) + Send + Sync>;
type OnceHandler = Box<dyn FnOnce(Message) + Send>;
type UndeliveredHandler = Arc<dyn Fn(SendResult) + Send + Sync>;
type ShutdownHook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

enum Handler {
    On(OnHandler),
    Once(Option<OnceHandler>),
    Stream(mpsc::Sender<Message>),
}

impl Handler {
    /// Runs an `on` or `once` handler on `message`; returns whether it stays
    /// registered. A `subscribe` stream is not fed here (feeding it may
    /// wait): see `Dispatcher::deliver_waiting`.
    fn run(&mut self, message: Message) -> bool {
        match self {
            Handler::On(f) => {
                call(message, |m| f(m));
                true
            }
            Handler::Once(f) => {
                if let Some(f) = f.take() {
                    call(message, f);
                }
                false
            }
            Handler::Stream(_) => true,
        }
    }
}

/// Changes to the handler table. They are applied by the dispatcher task
/// before it reads the next frame, so a handler registered before a message
/// arrives always sees it.
enum Command {
    Subscribe(Arc<str>, Handler),
    /// `ready()` was called: stop keeping unhandled messages for later.
    StopBuffering,
}

/// Shared state between the client handles and the dispatcher task.
struct Inner {
    /// Who the master says we are.
    identity: Identity,
    /// Frames to the master; bounded, so a fast sender waits for the socket.
    frames: send_queue::Sender<Queued>,
    /// Send ids, unique per client.
    next_id: AtomicU64,
    /// Sends waiting for their result, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<SendResult>>>,
    /// Handler changes not yet applied by the dispatcher.
    commands: Mutex<Vec<Command>>,
    /// Wakes the dispatcher when `commands` grows.
    commands_changed: Notify,
    /// Set when `commands` is not empty, so the dispatcher looks at it
    /// without taking the lock per message.
    commands_pending: AtomicBool,
    /// Called with results of fire-and-forget sends that missed a target.
    on_undelivered: Mutex<Option<UndeliveredHandler>>,
    /// Whether `ready` was sent (it is sent once).
    ready_sent: AtomicBool,
    /// Becomes true at `egg-ready`.
    egg_ready: watch::Sender<bool>,
    /// The last `egg-pids`.
    egg_pids: watch::Sender<Arc<[u32]>>,
    /// Becomes `Some(grace_ms)` at the master's shutdown notice.
    shutdown: watch::Sender<Option<u32>>,
    /// Becomes true when the stream to the master has ended.
    closed: watch::Sender<bool>,
    /// Becomes true when the stream has ended and the SDK leaves the process
    /// to its owner (`exit_on_disconnect` off). While the SDK is going to
    /// end the process itself, it never does, so code awaiting
    /// [`Client::closed`] cannot return from `main` first and change the
    /// exit code, or cut the shutdown hooks short.
    released: watch::Sender<bool>,
    /// Run when the shutdown notice arrives, before the process exits.
    shutdown_hooks: Mutex<Vec<ShutdownHook>>,
    /// Whether to exit the process on shutdown or disconnection.
    exit_on_disconnect: bool,
    /// The highest message sequence number handled, for the last ack.
    handled: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A handler panic is caught before it can poison these locks; if one is
    // poisoned anyway, the data is still consistent (every critical section
    // is a single insert or take), so carry on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One child's connection to the master. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("identity", &self.inner.identity)
            .finish()
    }
}

impl Client {
    /// Connects to the master, registers, and starts dispatching.
    pub async fn connect(opts: ConnectOptions) -> Result<Client, ConnectError> {
        let mut channel = dial(&opts.addr).await?;
        let (frames, rx) = send_queue::channel(opts.send_buffer);
        // The master answers the call only after it has read the register
        // frame, so the frame must be queued before the call is awaited.
        frames
            .send(Queued::Frame(ToMaster::Pb(convert::register_to_pb(
                &opts.secret,
                opts.role,
                opts.acks,
            ))))
            .await
            .map_err(|_| {
                ConnectError::Protocol("request stream closed before registering".into())
            })?;
        let rejected = |s: tonic::Status| ConnectError::Rejected {
            code: s.code(),
            message: s.message().to_owned(),
        };
        // The generated client's `attach`, by hand: the request body is
        // tonic's encoder over the protocol layer's own (see `convert.rs`);
        // the response body is read by `grpc_body`, which hands messages
        // out as slices of what arrived. No message size limit: the master
        // bounds what it sends.
        let body = tonic::body::Body::new(EncodeBody::new_client(
            ClientEncoder,
            Outgoing {
                rx,
                draining: false,
            }
            .map(Ok),
            None,
            None,
        ));
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri("/clutch.v1.Messenger/Attach")
            .version(http::Version::HTTP_2)
            .header(http::header::TE, "trailers")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(body)
            .map_err(|e| ConnectError::Protocol(format!("cannot build the Attach request: {e}")))?;
        let not_ready =
            |e: tonic::transport::Error| rejected(tonic::Status::from_error(Box::new(e)));
        let response = tower::ServiceExt::ready(&mut channel)
            .await
            .map_err(not_ready)?
            .call(request)
            .await
            .map_err(not_ready)?;
        // A refusal is a trailers-only response: the status is in the head.
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            if status.code() != tonic::Code::Ok {
                return Err(rejected(status));
            }
        }
        if response.status() != http::StatusCode::OK {
            return Err(rejected(tonic::Status::unknown(format!(
                "the master answered Attach with HTTP status {}",
                response.status()
            ))));
        }
        // The master is trusted: it bounds what it sends.
        let mut stream = Messages::new(
            response.into_body(),
            ClientDecoder::default(),
            usize::MAX,
            opts.idle_spin,
        );
        let identity = match stream.message().await.map_err(rejected)?.flatten() {
            Some(Inbound::Welcome(Some(identity))) => identity,
            Some(_) => {
                return Err(ConnectError::Protocol(
                    "the first frame from the master was not `welcome`".into(),
                ))
            }
            None => {
                return Err(ConnectError::Protocol(
                    "the master closed the stream without a welcome".into(),
                ))
            }
        };
        let inner = Arc::new(Inner {
            identity,
            frames,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            commands: Mutex::new(Vec::new()),
            commands_changed: Notify::new(),
            commands_pending: AtomicBool::new(false),
            on_undelivered: Mutex::new(None),
            ready_sent: AtomicBool::new(false),
            egg_ready: watch::Sender::new(false),
            egg_pids: watch::Sender::new(Arc::from(Vec::new())),
            shutdown: watch::Sender::new(None),
            closed: watch::Sender::new(false),
            released: watch::Sender::new(false),
            shutdown_hooks: Mutex::new(Vec::new()),
            handled: AtomicU64::new(0),
            exit_on_disconnect: opts.exit_on_disconnect,
        });
        tokio::spawn(dispatch(inner.clone(), stream));
        tracing::debug!(?identity, "registered with the master");
        Ok(Client { inner })
    }

    /// Who the master says this process is.
    pub fn identity(&self) -> Identity {
        self.inner.identity
    }

    /// Calls `handler` for every message with this action, in arrival order,
    /// on the dispatcher task. Keep it short; spawn for slow work.
    pub fn on<F>(&self, action: &str, handler: F)
    where
        F: Fn(Message) + Send + Sync + 'static,
    {
        self.command(Command::Subscribe(
            Arc::from(action),
            Handler::On(Arc::new(handler)),
        ));
    }

    /// Calls `handler` for the next message with this action only.
    pub fn once<F>(&self, action: &str, handler: F)
    where
        F: FnOnce(Message) + Send + 'static,
    {
        self.command(Command::Subscribe(
            Arc::from(action),
            Handler::Once(Some(Box::new(handler))),
        ));
    }

    /// The messages with this action as a stream. The stream is bounded: if
    /// it is not read, dispatch to this process waits for it.
    pub fn subscribe(&self, action: &str) -> impl Stream<Item = Message> + Send + 'static {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.command(Command::Subscribe(Arc::from(action), Handler::Stream(tx)));
        ReceiverStream::new(rx)
    }

    /// Replaces the default handling (a warning in the log) of fire-and-forget
    /// sends that missed a target.
    pub fn on_undelivered<F>(&self, handler: F)
    where
        F: Fn(SendResult) + Send + Sync + 'static,
    {
        *lock(&self.inner.on_undelivered) = Some(Arc::new(handler));
    }

    fn command(&self, command: Command) {
        lock(&self.inner.commands).push(command);
        self.inner.commands_pending.store(true, Ordering::Release);
        self.inner.commands_changed.notify_one();
    }

    /// Tells the master this process is ready. Idempotent.
    pub async fn ready(&self) -> Result<(), SendError> {
        if self.inner.ready_sent.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.command(Command::StopBuffering);
        self.frame(ToMaster::Pb(convert::ready_to_pb())).await
    }

    /// Waits for `egg-ready`: every process in the cluster is ready.
    pub async fn egg_ready(&self) -> Result<(), SendError> {
        let mut ready = self.inner.egg_ready.subscribe();
        let mut closed = self.inner.closed.subscribe();
        tokio::select! {
            r = ready.wait_for(|r| *r) => r.map(|_| ()).map_err(|_| SendError::Disconnected),
            _ = closed.wait_for(|c| *c) => Err(SendError::Disconnected),
        }
    }

    /// True once `egg-ready` has arrived.
    pub fn is_egg_ready(&self) -> bool {
        *self.inner.egg_ready.borrow()
    }

    /// The pids from the last `egg-pids`.
    pub fn egg_pids(&self) -> Arc<[u32]> {
        self.inner.egg_pids.borrow().clone()
    }

    /// Waits for the master's shutdown notice and returns the grace period
    /// before SIGTERM. Returns `None` if the stream ended without one.
    pub async fn shutdown_notice(&self) -> Option<Duration> {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut closed = self.inner.closed.subscribe();
        tokio::select! {
            r = shutdown.wait_for(Option::is_some) => r.ok().and_then(|g| g.map(|ms| Duration::from_millis(ms.into()))),
            _ = closed.wait_for(|c| *c) => (*self.inner.shutdown.borrow()).map(|ms| Duration::from_millis(ms.into())),
        }
    }

    /// Runs `hook` when the master's shutdown notice arrives: finish in-flight
    /// work there. Messages keep being dispatched meanwhile. Once every hook
    /// has returned the process exits with code 0 (unless
    /// `exit_on_disconnect` is off); the master sends SIGTERM if the hooks
    /// take longer than the grace period it announced.
    pub fn on_shutdown<F, Fut>(&self, hook: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        lock(&self.inner.shutdown_hooks).push(Box::new(move || Box::pin(hook())));
    }

    /// Waits until the stream to the master has ended and the process is
    /// yours to end. With `exit_on_disconnect` (the default) the SDK ends
    /// the process itself — code 0 after the shutdown hooks, 1 on a broken
    /// stream — so this never returns: it parks `main` until then.
    pub async fn closed(&self) {
        let mut released = self.inner.released.subscribe();
        let _ = released.wait_for(|c| *c).await;
    }

    /// Sends `data` (as JSON) and waits for the master's account of it.
    /// Fails if any target was not reached, e.g. NOT_FOUND for an unknown pid.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        target: Target,
        action: &str,
        data: &T,
    ) -> Result<Receipt, SendError> {
        self.send_bytes(target, action, encode(action, data)?).await
    }

    /// Egg's `broadcast`: the agent and every app worker, this process included.
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        action: &str,
        data: &T,
    ) -> Result<Receipt, SendError> {
        self.send(Target::Broadcast, action, data).await
    }

    /// Egg's `sendToApp`: every app worker (this one too, if it is an app).
    pub async fn send_to_app<T: Serialize + ?Sized>(
        &self,
        action: &str,
        data: &T,
    ) -> Result<Receipt, SendError> {
        self.send(Target::Apps, action, data).await
    }

    /// Egg's `sendToAgent`: the agent.
    pub async fn send_to_agent<T: Serialize + ?Sized>(
        &self,
        action: &str,
        data: &T,
    ) -> Result<Receipt, SendError> {
        self.send(Target::Agent, action, data).await
    }

    /// Egg's `sendTo(pid)`: the one process with this pid. An unknown pid
    /// fails with [`SendError::Undelivered`] and code NOT_FOUND.
    pub async fn send_to<T: Serialize + ?Sized>(
        &self,
        pid: u32,
        action: &str,
        data: &T,
    ) -> Result<Receipt, SendError> {
        self.send(Target::Pid(pid), action, data).await
    }

    /// Like [`Client::send`] with a payload that is already encoded.
    pub async fn send_bytes(
        &self,
        target: Target,
        action: &str,
        data: Bytes,
    ) -> Result<Receipt, SendError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, tx);
        let sent = self.frame(send_frame(id, target, action, data, true)).await;
        if let Err(e) = sent {
            lock(&self.inner.pending).remove(&id);
            return Err(e);
        }
        let result = rx.await.map_err(|_| SendError::Disconnected)?;
        if result.undelivered.is_empty() {
            Ok(Receipt {
                delivered: result.delivered,
                held: result.held,
            })
        } else {
            Err(SendError::Undelivered {
                action: action.to_owned(),
                delivered: result.delivered,
                held: result.held,
                failures: result.undelivered,
            })
        }
    }

    /// Sends `data` (as JSON) without waiting for the master's account: the
    /// fast path for streams of messages. A target that is missed is reported
    /// to the [`Client::on_undelivered`] handler.
    pub async fn emit<T: Serialize + ?Sized>(
        &self,
        target: Target,
        action: &str,
        data: &T,
    ) -> Result<(), SendError> {
        self.emit_bytes(target, action, encode(action, data)?).await
    }

    /// Like [`Client::emit`] with a payload that is already encoded.
    pub async fn emit_bytes(
        &self,
        target: Target,
        action: &str,
        data: Bytes,
    ) -> Result<(), SendError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.frame(send_frame(id, target, action, data, false))
            .await
    }

    async fn frame(&self, frame: ToMaster) -> Result<(), SendError> {
        // Without waiting when there is room (the usual case): no future
        // to build and poll.
        match self.inner.frames.try_send(Queued::Frame(frame)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(frame)) => self
                .inner
                .frames
                .send(frame)
                .await
                .map_err(|_| SendError::Disconnected),
            Err(TrySendError::Closed(_)) => Err(SendError::Disconnected),
        }
    }
}

/// Opens a channel to the master at `host:port` or `unix:/path`.
async fn dial(addr: &str) -> Result<tonic::transport::Channel, ConnectError> {
    let bad = |e: &dyn std::fmt::Display| ConnectError::BadEnv {
        var: crate::env::ADDR,
        reason: format!("{addr:?} is not host:port or unix:/path: {e}"),
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = path.to_owned();
        // The URI is required by the API but unused: the connector dials the socket.
        let endpoint =
            Endpoint::from_static("http://localhost").max_frame_size(crate::MAX_FRAME_BYTES);
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        });
        return Ok(endpoint
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(connector)
            .await?);
    }
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| bad(&e))?;
    Ok(endpoint
        .max_frame_size(crate::MAX_FRAME_BYTES)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

fn encode<T: Serialize + ?Sized>(action: &str, data: &T) -> Result<Bytes, SendError> {
    serde_json::to_vec(data)
        .map(Bytes::from)
        .map_err(|source| SendError::Encode {
            action: action.to_owned(),
            source,
        })
}

fn send_frame(id: u64, target: Target, action: &str, data: Bytes, want_result: bool) -> ToMaster {
    ToMaster::Send {
        id,
        target,
        action: ActionText::new(action),
        data,
        want_result,
    }
}

/// The dispatcher's own state: only its task touches it, so handlers run in
/// arrival order without locks around user code.
struct Dispatcher {
    /// Each action's handlers, by the index `actions` gives. Entries are
    /// never removed, so an index stays valid for the life of the client.
    handlers: Vec<Vec<Handler>>,
    /// Where each action's handlers are.
    actions: HashMap<Arc<str>, usize, BuildFnv>,
    /// The action of the last message and its index: a run of messages
    /// with one action shares one `Arc<str>` (the decoder sees to it), so
    /// the table is looked up once per run, not per message.
    last: Option<(Arc<str>, usize)>,
    /// Messages that arrived before `ready()` with no handler yet.
    early: VecDeque<Message>,
    buffering: bool,
}

impl Dispatcher {
    fn new() -> Self {
        Dispatcher {
            handlers: Vec::new(),
            actions: HashMap::default(),
            last: None,
            early: VecDeque::new(),
            buffering: true,
        }
    }

    /// Applies the pending commands (the caller has seen
    /// `commands_pending` set).
    async fn apply(&mut self, inner: &Inner) {
        // Cleared before taking the list: a command pushed meanwhile sets it
        // again and is applied on the next round at the latest.
        inner.commands_pending.store(false, Ordering::Release);
        let commands = std::mem::take(&mut *lock(&inner.commands));
        for command in commands {
            match command {
                Command::StopBuffering => {
                    self.buffering = false;
                    if !self.early.is_empty() {
                        tracing::debug!(
                            count = self.early.len(),
                            "dropping messages that no handler subscribed to before ready()"
                        );
                        self.early.clear();
                    }
                }
                Command::Subscribe(action, handler) => {
                    let index = match self.actions.get(&action) {
                        Some(&index) => index,
                        None => {
                            self.handlers.push(Vec::new());
                            self.actions.insert(action.clone(), self.handlers.len() - 1);
                            self.handlers.len() - 1
                        }
                    };
                    self.handlers[index].push(handler);
                    // Replay what arrived for this action before it had a handler.
                    let (matching, rest): (VecDeque<Message>, VecDeque<Message>) =
                        std::mem::take(&mut self.early)
                            .into_iter()
                            .partition(|m| m.action == action);
                    self.early = rest;
                    for message in matching {
                        self.deliver(message).await;
                    }
                }
            }
        }
    }

    /// Where the handlers of `action` are, if it has any.
    fn index(&mut self, action: &Arc<str>) -> Option<usize> {
        if let Some((last, index)) = &self.last {
            if Arc::ptr_eq(last, action) {
                return Some(*index);
            }
        }
        let index = *self.actions.get(action)?;
        self.last = Some((action.clone(), index));
        Some(index)
    }

    /// Delivers `message` to its handlers.
    async fn deliver(&mut self, message: Message) {
        if let Some(message) = self.deliver_now(message) {
            self.deliver_waiting(message).await;
        }
    }

    /// Delivers `message` unless one of its handlers is a `subscribe`
    /// stream (which may make the dispatcher wait): then it comes back.
    /// Every other case — `on` and `once` handlers, no handler — is
    /// handled here without a future.
    fn deliver_now(&mut self, message: Message) -> Option<Message> {
        let Some(index) = self.index(&message.action) else {
            self.unhandled(message);
            return None;
        };
        let handlers = &mut self.handlers[index];
        if handlers.iter().any(|h| matches!(h, Handler::Stream(_))) {
            return Some(message);
        }
        if handlers.is_empty() {
            self.unhandled(message);
            return None;
        }
        // The last handler takes the message itself; the others a copy.
        let mut message = Some(message);
        let mut left = handlers.len();
        handlers.retain_mut(|handler| {
            left -= 1;
            let copy = if left == 0 {
                message.take()
            } else {
                message.clone()
            };
            copy.is_none_or(|m| handler.run(m))
        });
        None
    }

    /// The general case: handlers in order, waiting for room in a full
    /// `subscribe` stream; a stream whose receiver is gone is removed.
    async fn deliver_waiting(&mut self, message: Message) {
        let Some(index) = self.index(&message.action) else {
            self.unhandled(message);
            return;
        };
        let handlers = &mut self.handlers[index];
        let mut i = 0;
        while i < handlers.len() {
            let keep = match &mut handlers[i] {
                Handler::Stream(tx) => tx.send(message.clone()).await.is_ok(),
                other => other.run(message.clone()),
            };
            if keep {
                i += 1;
            } else {
                handlers.remove(i);
            }
        }
    }

    /// A message no handler takes: kept for a later handler until
    /// `ready()`, ignored after.
    fn unhandled(&mut self, message: Message) {
        if self.buffering {
            if self.early.len() == EARLY_BUFFER {
                tracing::warn!(action = %message.action, "no handler before ready(): early-message buffer full, dropping the oldest");
                self.early.pop_front();
            }
            self.early.push_back(message);
        } else {
            tracing::debug!(action = %message.action, "no handler for this action; message ignored");
        }
    }
}

/// FNV-1a for the handler table: action names are short and come from the
/// cluster's own processes, so a fast hash beats SipHash's DoS resistance
/// on a lookup that happens for every message.
#[derive(Clone, Copy, Default)]
struct BuildFnv;

struct Fnv(u64);

impl std::hash::BuildHasher for BuildFnv {
    type Hasher = Fnv;
    fn build_hasher(&self) -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Runs a user handler; a panic is logged instead of killing the dispatcher.
fn call<F: FnOnce(Message)>(message: Message, f: F) {
    // Kept for the log line only: a handler owns the message it is given.
    let action = message.action.clone();
    if std::panic::catch_unwind(AssertUnwindSafe(|| f(message))).is_err() {
        tracing::error!(action = %action, "a message handler panicked; dispatch goes on");
    }
}

/// Tracks what to acknowledge: cumulative, and sent every [`ACK_EVERY`]
/// messages or once the stream has been quiet for [`ACK_IDLE`], so a
/// stream of messages costs a fraction of an ack each.
#[derive(Default)]
struct Acker {
    /// The highest handled message sequence number.
    handled: u64,
    /// The highest number acknowledged so far.
    acked: u64,
}

impl Acker {
    fn handled(&mut self, inner: &Inner, seq: u64) {
        self.handled = self.handled.max(seq);
        inner.handled.store(self.handled, Ordering::Relaxed);
    }

    /// Whether something handled is not acknowledged yet.
    fn pending(&self) -> bool {
        self.handled > self.acked
    }

    /// Sends an ack if one is due (`caught_up`: the stream is quiet).
    /// A full send queue defers it; a later ack covers it. Returns true when
    /// an ack was queued.
    fn flush(&mut self, inner: &Inner, caught_up: bool) -> bool {
        let behind = self.handled - self.acked;
        if behind > 0
            && (caught_up || behind >= ACK_EVERY)
            && inner
                .frames
                .try_send(Queued::Frame(ToMaster::Ack(self.handled)))
                .is_ok()
        {
            self.acked = self.handled;
            return true;
        }
        false
    }
}

/// After a shutdown notice: runs the hooks, then leaves cleanly — the last
/// ack and every queued frame go out, the request stream ends, and the
/// process exits once the master has closed the stream (or after a short
/// deadline).
async fn leave(inner: Arc<Inner>, hooks: Vec<ShutdownHook>) {
    for hook in hooks {
        hook().await;
    }
    if !inner.exit_on_disconnect {
        return;
    }
    let handled = inner.handled.load(Ordering::Relaxed);
    if inner
        .frames
        .send(Queued::Frame(ToMaster::Ack(handled)))
        .await
        .is_err()
    {
        tracing::debug!("the stream was already closed before the last ack");
    }
    let _ = inner.frames.send(Queued::Close).await;
    let mut closed = inner.closed.subscribe();
    if tokio::time::timeout(Duration::from_secs(2), closed.wait_for(|c| *c))
        .await
        .is_err()
    {
        tracing::warn!("the master did not close the stream within 2 s of ours");
    }
    tracing::info!("the master is stopping the cluster; exiting");
    std::process::exit(0);
}

/// What the client queues for the request stream.
enum Queued {
    /// A frame for the master.
    Frame(ToMaster),
    /// The process is leaving: write what is queued, then end the stream.
    Close,
}

/// The request stream: queued frames, in order, until `Close`; then what
/// is still queued, then the end of the stream.
struct Outgoing {
    rx: send_queue::Receiver<Queued>,
    draining: bool,
}

impl Stream for Outgoing {
    type Item = ToMaster;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ToMaster>> {
        use std::task::Poll;
        loop {
            let next = if self.draining {
                self.rx.try_recv()
            } else {
                match self.rx.poll_recv(cx) {
                    Poll::Ready(next) => next,
                    Poll::Pending => return Poll::Pending,
                }
            };
            match next {
                Some(Queued::Frame(frame)) => return Poll::Ready(Some(frame)),
                Some(Queued::Close) => self.draining = true,
                None => return Poll::Ready(None),
            }
        }
    }
}

/// The master's frames, as this client reads them.
type FromMaster = Messages<tonic::body::Body, ClientDecoder>;

async fn dispatch(inner: Arc<Inner>, mut stream: FromMaster) {
    let mut d = Dispatcher::new();
    let master = Origin {
        role: Role::Master,
        pid: inner.identity.master_pid,
        worker_id: 0,
    };
    let synthetic = |action: &str, data: String| Message {
        action: Arc::from(action),
        data: Bytes::from(data),
        from: master,
    };
    let mut acker = Acker::default();
    let mut quiet = Box::pin(tokio::time::sleep(ACK_IDLE));
    let ended_cleanly = loop {
        // Checked here rather than in `apply`: no future per message.
        if inner.commands_pending.load(Ordering::Acquire) {
            d.apply(&inner).await;
        }
        // `message()` is cancel-safe: polling it once and dropping it loses
        // nothing. A frame that is already here is handled before acking.
        let frame = match stream.message().now_or_never() {
            Some(frame) => {
                if acker.flush(&inner, false) {
                    // While frames keep arriving this loop never waits, and
                    // on a busy (or single-threaded) runtime the connection
                    // task would not get to write the ack until the backlog
                    // is gone: the master would see a slow reader make no
                    // progress and give up on it. Let it run.
                    tokio::task::yield_now().await;
                }
                frame
            }
            None if stream.keep_polling() => {
                tokio::task::yield_now().await;
                continue;
            }
            None if acker.pending() => {
                acker.flush(&inner, false);
                quiet.as_mut().reset(tokio::time::Instant::now() + ACK_IDLE);
                tokio::select! {
                    biased;
                    _ = inner.commands_changed.notified() => continue,
                    frame = stream.message() => frame,
                    () = &mut quiet => {
                        acker.flush(&inner, true);
                        continue;
                    }
                }
            }
            None => {
                tokio::select! {
                    biased;
                    _ = inner.commands_changed.notified() => continue,
                    frame = stream.message() => frame,
                }
            }
        };
        let out = match frame {
            Ok(Some(frame)) => match frame {
                Some(Inbound::Outbound(out)) => out,
                Some(Inbound::Welcome(_)) => {
                    tracing::warn!("ignoring a second welcome from the master");
                    continue;
                }
                None => continue,
            },
            Ok(None) => break true,
            Err(status) => {
                tracing::debug!(%status, "stream to the master failed");
                break false;
            }
        };
        match out {
            Outbound::Message { seq, delivery: m } => {
                let message = Message {
                    action: m.action,
                    data: m.data,
                    from: m.from,
                };
                // `deliver`, without a future unless a `subscribe` stream
                // takes the message.
                if let Some(message) = d.deliver_now(message) {
                    d.deliver_waiting(message).await;
                }
                acker.handled(&inner, seq);
            }
            Outbound::EggReady => {
                inner.egg_ready.send_replace(true);
                d.deliver(synthetic(EGG_READY, "null".into())).await;
            }
            Outbound::EggPids(pids) => {
                let json = serde_json::to_string(&*pids).unwrap_or_else(|_| "[]".into());
                inner.egg_pids.send_replace(pids);
                d.deliver(synthetic(EGG_PIDS, json)).await;
            }
            Outbound::AgentStart { .. } => d.deliver(synthetic(AGENT_START, "null".into())).await,
            Outbound::SendResult(result) => {
                let waiter = lock(&inner.pending).remove(&result.id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(result);
                    }
                    None if result.undelivered.is_empty() => {}
                    None => {
                        let handler = lock(&inner.on_undelivered).clone();
                        match handler {
                            Some(h) => h(result),
                            None => tracing::warn!(
                                action = %result.action,
                                failures = %describe(&result.undelivered),
                                "a message did not reach every target"
                            ),
                        }
                    }
                }
            }
            // Only the first notice counts: a later one (a restart, then
            // a shutdown) must not cut the running hooks short.
            Outbound::Shutdown { grace_ms } if inner.shutdown.borrow().is_none() => {
                inner.shutdown.send_replace(Some(grace_ms));
                let hooks = std::mem::take(&mut *lock(&inner.shutdown_hooks));
                tokio::spawn(leave(inner.clone(), hooks));
            }
            Outbound::Shutdown { .. } => {}
        }
    };
    inner.closed.send_replace(true);
    // Dropping the waiters fails every pending send with `Disconnected`.
    lock(&inner.pending).clear();
    if inner.exit_on_disconnect {
        let noticed = inner.shutdown.borrow().is_some();
        if noticed {
            // `leave` exits once the hooks are done; the master's SIGTERM
            // ends them if they overrun.
            tracing::debug!("the stream closed during shutdown");
            return;
        }
        tracing::error!(
            clean = ended_cleanly,
            "lost the connection to the master; exiting"
        );
        std::process::exit(1);
    }
    inner.released.send_replace(true);
}
