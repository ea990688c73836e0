//! The access token (PROTOCOL §1.3): read the refresh-token file, exchange it for an access
//! token, cache it, renew it after a 401, and back off after failed refreshes without ever
//! giving up for good.
//!
//! The HTTP exchange itself is passed in as a closure so that this state machine can be
//! tested without a network; [`super::http`] supplies the real `POST /v1/oauth2/refresh`.

use super::backoff::Backoff;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a refresh did not produce a token; the text is logged, never the tokens.
pub(crate) type RefreshError = String;

/// Exchanges a refresh token for an access token.
pub(crate) type Exchange<'a> = &'a dyn Fn(&str) -> Result<String, RefreshError>;

/// The refresh-token file written by the deployment tooling.
#[derive(Deserialize)]
struct TokenFile {
    refresh_token: String,
}

#[derive(Debug, Default)]
struct State {
    /// The cached access token.
    token: Option<String>,
    /// Consecutive failed refreshes.
    failures: u32,
    /// No refresh is attempted before this instant.
    retry_at: Option<Instant>,
    /// When the cached token should be replaced, shortly before it expires (from its own
    /// `exp` and `iat` claims); `None` when the token does not say (it is then renewed
    /// after the server refuses it).
    renew_at: Option<Instant>,
}

impl State {
    /// A new access token was obtained: cache it, note when to renew it, end any back-off.
    fn took(&mut self, token: String) -> Option<String> {
        if let Some(metrics) = crate::metrics::get() {
            metrics.token_refreshed();
        }
        self.renew_at = renewal_time(&token);
        self.token = Some(token);
        self.failures = 0;
        self.retry_at = None;
        self.token.clone()
    }
}

