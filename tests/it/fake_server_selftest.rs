//! The fake Testflinger server itself: status codes, bodies, auth, job selection and faults.

use crate::support::fake_server::{FakeConfig, FakeServer, Route, DEFAULT_REFRESH_TOKEN};
use crate::support::{iso_time, multipart};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const JOB_A: &str = "2bac1457-7d5e-4b8f-9f6a-15f23f69fd39";

/// One answer, read whole.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    set_cookie: Option<String>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

/// A ureq client that returns every status as a response.
struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    cookie: Option<String>,
}

impl Client {
    fn new(server: &FakeServer) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            base: server.url(),
            token: None,
            cookie: None,
        }
    }

    /// Authenticated as an agent named `name` (token from the refresh endpoint, cookie set).
    fn agent(server: &FakeServer, name: &str) -> Client {
        let mut c = Client::new(server);
        let refreshed = c.post_json(
            "/v1/oauth2/refresh",
            json!({"refresh_token": DEFAULT_REFRESH_TOKEN}),
        );
        assert_eq!(refreshed.status, 200, "{refreshed:?}");
        c.token = Some(
            refreshed.json()["access_token"]
                .as_str()
                .expect("access_token")
                .to_string(),
        );
        c.cookie = Some(format!("agent_name={name}"));
        c
    }

    fn finish(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithBody>,
        content_type: &str,
        body: &[u8],
    ) -> Result<Answer, ureq::Error> {
        let mut req = req.header("Content-Type", content_type);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        if let Some(c) = &self.cookie {
            req = req.header("Cookie", c);
        }
        read(req.send(body)?)
    }

    fn try_get(&self, path: &str) -> Result<Answer, ureq::Error> {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        if let Some(c) = &self.cookie {
            req = req.header("Cookie", c);
        }
        read(req.call()?)
    }

    fn get(&self, path: &str) -> Answer {
        self.try_get(path).expect("GET answered")
    }

    fn post_json(&self, path: &str, body: Value) -> Answer {
        let bytes = serde_json::to_vec(&body).expect("serialise");
        self.post_raw(path, "application/json", &bytes)
    }

    fn post_raw(&self, path: &str, content_type: &str, body: &[u8]) -> Answer {
        self.finish(
            self.agent.post(&format!("{}{path}", self.base)),
            content_type,
            body,
        )
        .expect("POST answered")
    }
}

fn read(mut resp: ureq::http::Response<ureq::Body>) -> Result<Answer, ureq::Error> {
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(Answer {
        status: resp.status().as_u16(),
        body: resp.body_mut().read_to_string()?,
        set_cookie,
    })
}

fn no_auth() -> FakeServer {
    FakeServer::start_with(FakeConfig {
        require_auth: false,
        ..FakeConfig::default()
    })
}

fn fragment(n: i64, phase: &str, data: &str) -> Value {
    json!({
        "fragment_number": n,
        "timestamp": format!("2026-01-05T10:00:{:02}.000000+00:00", n),
        "phase": phase,
        "log_data": data,
    })
}

#[test]
fn health_unknown_routes_and_bad_ids() {
    let server = FakeServer::start();
    let c = Client::new(&server);
    let health = c.get("/v1");
    assert_eq!(health.status, 200);
    assert!(
        health.body.starts_with("Testflinger Server v"),
        "{health:?}"
    );
    assert_eq!(c.get("/v1/").status, 200, "trailing slash accepted");
    let missing = c.get("/v1/nothing/here");
    assert_eq!(missing.status, 404);
    assert!(missing.body.starts_with("Not found: "), "{missing:?}");
    let bad = c.get("/v1/result/not-a-uuid");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["message"], "Invalid job_id specified");
    let bad_text = Client::agent(&server, "a").get("/v1/job/nope/attachments");
    assert_eq!(
        (bad_text.status, bad_text.body.as_str()),
        (400, "Invalid job id\n")
    );
    // Unknown log types are not routes.
    let c = Client::agent(&server, "a");
    assert_eq!(
        c.post_json(
            &format!("/v1/result/{JOB_A}/log/console"),
            fragment(0, "test", "x")
        )
        .status,
        404
    );
    assert!(server.server_errors().is_empty());
}

#[test]
fn uuid_forms_follow_python() {
    let server = FakeServer::start();
    let c = Client::new(&server);
    for form in [
        "2bac1457-7d5e-4b8f-9f6a-15f23f69fd39",
        "2bac14577d5e4b8f9f6a15f23f69fd39",
        "%7B2bac1457-7d5e-4b8f-9f6a-15f23f69fd39%7D",
        "urn:uuid:2bac1457-7d5e-4b8f-9f6a-15f23f69fd39",
        "2BAC1457-7D5E-4B8F-9F6A-15F23F69FD39",
    ] {
        assert_eq!(c.get(&format!("/v1/result/{form}")).status, 204, "{form}");
    }
    for form in ["2bac1457", "2bac1457-7d5e-4b8f-9f6a-15f23f69fd3g", "x"] {
        assert_eq!(c.get(&format!("/v1/result/{form}")).status, 400, "{form}");
    }
}

