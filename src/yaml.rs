//! The one door to YAML: text to a JSON value and back. serde_yaml (deprecated upstream) is
//! used here and nowhere else, so swapping the backend touches this file only.
//!
//! What the parser accepts is YAML 1.2 as serde_yaml reads it, with three rules on top:
//! every mapping key must be a string (an integer, boolean, null or structured key is an
//! error naming its place), a key may appear only once per mapping, and a merge key `<<`
//! copies the entries of the mapping (or list of mappings) it points at into the mapping
//! that holds it, explicit entries winning, as PyYAML's `safe_load` does. Custom tags and
//! numbers that JSON cannot hold (NaN, infinities, integers beyond 64 bits) are errors.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// YAML that could not be read, with the place of the problem when the parser knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    /// The parser's explanation; it already names the line and column when they are known.
    pub message: String,
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// 1-based column of the problem, when known.
    pub column: Option<usize>,
}

/// Parses one YAML document into a JSON value. An empty document (or one holding only
/// comments) is `Value::Null`; more than one document is an error.
pub fn parse(text: &str) -> Result<Value, YamlError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    ValueSeed.deserialize(deserializer).map_err(|error| {
        let location = error.location();
        YamlError {
            message: error.to_string(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
        }
    })
}

/// Renders a JSON value as a YAML document (block style, keys in the map's order).
pub fn to_string(value: &Value) -> String {
    // Rendering a JSON value cannot fail in practice (string keys, finite numbers); should
    // the backend ever refuse, JSON is valid YAML, so fall back to it instead of panicking.
    serde_yaml::to_string(value).unwrap_or_else(|_| format!("{value:#}\n"))
}

/// Builds a `serde_json::Value` straight from the YAML events, so that errors keep the
/// parser's position and non-string keys can be refused instead of being stringified.
struct ValueSeed;

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value that JSON can hold")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Err(E::custom(format!(
            "the integer {v} does not fit in 64 bits"
        )))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        Err(E::custom(format!(
            "the integer {v} does not fit in 64 bits"
        )))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("the number {v} cannot be represented in JSON")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(ValueSeed)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        let mut merged: Vec<Map<String, Value>> = Vec::new();
        while let Some(key) = access.next_key_seed(KeySeed { taken: &map })? {
            let value = access.next_value_seed(ValueSeed)?;
            if key == "<<" {
                merged.extend(merge_sources::<A::Error>(value)?);
                continue;
            }
            map.insert(key, value);
        }
        // Explicit entries win; among merged mappings the first one listed wins (YAML
        // merge-key semantics).
        for source in merged {
            for (key, value) in source {
                map.entry(key).or_insert(value);
            }
        }
        Ok(Value::Object(map))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom(
            "YAML tags such as `!name` are not supported",
        ))
    }
}

/// The mappings a merge key (`<<`) points at: one mapping or a list of them.
fn merge_sources<E: de::Error>(value: Value) -> Result<Vec<Map<String, Value>>, E> {
    match value {
        Value::Object(map) => Ok(vec![map]),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(map) => Ok(map),
                _ => Err(E::custom(
                    "a merge key `<<` must point at a mapping or a list of mappings",
                )),
            })
            .collect(),
        _ => Err(E::custom(
            "a merge key `<<` must point at a mapping or a list of mappings",
        )),
    }
}

/// A mapping key: strings only, each once per mapping. Checked while the key is read so
/// that the error points at the key itself.
struct KeySeed<'a> {
    taken: &'a Map<String, Value>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(KeyVisitor { taken: self.taken })
    }
}

struct KeyVisitor<'a> {
    taken: &'a Map<String, Value>,
}

impl KeyVisitor<'_> {
    fn accept<E: de::Error>(&self, key: String) -> Result<String, E> {
        if self.taken.contains_key(&key) {
            return Err(E::custom(format!(
                "the key `{key}` appears twice in one mapping"
            )));
        }
        Ok(key)
    }

    fn refuse<E: de::Error>(found: &str) -> Result<String, E> {
        Err(E::custom(format!(
            "mapping keys must be strings, found {found} (quote the key to make it a string)"
        )))
    }
}