/// Holds the access token and decides when to refresh it.
#[derive(Debug)]
pub(crate) struct TokenSource {
    file: Option<PathBuf>,
    backoff: Backoff,
    state: Mutex<State>,
    /// Serialises refreshes, so that concurrent 401s cause one refresh, not several.
    refreshing: Mutex<()>,
    /// The server refused a request that any role may make because it carried no token
    /// (OIDC on): such requests need one too from now on.
    anonymous_refused: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TokenSource {
    /// `file` is the refresh-token file; `None` means requests go out without a token.
    pub(crate) fn new(file: Option<PathBuf>, backoff: Backoff) -> TokenSource {
        TokenSource {
            file,
            backoff,
            state: Mutex::new(State::default()),
            refreshing: Mutex::new(()),
            anonymous_refused: AtomicBool::new(false),
        }
    }

    /// Whether a refresh-token file is configured at all.
    pub(crate) fn configured(&self) -> bool {
        self.file.is_some()
    }

    /// The token to send with the next request: the cached one, or a fresh one when none is
    /// cached and the back-off after the last failed refresh has run out.
    pub(crate) fn token(&self, exchange: Exchange<'_>) -> Option<String> {
        self.file.as_ref()?;
        {
            let state = lock(&self.state);
            if let Some(token) = &state.token {
                if state.renew_at.is_some_and(|at| Instant::now() >= at) {
                    let token = token.clone();
                    drop(state);
                    return self.renew_early(token, exchange);
                }
                return Some(token.clone());
            }
            if state.retry_at.is_some_and(|at| Instant::now() < at) {
                return None;
            }
        }
        self.refresh(None, exchange)
    }

    /// The cached token while it is fresh (not yet due for renewal), else `None`; never
    /// a refresh. For requests the server also answers without a token.
    pub(crate) fn fresh_token(&self) -> Option<String> {
        self.file.as_ref()?;
        let state = lock(&self.state);
        let token = state.token.as_ref()?;
        state
            .renew_at
            .is_none_or(|at| Instant::now() < at)
            .then(|| token.clone())
    }

    /// Whether the server refuses tokenless requests even where any role may read.
    pub(crate) fn anonymous_refused(&self) -> bool {
        self.anonymous_refused.load(Ordering::Relaxed)
    }

    /// `what` went without a token and the server answered `status`: from now on every
    /// request carries one.
    pub(crate) fn note_anonymous_refused(&self, what: &str, status: u16) {
        if !self.anonymous_refused.swap(true, Ordering::Relaxed) {
            log::info!(
                "{what} answered {status} without a token (the server has OIDC on): \
                 reads of the job state and the agent record carry a token from now on"
            );
        }
    }

    /// The server refused `rejected` (401, or 403 without a token): drop it and try to get
    /// a new one. Returns the token to replay the request with, if there is a new one.
    pub(crate) fn renew(&self, rejected: Option<&str>, exchange: Exchange<'_>) -> Option<String> {
        self.file.as_ref()?;
        self.refresh(Some(rejected), exchange)
    }

    /// The cached `current` token is about to expire: get a new one now, so that no request
    /// goes out only to come back 401. If that fails, `current` is kept for as long as it
    /// lasts (the server's 401 then renews it the usual way) and the early renewal is tried
    /// again after the back-off.
    fn renew_early(&self, current: String, exchange: Exchange<'_>) -> Option<String> {
        let Some(path) = self.file.as_ref() else {
            return Some(current);
        };
        let _one_at_a_time = lock(&self.refreshing);
        {
            let state = lock(&self.state);
            // Another thread renewed it while this one waited.
            if state.token.as_deref() != Some(current.as_str())
                || state.renew_at.is_none_or(|at| Instant::now() < at)
            {
                return state.token.clone();
            }
        }
        let outcome = read_refresh_token(path).and_then(|refresh| exchange(&refresh));
        let mut state = lock(&self.state);
        match outcome {
            Ok(token) => {
                log::debug!("renewed the access token before it expires");
                state.took(token)
            }
            Err(why) => {
                state.failures = state.failures.saturating_add(1);
                let wait = self.backoff.delay(state.failures);
                state.renew_at = Some(Instant::now() + wait);
                log::warn!(
                    "could not renew the access token before it expires ({why}); using it while it lasts; next attempt in {}",
                    human(wait)
                );
                Some(current)
            }
        }
    }

    /// Refreshes unless another thread did meanwhile or a back-off is running.
    /// `rejected` is `Some(token sent)` when called after a refusal.
    fn refresh(&self, rejected: Option<Option<&str>>, exchange: Exchange<'_>) -> Option<String> {
        let path = self.file.as_ref()?;
        let _one_at_a_time = lock(&self.refreshing);
        {
            let mut state = lock(&self.state);
            match (&state.token, rejected) {
                // Someone refreshed while we waited for the lock, or the cache is valid.
                (Some(current), Some(Some(sent))) if current != sent => return state.token.clone(),
                (Some(current), None) => return Some(current.clone()),
                (Some(_), Some(None)) => return state.token.clone(),
                _ => {}
            }
            state.token = None;
            if state.retry_at.is_some_and(|at| Instant::now() < at) {
                return None;
            }
        }
        let outcome = read_refresh_token(path).and_then(|refresh| exchange(&refresh));
        let mut state = lock(&self.state);
        match outcome {
            Ok(token) => {
                if state.failures > 0 {
                    log::info!(
                        "obtained an access token after {} failed attempt(s)",
                        state.failures
                    );
                } else {
                    log::debug!("obtained an access token");
                }
                state.took(token)
            }
            Err(why) => {
                state.failures = state.failures.saturating_add(1);
                let wait = self.backoff.delay(state.failures);
                state.retry_at = Some(Instant::now() + wait);
                log::warn!(
                    "could not obtain an access token ({why}); requests go out without one; \
                     next attempt in {} (failure {})",
                    human(wait),
                    state.failures
                );
                None
            }
        }
    }
}

/// When to renew an access token just obtained: its lifetime, from the `exp` and `iat`
/// claims of the JWT it is (the server's own clock on both, so no clock skew enters), less a
/// margin of a tenth of it (at least 1 s, at most 60 s). `None` for a token that is no JWT
/// or carries no usable claims: it is then renewed after a 401.
fn renewal_time(token: &str) -> Option<Instant> {
    let lifetime = jwt_lifetime(token)?;
    let margin = (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    Some(Instant::now() + lifetime.checked_sub(margin)?)
}

/// `exp - iat` of a JWT's payload (unverified: only the agent's own timing depends on it).
pub(crate) fn jwt_lifetime(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value = serde_json::from_slice(&base64url_decode(payload)?).ok()?;
    let seconds = |key: &str| claims.get(key).and_then(serde_json::Value::as_f64);
    let lifetime = seconds("exp")? - seconds("iat")?;
    (lifetime.is_finite() && lifetime > 0.0 && lifetime < 1e9)
        .then(|| Duration::from_secs_f64(lifetime))
}

/// Decodes unpadded (or padded) base64url; `None` on any other character.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut bits: u32 = 0;
    let mut count = 0;
    for byte in text.trim_end_matches('=').bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    Some(out)
}

/// Why the refresh-token file gives no refresh token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the refresh-token file {} (option --token-file): {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the refresh-token file {} is not a JSON object with a string \"refresh_token\": {reason}", path.display())]
    NotJson { path: PathBuf, reason: String },
    #[error("the refresh-token file {} has an empty \"refresh_token\"", path.display())]
    Empty { path: PathBuf },
}