#[test]
fn auth_flow_refresh_bearer_expiry_and_missing_token() {
    let server = FakeServer::start();
    let mut c = Client::new(&server);
    let body = json!({"state": "waiting", "comment": ""});

    // No token, OIDC off: the anonymous contributor is refused.
    assert_eq!(c.post_json("/v1/agents/data/a1", body.clone()).status, 403);
    // ... but may read results and agent data.
    assert_eq!(c.get(&format!("/v1/result/{JOB_A}")).status, 204);

    let wrong = c.post_json("/v1/oauth2/refresh", json!({"refresh_token": "nope"}));
    assert_eq!(wrong.status, 400);
    assert_eq!(wrong.json()["message"], "Invalid refresh token.");
    assert_eq!(
        c.post_json("/v1/oauth2/refresh", json!({"refresh_token": ""}))
            .status,
        422
    );
    let ok = c.post_json(
        "/v1/oauth2/refresh",
        json!({"refresh_token": DEFAULT_REFRESH_TOKEN}),
    );
    assert_eq!(ok.status, 200);
    let granted = ok.json();
    assert_eq!(granted["token_type"], "Bearer");
    assert_eq!(granted["expires_in"], 600);
    c.token = Some(granted["access_token"].as_str().expect("token").to_string());

    assert_eq!(c.post_json("/v1/agents/data/a1", body.clone()).status, 200);

    server.expire_all_tokens();
    let expired = c.post_json("/v1/agents/data/a1", body.clone());
    assert_eq!(expired.status, 401);
    assert_eq!(expired.json()["message"], "Token has expired");

    c.token = Some("forged".into());
    assert_eq!(c.post_json("/v1/agents/data/a1", body.clone()).status, 403);

    server.revoke_refresh_token(DEFAULT_REFRESH_TOKEN);
    let revoked = c.post_json(
        "/v1/oauth2/refresh",
        json!({"refresh_token": DEFAULT_REFRESH_TOKEN}),
    );
    assert_eq!(revoked.status, 400);
    server.add_refresh_token("second");
    let second = c.post_json("/v1/oauth2/refresh", json!({"refresh_token": "second"}));
    assert_eq!(second.status, 200);
}

#[test]
fn tokens_expire_after_their_ttl() {
    let server = FakeServer::start_with(FakeConfig {
        access_token_ttl: Duration::from_millis(250),
        ..FakeConfig::default()
    });
    let c = Client::agent(&server, "a1");
    assert_eq!(c.get("/v1/agents/data/a1").status, 404);
    assert!(server.wait_until(Duration::from_secs(1), |_| {
        c.get("/v1/agents/data/a1").status == 401
    }));
}

#[test]
fn oidc_turns_missing_tokens_into_401() {
    let server = FakeServer::start_with(FakeConfig {
        oidc_enabled: true,
        ..FakeConfig::default()
    });
    let c = Client::new(&server);
    assert_eq!(c.post_json("/v1/agents/data/a1", json!({})).status, 401);
    assert_eq!(c.get("/v1/agents/data/a1").status, 401);
    assert_eq!(c.get(&format!("/v1/result/{JOB_A}")).status, 401);
    // Health and refresh stay open.
    assert_eq!(c.get("/v1").status, 200);
}

#[test]
fn archived_mode_needs_no_token_but_still_the_cookie() {
    let server = no_auth();
    let mut c = Client::new(&server);
    let posted = c.post_json("/v1/agents/data/old-agent", json!({"state": "waiting"}));
    assert_eq!(posted.status, 200);
    assert_eq!(c.get("/v1/job?queue=q").status, 401);
    c.cookie = Some("agent_name=old-agent".into());
    assert_eq!(c.get("/v1/job?queue=q").status, 204);
}

