//! Start-up against the server (PROTOCOL §14.3): the agent record read before anything is
//! posted, the hold it may carry (an administrator's, or the agent's own that a health check
//! lifts), and the start-up posts (state, agent data, advertised images and queues).

use super::run::{Daemon, DaemonExit, RESTART_SIGNAL_COMMENT};
use super::states::DaemonEvent;
use crate::config::Key;
use crate::executor::AgentRequest;
use crate::server::http::AgentRecord;
use serde_json::json;
use std::time::Instant;

/// Comments of `offline` states that an agent posted itself on a stop or a restart, not an
/// administrator: this agent before it posted `restart` and `waiting` instead, and the
/// Python agent 1.2.0 on a SIGUSR1 restart. Such a record does not hold the next start.
const TRANSIENT_OFFLINE_COMMENTS: &[&str] = &["Agent stopped by signal", RESTART_SIGNAL_COMMENT];

/// Whether a record read at start-up holds the agent: `offline` or `maintenance`, unless
/// the comment shows the agent posted it itself on a stop or restart.
fn admin_hold(record: &AgentRecord) -> Option<AgentRequest> {
    let state = record.state.as_deref()?;
    match state {
        "maintenance" => {}
        "offline" if !TRANSIENT_OFFLINE_COMMENTS.contains(&record.comment.as_str()) => {}
        _ => return None,
    }
    Some(AgentRequest {
        state: state.to_owned(),
        comment: record.comment.clone(),
    })
}

impl Daemon {
    /// The start-up posts: the state (`waiting`, or the hold re-posted with its comment),
    /// the agent's data, advertised images and queues.
    pub(super) fn announce(&mut self) {
        let (state, comment) = match &self.held {
            Some(hold) => (hold.state.clone(), hold.comment.clone()),
            None => ("waiting".to_owned(), String::new()),
        };
        let mut body = json!({
            "state": state,
            "comment": comment,
            "job_id": "",
            "queues": self.config.job_queues,
            "location": self.config.location.clone().unwrap_or_default(),
            "provision_type": self.config.provision_type.clone().unwrap_or_default(),
        });
        if let Some(identifier) = &self.config.identifier {
            body["identifier"] = json!(identifier);
        }
        self.post_agent(body);
        if let Some(images) = self.config.value(Key::AdvertisedImages) {
            if let Err(err) = self.server.post_images(images) {
                log::warn!("advertising images failed: {err}");
            }
        }
        self.refresh_queues();
    }

    /// Start-up (PROTOCOL §14.3): read the agent record before posting anything, then come
    /// up `waiting`, or held in an administrator's `offline` or `maintenance` with its
    /// comment. While the record cannot be read the agent posts nothing and asks again;
    /// systemd is told it is ready anyway at the first failure [`crate::notify::ready_wait`]
    /// after the first try. `recovered_offline`: a recovered job's cleanup exited 46, so the
    /// agent comes up `offline` unless an administrator's hold is already there. `Some` when
    /// a stop arrived first.
    pub(super) fn come_up(
        &mut self,
        recovered_offline: Option<AgentRequest>,
    ) -> Option<DaemonExit> {
        let first_try = Instant::now();
        let record = loop {
            if self.stopping() {
                return Some(DaemonExit::Stopped);
            }
            let tried = Instant::now();
            match self.read_record() {
                Ok(record) => break record,
                Err(err) => {
                    let wait = self.unreachable_backoff();
                    self.unreachable_streak += 1;
                    log::warn!(
                        "cannot read this agent's record before starting (next try in {wait:?}): {err}"
                    );
                    if first_try.elapsed() >= crate::notify::ready_wait()
                        && !crate::notify::is_ready()
                    {
                        crate::notify::status("starting: the server has not answered yet");
                        if crate::notify::ready() {
                            log::warn!(
                                "the server has not answered for {}s: telling systemd the agent \
                                 is up anyway; it keeps asking, and posts nothing and takes no job \
                                 until the server answers",
                                first_try.elapsed().as_secs()
                            );
                        }
                    }
                    self.pause(wait.saturating_sub(tried.elapsed()));
                }
            }
        };
        self.unreachable_streak = 0;
        self.held = record.as_ref().and_then(admin_hold);
        if self.held.is_none() {
            self.held = recovered_offline;
        }
        let own = self
            .held
            .as_ref()
            .is_some_and(|hold| self.is_own_hold(&hold.state, &hold.comment));
        let on_start = self.health.as_ref().is_some_and(|h| h.on_start);
        match self.held.clone() {
            Some(hold) if own => {
                log::warn!(
                    "the agent's own {} ({:?}) is on the server: running the health check before taking a job",
                    hold.state,
                    hold.comment
                );
                self.fire(DaemonEvent::CheckDue, "");
                self.announce();
                self.check_now("start-up, the agent's own hold on the server");
                return None;
            }
            None if on_start => {
                self.fire(DaemonEvent::CheckDue, "");
                self.announce();
                self.check_now("start-up (healthcheck_on_start)");
                return None;
            }
            Some(hold) => {
                if on_start {
                    self.check_due = Some("start-up (healthcheck_on_start)".to_owned());
                }
                self.hold(&hold.state);
                log::warn!(
                    "the server holds this agent {} ({:?}); no job is taken until an administrator changes it",
                    hold.state,
                    hold.comment
                );
            }
            None => {
                self.fire(DaemonEvent::CameUp, "");
                if let Some((state, comment)) = record
                    .as_ref()
                    .and_then(|r| Some((r.state.as_deref()?, &r.comment)))
                {
                    log::info!("agent record was {state:?} ({comment:?}); coming up waiting");
                }
            }
        }
        self.announce();
        None
    }
}
