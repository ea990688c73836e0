//! The job's events for its status webhook (PROTOCOL §3.15): each one appended to the list
//! the agent posts whole every time.

use crate::config::Config;
use crate::job::JobSpec;
use serde_json::{json, Value};

/// The job's cumulative event list (PROTOCOL §3.15); inert when the job has no webhook.
#[derive(Debug)]
pub(super) struct Events {
    header: Option<Value>,
    list: Vec<Value>,
}

impl Events {
    pub(super) fn for_job(config: &Config, spec: &JobSpec) -> Events {
        let header = spec.job_status_webhook().map(|hook| {
            json!({
                "agent_id": config.agent_id,
                "job_queue": spec.job_queue().unwrap_or(""),
                "job_status_webhook": hook,
            })
        });
        Events {
            header,
            list: Vec::new(),
        }
    }

    /// Appends an event; returns the body to post, `None` without a webhook.
    pub(super) fn push(&mut self, name: &str, detail: &str) -> Option<Value> {
        let mut body = self.header.clone()?;
        self.list.push(json!({
            "event_name": name,
            "timestamp": crate::time::now_iso(),
            "detail": detail,
        }));
        body["events"] = Value::Array(self.list.clone());
        Some(body)
    }
}
