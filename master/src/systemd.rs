//! systemd's notify protocol (`Type=notify`): READY=1 at egg-ready,
//! STOPPING=1 at shutdown, and WATCHDOG=1 pings when `WATCHDOG_USEC` asks.
//! Without `NOTIFY_SOCKET` every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// A connection to systemd's notify socket, if there is one.
pub struct Notifier {
    /// The socket address from `NOTIFY_SOCKET`, with the datagram socket.
    target: Option<(Target, UnixDatagram)>,
    /// A failure was logged already.
    warned: std::sync::atomic::AtomicBool,
}

enum Target {
    Path(PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|raw| {
            let raw = raw.to_string_lossy().into_owned();
            let target = match raw.strip_prefix('@') {
                #[cfg(target_os = "linux")]
                Some(name) => Target::Abstract(name.as_bytes().to_vec()),
                #[cfg(not(target_os = "linux"))]
                Some(_) => return None,
                None => Target::Path(PathBuf::from(raw)),
            };
            UnixDatagram::unbound().ok().map(|s| (target, s))
        });
        Notifier {
            target,
            warned: Default::default(),
        }
    }

    /// Sends one notification; failures are logged, never fatal.
    pub fn notify(&self, state: &str) {
        let Some((target, socket)) = &self.target else {
            return;
        };
        let sent = match target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p),
            #[cfg(target_os = "linux")]
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
            }
        };
        if let Err(e) = sent {
            // Once is enough: the watchdog would repeat it every tick.
            if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, state, "cannot notify systemd (further failures are not logged)");
            }
        }
    }

    /// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is
    /// set for this process (`WATCHDOG_PID` unset or ours).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.trim() != std::process::id().to_string() {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            target: Some((Target::Path(path), UnixDatagram::unbound().expect("socket"))),
            warned: Default::default(),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).expect("a datagram");
        assert_eq!(&buf[..len], b"READY=1");
    }
}