/// Reads the refresh token afresh (the deployment tooling rewrites the file).
pub(crate) fn load_refresh_token(path: &Path) -> Result<String, TokenFileError> {
    let text = std::fs::read(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_token_file(&text).map_err(|problem| match problem {
        TokenContentError::NotJson(reason) => TokenFileError::NotJson {
            path: path.to_owned(),
            reason,
        },
        TokenContentError::Empty => TokenFileError::Empty {
            path: path.to_owned(),
        },
    })
}

/// What is wrong with a refresh-token file's content.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenContentError {
    /// Not a JSON object with a string `refresh_token` (the parser's reason).
    NotJson(String),
    /// The `refresh_token` is empty or blank.
    Empty,
}

/// The refresh token of a refresh-token file's content: a JSON object with a non-empty
/// string `refresh_token` (other keys, e.g. `obtained_at`, are ignored).
pub(crate) fn parse_token_file(text: &[u8]) -> Result<String, TokenContentError> {
    let parsed: TokenFile =
        serde_json::from_slice(text).map_err(|e| TokenContentError::NotJson(e.to_string()))?;
    if parsed.refresh_token.trim().is_empty() {
        return Err(TokenContentError::Empty);
    }
    Ok(parsed.refresh_token)
}

fn read_refresh_token(path: &Path) -> Result<String, RefreshError> {
    load_refresh_token(path).map_err(|e| e.to_string())
}

