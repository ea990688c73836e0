//! What describes a config key (its type, default and origin, [`KeySpec`]) and the
//! `config_keys!` macro that turns the table of keys (`keys.rs`) into the [`Key`] enum,
//! [`KEYS`] and the [`Config`] struct.

use super::Key;
#[cfg(doc)]
use super::{Config, KEYS};
use serde_json::Value;

/// What a config key holds, which decides how its value is checked and described.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// Any string.
    Text,
    /// The agent's name: a string usable as one path segment and one URL path segment.
    AgentId,
    /// A non-negative whole number of seconds.
    Seconds,
    /// A non-negative whole number of milliseconds.
    Milliseconds,
    /// A non-negative whole number.
    Count,
    /// A TCP port number, 0 to 65535.
    Port,
    /// `true` or `false` (YAML 1.1 `yes`/`no`/`on`/`off` too, as PyYAML reads them).
    Bool,
    /// A Python log level name, any case.
    LogLevel,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// A list of non-empty strings.
    TextList,
    /// A mapping of strings to strings.
    TextMap,
    /// A mapping of queue names to mappings of image names to provision data strings.
    ImageMap,
    /// An `oom_score_adj` value: a whole number from -1000 to 1000.
    OomScore,
    /// `false`, `true` (the `daemon` facility) or a syslog facility name
    /// ([`SYSLOG_FACILITIES`]); kept as `false` or the facility's name.
    Syslog,
}

/// The syslog facilities `logging_syslog` accepts.
pub const SYSLOG_FACILITIES: &[&str] = &[
    "user", "daemon", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
    "local7",
];

/// The facility `logging_syslog: true` means.
pub const DEFAULT_SYSLOG_FACILITY: &str = "daemon";

impl KeyType {
    /// The short type shown in the reference table.
    pub fn table_name(self) -> &'static str {
        match self {
            KeyType::Text => "string",
            KeyType::AgentId => "string (path segment)",
            KeyType::Seconds => "int (s)",
            KeyType::Milliseconds => "int (ms)",
            KeyType::Count => "int",
            KeyType::Port => "int (port)",
            KeyType::Bool => "bool",
            KeyType::LogLevel => "string (log level)",
            KeyType::Choice(_) => "string (choice)",
            KeyType::TextList => "list of strings",
            KeyType::TextMap => "map string→string",
            KeyType::ImageMap => "map queue→map image→string",
            KeyType::OomScore => "int (-1000 to 1000)",
            KeyType::Syslog => "bool or string (facility)",
        }
    }

    /// What an error message says was expected.
    pub fn expected(self) -> &'static str {
        match self {
            KeyType::Text | KeyType::AgentId => "a string",
            KeyType::Seconds => "a whole number of seconds",
            KeyType::Milliseconds => "a whole number of milliseconds",
            KeyType::Count => "a whole number",
            KeyType::Port => "a port number (0 to 65535)",
            KeyType::Bool => "true or false",
            KeyType::LogLevel => "a log level name such as INFO",
            KeyType::Choice(_) => "a string",
            KeyType::TextList => "a list of strings",
            KeyType::TextMap => "a mapping of strings to strings",
            KeyType::ImageMap => "a mapping of queue names to mappings of image names to strings",
            KeyType::OomScore => "a whole number from -1000 to 1000",
            KeyType::Syslog => "true, false or a syslog facility (user, daemon, local0 to local7)",
        }
    }
}

/// The longest duration a key may give, in seconds (a year).
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// The value a key takes when the file does not set it (or sets it to `null`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultValue {
    /// The file must set it.
    Required,
    /// Absent from the effective config; the text says what absence means ("" for nothing).
    Absent(&'static str),
    Text(&'static str),
    Int(u64),
    Bool(bool),
}

impl DefaultValue {
    pub(super) fn to_value(self) -> Option<Value> {
        match self {
            DefaultValue::Required | DefaultValue::Absent(_) => None,
            DefaultValue::Text(s) => Some(Value::String(s.to_owned())),
            DefaultValue::Int(n) => Some(Value::from(n)),
            DefaultValue::Bool(b) => Some(Value::Bool(b)),
        }
    }

    pub(super) fn table_text(self) -> String {
        match self {
            DefaultValue::Required => "required".to_owned(),
            DefaultValue::Absent("") => "absent".to_owned(),
            DefaultValue::Absent(note) => format!("absent ({note})"),
            DefaultValue::Text("") => "`\"\"`".to_owned(),
            DefaultValue::Text(s) => format!("`{s}`"),
            DefaultValue::Int(n) => format!("`{n}`"),
            DefaultValue::Bool(b) => format!("`{b}`"),
        }
    }
}

/// Which agent knows a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The archived (2024-01) and the current Python agent.
    BothPython,
    /// The current Python agent only.
    CurrentPython,
    /// Set from the current Python agent's command line; accepted in the file too.
    PythonCli,
    /// This agent's own key.
    ThisAgent,
    /// Named in older Testflinger documents; today's Python agent refuses it.
    Compat,
}