#[test]
fn agent_data_cookie_record_and_restricted_queues() {
    let server = FakeServer::start();
    let c = Client::agent(&server, "dev-001");
    let posted = c.post_json(
        "/v1/agents/data/dev-001",
        json!({"location": "lab", "queues": ["rpi4", "rpi4-001"], "provision_type": "noprovision"}),
    );
    assert_eq!(posted.status, 200);
    assert_eq!(posted.json(), json!({"status": "OK"}));
    assert_eq!(
        posted.set_cookie.as_deref(),
        Some("agent_name=dev-001; HttpOnly; SameSite=Strict; Path=/")
    );
    c.post_json(
        "/v1/agents/data/dev-001",
        json!({"state": "test", "comment": "", "log": ["a", "b"]}),
    );
    server.set_restricted_queue("rpi4-001", &["alice"]);
    server.set_restricted_queue("rpi4", &[]);

    let record = c.get("/v1/agents/data/dev-001").json();
    assert_eq!(record["name"], "dev-001");
    assert_eq!(record["state"], "test");
    assert_eq!(record["location"], "lab");
    assert!(record["updated_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.len() == 20));
    assert_eq!(record["restricted_to"], json!({"rpi4-001": ["alice"]}));
    assert!(record.get("log").is_none());
    assert_eq!(server.agent_log("dev-001"), vec!["a", "b"]);
    assert_eq!(server.agent_posts("dev-001").len(), 2);

    let unknown = c.get("/v1/agents/data/ghost");
    assert_eq!((unknown.status, unknown.json()), (404, json!({})));

    server.set_agent_state("dev-001", "offline", "maintenance window");
    let record = c.get("/v1/agents/data/dev-001").json();
    assert_eq!(
        (record["state"].clone(), record["comment"].clone()),
        (json!("offline"), json!("maintenance window"))
    );
}

#[test]
fn strict_422_on_unknown_fields_and_wrong_types() {
    let server = FakeServer::start();
    let c = Client::agent(&server, "a1");
    let result = c.post_json(
        &format!("/v1/result/{JOB_A}"),
        json!({"job_state": "test", "test_output": "legacy"}),
    );
    assert_eq!(result.status, 422);
    assert_eq!(
        result.json(),
        json!({
            "message": "Validation error",
            "detail": {"json": {"test_output": ["Unknown field."]}},
        })
    );
    let bad_status = c.post_json(
        &format!("/v1/result/{JOB_A}"),
        json!({"status": {"testing": 0}}),
    );
    assert_eq!(bad_status.status, 422);

    let mut frag = fragment(0, "test", "x");
    frag["extra"] = json!(1);
    let log = c.post_json(&format!("/v1/result/{JOB_A}/log/output"), frag);
    assert_eq!(log.status, 422);
    assert_eq!(
        log.json()["detail"]["json"]["extra"],
        json!(["Unknown field."])
    );
    let mut frag = fragment(0, "test", "x");
    frag["fragment_number"] = json!("0");
    assert_eq!(
        c.post_json(&format!("/v1/result/{JOB_A}/log/output"), frag)
            .status,
        422
    );
    let wrong_phase = c.post_json(
        &format!("/v1/result/{JOB_A}/log/serial"),
        fragment(0, "teardown", "x"),
    );
    assert_eq!(wrong_phase.status, 422);
    let missing = c.post_json(
        &format!("/v1/result/{JOB_A}/log/output"),
        json!({"fragment_number": 0}),
    );
    assert_eq!(
        missing.json()["detail"]["json"]["log_data"],
        json!(["Missing data for required field."])
    );

    // The archived agent's map-valued queues.
    let agent = c.post_json("/v1/agents/data/a1", json!({"queues": {"rpi4": "desc"}}));
    assert_eq!(agent.status, 422);
    assert_eq!(
        agent.json()["detail"]["json"]["queues"],
        json!(["Not a valid list."])
    );
    assert_eq!(
        c.post_json("/v1/agents/data/a1", json!({"status": "waiting"}))
            .status,
        422
    );
    assert!(server.agent_posts("a1").is_empty());
    assert!(server.fragments(JOB_A, "output").is_empty());

    // Bad JSON is a 400; a non-JSON or empty body is read as {} like the real server.
    assert_eq!(
        c.post_raw("/v1/agents/data/a1", "application/json", b"{nope")
            .status,
        400
    );
    assert_eq!(
        c.post_raw("/v1/agents/data/a1", "text/plain", b"{\"state\": \"x\"}")
            .status,
        200
    );
    assert_eq!(
        c.post_raw("/v1/agents/data/a1", "application/json", b"")
            .status,
        200
    );
    assert_eq!(server.agent_posts("a1"), vec![json!({}), json!({})]);
}

#[test]
fn queues_and_images_validation() {
    let server = FakeServer::start();
    let c = Client::agent(&server, "a1");
    assert_eq!(
        c.post_json("/v1/agents/queues", json!({"rpi4": "Raspberry Pi 4"}))
            .status,
        200
    );
    assert_eq!(
        c.post_json("/v1/agents/queues", json!({"rpi4": 4})).status,
        422
    );
    assert_eq!(
        server.advertised_queues(),
        json!({"rpi4": "Raspberry Pi 4"})
    );
    assert_eq!(
        c.post_json("/v1/agents/images", json!({"rpi4": {"core22": "url: x"}}))
            .status,
        200
    );
    for bad in [
        json!({"rpi4": [{"core22": "url: x"}]}),
        json!({"rpi4": {"core.22": "url: x"}}),
        json!({"rpi4": {"$core": "url: x"}}),
        json!({"rpi4": {"core22": {"url": "x"}}}),
    ] {
        assert_eq!(
            c.post_json("/v1/agents/images", bad.clone()).status,
            422,
            "{bad}"
        );
    }
    assert_eq!(
        server.advertised_images(),
        json!({"rpi4": {"core22": "url: x"}})
    );
}

#[test]
fn job_poll_needs_queue_and_cookie_and_answers_204_when_idle() {
    let server = FakeServer::start();
    let mut c = Client::agent(&server, "a1");
    assert_eq!(c.get("/v1/job").status, 400);
    let idle = c.get("/v1/job?queue=q1&queue=q2");
    assert_eq!((idle.status, idle.body.as_str()), (204, ""));
    c.cookie = None;
    let anonymous = c.get("/v1/job?queue=q1");
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.json()["message"], "Agent not identified");
    let mut no_token = Client::new(&server);
    no_token.cookie = Some("agent_name=a1".into());
    assert_eq!(no_token.get("/v1/job?queue=q1").status, 403);
}

#[test]
fn job_selection_by_priority_queue_and_exclusion() {
    let server = FakeServer::start();
    let low = server.submit_job(json!({"job_queue": "q1", "job_priority": 1}));
    let high = server.submit_job(json!({"job_queue": "q1", "job_priority": 5}));
    let other = server.submit_job(json!({"job_queue": "q2", "job_priority": 10}));
    let excluding = server
        .submit_job(json!({"job_queue": "q1", "job_priority": 9, "exclude_agents": ["agent-a"]}));
    let plain = server.submit_job(json!({"job_queue": "q1"}));
    assert_eq!(server.job_state(&high).as_deref(), Some("waiting"));

    let a = Client::agent(&server, "agent-a");
    let b = Client::agent(&server, "agent-b");
    let first = a.get("/v1/job?queue=q1");
    assert_eq!(first.status, 200);
    let doc = first.json();
    assert_eq!(doc["job_id"], json!(high));
    assert_eq!(doc["job_queue"], "q1");
    assert_eq!(doc["exclude_agents"], json!([]));
    let started = doc["started_at"].as_str().expect("started_at");
    assert!(started.ends_with("+00:00Z"), "{started}");
    assert_eq!(server.job_state(&high).as_deref(), Some("running"));

    assert_eq!(b.get("/v1/job?queue=q1").json()["job_id"], json!(excluding));
    assert_eq!(a.get("/v1/job?queue=q1").json()["job_id"], json!(low));
    assert_eq!(a.get("/v1/job?queue=q1").json()["job_id"], json!(plain));
    assert_eq!(a.get("/v1/job?queue=q1").status, 204);
    assert_eq!(
        a.get("/v1/job?queue=q1&queue=q2").json()["job_id"],
        json!(other)
    );

    // Over HTTP, exclude_agents must leave some known agent on the queue.
    let client = Client::new(&server);
    let refused = client.post_json(
        "/v1/job",
        json!({"job_queue": "q3", "exclude_agents": ["agent-a"]}),
    );
    assert_eq!(refused.status, 422);
    let submitted = client.post_json("/v1/job", json!({"job_queue": "q3", "job_id": JOB_A}));
    assert_eq!(submitted.json(), json!({"job_id": JOB_A}));
    assert_eq!(
        client
            .post_json("/v1/job", json!({"job_queue": "q3", "surprise": 1}))
            .status,
        422
    );
}

#[test]
fn attachments_hold_a_job_until_uploaded() {
    let server = FakeServer::start();
    let id = server.submit_job(json!({
        "job_queue": "q1",
        "test_data": {"test_cmds": "true", "attachments": [{"agent": "data.txt"}]},
    }));
    let a = Client::agent(&server, "agent-a");
    assert_eq!(a.get("/v1/job?queue=q1").status, 204);
    assert_eq!(
        a.get(&format!("/v1/job/{id}/attachments")).status,
        204,
        "no archive yet"
    );
    let client = Client::new(&server);
    let (content_type, body) = multipart::file_upload(b"tarball");
    let uploaded = client.post_raw(&format!("/v1/job/{id}/attachments"), &content_type, &body);
    assert_eq!((uploaded.status, uploaded.body.as_str()), (200, "OK"));
    let doc = a.get("/v1/job?queue=q1").json();
    assert_eq!(doc["attachments_status"], "complete");
    let archive = a.get(&format!("/v1/job/{id}/attachments"));
    assert_eq!((archive.status, archive.body.as_str()), (200, "tarball"));
}

#[test]
fn secrets_are_checked_at_submission_and_resolved_when_taken() {
    let server = FakeServer::start_with(FakeConfig {
        secrets: vec![("team/token".into(), "s3cr3t".into())],
        ..FakeConfig::default()
    });
    let missing = server.try_submit_job(json!({
        "job_queue": "q1",
        "test_data": {"secrets": {"TOKEN": "team/other"}},
    }));
    assert!(missing.is_err(), "{missing:?}");
    let id = server.submit_job(json!({
        "job_queue": "q1",
        "test_data": {"secrets": {"TOKEN": "team/token"}},
    }));
    let doc = Client::agent(&server, "a").get("/v1/job?queue=q1").json();
    assert_eq!(doc["job_id"], json!(id));
    assert_eq!(doc["test_data"]["secrets"], json!({"TOKEN": "s3cr3t"}));
    assert_eq!(doc["client_id"], "fake-client");
}

#[test]
fn results_are_shallow_set_and_read_back_flat() {
    let server = FakeServer::start();
    let id = server.submit_job(json!({"job_queue": "q1"}));
    let c = Client::agent(&server, "a1");
    let post = |body: Value| c.post_json(&format!("/v1/result/{id}"), body);
    assert_eq!(post(json!({"job_state": "setup"})).status, 200);
    assert_eq!(
        post(json!({"status": {"setup": 0, "provision": 1}})).status,
        200
    );
    assert_eq!(post(json!({"status": {"setup": 0}})).status, 200);
    assert_eq!(
        post(json!({"device_info": {"device_ip": "10.0.0.5"}})).status,
        200
    );
    assert_eq!(
        server.result_data(&id),
        json!({
            "job_state": "setup",
            "status": {"setup": 0},
            "device_info": {"device_ip": "10.0.0.5"},
        })
    );
    c.post_json(
        &format!("/v1/result/{id}/log/output"),
        fragment(0, "setup", "hello "),
    );
    c.post_json(
        &format!("/v1/result/{id}/log/serial"),
        fragment(0, "setup", "console"),
    );
    let flat = c.get(&format!("/v1/result/{id}")).json();
    assert_eq!(
        flat,
        json!({
            "job_state": "setup",
            "device_info": {"device_ip": "10.0.0.5"},
            "setup_status": 0,
            "setup_output": "hello ",
            "setup_serial": "console",
        })
    );
    // Posting to an unknown job is accepted and changes nothing.
    assert_eq!(
        c.post_json(&format!("/v1/result/{JOB_A}"), json!({"job_state": "x"}))
            .status,
        200
    );
    assert_eq!(c.get(&format!("/v1/result/{JOB_A}")).status, 204);
}

#[test]
fn oversized_result_posts_get_413() {
    let server = FakeServer::start();
    let c = Client::agent(&server, "a1");
    let mut body = br#"{"device_info": {"blob": ""#.to_vec();
    body.resize(16 * 1024 * 1024, b'x');
    body.extend_from_slice(br#""}}"#);
    let answer = c.post_raw(&format!("/v1/result/{JOB_A}"), "application/json", &body);
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["message"], "Payload too large");
    let just_under = c.post_json(
        &format!("/v1/result/{JOB_A}"),
        json!({"device_info": {"blob": "x".repeat(1024 * 1024)}}),
    );
    assert_eq!(just_under.status, 200);
}

#[test]
fn fragments_keep_duplicates_and_read_back_like_the_server() {
    let server = FakeServer::start();
    let id = server.submit_job(json!({"job_queue": "q1"}));
    let c = Client::agent(&server, "a1");
    let path = format!("/v1/result/{id}/log/output");
    for (n, phase, data) in [
        (0, "setup", "a"),
        (2, "test", "c"),
        (1, "setup", "b"),
        (1, "setup", "b"),
        (3, "test", "d"),
    ] {
        let answer = c.post_json(&path, fragment(n, phase, data));
        assert_eq!((answer.status, answer.body.as_str()), (200, "OK"));
    }
    let stored = server.fragments(&id, "output");
    assert_eq!(
        stored.iter().map(|f| f.fragment_number).collect::<Vec<_>>(),
        vec![0, 2, 1, 1, 3]
    );
    assert_eq!(stored[1].phase, "test");
    assert_eq!(stored[1].timestamp, "2026-01-05T10:00:02.000000+00:00");
    assert_eq!(server.log_text(&id, "output"), "abbcd");
    assert!(server.fragments(&id, "serial").is_empty());

    let all = c.get(&format!("/v1/result/{id}")).json();
    assert_eq!(all["setup_output"], "abb");
    assert_eq!(all["test_output"], "cd");

    let reader = Client::new(&server);
    let back = reader.get(&path).json();
    assert_eq!(
        back["output"]["setup"],
        json!({"last_fragment_number": 1, "log_data": "abb"})
    );
    assert_eq!(
        back["output"]["reserve"],
        json!({"last_fragment_number": -1, "log_data": ""})
    );
    assert_eq!(back["output"].as_object().map(|o| o.len()), Some(7));
    let test_only = reader
        .get(&format!("{path}?phase=test&start_fragment=3"))
        .json();
    assert_eq!(
        test_only,
        json!({"output": {"test": {"last_fragment_number": 3, "log_data": "d"}}})
    );
    let since = reader
        .get(&format!(
            "{path}?phase=setup&start_timestamp=2026-01-05T10:00:01%2B00:00"
        ))
        .json();
    assert_eq!(since["output"]["setup"]["log_data"], "bb");
    assert_eq!(reader.get(&format!("{path}?phase=nope")).status, 400);
    assert_eq!(reader.get(&format!("{path}?start_fragment=-1")).status, 400);
    assert_eq!(reader.get(&format!("{path}?colour=blue")).status, 400);
    // The agent's token cannot read logs back.
    assert_eq!(c.get(&path).status, 403);
}

#[test]
fn artifact_multipart_round_trip() {
    let server = FakeServer::start();
    let c = Client::agent(&server, "a1");
    let path = format!("/v1/result/{JOB_A}/artifact");
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let (content_type, body) = multipart::file_upload(&payload);
    let uploaded = c.post_raw(&path, &content_type, &body);
    assert_eq!((uploaded.status, uploaded.body.as_str()), (200, "OK"));
    assert_eq!(server.artifact(JOB_A).as_deref(), Some(payload.as_slice()));

    let reader = Client::new(&server);
    let resp = reader
        .agent
        .get(&format!("{}{path}", server.url()))
        .call()
        .expect("GET artifact");
    let downloaded = resp.into_body().read_to_vec().expect("read artifact");
    assert_eq!(downloaded, payload);

    let (content_type, body) = multipart::build(&[("other", Some("file"), "text/plain", b"x")]);
    assert_eq!(c.post_raw(&path, &content_type, &body).status, 400);
    let (content_type, body) = multipart::build(&[("file", None, "text/plain", b"x")]);
    assert_eq!(
        c.post_raw(&path, &content_type, &body).status,
        400,
        "a part without filename is a form field, not a file"
    );
    assert_eq!(c.post_raw(&path, "application/json", b"{}").status, 400);
    let (content_type, body) = multipart::file_upload(b"second");
    c.post_raw(&path, &content_type, &body);
    assert_eq!(server.artifact(JOB_A).as_deref(), Some(&b"second"[..]));
    assert_eq!(server.artifacts(JOB_A).len(), 2);
    assert_eq!(
        reader
            .get(&format!(
                "/v1/result/{}/artifact",
                "1e1a8a35-4d0e-4a53-9d43-2a2b2cb5d4a1"
            ))
            .status,
        204
    );
}

#[test]
fn cancel_action_rules() {
    let server = FakeServer::start();
    let id = server.submit_job(json!({"job_queue": "q1"}));
    let c = Client::new(&server);
    let action = format!("/v1/job/{id}/action");
    assert_eq!(c.post_json(&action, json!({"action": "pause"})).status, 422);
    assert_eq!(c.post_json(&action, json!({"action": "cancel"})).body, "OK");
    assert_eq!(server.job_state(&id).as_deref(), Some("cancelled"));
    let again = c.post_json(&action, json!({"action": "cancel"}));
    assert_eq!(
        (again.status, again.body.as_str()),
        (400, "The job is already completed or cancelled")
    );
    let done = server.submit_job(json!({"job_queue": "q1"}));
    assert!(server.set_job_state(&done, "complete"));
    assert!(!server.cancel_job(&done));
    assert_eq!(
        c.post_json(
            &format!("/v1/job/{done}/action"),
            json!({"action": "cancel"})
        )
        .status,
        400
    );
    assert_eq!(
        c.post_json("/v1/job/nope/action", json!({"action": "cancel"}))
            .status,
        400
    );
    let running = server.submit_job(json!({"job_queue": "q1"}));
    assert!(server.cancel_job(&running));
}

#[test]
fn events_need_a_webhook_and_a_configured_base() {
    let job = json!({"job_queue": "q1", "job_status_webhook": "https://hooks.example.com/tf"});
    let event = |hook: &str| {
        json!({
            "agent_id": "a1",
            "job_queue": "q1",
            "job_status_webhook": hook,
            "events": [{
                "event_name": "job_start",
                "timestamp": "2026-01-05T10:00:00+00:00",
                "detail": "",
            }],
        })
    };

    let unconfigured = FakeServer::start();
    let id = unconfigured.submit_job(job.clone());
    let c = Client::agent(&unconfigured, "a1");
    let path = format!("/v1/job/{id}/events");
    let answer = c.post_json(&path, event("https://hooks.example.com/tf"));
    assert_eq!(answer.status, 500);
    assert_eq!(answer.json()["message"], "Webhook URL not configured");
    assert_eq!(unconfigured.events(&id).len(), 1);
    let mut no_hook = event("x");
    no_hook
        .as_object_mut()
        .expect("object")
        .remove("job_status_webhook");
    assert_eq!(c.post_json(&path, no_hook).status, 422);
    assert_eq!(c.post_json(&path, event("not a url")).status, 422);
    assert_eq!(
        c.post_json(
            &format!("/v1/job/{JOB_A}/events"),
            event("https://hooks.example.com/tf")
        )
        .status,
        404
    );

    let configured = FakeServer::start_with(FakeConfig {
        webhook_base: Some("https://hooks.example.com".into()),
        ..FakeConfig::default()
    });
    let id = configured.submit_job(job);
    let c = Client::agent(&configured, "a1");
    let path = format!("/v1/job/{id}/events");
    assert_eq!(
        c.post_json(&path, event("https://hooks.example.com/tf"))
            .status,
        200
    );
    assert_eq!(
        c.post_json(&path, event("https://elsewhere.example.com/tf"))
            .status,
        403
    );
    assert_eq!(
        configured.events(&id)[0]["events"][0]["event_name"],
        "job_start"
    );
}

#[test]
fn provision_logs_need_a_known_agent_and_track_streaks() {
    let server = FakeServer::start();
    let c = Client::agent(&server, "a1");
    let log = |code: i64| json!({"job_id": JOB_A, "exit_code": code, "detail": "provision_fail"});
    let unknown = c.post_json("/v1/agents/provision_logs/a1", log(1));
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (404, "Agent not found\n")
    );
    c.post_json("/v1/agents/data/a1", json!({"state": "waiting"}));
    c.post_json("/v1/agents/provision_logs/a1", log(1));
    c.post_json("/v1/agents/provision_logs/a1", log(1));
    let record = server.agent_record("a1").expect("record");
    assert_eq!(record["provision_streak_type"], "fail");
    assert_eq!(record["provision_streak_count"], 2);
    c.post_json("/v1/agents/provision_logs/a1", log(0));
    let record = server.agent_record("a1").expect("record");
    assert_eq!(
        (
            record["provision_streak_type"].clone(),
            record["provision_streak_count"].clone()
        ),
        (json!("pass"), json!(1))
    );
    assert_eq!(server.provision_logs("a1").len(), 4);
    assert_eq!(
        c.post_json("/v1/agents/provision_logs/a1", json!({"job_id": JOB_A}))
            .status,
        422
    );
}

