//! The agent's log to syslog (config `logging_syslog`), through the `syslog` crate, whose
//! types stay in this file: RFC 3164 lines, `<PRI>TIMESTAMP testflinger-agent[PID]: message`
//! with the configured facility and the level's severity, to a Unix socket (`/dev/log` by
//! default; datagram, or stream when the socket is one), without a hostname, as the C
//! library's `syslog(3)` writes to the local daemon.
//!
//! A line that cannot be sent (the syslog daemon restarted, its socket went away) is lost
//! to syslog only: stderr and the file have it. The first failure of a run is one warning on
//! stderr, and the socket is reconnected at the first line [`RECONNECT_AFTER`] later.

use ::syslog::{Facility, Formatter3164, LoggerBackend};
use log::Level;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// The program name in every syslog line.
pub const TAG: &str = "testflinger-agent";

/// How long after a failed send the socket is connected again.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(10);

type Connection = ::syslog::Logger<LoggerBackend, Formatter3164>;

/// A connection to the syslog socket that survives the daemon's restarts.
pub struct Sink {
    facility: Facility,
    socket: PathBuf,
    connection: Option<Connection>,
    /// After a failure: when to connect again.
    retry_at: Option<SystemTime>,
}

impl Sink {
    /// Connects to `socket` for `facility` (`user`, `daemon`, `local0`..`local7`, as the
    /// config checked). The error says what failed, for a warning.
    pub fn connect(facility: &str, socket: &Path) -> Result<Sink, String> {
        let facility = Facility::from_str(facility)
            .map_err(|()| format!("unknown syslog facility {facility:?}"))?;
        let connection = open(facility, socket)?;
        Ok(Sink {
            facility,
            socket: socket.to_path_buf(),
            connection: Some(connection),
            retry_at: None,
        })
    }

    /// Sends `message` at `level`; `now` paces the reconnections.
    pub fn send(&mut self, level: Level, message: &str, now: SystemTime) {
        if self.connection.is_none() {
            if self.retry_at.is_some_and(|at| now < at) {
                return;
            }
            match open(self.facility, &self.socket) {
                Ok(connection) => self.connection = Some(connection),
                Err(_) => {
                    self.retry_at = now.checked_add(RECONNECT_AFTER);
                    return;
                }
            }
        }
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let sent = match level {
            Level::Error => connection.err(message),
            Level::Warn => connection.warning(message),
            Level::Info => connection.info(message),
            Level::Debug | Level::Trace => connection.debug(message),
        };
        if let Err(err) = sent {
            if self.retry_at.is_none() {
                // Not through `log`: this runs inside the logger.
                eprintln!(
                    "testflinger-agent: cannot send the log to syslog at {}: {err}; retrying every {}s (stderr and the log file still have every line)",
                    self.socket.display(),
                    RECONNECT_AFTER.as_secs()
                );
            }
            self.connection = None;
            self.retry_at = now.checked_add(RECONNECT_AFTER);
        } else {
            self.retry_at = None;
        }
    }
}

fn open(facility: Facility, socket: &Path) -> Result<Connection, String> {
    let formatter = Formatter3164 {
        facility,
        hostname: None,
        process: TAG.to_owned(),
        pid: std::process::id(),
    };
    ::syslog::unix_custom(formatter, socket)
        .map_err(|err| format!("cannot connect to syslog at {}: {err}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 1024];
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn facility_and_severity_make_the_priority() {
        let tmp = crate::testing::tempdir("syslog-pri");
        let dir = tmp.path();
        let path = dir.join("log.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let mut sink = Sink::connect("local3", &path).expect("connects");
        let now = SystemTime::now();
        // local3 = 19; PRI = facility * 8 + severity.
        for (level, pri) in [
            (Level::Error, 155),
            (Level::Warn, 156),
            (Level::Info, 158),
            (Level::Debug, 159),
            (Level::Trace, 159),
        ] {
            sink.send(level, "hello", now);
            let line = receive(&server);
            assert!(line.starts_with(&format!("<{pri}>")), "{level}: {line}");
            assert!(
                line.ends_with(&format!(" {TAG}[{}]: hello", std::process::id())),
                "{line}"
            );
        }
    }

    #[test]
    fn an_absent_socket_is_an_error_not_a_panic() {
        let tmp = crate::testing::tempdir("syslog-absent");
        let dir = tmp.path();
        let err = match Sink::connect("daemon", &dir.join("nothing-here")) {
            Ok(_) => panic!("no socket there"),
            Err(err) => err,
        };
        assert!(err.contains("nothing-here"), "{err}");
    }

    #[test]
    fn reconnects_after_the_daemon_restarts() {
        let tmp = crate::testing::tempdir("syslog-restart");
        let dir = tmp.path();
        let path = dir.join("log.sock");
        let first = UnixDatagram::bind(&path).expect("bind");
        let mut sink = Sink::connect("user", &path).expect("connects");
        let t0 = SystemTime::now();
        sink.send(Level::Info, "one", t0);
        assert!(receive(&first).ends_with("one"));
        // The daemon restarts: its old socket is gone, a new one takes the path.
        drop(first);
        std::fs::remove_file(&path).expect("remove the socket");
        let second = UnixDatagram::bind(&path).expect("bind again");
        sink.send(Level::Info, "lost", t0);
        sink.send(Level::Info, "too early", t0 + Duration::from_secs(1));
        sink.send(Level::Info, "two", t0 + RECONNECT_AFTER);
        let line = receive(&second);
        assert!(line.ends_with("two"), "{line}");
    }
}
