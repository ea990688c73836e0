//! The daemon's states and the events that move it between them: the source of the
//! daemon diagram in `state-diagrams/`.

/// The daemon's own states, for the diagram: (from, event, to).
pub const DAEMON_TRANSITIONS: &[(&str, &str, &str)] = &[
    ("starting", "agent data posted", "waiting"),
    ("waiting", "job received", "busy"),
    (
        "waiting",
        "server state offline/maintenance, or offline marker",
        "offline",
    ),
    ("waiting", "server state restart, or SIGUSR1", "restarting"),
    ("waiting", "SIGTERM/SIGINT", "stopped"),
    ("busy", "job reported or spooled", "waiting"),
    ("busy", "exit 46 (recovery failed)", "offline"),
    ("busy", "SIGTERM/SIGINT", "draining"),
    (
        "draining",
        "cleanup ran, outcome reported or spooled",
        "stopped",
    ),
    (
        "draining",
        "second SIGTERM/SIGINT, every group killed",
        "stopped",
    ),
    ("offline", "server state waiting", "waiting"),
    ("offline", "SIGTERM/SIGINT", "stopped"),
    ("restarting", "offline posted, exit non-zero", "stopped"),
];