#[test]
fn fail_next_answers_then_recovers_without_applying() {
    let server = FakeServer::start();
    let id = server.submit_job(json!({"job_queue": "q1"}));
    let c = Client::agent(&server, "a1");
    server.fail_next(Route::ResultPost, 2, 503);
    let post = || c.post_json(&format!("/v1/result/{id}"), json!({"job_state": "setup"}));
    assert_eq!(post().status, 503);
    assert_eq!(
        server.job_state(&id).as_deref(),
        Some("waiting"),
        "not applied"
    );
    assert_eq!(post().status, 503);
    assert_eq!(post().status, 200);
    assert_eq!(server.job_state(&id).as_deref(), Some("setup"));

    server.fail_next(Route::prefix("GET", "/v1/agents/"), 1, 500);
    assert_eq!(c.get("/v1/agents/data/a1").status, 500);
    assert_eq!(c.get("/v1/agents/data/a1").status, 404);

    let statuses: Vec<u16> = server
        .requests()
        .iter()
        .filter(|r| r.route == Some(Route::ResultPost))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    assert_eq!(server.request_count(&Route::ResultPost), 3);
}

#[test]
fn drop_next_is_a_connection_error_not_a_hang() {
    let server = FakeServer::start();
    let c = Client::agent(&server, "a1");
    server.drop_next(Route::LogPost, 1);
    let path = format!("/v1/result/{JOB_A}/log/output");
    let started = Instant::now();
    let body = serde_json::to_vec(&fragment(0, "test", "x")).expect("serialise");
    let dropped = c.finish(
        c.agent.post(&format!("{}{path}", server.url())),
        "application/json",
        &body,
    );
    assert!(dropped.is_err(), "{dropped:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(server.fragments(JOB_A, "output").is_empty(), "not applied");
    assert_eq!(c.post_json(&path, fragment(0, "test", "x")).status, 200);
    let records = server.requests();
    let log_posts: Vec<u16> = records
        .iter()
        .filter(|r| r.route == Some(Route::LogPost))
        .map(|r| r.status)
        .collect();
    assert_eq!(log_posts, vec![0, 200]);
}

#[test]
fn go_down_refuses_connections_and_come_back_uses_the_same_port() {
    let server = FakeServer::start();
    let url = server.url();
    assert_eq!(Client::new(&server).get("/v1").status, 200);
    server.go_down();
    assert!(server.is_down());
    let refused = TcpStream::connect(("127.0.0.1", server.port()));
    assert!(refused.is_err(), "still listening");
    assert!(Client::new(&server).try_get("/v1").is_err());
    server.come_back();
    assert!(!server.is_down());
    assert_eq!(server.url(), url);
    assert_eq!(Client::new(&server).get("/v1").status, 200);
}

/// The soak's stall (issue 15): during an outage the port was free, so a listener of
/// another test (one that never accepts) could take it; `come_back` then failed and the
/// agent's requests were swallowed. The port now stays the server's while it is down.
#[test]
fn while_down_no_other_socket_can_take_the_port() {
    let server = FakeServer::start();
    let port = server.port();
    server.go_down();
    let taken = std::net::TcpListener::bind(("127.0.0.1", port));
    assert!(
        taken.is_err(),
        "another listener took the fake server's port during its outage"
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "refused");
    server.come_back();
    assert_eq!(Client::new(&server).get("/v1").status, 200);
    // Down and back more than once, on the same port.
    server.go_down();
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
    server.come_back();
    assert_eq!(Client::new(&server).get("/v1").status, 200);
}

#[test]
fn swallow_reads_requests_and_never_answers_until_turned_off() {
    let server = FakeServer::start();
    server.swallow(true);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).expect("accepted");
    stream
        .write_all(b"GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let read = stream.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "answered while swallowing: {read:?}"
    );
    assert!(server.wait_until(Duration::from_secs(10), |s| s.swallowed() == 1));
    server.swallow(false);
    assert_eq!(Client::new(&server).get("/v1").status, 200);
}