impl<'de> Visitor<'de> for KeyVisitor<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.accept(v.to_owned())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        self.accept(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Self::refuse(&format!("the boolean {v}"))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Self::refuse(&format!("the integer {v}"))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Self::refuse(&format!("the integer {v}"))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<String, E> {
        Self::refuse(&format!("the integer {v}"))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<String, E> {
        Self::refuse(&format!("the integer {v}"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Self::refuse(&format!("the number {v}"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Self::refuse("null (an empty key)")
    }
    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Self::refuse("null (an empty key)")
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<String, A::Error> {
        Self::refuse("a list")
    }
    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<String, A::Error> {
        Self::refuse("a mapping")
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<String, A::Error> {
        Self::refuse("a tagged value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_lists_and_maps() {
        let v = parse(
            "a: 1\nb: -2\nc: 1.5\nd: true\ne: null\nf: ~\ng:\nh: text\ni: [x, 'y']\nj: {k: v}\n",
        )
        .expect("valid YAML");
        assert_eq!(
            v,
            json!({"a": 1, "b": -2, "c": 1.5, "d": true, "e": null, "f": null, "g": null,
                   "h": "text", "i": ["x", "y"], "j": {"k": "v"}})
        );
    }

    #[test]
    fn keeps_key_order() {
        let v = parse("z: 1\na: 2\nm: 3\n").expect("valid YAML");
        let keys: Vec<&String> = v.as_object().expect("a mapping").keys().collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn empty_and_comment_only_documents_are_null() {
        assert_eq!(parse("").expect("empty"), Value::Null);
        assert_eq!(parse("# nothing\n\n").expect("comments"), Value::Null);
    }

    #[test]
    fn non_string_keys_are_errors_with_a_place() {
        for (text, found, line) in [
            ("a: 1\n1: x\n", "integer 1", 2),
            ("ok: 1\nsub:\n  true: x\n", "boolean true", 3),
            ("? [a, b]\n: x\n", "a list", 1),
            ("a: 1\n~: x\n", "null", 2),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.message.contains(found), "{text:?}: {err}");
            assert!(
                err.message.contains("mapping keys must be strings"),
                "{err}"
            );
            assert_eq!(err.line, Some(line), "{text:?}: {err}");
            assert!(err.column.is_some(), "{err}");
        }
    }

    #[test]
    fn quoted_number_keys_are_strings() {
        assert_eq!(parse("'1': x\n").expect("quoted"), json!({"1": "x"}));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = parse("a: 1\nb: [unclosed\n").expect_err("unclosed flow list");
        assert!(err.line.is_some() && err.column.is_some(), "{err:?}");
        let err = parse("a: 1\n  b: 2\n").expect_err("bad indentation");
        assert_eq!(err.line, Some(2), "{err:?}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert!(err.message.contains("`a` appears twice"), "{err}");
        assert_eq!(err.line, Some(3), "{err:?}");
    }

    #[test]
    fn merge_keys_copy_entries_and_explicit_ones_win() {
        let v = parse("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n").expect("merge");
        assert_eq!(v["use"], json!({"y": 3, "x": 1}));
        let v =
            parse("a: &a {x: 1}\nb: &b {x: 2, z: 2}\nc:\n  <<: [*a, *b]\n").expect("merge list");
        assert_eq!(v["c"], json!({"x": 1, "z": 2}));
        assert!(parse("a:\n  <<: 3\n").is_err());
    }

    #[test]
    fn more_than_one_document_is_an_error() {
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }

    #[test]
    fn tags_and_unrepresentable_numbers_are_errors() {
        assert!(parse("a: !custom x\n").is_err());
        assert!(parse("a: .nan\n").is_err());
        assert!(parse("a: .inf\n").is_err());
        assert!(parse("a: 340282366920938463463374607431768211455\n").is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = "[".repeat(100_000);
        assert!(parse(&text).is_err());
    }

    /// serde_yaml stays behind this module so that it can be swapped: no other source file
    /// under src/ may name it.
    #[test]
    fn no_other_module_uses_serde_yaml() {
        fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
            let entries = std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("src/yaml.rs")
                    && std::fs::read_to_string(&path).is_ok_and(|t| t.contains("serde_yaml"))
                {
                    found.push(path.display().to_string());
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "serde_yaml used outside src/yaml.rs: {found:?}"
        );
    }

    #[test]
    fn round_trips_through_text() {
        let value = json!({"agent_id": "a", "n": 3, "list": ["x", "y"], "map": {"k": "v"},
                           "multi": "line one\nline two\n", "flag": false, "nothing": null});
        let text = to_string(&value);
        assert_eq!(parse(&text).expect("own output parses"), value, "{text}");
    }
}
