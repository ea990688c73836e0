//! The man pages and shell completions under `packaging/` are what the clap definition
//! (`src/cli.rs`) renders today; `UPDATE_GENERATED=1 cargo test --test it generated::`
//! rewrites them. The Debian package ships these committed files
//! (`packaging/check-deb.sh` compares the packaged copies with them).

use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;
use std::path::{Path, PathBuf};
use testflinger_agent::cli;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NAME: &str = "testflinger-agent";
const UPDATE_VAR: &str = "UPDATE_GENERATED";

/// Markdown code spans read as plain words in a man page.
fn plain(text: &str) -> String {
    text.replace('`', "")
}

fn section(roff: &mut Roff, title: &str) {
    roff.control("SH", [title]);
}

/// A `.TP` entry: a bold tag, then its paragraph.
fn entry(roff: &mut Roff, tag: &str, text: &str) {
    roff.control("TP", []);
    roff.text([bold(tag)]);
    roff.text([roman(text)]);
}

fn exit_status_section(roff: &mut Roff) {
    section(roff, "EXIT STATUS");
    for status in cli::EXIT_STATUSES {
        let text = format!(
            "The daemon: {}. run-job: {}. check-config: {}.",
            plain(status.daemon),
            plain(status.run_job),
            plain(status.check_config)
        );
        entry(roff, status.status, &text);
    }
}

fn signals_section(roff: &mut Roff) {
    section(roff, "SIGNALS");
    entry(
        roff,
        "SIGTERM, SIGINT",
        "The first stops taking jobs, ends the running phase (SIGTERM to its process group and \
         to the processes that left it, SIGKILL after termination_grace_period), runs cleanup \
         for at most shutdown_cleanup_timeout, reports or spools the outcome and exits 0. A \
         second one kills every command at once and exits within 10 seconds; the run \
         directory is reported at the next start.",
    );
    entry(
        roff,
        "SIGUSR1",
        "Restart between jobs: the running job finishes, the agent posts the restart state and \
         exits 1, for the supervisor to start it again (with a new binary after an upgrade).",
    );
    entry(roff, "SIGHUP", "Reopens the agent's log file.");
}

fn files_section(roff: &mut Roff) {
    section(roff, "FILES");
    for (path, what) in [
        (
            "/etc/testflinger-agent/AGENT.yaml",
            "The config file of agent AGENT under the packaged systemd unit testflinger-agent@AGENT.",
        ),
        (
            cli::DEFAULT_TOKEN_FILE,
            "The refresh-token file read when --token-file is not given (the host charm's \
             path); a JSON object with a string refresh_token.",
        ),
        (
            "EXECUTION_BASEDIR/JOB_ID/",
            "A job's run directory: testflinger.json, testflinger-outcome.json, PHASE.log, \
             artifacts/, and the job journal .agent-journal.json read after a crash.",
        ),
        (
            "RESULTS_BASEDIR/",
            "The spool: run directories whose report the server has not taken yet, retried \
             every cycle and across restarts.",
        ),
        (
            "LOGGING_BASEDIR/",
            "The agent's own log, rotated at midnight.",
        ),
        (
            "/tmp/TESTFLINGER-DEVICE-OFFLINE-AGENT_ID",
            "While this file exists the agent takes no job.",
        ),
        (
            "/usr/lib/systemd/system/testflinger-agent@.service",
            "The packaged systemd template unit, one instance per device.",
        ),
        (
            "/usr/share/testflinger-agent/hardening.conf",
            "A hardened profile for the unit: copy it into \
             /etc/systemd/system/testflinger-agent@.service.d/ to enable it.",
        ),
        (
            "/usr/share/doc/testflinger-agent/",
            "README.md; operating.md and migrating.md (the operator's guides); \
             configuration.md (every config key); auditing.md (the state machines and how \
             they are checked); examples/.",
        ),
    ] {
        entry(roff, path, what);
    }
}

fn environment_section(roff: &mut Roff) {
    section(roff, "ENVIRONMENT");
    entry(
        roff,
        "TESTFLINGER_AGENT_STARTUP_FAILURE_DELAY",
        "Seconds the daemon waits before exiting 2 when it cannot start and its standard \
         input is not a terminal (default 10, so that a supervisor that restarts on every \
         exit does not loop); 0 exits at once.",
    );
    entry(
        roff,
        "REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, SSL_CERT_FILE, SSL_CERT_DIR",
        "Certificates trusted for an https server_address, beside the system store.",
    );
}

fn see_also_section(roff: &mut Roff, subcommands: &[String]) {
    section(roff, "SEE ALSO");
    let mut inlines = Vec::new();
    for name in subcommands {
        inlines.push(bold(name.as_str()));
        inlines.push(roman("(1), "));
    }
    inlines.push(bold("systemctl"));
    inlines.push(roman("(1), "));
    inlines.push(bold("supervisord"));
    inlines.push(roman("(1), and the guides "));
    inlines.push(italic("/usr/share/doc/testflinger-agent/operating.md"));
    inlines.push(roman(", "));
    inlines.push(italic("/usr/share/doc/testflinger-agent/migrating.md"));
    inlines.push(roman(" and "));
    inlines.push(italic("/usr/share/doc/testflinger-agent/configuration.md"));
    inlines.push(roman("."));
    roff.text(inlines);
}