/// A short rendering of a wait, e.g. `1.5 s` or `250 ms`.
pub(crate) fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn token_file(dir: &Path, content: &str) -> PathBuf {
        let path = dir.join("refresh_token");
        std::fs::write(&path, content).expect("write the token file");
        path
    }

    const FAST: Backoff = Backoff {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(40),
    };

    fn b64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    /// A JWT-shaped token with these claims (the signature is not looked at).
    fn jwt(claims: &str, n: usize) -> String {
        format!(
            "{}.{}.sig{n}",
            b64url(br#"{"alg":"HS256"}"#),
            b64url(claims.as_bytes())
        )
    }

    #[test]
    fn a_jwts_lifetime_comes_from_its_claims() {
        for text in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "{\"exp\": 1}",
        ] {
            assert_eq!(
                base64url_decode(&b64url(text.as_bytes())).as_deref(),
                Some(text.as_bytes())
            );
        }
        assert_eq!(base64url_decode("a+b"), None);
        assert_eq!(
            jwt_lifetime(&jwt(
                r#"{"exp": 1700000020, "iat": 1700000000, "sub": "x"}"#,
                0
            )),
            Some(Duration::from_secs(20))
        );
        for claims in [
            r#"{"exp": 1700000000, "iat": 1700000020}"#,
            r#"{"exp": 1700000020}"#,
            r#"{"exp": "soon", "iat": 1}"#,
            "not json",
        ] {
            assert_eq!(jwt_lifetime(&jwt(claims, 0)), None, "{claims}");
        }
        assert_eq!(jwt_lifetime("opaque-token"), None);
        assert_eq!(jwt_lifetime("a.%%%.c"), None);
    }

    #[test]
    fn a_token_about_to_expire_is_renewed_before_the_server_refuses_it() {
        let tmp = crate::testing::tempdir("auth-early");
        let dir = tmp.path().to_path_buf();
        let path = token_file(&dir, r#"{"refresh_token": "r1"}"#);
        let source = TokenSource::new(Some(path), FAST);
        let calls = AtomicU32::new(0);
        // Lifetime 2 s: renewed 1 s before it ends (the margin's floor).
        let exchange = |_: &str| {
            let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
            Ok(jwt(r#"{"exp": 1700000002, "iat": 1700000000}"#, n))
        };
        let first = source.token(&exchange);
        assert_eq!(source.token(&exchange), first, "cached while fresh");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        std::thread::sleep(Duration::from_millis(1500));
        let second = source.token(&exchange);
        assert_ne!(second, first, "renewed before it expires");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(source.token(&exchange), second);
    }

    #[test]
    fn a_fresh_token_is_only_ever_the_cached_one_before_it_is_due() {
        let tmp = crate::testing::tempdir("auth-fresh");
        let dir = tmp.path().to_path_buf();
        let path = token_file(&dir, r#"{"refresh_token": "r1"}"#);
        let source = TokenSource::new(Some(path), FAST);
        let calls = AtomicU32::new(0);
        let exchange = |_: &str| {
            let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
            Ok(jwt(r#"{"exp": 1700000002, "iat": 1700000000}"#, n))
        };
        assert_eq!(
            source.fresh_token(),
            None,
            "nothing cached, nothing obtained"
        );
        let first = source.token(&exchange);
        assert!(first.is_some());
        assert_eq!(source.fresh_token(), first, "cached and not due");
        // Lifetime 2 s: due after 1 s.
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(source.fresh_token(), None, "due: not sent, not renewed");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!source.anonymous_refused());
        source.note_anonymous_refused("GET /v1/result/x", 401);
        assert!(source.anonymous_refused());
    }

    #[test]
    fn a_failed_early_renewal_keeps_the_token_and_waits_for_the_back_off() {
        let tmp = crate::testing::tempdir("auth-early-fail");
        let dir = tmp.path().to_path_buf();
        let path = token_file(&dir, r#"{"refresh_token": "r1"}"#);
        let slow = Backoff {
            base: Duration::from_secs(30),
            cap: Duration::from_secs(30),
        };
        let source = TokenSource::new(Some(path), slow);
        let calls = AtomicU32::new(0);
        let exchange = |_: &str| {
            let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
            if n == 0 {
                Ok(jwt(r#"{"exp": 1700000002, "iat": 1700000000}"#, n))
            } else {
                Err("server down".to_string())
            }
        };
        let first = source.token(&exchange);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(source.token(&exchange), first, "kept while it lasts");
        assert_eq!(source.token(&exchange), first);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one attempt, then the back-off"
        );
    }

    #[test]
    fn no_file_means_no_token_and_no_exchange() {
        let source = TokenSource::new(None, FAST);
        let calls = AtomicU32::new(0);
        let exchange = |_: &str| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok("t".to_string())
        };
        assert_eq!(source.token(&exchange), None);
        assert_eq!(source.renew(None, &exchange), None);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn token_is_fetched_lazily_cached_and_renewed_after_a_refusal() {
        let tmp = crate::testing::tempdir("auth-cache");
        let dir = tmp.path().to_path_buf();
        let path = token_file(&dir, r#"{"refresh_token": "r1", "obtained_at": "x"}"#);
        let source = TokenSource::new(Some(path), FAST);
        let seen = RefCell::new(Vec::new());
        let exchange = |r: &str| {
            seen.borrow_mut().push(r.to_string());
            Ok(format!("access{}", seen.borrow().len()))
        };
        assert_eq!(source.token(&exchange).as_deref(), Some("access1"));
        assert_eq!(source.token(&exchange).as_deref(), Some("access1"));
        assert_eq!(seen.borrow().len(), 1);
        // A refusal of an older token than the cached one does not refresh again.
        assert_eq!(
            source.renew(Some("stale"), &exchange).as_deref(),
            Some("access1")
        );
        assert_eq!(
            source.renew(Some("access1"), &exchange).as_deref(),
            Some("access2")
        );
        assert_eq!(seen.borrow().as_slice(), ["r1", "r1"]);
    }

    #[test]
    fn failure_backs_off_and_is_retried_later_with_the_rewritten_file() {
        let tmp = crate::testing::tempdir("auth-retry");
        let dir = tmp.path().to_path_buf();
        let path = token_file(&dir, "not json");
        let source = TokenSource::new(Some(path.clone()), FAST);
        let calls = AtomicU32::new(0);
        let exchange = |r: &str| {
            calls.fetch_add(1, Ordering::SeqCst);
            if r == "good" {
                Ok("access".to_string())
            } else {
                Err("400 unknown refresh token".to_string())
            }
        };
        assert_eq!(source.token(&exchange), None);
        // Inside the back-off nothing is tried.
        assert_eq!(source.token(&exchange), None);
        assert_eq!(source.renew(None, &exchange), None);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        std::fs::write(&path, r#"{"refresh_token": "bad"}"#).expect("rewrite");
        std::thread::sleep(FAST.cap + Duration::from_millis(5));
        assert_eq!(source.token(&exchange), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        std::fs::write(&path, r#"{"refresh_token": "good"}"#).expect("rewrite");
        std::thread::sleep(FAST.cap + Duration::from_millis(5));
        assert_eq!(source.token(&exchange).as_deref(), Some("access"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn empty_or_missing_token_is_an_error() {
        let tmp = crate::testing::tempdir("auth-empty");
        let dir = tmp.path().to_path_buf();
        let path = token_file(&dir, r#"{"refresh_token": "  "}"#);
        assert!(read_refresh_token(&path).is_err());
        assert!(read_refresh_token(&dir.join("absent")).is_err());
        let path = token_file(&dir, r#"{"refresh_token": 5}"#);
        assert!(read_refresh_token(&path).is_err());
    }
}