#[test]
fn go_down_closes_kept_alive_connections() {
    let server = FakeServer::start();
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
    stream
        .write_all(b"GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut first = [0u8; 512];
    let n = stream.read(&mut first).expect("first answer");
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200 OK"));
    server.go_down();
    let mut rest = Vec::new();
    let closed = stream.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "kept-alive connection still open: {closed:?}"
    );
}

/// The soak's outage: a request being handled when it starts still gets its answer (with
/// `go_down` that answer is cut, and a job handed out by a poll would be lost for good);
/// then connections are refused until the server comes back.
#[test]
fn going_down_between_requests_finishes_the_answer_being_handled() {
    let server = FakeServer::start();
    server.delay(Route::Health, Duration::from_millis(500));
    let client = Client::new(&server);
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| client.try_get("/v1").map(|a| a.status));
        // The request is in the handler (its delay) when the outage starts.
        assert!(server.wait_until(Duration::from_secs(10), |s| {
            s.requests().is_empty() && s.connections_accepted() >= 1
        }));
        std::thread::sleep(Duration::from_millis(100));
        server.go_down_between_requests();
        assert_eq!(slow.join().expect("slow request").ok(), Some(200));
    });
    assert!(server.is_down());
    assert!(TcpStream::connect(("127.0.0.1", server.port())).is_err());
    server.delay(Route::Health, Duration::ZERO);
    server.come_back();
    assert_eq!(Client::new(&server).get("/v1").status, 200);
}

