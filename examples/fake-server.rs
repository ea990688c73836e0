//! The test suite's fake Testflinger server (tests/support/fake_server.rs) as a process of
//! its own, for tests that drive the agent from outside Rust: packaging/system-test.sh runs
//! the packaged agent under a booted systemd against it.
//!
//!   cargo run --example fake-server [-- --url-file PATH]
//!
//! It listens on 127.0.0.1 (an ephemeral port), prints its base URL as the first line on
//! stdout (and writes it to PATH, when given), then serves until it is killed. Everything
//! else goes over HTTP, on the endpoints the fixture already answers (PROTOCOL §3.16):
//! `POST /v1/job` submits a job, `GET /v1/result/<id>` reads its state, phase statuses and
//! output, `GET /v1/agents/data/<agent>` the agent's record. Agents authenticate with the
//! refresh token `fake-refresh-token`, as in the tests. Loopback only: nothing here is
//! meant to face a network.

use std::io::Write;
use testflinger_agent_test_support::fake_server::FakeServer;

fn main() {
    let mut url_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url-file" => match args.next() {
                Some(path) => url_file = Some(path),
                None => usage("--url-file needs a path"),
            },
            "-h" | "--help" => {
                println!("usage: fake-server [--url-file PATH]");
                return;
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let server = FakeServer::start();
    let url = server.url();
    if let Some(path) = url_file {
        // Written whole under another name first, so a reader never sees half a URL.
        let partial = format!("{path}.partial");
        if let Err(e) = std::fs::write(&partial, format!("{url}\n"))
            .and_then(|()| std::fs::rename(&partial, &path))
        {
            eprintln!("fake-server: cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{url}");
    let _ = out.flush();
    // Serves from its own threads; this one only keeps the process (and `server`) alive
    // until a signal ends it.
    loop {
        std::thread::park();
    }
}

fn usage(message: &str) -> ! {
    eprintln!("fake-server: {message}\nusage: fake-server [--url-file PATH]");
    std::process::exit(2);
}
