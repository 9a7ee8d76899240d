//! Domain types shared by the master and the SDKs.
//!
//! These are plain Rust values with no trace of the generated proto types:
//! the conversion lives in `convert.rs`, so that nothing outside this crate
//! depends on how the wire format is generated.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

/// The kind of a process in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The single agent process.
    Agent,
    /// One of the N app worker processes.
    App,
    /// The master itself, as the sender of injected messages.
    Master,
}

impl Role {
    /// The lowercase name used in environment variables and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::App => "app",
            Role::Master => "master",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not `agent`, `app` or `master`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown role {0:?}: expected \"agent\" or \"app\"")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "app" => Ok(Role::App),
            "master" => Ok(Role::Master),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

/// Where a message goes: the rows of Egg's messenger table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `broadcast`: the agent and every app worker, the sender included.
    Broadcast,
    /// `sendToApp`: every app worker, the sender included when it is an app.
    Apps,
    /// `sendToAgent`: the agent.
    Agent,
    /// `sendRandom`: one ready app worker picked by the master; from an app
    /// worker it means the agent, as in Egg.
    Random,
    /// `sendTo(pid)`: the one process with this pid.
    Pid(u32),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Broadcast => f.write_str("broadcast"),
            Target::Apps => f.write_str("sendToApp"),
            Target::Agent => f.write_str("sendToAgent"),
            Target::Random => f.write_str("sendRandom"),
            Target::Pid(pid) => write!(f, "sendTo({pid})"),
        }
    }
}

/// Who sent a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The sender's role.
    pub role: Role,
    /// The sender's pid (the master's own pid for injected messages).
    pub pid: u32,
    /// The sender's worker id when it is an app worker, else 0.
    pub worker_id: u32,
}

/// One message on its way to one receiver. Cloning is cheap: the action
/// and the payload are shared between all receivers of a fan-out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The action name.
    pub action: Arc<str>,
    /// The payload, untouched since the sender wrote it.
    pub data: Bytes,
    /// Who sent it.
    pub from: Origin,
}

/// Who a registered child is, as the master sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The role the child was launched as.
    pub role: Role,
    /// The app worker's slot (1..=N); 0 for the agent.
    pub worker_id: u32,
    /// The child's pid as the master sees it.
    pub pid: u32,
    /// The master's pid.
    pub master_pid: u32,
    /// The number of app workers in the cluster.
    pub workers: u32,
    /// How many processes have held this slot, counting this one (from 1).
    pub incarnation: u32,
}

/// A canonical gRPC status code, as used in per-send failures.
pub type Code = tonic::Code;

/// One target a send did not reach, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undelivered {
    /// The reason, as a canonical gRPC status code.
    pub code: Code,
    /// A sentence that names the problem.
    pub message: String,
    /// The target's pid, or 0 when there is none.
    pub pid: u32,
    /// The target's worker id when it is an app worker, else 0.
    pub worker_id: u32,
    /// The target's role, when known.
    pub role: Option<Role>,
}

/// The master's account of one send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendResult {
    /// The sender's id for the send.
    pub id: u64,
    /// The send's action.
    pub action: Arc<str>,
    /// Processes it was handed to.
    pub delivered: u32,
    /// Processes it is held for until they register.
    pub held: u32,
    /// Targets it did not reach.
    pub undelivered: Vec<Undelivered>,
}

/// A frame from the master to one child, in domain terms. The protocol
/// layer turns it into the wire frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// A routed message, numbered in its receiver's slot sequence.
    Message {
        /// The slot sequence number (0 until a mailbox assigns it).
        seq: u64,
        /// The message.
        delivery: Delivery,
    },
    /// Every process is ready (`egg-ready`).
    EggReady,
    /// `egg-pids`: live app pids (to the agent) or `[agentPid]` (to apps).
    EggPids(Arc<[u32]>),
    /// `agent-start`: the agent is up, with this pid.
    AgentStart {
        /// The agent's pid.
        pid: u32,
    },
    /// The outcome of one of this child's sends.
    SendResult(SendResult),
    /// The cluster is stopping.
    Shutdown {
        /// Milliseconds before the master sends SIGTERM.
        grace_ms: u32,
    },
}

/// A child's registration, the first frame on its stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The secret from `CLUTCH_SECRET`.
    pub secret: String,
    /// The claimed role; `None` when the frame left it unset.
    pub role: Option<Role>,
    /// Whether the child acknowledges handled messages.
    pub acks: bool,
}

/// A message a child asks the master to route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRequest {
    /// The sender's id for this send, echoed in its `SendResult`.
    pub id: u64,
    /// Where it goes; `None` when the route is missing or unknown.
    pub target: Option<Target>,
    /// The action name, shared with the deliveries made from it.
    pub action: Arc<str>,
    /// The payload.
    pub data: Bytes,
    /// Whether the sender wants a `SendResult` even when all went well.
    pub want_result: bool,
}

/// Why a registration was refused. Each maps to one gRPC status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The register frame had an empty secret.
    #[error("registration has no secret: pass the CLUTCH_SECRET the master gave this process")]
    MissingSecret,
    /// The register frame had no role.
    #[error("registration has no role: set it to the CLUTCH_ROLE the master gave this process")]
    MissingRole,
    /// No child was launched with this secret.
    #[error("unknown secret: this master launched no process with it")]
    UnknownSecret,
    /// The secret was already used by another stream.
    #[error("secret already used: {role} {slot} is already registered with it")]
    SecretUsed {
        /// The role of the slot that owns the secret.
        role: Role,
        /// A human name for the slot ("worker 2").
        slot: String,
    },
    /// The claimed role does not match the one the secret was issued for.
    #[error("role mismatch: the secret belongs to the {expected}, but the registration claims {claimed}")]
    RoleMismatch {
        /// The role the master launched the secret for.
        expected: Role,
        /// The role in the register frame.
        claimed: Role,
    },
    /// The master is shutting down and takes no new registrations.
    #[error("the master is shutting down")]
    ShuttingDown,
}

impl RegisterError {
    /// The gRPC status code a stream ends with for this error.
    pub fn code(&self) -> Code {
        match self {
            RegisterError::MissingSecret | RegisterError::UnknownSecret => Code::Unauthenticated,
            RegisterError::MissingRole => Code::InvalidArgument,
            RegisterError::SecretUsed { .. } => Code::AlreadyExists,
            RegisterError::RoleMismatch { .. } => Code::PermissionDenied,
            RegisterError::ShuttingDown => Code::Unavailable,
        }
    }
}