/// Every generated file: its path under the repository, and its content.
fn render_all() -> Vec<(PathBuf, Vec<u8>)> {
    let mut cmd = cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut files = Vec::new();

    let subcommands: Vec<clap::Command> = cmd.get_subcommands().cloned().collect();
    let names: Vec<String> = subcommands
        .iter()
        .map(|s| Man::new(s.clone()).get_filename())
        .map(|f| f.trim_end_matches(".1").to_string())
        .collect();

    let man = Man::new(cmd.clone());
    let mut page = Vec::new();
    type Part = fn(&Man, &mut Vec<u8>) -> std::io::Result<()>;
    let parts: [Part; 6] = [
        |m, w| m.render_title(w),
        |m, w| m.render_name_section(w),
        |m, w| m.render_synopsis_section(w),
        |m, w| m.render_description_section(w),
        |m, w| m.render_options_section(w),
        |m, w| m.render_subcommands_section(w),
    ];
    for part in parts {
        part(&man, &mut page).expect("rendering into memory cannot fail");
    }
    let mut roff = Roff::new();
    exit_status_section(&mut roff);
    signals_section(&mut roff);
    files_section(&mut roff);
    environment_section(&mut roff);
    see_also_section(&mut roff, &names);
    roff.to_writer(&mut page)
        .expect("rendering into memory cannot fail");
    man.render_version_section(&mut page)
        .expect("rendering into memory cannot fail");
    files.push((PathBuf::from(format!("packaging/man/{NAME}.1")), page));

    let source = format!("{NAME} {}", env!("CARGO_PKG_VERSION"));
    for sub in subcommands {
        let man = Man::new(sub).source(source.clone());
        let mut page = Vec::new();
        man.render(&mut page)
            .expect("rendering into memory cannot fail");
        files.push((
            PathBuf::from(format!("packaging/man/{}", man.get_filename())),
            page,
        ));
    }

    for (shell, file) in [
        (Shell::Bash, format!("{NAME}.bash")),
        (Shell::Zsh, format!("_{NAME}")),
        (Shell::Fish, format!("{NAME}.fish")),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cli::command(), NAME, &mut out);
        files.push((PathBuf::from(format!("packaging/completions/{file}")), out));
    }
    files
}

#[test]
fn man_pages_and_completions_are_current() {
    let files = render_all();
    let update = std::env::var_os(UPDATE_VAR).is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (path, content) in &files {
        let full = Path::new(ROOT).join(path);
        let committed = std::fs::read(&full).unwrap_or_default();
        if committed != *content {
            if update {
                if let Some(dir) = full.parent() {
                    std::fs::create_dir_all(dir).expect("packaging/ is writable");
                }
                std::fs::write(&full, content).expect("packaging/ is writable");
            } else {
                stale.push(path.display().to_string());
            }
        }
    }
    // A file left from a command that no longer exists would be shipped all the same.
    for dir in ["packaging/man", "packaging/completions"] {
        for entry in std::fs::read_dir(Path::new(ROOT).join(dir))
            .into_iter()
            .flatten()
        {
            let Ok(entry) = entry else { continue };
            let relative = Path::new(dir).join(entry.file_name());
            if !files.iter().any(|(p, _)| *p == relative) {
                stale.push(format!(
                    "{} (not generated any more: remove it)",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated files differ from src/cli.rs: {}\nregenerate with: {UPDATE_VAR}=1 cargo test --test it generated::",
        stale.join(", ")
    );
}

#[test]
fn the_main_page_documents_every_exit_status_and_subcommand() {
    let files = render_all();
    let page = String::from_utf8(files[0].1.clone())
        .expect("roff is UTF-8")
        .replace("\\-", "-");
    assert!(page.contains(".SH \"EXIT STATUS\""), "{page}");
    for status in cli::EXIT_STATUSES {
        assert!(
            page.contains(&format!("\\fB{}\\fR", status.status)),
            "{}",
            status.status
        );
    }
    for sub in ["run-job", "check-config", "diagram"] {
        assert!(page.contains(&format!("testflinger-agent-{sub}")), "{sub}");
    }
    // The charm's spellings are documented.
    assert!(page.contains("metrics_port"), "{page}");
    let bash = String::from_utf8(
        files
            .iter()
            .find(|(p, _)| p.ends_with("testflinger-agent.bash"))
            .expect("bash")
            .1
            .clone(),
    )
    .expect("UTF-8");
    assert!(
        bash.contains("--metrics_port") && bash.contains("check-config"),
        "{bash}"
    );
}
