//! The `testflinger-agent` command line: the daemon (default), `run-job`, `check-config`,
//! `diagram`, `explain` and `healthcheck`.

use clap::Parser;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use testflinger_agent::audit;
use testflinger_agent::check;
use testflinger_agent::cli::{
    Cli, Command, DiagramFormat, ExplainFormat, EXIT_BAD_INPUT, EXIT_JOB_FAILED, EXIT_OK,
    EXIT_RESTART,
};
use testflinger_agent::config::{Config, LogFormat};
use testflinger_agent::daemon::{AgentLock, Daemon, DaemonExit};
use testflinger_agent::diagram::{self, Format};
use testflinger_agent::healthcheck::{self, HealthSettings};
use testflinger_agent::job::JobSpec;
use testflinger_agent::process::StopSignal;
use testflinger_agent::{logging, run_job, signals, trails};

/// How long the daemon waits before exiting with [`EXIT_BAD_INPUT`] when its standard input
/// is not a terminal (it runs under a supervisor); the environment variable overrides it.
const STARTUP_FAILURE_DELAY: Duration = Duration::from_secs(10);
const STARTUP_FAILURE_DELAY_VAR: &str = "TESTFLINGER_AGENT_STARTUP_FAILURE_DELAY";

fn main() -> ExitCode {
    // First, while the process has one thread: systemd's variables leave the environment.
    let notify_problem = testflinger_agent::notify::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let usage_error = err.use_stderr();
            let _ = err.print();
            if !usage_error {
                // --help and --version.
                return ExitCode::SUCCESS;
            }
            let daemon = std::env::args().nth(1).is_none_or(|a| a.starts_with('-'));
            return if daemon {
                startup_failure(None)
            } else {
                ExitCode::from(EXIT_BAD_INPUT)
            };
        }
    };
    match cli.command {
        Some(Command::RunJob { config, job }) => run_job(&config, &job),
        Some(Command::CheckConfig {
            config,
            token_file,
            metrics_port,
            server,
            reference_table,
        }) => {
            let options = check::Options {
                token_file,
                metrics_port,
                server,
            };
            check_config(config.as_deref(), reference_table, &options)
        }
        Some(Command::Diagram {
            format,
            machine,
            write,
        }) => diagram(format, &machine, write.as_deref()),
        Some(Command::Explain {
            path,
            config,
            format,
        }) => explain(&path, config.as_deref(), format),
        Some(Command::Healthcheck { config }) => healthcheck(&config),
        None => daemon(
            &cli.config,
            &cli.token_file,
            cli.metrics_port,
            notify_problem,
        ),
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|err| {
        eprintln!("testflinger-agent: {err}");
        ExitCode::from(EXIT_BAD_INPUT)
    })
}

