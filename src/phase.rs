//! The seven Testflinger phases, their names and the rules that depend only on the phase.

use serde_json::Value;
use std::fmt;

/// A Testflinger job phase, in the order the agent runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Setup,
    Provision,
    FirmwareUpdate,
    Test,
    Allocate,
    Reserve,
    Cleanup,
}

impl Phase {
    /// Every phase, in running order.
    pub const ALL: [Phase; 7] = [
        Phase::Setup,
        Phase::Provision,
        Phase::FirmwareUpdate,
        Phase::Test,
        Phase::Allocate,
        Phase::Reserve,
        Phase::Cleanup,
    ];

    /// The Testflinger name: used in config keys, log file names, job states and events.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Provision => "provision",
            Phase::FirmwareUpdate => "firmware_update",
            Phase::Test => "test",
            Phase::Allocate => "allocate",
            Phase::Reserve => "reserve",
            Phase::Cleanup => "cleanup",
        }
    }

    /// Parses a Testflinger phase name.
    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The config key holding this phase's command, e.g. `test_command`.
    pub fn command_key(self) -> &'static str {
        match self {
            Phase::Setup => "setup_command",
            Phase::Provision => "provision_command",
            Phase::FirmwareUpdate => "firmware_update_command",
            Phase::Test => "test_command",
            Phase::Allocate => "allocate_command",
            Phase::Reserve => "reserve_command",
            Phase::Cleanup => "cleanup_command",
        }
    }

    /// The job key holding this phase's data, for the phases that need data to run.
    pub fn data_key(self) -> Option<&'static str> {
        match self {
            Phase::Setup | Phase::Cleanup => None,
            Phase::Provision => Some("provision_data"),
            Phase::FirmwareUpdate => Some("firmware_update_data"),
            Phase::Test => Some("test_data"),
            Phase::Allocate => Some("allocate_data"),
            Phase::Reserve => Some("reserve_data"),
        }
    }

    /// Whether the global timeout applies (every phase but reserve, PROTOCOL §5.6).
    pub fn has_global_timeout(self) -> bool {
        self != Phase::Reserve
    }

    /// Whether the output timeout applies (the test phase only, PROTOCOL §5.6).
    pub fn has_output_timeout(self) -> bool {
        self == Phase::Test
    }

    /// Whether a cancelled job interrupts this phase's command. Provision is never
    /// interrupted (device safety) and cleanup always runs to its end (PROTOCOL §5.5).
    pub fn interrupted_by_cancel(self) -> bool {
        !matches!(self, Phase::Provision | Phase::Cleanup)
    }

    /// Whether a non-zero exit code ends the forward path (PROTOCOL §5.4).
    pub fn failure_aborts(self) -> bool {
        !matches!(self, Phase::Test | Phase::Cleanup)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a phase did not run (PROTOCOL §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// `<phase>_command` is missing or empty in the agent config.
    NoCommand,
    /// The job's `<phase>_data` is absent, null or empty.
    NoData,
    /// The job's `<phase>_data` has a truthy `skip`.
    SkipRequested,
}

impl SkipReason {
    /// A short human explanation, used in the run summary and the agent log.
    pub fn describe(self, phase: Phase) -> String {
        match self {
            SkipReason::NoCommand => format!("no {} configured", phase.command_key()),
            SkipReason::NoData => format!(
                "job has no {}",
                phase.data_key().unwrap_or("data for this phase")
            ),
            SkipReason::SkipRequested => {
                format!("job set skip in {}", phase.data_key().unwrap_or("its data"))
            }
        }
    }
}

/// Decides whether `phase` is skipped, given its configured command and the job's data
/// for it. Setup and cleanup need only their command.
pub fn skip_reason(
    phase: Phase,
    command: Option<&str>,
    data: Option<&Value>,
) -> Option<SkipReason> {
    if command.is_none_or(|c| c.trim().is_empty()) {
        return Some(SkipReason::NoCommand);
    }
    phase.data_key()?;
    match data {
        None => Some(SkipReason::NoData),
        Some(value) if !truthy(value) => Some(SkipReason::NoData),
        Some(Value::Object(map)) if map.get("skip").is_some_and(truthy) => {
            Some(SkipReason::SkipRequested)
        }
        Some(_) => None,
    }
}

/// Python truthiness of a JSON value, which is what the Python agent's checks use.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_round_trip() {
        for phase in Phase::ALL {
            assert_eq!(Phase::from_name(phase.name()), Some(phase));
            assert!(phase.command_key().starts_with(phase.name()));
        }
        assert_eq!(Phase::from_name("bogus"), None);
    }

    /// Every combination of command present/absent × data absent/null/empty/present/skip,
    /// for every phase.
    #[test]
    fn skip_rules_cover_every_combination() {
        let datas: [(&str, Option<Value>); 7] = [
            ("absent", None),
            ("null", Some(Value::Null)),
            ("empty", Some(json!({}))),
            ("present", Some(json!({"url": "x"}))),
            ("skip-true", Some(json!({"skip": true}))),
            ("skip-false", Some(json!({"skip": false, "url": "x"}))),
            ("skip-only-false", Some(json!({"skip": false}))),
        ];
        for phase in Phase::ALL {
            for command in [None, Some(""), Some("  "), Some("run-it")] {
                for (label, data) in &datas {
                    let got = skip_reason(phase, command, data.as_ref());
                    let expected = if command.is_none_or(|c| c.trim().is_empty()) {
                        Some(SkipReason::NoCommand)
                    } else if phase.data_key().is_none() {
                        None
                    } else {
                        match *label {
                            "absent" | "null" | "empty" => Some(SkipReason::NoData),
                            "skip-true" => Some(SkipReason::SkipRequested),
                            _ => None,
                        }
                    };
                    assert_eq!(got, expected, "{phase} command={command:?} data={label}");
                }
            }
        }
    }

    #[test]
    fn truthiness_matches_python() {
        for (v, t) in [
            (json!(null), false),
            (json!(0), false),
            (json!(0.0), false),
            (json!(""), false),
            (json!([]), false),
            (json!({}), false),
            (json!(false), false),
            (json!(1), true),
            (json!("no"), true),
            (json!([0]), true),
            (json!({"a": 1}), true),
            (json!(true), true),
        ] {
            assert_eq!(truthy(&v), t, "{v}");
        }
    }
}
