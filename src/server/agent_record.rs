//! The agent's own record as the server keeps it (PROTOCOL §3.4): the four fields the
//! agent reads back each cycle, parsed straight from the answer without a JSON tree.

use super::reply::detail_of;

/// What the agent reads back from its own record (PROTOCOL §3.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentRecord {
    /// The server-side agent state; `None` when unknown.
    pub state: Option<String>,
    /// The reason for the state, `""` when none.
    pub comment: String,
    /// When the record was last written, as the server renders it.
    pub updated_at: Option<String>,
    /// The agent's queues that are restricted (with at least one owner).
    pub restricted_to: Vec<String>,
}

/// The body of a 200 answer to `GET /v1/agents/data/<agent>`; an error (the text for the
/// message) when it is not a JSON object. Read once a cycle: it goes straight into an
/// [`AgentRecord`], keeping only the four fields the agent looks at (no JSON tree is built).
/// A field of the wrong type counts as absent; for a key given twice the last one counts.
pub(crate) fn parse_agent_record(body: &[u8]) -> Result<AgentRecord, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde::Deserializer::deserialize_any(&mut de, RecordVisitor)
        .and_then(|record| de.end().map(|()| record))
        .map_err(|_| {
            format!(
                "answered something that is not a JSON object ({})",
                detail_of(body)
            )
        })
}

/// The keys of an agent record the agent reads.
#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum RecordField {
    State,
    Comment,
    UpdatedAt,
    RestrictedTo,
    #[serde(other)]
    Other,
}

struct RecordVisitor;

