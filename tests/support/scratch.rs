//! Scratch directories for the agent's folders and process markers for tests that start
//! command trees: both clean up on drop, even when the test fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The agent's repository (this crate is tests/support in it).
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// A scratch directory holding the agent's directories: a [`tempfile::TempDir`] named
/// `tf-it-<name>-<random>`, removed on drop unless `TF_KEEP_SCRATCH` is set (to read an
/// agent's log after a failure).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        Scratch::new_in(&std::env::temp_dir(), name)
    }

    /// A scratch directory under `base` (e.g. a tmpfs, where fsync costs nothing).
    pub fn new_in(base: &Path, name: &str) -> Scratch {
        // Created with the umask's mode, as before (0755 under the usual 022), not
        // owner-only: some tests run the agent as another user inside it.
        let dir = tempfile::Builder::new()
            .prefix(&format!("tf-it-{name}-"))
            .disable_cleanup(std::env::var_os("TF_KEEP_SCRATCH").is_some())
            .tempdir_in(base)
            .expect("scratch dir is writable");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `agent.yaml`: `body` plus this scratch's directories.
    pub fn config(&self, body: &str) -> PathBuf {
        let text = format!(
            "{body}\nexecution_basedir: {d}/run\nlogging_basedir: {d}/logs\nresults_basedir: {d}/results\n",
            d = self.dir.path().display()
        );
        self.write("agent.yaml", &text)
    }

    /// A shipped example config, pointed at this scratch's directories.
    pub fn example_config(&self, example: &str) -> PathBuf {
        let text = std::fs::read_to_string(Path::new(ROOT).join(example)).expect("example exists");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                !(l.starts_with("execution_basedir:")
                    || l.starts_with("logging_basedir:")
                    || l.starts_with("results_basedir:"))
            })
            .collect();
        self.config(&kept.join("\n"))
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write scratch file");
        path
    }

    /// The one run directory left under `run/`.
    pub fn rundir(&self) -> PathBuf {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.path("run"))
            .expect("run dir exists")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(dirs.len(), 1, "exactly one run directory: {dirs:?}");
        dirs.remove(0)
    }

    /// A unique string of digits, so `sleep 1000.<marker>N` is a valid sleep that carries it.
    pub fn marker(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!(
            "{}{:03}{nanos:09}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed) % 1000
        )
    }
}

/// Finds, and on drop SIGKILLs, every process whose command line carries
/// `1000.<marker>` (the sleeps a test started): killed by the marker the test made, never
/// by name.
pub struct KillByMarker {
    needle: String,
}

impl KillByMarker {
    pub fn new(marker: &str) -> KillByMarker {
        KillByMarker {
            needle: format!("1000.{marker}"),
        }
    }

    /// Living (non-zombie) processes carrying the marker.
    pub fn living(&self) -> Vec<i32> {
        living_carrying(self.needle.as_bytes())
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }
}

/// Living (non-zombie) processes other than this one whose command line contains
/// `needle`, with their start times (to tell a reaped pid from a reused one).
pub fn living_carrying(needle: &[u8]) -> Vec<(i32, u64)> {
    let own = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !cmdline.windows(needle.len()).any(|w| w == needle) {
            continue;
        }
        if let Some((state, start)) = stat_of(pid) {
            if state != 'Z' && state != 'X' {
                found.push((pid, start));
            }
        }
    }
    found
}

/// A process's state letter and start time (in clock ticks since boot), zombies included.
pub fn stat_of(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

impl Drop for KillByMarker {
    fn drop(&mut self) {
        for pid in self.living() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