impl Origin {
    pub(super) fn table_text(self) -> &'static str {
        match self {
            Origin::BothPython => "both Python agents",
            Origin::CurrentPython => "current Python agent",
            Origin::PythonCli => "Python agent's command line",
            Origin::ThisAgent => "this agent",
            Origin::Compat => "older Testflinger docs",
        }
    }
}

/// One config key: its name, type, default, origin and meaning.
#[derive(Clone, Copy, Debug)]
pub struct KeySpec {
    /// The key as a value the compiler checks; `key.name() == name`.
    pub key: Key,
    pub name: &'static str,
    pub kind: KeyType,
    pub default: DefaultValue,
    pub origin: Origin,
    /// The smallest accepted value, for the whole-number kinds.
    pub min: u64,
    /// One line for the reference table.
    pub meaning: &'static str,
}

/// Defines every config key from one row each; the rows are its invocation in `keys.rs`.
///
/// A row reads `field: Type = Variant { kind, default, origin, [min,] [read,] meaning }`:
/// `field` is the key's name in the file and its [`Config`] field, `Type` that field's type
/// (a plain type when the key is required or has a default, an `Option` when it may be
/// absent), `Variant` the key's name in the [`Key`] enum. `kind`, `default` and `origin` are
/// a [`KeyType`], a [`DefaultValue`] and an [`Origin`]; `min` (the smallest whole number
/// accepted) is 0 when left out; `meaning` is the reference table's line. `read` names a
/// function that turns the checked value into `Type` where [`Field`] alone cannot (it also
/// sees the warnings); most rows leave it out.
///
/// From the rows it generates: the [`Key`] enum (code names a key by a value the compiler
/// checks, never by a string), [`KEYS`] (which drives validation, the defaults, the
/// effective config and the reference tables), the [`Config`] struct with one field per key
/// (documented with the key's meaning), and `Config::from_effective`, which fills each field
/// from the checked, defaulted values.
macro_rules! config_keys {
    ($(
        $field:ident: $ty:ty = $variant:ident {
            kind: $kind:expr,
            default: $default:expr,
            origin: $origin:expr,
            $(min: $min:expr,)?
            $(read: $read:expr,)?
            meaning: $meaning:literal $(,)?
        }
    ),* $(,)?) => {
        /// A config key, named by a value the compiler checks; its spec is [`Key::spec`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Key {
            $(
                #[doc = concat!("`", stringify!($field), "`: ", $meaning)]
                $variant,
            )*
        }

        impl Key {
            /// Every key, in [`KEYS`] order.
            pub const ALL: &'static [Key] = &[$(Key::$variant),*];

            /// The key's name, as the config file spells it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Key::$variant => stringify!($field),)*
                }
            }
        }

        /// Every key the config file may hold, in the order `check-config` prints them.
        pub const KEYS: &[$crate::config::KeySpec] = &[$(
            $crate::config::KeySpec {
                key: Key::$variant,
                name: stringify!($field),
                kind: $kind,
                default: $default,
                origin: $origin,
                min: config_keys!(@min $($min)?),
                meaning: $meaning,
            },
        )*];

        /// The effective configuration, defaults filled in: one field per key of [`KEYS`],
        /// named as the key.
        #[derive(Clone, Debug)]
        pub struct Config {
            $(
                #[doc = $meaning]
                pub $field: $ty,
            )*
            /// Problems that did not stop the load (such as an unknown `logging_level`),
            /// for the caller to log once logging is set up.
            pub warnings: Vec<String>,
            /// Every key with its effective value, in [`KEYS`] order; absent optional keys
            /// left out.
            pub(super) effective: ::serde_json::Map<String, ::serde_json::Value>,
        }

        impl Config {
            /// Fills the typed fields from the checked, defaulted map, in [`KEYS`] order.
            pub(super) fn from_effective(
                effective: ::serde_json::Map<String, ::serde_json::Value>,
                mut warnings: Vec<String>,
            ) -> Result<Config, $crate::config::ConfigError> {
                Ok(Config {
                    $(
                        $field: config_keys!(@read $ty $(, $read)?)(
                            Key::$variant,
                            effective.get(stringify!($field)),
                            &mut warnings,
                        )?,
                    )*
                    warnings,
                    effective,
                })
            }
        }
    };
    (@min) => { 0 };
    (@min $min:expr) => { $min };
    (@read $ty:ty) => { <$ty as $crate::config::field::Field>::read };
    (@read $ty:ty, $read:expr) => { $read };
}
pub(super) use config_keys;