impl<'de> serde::de::Visitor<'de> for RecordVisitor {
    type Value = AgentRecord;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AgentRecord, A::Error> {
        let mut record = AgentRecord::default();
        let mut comment = None;
        while let Some(key) = map.next_key::<RecordField>()? {
            match key {
                RecordField::State => record.state = map.next_value::<Text>()?.0,
                RecordField::Comment => comment = map.next_value::<Text>()?.0,
                RecordField::UpdatedAt => record.updated_at = map.next_value::<Text>()?.0,
                RecordField::RestrictedTo => {
                    record.restricted_to = map.next_value::<QueueNames>()?.0;
                }
                RecordField::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        record.comment = comment.unwrap_or_default();
        Ok(record)
    }
}

/// A JSON string; any other value reads as `None`.
struct Text(Option<String>);

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        d.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = Text;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<Text, E> {
        Ok(Text(Some(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Text, E> {
        Ok(Text(Some(v)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
        Ok(Text(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Text, E> {
        Ok(Text(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
        Ok(Text(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Text, E> {
        Ok(Text(None))
    }

    fn visit_unit<E>(self) -> Result<Text, E> {
        Ok(Text(None))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Text(None))
    }
}

/// `restricted_to`: the keys of an object (queue → owners), or the strings of a list;
/// anything else reads as no queue.
struct QueueNames(Vec<String>);

impl<'de> serde::Deserialize<'de> for QueueNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<QueueNames, D::Error> {
        d.deserialize_any(QueueNamesVisitor)
    }
}

struct QueueNamesVisitor;

impl<'de> serde::de::Visitor<'de> for QueueNamesVisitor {
    type Value = QueueNames;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<QueueNames, A::Error> {
        let mut names: Vec<String> = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            map.next_value::<serde::de::IgnoredAny>()?;
            // A key given twice is one queue, as in a JSON object.
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(QueueNames(names))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<QueueNames, A::Error> {
        let mut names = Vec::new();
        while let Some(Text(name)) = seq.next_element::<Text>()? {
            names.extend(name);
        }
        Ok(QueueNames(names))
    }

    fn visit_str<E>(self, _: &str) -> Result<QueueNames, E> {
        Ok(QueueNames(Vec::new()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<QueueNames, E> {
        Ok(QueueNames(Vec::new()))
    }

    fn visit_i64<E>(self, _: i64) -> Result<QueueNames, E> {
        Ok(QueueNames(Vec::new()))
    }

    fn visit_u64<E>(self, _: u64) -> Result<QueueNames, E> {
        Ok(QueueNames(Vec::new()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<QueueNames, E> {
        Ok(QueueNames(Vec::new()))
    }

    fn visit_unit<E>(self) -> Result<QueueNames, E> {
        Ok(QueueNames(Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn agent_record_fields() {
        let r = parse_agent_record(
            br#"{"state": "offline", "comment": "why", "updated_at": "2026-01-05T10:00:00Z",
                "restricted_to": {"q1": ["alice"], "q2": ["bob"]}, "name": "a"}"#,
        )
        .expect("an object");
        assert_eq!(r.state.as_deref(), Some("offline"));
        assert_eq!(r.comment, "why");
        assert_eq!(r.updated_at.as_deref(), Some("2026-01-05T10:00:00Z"));
        assert_eq!(r.restricted_to, ["q1", "q2"]);
        let r = parse_agent_record(br#"{"restricted_to": ["q3", 4, "q4"], "state": 1}"#)
            .expect("an object");
        assert_eq!(
            (r.state, r.restricted_to),
            (None, vec!["q3".into(), "q4".into()])
        );
        assert_eq!(parse_agent_record(b"{}"), Ok(AgentRecord::default()));
        for bad in [&b"[]"[..], b"", b"null", b"{\"state\""] {
            let why = parse_agent_record(bad).expect_err("not an object");
            assert!(why.contains("not a JSON object"), "{why}");
        }
    }

    /// What the agent record was before it was parsed without a JSON tree: the fields of a
    /// `serde_json::Value` object.
    fn reference(body: &[u8]) -> Option<AgentRecord> {
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
            return None;
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
        let restricted_to = match map.get("restricted_to") {
            Some(Value::Object(queues)) => queues.keys().cloned().collect(),
            Some(Value::Array(queues)) => queues
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        Some(AgentRecord {
            state: text("state"),
            comment: text("comment").unwrap_or_default(),
            updated_at: text("updated_at"),
            restricted_to,
        })
    }

    #[test]
    fn agent_records_read_as_a_json_tree_would() {
        for body in [
            &br#"{"name": "a", "state": "waiting", "comment": "", "queues": ["q"], "location": "",
                "provision_type": "x", "job_id": "", "updated_at": "2026-01-05T10:00:00Z",
                "provision_streak_type": "pass", "provision_streak_count": 3,
                "restricted_to": {}}"#[..],
            br#"{"state": "a", "state": "b", "comment": null, "updated_at": 5}"#,
            br#"{"state": "a", "state": 7}"#,
            br#"{"restricted_to": {"q1": [], "q2": {"x": [1]}, "q1": 3}}"#,
            br#"{"restricted_to": ["q1", ["q2"], {"q3": 1}, null, "q4"]}"#,
            br#"{"restricted_to": "q1", "comment": ["x"], "state": {"a": "b"}}"#,
            br#"{"state": "\u00e9\n\"q\"", "comment": "tab\t"}"#,
            br#"  {"nested": [[[{"deep": [1, 2.5, -3e2, true, false, null]}]]]}  "#,
            b"{}",
            b"[]",
            b"",
            b"null",
            b"{\"state\"",
            br#"{"state": "a"} trailing"#,
            br#"{"state": 1e999}"#,
            b"\xff",
        ] {
            assert_eq!(
                parse_agent_record(body).ok(),
                reference(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_json_reads_as_a_json_tree_would(value in json_value()) {
            let body = serde_json::to_vec(&value).expect("serialisable");
            proptest::prop_assert_eq!(parse_agent_record(&body).ok(), reference(&body));
        }
    }

    /// JSON values whose objects often use the record's keys.
    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("state".to_string()),
            Just("comment".to_string()),
            Just("updated_at".to_string()),
            Just("restricted_to".to_string()),
            "[a-z_]{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::vec((key.clone(), inner), 0..6)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }
}