#[test]
fn delay_holds_one_route_without_blocking_others() {
    let server = FakeServer::start();
    server.delay(Route::Health, Duration::from_millis(300));
    let slow_client = Client::new(&server);
    let fast_client = Client::new(&server);
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            let started = Instant::now();
            let answer = slow_client.get("/v1");
            (answer.status, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        assert_eq!(fast_client.get(&format!("/v1/result/{JOB_A}")).status, 204);
        assert!(started.elapsed() < Duration::from_millis(200));
        let (status, took) = slow.join().expect("slow request");
        assert_eq!(status, 200);
        assert!(took >= Duration::from_millis(300), "{took:?}");
    });
    server.delay(Route::Health, Duration::ZERO);
    let started = Instant::now();
    assert_eq!(fast_client.get("/v1").status, 200);
    assert!(started.elapsed() < Duration::from_millis(200));
}

#[test]
fn dropping_the_server_cuts_delays_short() {
    let server = FakeServer::start();
    server.delay(Route::Any, Duration::from_secs(30));
    let client = Client::new(&server);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| client.try_get("/v1").map(|a| a.status));
        std::thread::sleep(Duration::from_millis(50));
        drop(server);
        let outcome = waiting.join().expect("client thread");
        assert!(outcome.is_err(), "{outcome:?}");
    });
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn malformed_requests_get_4xx_and_the_server_survives() {
    let server = FakeServer::start();
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /v1 HTTP/9.9\r\n\r\n",
        b"POST /v1/job HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"GET /v1 HTTP/1.1\r\nbad header line\r\n\r\n",
        b"POST /v1/job HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let mut stream = TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        stream.write_all(raw).expect("write");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        let status: u16 = answer
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        assert!((400..506).contains(&status), "{raw:?} → {answer:?}");
    }
    // A chunked JSON body is read whole.
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
    stream
        .write_all(
            b"POST /v1/job HTTP/1.1\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              b\r\n{\"job_queue\r\n7\r\n\": \"q\"}\r\n0\r\n\r\n",
        )
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("job_id"), "{answer}");
    assert_eq!(Client::new(&server).get("/v1").status, 200);
    assert!(server.server_errors().is_empty());
}

