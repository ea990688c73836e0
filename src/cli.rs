//! The command line's definition (clap) and the exit statuses, in the library so that the
//! man page, the shell completions and the operator's guide are generated from the same
//! source the binary parses with (`tests/it/generated.rs` checks the committed copies).
//! `src/main.rs` acts on what is parsed here; `check` reads the daemon's defaults.

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// The refresh-token file the daemon reads when `--token-file` is not given (the path the
/// host charm writes; PROTOCOL §1.3).
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/testflinger-agent/refresh_token";

/// The system user the Debian package creates (`packaging/sysusers.conf`) for the agents.
pub const PACKAGE_USER: &str = "testflinger";

/// A hardened, drop-in replacement for the Testflinger agent.
///
/// Without a command, runs the agent daemon: it takes jobs from the Testflinger server's
/// queues named in the config file, one at a time, runs each phase's command in its own
/// process group, streams the output, and reports the outcome. It runs one agent (one
/// device) per process; a host with several devices runs one per device, each with its own
/// config file and metrics port.
#[derive(Debug, Parser)]
#[command(
    name = "testflinger-agent",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// The agent config file (YAML).
    #[arg(short = 'c', long = "config", default_value = "testflinger-agent.conf")]
    pub config: PathBuf,
    /// The refresh-token file written by the deployment tooling.
    #[arg(long = "token-file", default_value = DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// Serve Prometheus metrics (`/metrics`) and `/health` on this port; overrides the
    /// config key metrics_endpoint_port. `--metrics_port` is the Python agent's spelling.
    #[arg(
        short = 'p',
        long = "metrics-port",
        visible_alias = "metrics_port",
        value_name = "PORT"
    )]
    pub metrics_port: Option<u16>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one job locally, with no server: output to the terminal, files in the run dir.
    RunJob {
        /// The agent config file (YAML).
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// The job file (YAML as a person writes it, or JSON as the server sends it).
        job: PathBuf,
    },
    /// Validate a config file, print the effective config (defaults filled in), and check
    /// what the daemon would need at start-up.
    ///
    /// After the effective config come the checks, one per line, each starting with `# ok`
    /// or `# failed` (comments, so the output still loads as the config): the directories
    /// (execution_basedir, results_basedir, logging_basedir: present and writable, or
    /// creatable; nothing is left behind), the refresh-token file (readable, holds a
    /// refresh token), the metrics port (free), and with --server that the server answers,
    /// the refresh token is accepted and the agent's record can be read. Run it as the
    /// agent's user, with the daemon's --token-file and -p. Exits 0 when every check is
    /// ok, 2 otherwise.
    CheckConfig {
        /// The agent config file (YAML).
        #[arg(
            short = 'c',
            long = "config",
            required_unless_present = "reference_table"
        )]
        config: Option<PathBuf>,
        /// The refresh-token file the daemon is given (the daemon's default when absent).
        #[arg(long = "token-file", value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// The metrics port the daemon is given (else the config key metrics_endpoint_port).
        #[arg(
            short = 'p',
            long = "metrics-port",
            visible_alias = "metrics_port",
            value_name = "PORT"
        )]
        metrics_port: Option<u16>,
        /// Also contact the server: it answers, the refresh token is exchanged for an
        /// access token, and the agent's record can be read. Nothing else is posted.
        #[arg(long)]
        server: bool,
        /// Print the Markdown reference table of every config key instead.
        #[arg(long, conflicts_with_all = ["config", "token_file", "metrics_port", "server"])]
        reference_table: bool,
    },
    /// Run the device health check (config key healthcheck_command) once, in the
    /// foreground, as the daemon runs it: its output goes to
    /// `<logging_basedir>/healthchecks/`, a summary to standard output. It takes the
    /// agent's lock, so it never runs beside the daemon of the same agent_id (whose own
    /// checks run inside it: send it SIGUSR2 for one). Exits 0 when the check passes, 1
    /// when it fails or times out, 2 when the config has no health check, cannot be used,
    /// or the daemon holds the lock.
    Healthcheck {
        /// The agent config file (YAML).
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Render the state diagrams from the code.
    Diagram {
        #[arg(long, value_enum, default_value_t = DiagramFormat::Mermaid)]
        format: DiagramFormat,
        /// Which state machine.
        #[arg(long, default_value = "job-lifecycle")]
        machine: String,
        /// Write every machine in every format into this directory instead.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Show the path one job took through the lifecycle, from its journal's trail (or one
    /// health check, like a phase).
    Explain {
        /// A run directory (the daemon's or run-job's), a spooled one, or a kept trail
        /// (`<logging_basedir>/trails/<job_id>.json`); or a health check's trail or log in
        /// `<logging_basedir>/healthchecks/`, or that directory (its newest check).
        path: PathBuf,
        /// The agent config whose `logging_basedir` holds the kept trails: when PATH has
        /// no trail, they are listed from there (else from the default `logging_basedir`).
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// `table` lists each transition; `mermaid` and `dot` draw the lifecycle with this
        /// job's edges highlighted and numbered, the others faded.
        #[arg(long, value_enum, default_value_t = ExplainFormat::Table)]
        format: ExplainFormat,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExplainFormat {
    Table,
    Mermaid,
    Dot,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DiagramFormat {
    Mermaid,
    Dot,
    /// The transition table in Markdown: one row per (from, event, to).
    Table,
}

/// The clap command, for the man page and the completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Daemon stopped by SIGTERM/SIGINT; `run-job` with every phase ok; `check-config` all ok.
pub const EXIT_OK: u8 = 0;
/// Daemon: a restart was asked for.
pub const EXIT_RESTART: u8 = 1;
/// `run-job`: a phase failed (the same status as [`EXIT_RESTART`]: they never meet).
pub const EXIT_JOB_FAILED: u8 = 1;
/// A config, job file, directory, port or command line that cannot be used.
pub const EXIT_BAD_INPUT: u8 = 2;

/// One exit status and what it means for each command.
#[derive(Clone, Copy, Debug)]
pub struct ExitStatus {
    /// The status, or a description such as "any other".
    pub status: &'static str,
    pub daemon: &'static str,
    pub run_job: &'static str,
    pub check_config: &'static str,
}

/// The exit statuses of every command; the man page and `docs/operating.md` are generated
/// from this table, and `src/main.rs` exits with the constants above.
pub const EXIT_STATUSES: &[ExitStatus] = &[
    ExitStatus {
        status: "0",
        daemon: "stopped by SIGTERM or SIGINT, after ending the running phase, cleanup and the report (or its spooling)",
        run_job: "every phase that ran succeeded",
        check_config: "the config is valid and every check is ok (also `--reference-table`)",
    },
    ExitStatus {
        status: "1",
        daemon: "restart requested (SIGUSR1, or the server's `restart` state), carried out between jobs: the supervisor is to start it again",
        run_job: "a phase failed, timed out or was stopped",
        check_config: "not used",
    },
    ExitStatus {
        status: "2",
        daemon: "cannot start: config, directory, metrics port, another agent with the same agent_id, command line; restarting cannot help (systemd: `RestartPreventExitStatus=2`; supervisord: `exitcodes=0,2`)",
        run_job: "the config or job file cannot be used, or the command line is wrong",
        check_config: "the config is invalid or a check failed (the line starting `# failed` says what to fix)",
    },
    ExitStatus {
        status: "any other, or killed by a signal",
        daemon: "a crash: restart it; the next start finishes and reports the job it left",
        run_job: "a crash",
        check_config: "a crash",
    },
];

/// [`EXIT_STATUSES`] as a Markdown table.
pub fn exit_status_table_markdown() -> String {
    let mut out =
        String::from("| Status | Daemon | `run-job` | `check-config` |\n|---|---|---|---|\n");
    for s in EXIT_STATUSES {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            s.status, s.daemon, s.run_job, s.check_config
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn the_exit_table_names_each_constant() {
        for code in [EXIT_OK, EXIT_RESTART, EXIT_JOB_FAILED, EXIT_BAD_INPUT] {
            assert!(
                EXIT_STATUSES.iter().any(|s| s.status == code.to_string()),
                "{code}"
            );
        }
        let table = exit_status_table_markdown();
        assert_eq!(table.lines().count(), EXIT_STATUSES.len() + 2);
    }

    #[test]
    fn the_charms_spellings_parse() {
        for args in [
            &["testflinger-agent", "-c", "a.yaml", "-p", "8001"][..],
            &[
                "testflinger-agent",
                "--config",
                "a.yaml",
                "--metrics_port",
                "8001",
            ],
            &[
                "testflinger-agent",
                "-c",
                "a.yaml",
                "--metrics-port",
                "8001",
            ],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert_eq!(cli.metrics_port, Some(8001), "{args:?}");
            assert_eq!(cli.config, PathBuf::from("a.yaml"));
            assert_eq!(cli.token_file, PathBuf::from(DEFAULT_TOKEN_FILE));
            assert!(cli.command.is_none());
        }
        let cli = Cli::try_parse_from([
            "testflinger-agent",
            "check-config",
            "-c",
            "a.yaml",
            "-p",
            "9",
            "--server",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::CheckConfig {
                metrics_port: Some(9),
                server: true,
                ..
            })
        ));
        assert!(Cli::try_parse_from([
            "testflinger-agent",
            "check-config",
            "--reference-table",
            "--server"
        ])
        .is_err());
    }
}