fn run_job(config_path: &Path, job_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let spec = match JobSpec::load(job_path) {
        Ok(spec) => spec,
        Err(err) => {
            eprintln!("testflinger-agent: {err}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let stop = match start(&config) {
        Ok(stop) => stop,
        Err(code) => return code,
    };
    match run_job::run_local(&config, &spec, stop) {
        Ok(run) => {
            print!("{}", run_job::summary(&run));
            if run.outcome.succeeded() {
                ExitCode::from(EXIT_OK)
            } else {
                ExitCode::from(EXIT_JOB_FAILED)
            }
        }
        Err(err) => {
            eprintln!("testflinger-agent: {err}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

fn check_config(path: Option<&Path>, reference_table: bool, options: &check::Options) -> ExitCode {
    if reference_table {
        print!("{}", testflinger_agent::config::reference_table_markdown());
        return ExitCode::from(EXIT_OK);
    }
    let Some(path) = path else {
        return ExitCode::from(EXIT_BAD_INPUT);
    };
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let (config, report) = check::run(config, options);
    print!("{}{report}", config.effective_yaml());
    if report.all_ok() {
        ExitCode::from(EXIT_OK)
    } else {
        ExitCode::from(EXIT_BAD_INPUT)
    }
}

fn diagram(format: DiagramFormat, machine: &str, write: Option<&Path>) -> ExitCode {
    let format = match format {
        DiagramFormat::Mermaid => Format::Mermaid,
        DiagramFormat::Dot => Format::Dot,
        DiagramFormat::Table => Format::Table,
    };
    if let Some(dir) = write {
        return match audit::write_all(dir) {
            Ok(paths) => {
                for path in paths {
                    println!("{}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!(
                    "testflinger-agent: cannot write diagrams to {}: {err}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    match audit::machines().into_iter().find(|m| m.name == machine) {
        Some(m) => {
            print!("{}", diagram::render(&m, format));
            ExitCode::SUCCESS
        }
        None => {
            let names: Vec<_> = audit::machines().iter().map(|m| m.name).collect();
            eprintln!(
                "testflinger-agent: no state machine named {machine:?}; known: {}",
                names.join(", ")
            );
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

fn explain(path: &Path, config: Option<&Path>, format: ExplainFormat) -> ExitCode {
    // A health check's directory or log: the check's trail beside it.
    let check_trail = testflinger_agent::healthcheck::trail_for(path);
    if let Some((trail, count)) = &check_trail {
        if path.is_dir() {
            eprintln!(
                "the newest of {count} health check trail(s) in {}: {}",
                path.display(),
                trail.display()
            );
        }
    }
    let path = check_trail
        .as_ref()
        .map_or(path, |(trail, _)| trail.as_path());
    let journal = match testflinger_agent::journal::read_any(path) {
        Ok(journal) => journal,
        Err(err) => {
            eprintln!("testflinger-agent: {}: {err}", path.display());
            let (dir, whence) = match config {
                Some(config_path) => match load_config(config_path) {
                    Ok(config) => (
                        trails::dir(&config.logging_basedir),
                        format!("logging_basedir of {}", config_path.display()),
                    ),
                    Err(code) => return code,
                },
                None => (
                    trails::default_dir(),
                    "the default logging_basedir; -c CONFIG looks where an agent's config keeps them"
                        .to_owned(),
                ),
            };
            eprint!(
                "{}",
                audit::where_trails_are(path, &dir, &whence, &trails::list(&dir))
            );
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    if journal.check.is_some() && !matches!(format, ExplainFormat::Table) {
        eprintln!(
            "testflinger-agent: {} is a health check's trail, not a job's: it has no lifecycle to draw (--format table shows it)",
            path.display()
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    match format {
        ExplainFormat::Table => print!("{}", audit::explain_table(&journal)),
        ExplainFormat::Mermaid => print!("{}", audit::explain_diagram(&journal, Format::Mermaid)),
        ExplainFormat::Dot => print!("{}", audit::explain_diagram(&journal, Format::Dot)),
    }
    ExitCode::SUCCESS
}

/// `healthcheck`: the check once, in the foreground, under the agent's lock (never beside
/// the daemon). 0 pass, 1 fail or timeout, 2 no check configured, unusable config, or the
/// lock is held.
fn healthcheck(config_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(settings) = HealthSettings::from_config(&config) else {
        eprintln!(
            "testflinger-agent: {} sets no healthcheck_command: there is no health check to run",
            config_path.display()
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    };
    if let Err(err) = std::fs::create_dir_all(&config.execution_basedir) {
        eprintln!(
            "testflinger-agent: cannot create {} (config key execution_basedir): {err}",
            config.execution_basedir.display()
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let _lock = match AgentLock::acquire(&config.execution_basedir, &config.agent_id) {
        Ok(lock) => lock,
        Err(err) => {
            eprintln!(
                "testflinger-agent: not running the health check: {err}; the daemon runs its own checks (send it SIGUSR2 for one now)"
            );
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let stop = match start(&config) {
        Ok(stop) => stop,
        Err(code) => return code,
    };
    if let Err(err) = testflinger_agent::process::become_subreaper() {
        log::warn!("processes that leave the check's group may outlive it: {err}");
    }
    match healthcheck::run_check(&config, &settings, &stop, "asked on the command line") {
        Ok(report) => {
            println!(
                "health check: {} in {:.1} s (exit status {}); last line {:?}; output in {}",
                report
                    .result
                    .map_or("interrupted", healthcheck::CheckResult::as_str),
                report.duration.as_secs_f64(),
                report.exit_code,
                report.last_line,
                report
                    .log
                    .as_ref()
                    .map_or_else(|| "no file".to_owned(), |p| p.display().to_string())
            );
            if report.result == Some(healthcheck::CheckResult::Pass) {
                ExitCode::from(EXIT_OK)
            } else {
                ExitCode::from(EXIT_JOB_FAILED)
            }
        }
        Err(err) => {
            eprintln!("testflinger-agent: {err}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

/// The daemon cannot start (exit status 2: restarting cannot help). Under a supervisor
/// that restarts on any exit (the charm's supervisord program: `autorestart=unexpected`,
/// `startsecs=0`) an immediate exit would be a restart loop as fast as the machine goes;
/// so when standard input is not a terminal the agent says so and waits
/// [`STARTUP_FAILURE_DELAY`] first. A stop signal ends the wait at once.
fn startup_failure(stop: Option<&StopSignal>) -> ExitCode {
    let delay = std::env::var(STARTUP_FAILURE_DELAY_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(STARTUP_FAILURE_DELAY, Duration::from_secs);
    if !std::io::stdin().is_terminal() && !delay.is_zero() {
        let message = format!(
            "cannot start; exiting with status {EXIT_BAD_INPUT} in {}s (not on a terminal: \
             this keeps a supervisor that restarts on every exit from looping; {STARTUP_FAILURE_DELAY_VAR}=0 skips the wait)",
            delay.as_secs()
        );
        log::error!("{message}");
        eprintln!("testflinger-agent: {message}");
        match stop {
            Some(stop) => {
                stop.sleep_unless_shutdown(delay);
            }
            // No handler is installed yet: SIGTERM ends the process at once.
            None => std::thread::sleep(delay),
        }
    }
    ExitCode::from(EXIT_BAD_INPUT)
}

fn daemon(
    config_path: &Path,
    token_file: &Path,
    metrics_port: Option<u16>,
    notify_problem: Option<String>,
) -> ExitCode {
    let mut config = match load_config(config_path) {
        Ok(config) => config,
        Err(_) => return startup_failure(None),
    };
    config.set_token_file(token_file);
    if let Some(port) = metrics_port {
        config.set_metrics_endpoint_port(port);
    }
    let stop = match start(&config) {
        Ok(stop) => stop,
        Err(code) if code == ExitCode::from(EXIT_BAD_INPUT) => return startup_failure(None),
        Err(code) => return code,
    };
    if let Some(problem) = notify_problem {
        log::warn!("{problem}");
    }
    let daemon = match Daemon::new(config, stop.clone()) {
        Ok(daemon) => daemon,
        Err(err) => {
            log::error!("{err}");
            eprintln!("testflinger-agent: {err}");
            return startup_failure(Some(&stop));
        }
    };
    match daemon.run() {
        DaemonExit::Stopped => ExitCode::from(EXIT_OK),
        DaemonExit::Restart => ExitCode::from(EXIT_RESTART),
    }
}

/// What `run-job` and the daemon share: the agent log (config keys logging_basedir,
/// logging_level, logging_quiet, logging_format, logging_syslog, logging_syslog_socket),
/// the config's warnings, and the signal thread that turns SIGTERM/SIGINT into stop
/// requests.
fn start(config: &Config) -> Result<StopSignal, ExitCode> {
    if let Err(err) = logging::init(&logging::LogSettings {
        level: config.logging_level,
        quiet: config.logging_quiet,
        dir: config.logging_basedir.clone(),
        python_format: config.logging_format == LogFormat::Python,
        syslog: config
            .logging_syslog
            .as_ref()
            .map(|facility| logging::SyslogSettings {
                facility: facility.clone(),
                socket: config.logging_syslog_socket.clone(),
            }),
    }) {
        eprintln!(
            "testflinger-agent: cannot open the agent log in {} (config key logging_basedir): {err}",
            config.logging_basedir.display()
        );
        return Err(ExitCode::from(EXIT_BAD_INPUT));
    }
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    let stop = StopSignal::new().map_err(|err| {
        eprintln!("testflinger-agent: {err}");
        ExitCode::FAILURE
    })?;
    signals::spawn(stop.clone()).map_err(|err| {
        log::error!("cannot install signal handlers: {err}");
        ExitCode::FAILURE
    })?;
    Ok(stop)
}