#[test]
fn iso_time_renders_like_the_server() {
    let t = iso_time::parse_iso_datetime("2026-01-05T10:02:30.412345+00:00").expect("valid");
    assert_eq!(iso_time::render_naive(t), "2026-01-05T10:02:30Z");
    assert_eq!(iso_time::render_aware(t), "2026-01-05T10:02:30+00:00Z");
    assert_eq!(
        iso_time::render_isoformat(t),
        "2026-01-05T10:02:30.412345+00:00"
    );
    assert_eq!(
        iso_time::parse_iso_datetime("2026-01-05T12:02:30.412345+02:00"),
        Some(t)
    );
    assert_eq!(
        iso_time::parse_iso_datetime("2024-02-29T00:00"),
        iso_time::parse_iso_datetime("2024-02-29 00:00:00Z")
    );
    assert_eq!(iso_time::parse_iso_datetime("2026-02-29T00:00:00"), None);
    assert_eq!(iso_time::parse_iso_datetime("yesterday"), None);
}

/// The fixtures find the agent binary at run time (they are a library, which cargo does not
/// give its path); it is the file cargo names to this test.
#[test]
fn the_fixtures_run_the_binary_cargo_built_for_this_test() {
    let found = crate::support::agent::bin()
        .canonicalize()
        .expect("the binary the fixtures found exists");
    let given = std::path::Path::new(crate::support::agent::BIN)
        .canonicalize()
        .expect("the binary cargo names exists");
    assert_eq!(found, given);
}
