//! The server's name, resolved once and reused: ureq's own resolver looks the host up again
//! for every request, pooled connection or not, and spawns a thread to do it whenever a
//! timeout applies (always, here). An idle agent makes two requests a cycle to the same
//! host, so the addresses are kept until a request fails to reach the server or
//! [`MAX_AGE`] has passed (a moved server is found again either way).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long resolved addresses are used before the name is looked up again (a common DNS
/// TTL); a failure to reach the server forgets them at once.
pub(super) const MAX_AGE: Duration = Duration::from_secs(300);

/// Addresses of one `scheme://authority`.
struct Cached {
    scheme: String,
    authority: String,
    addrs: ResolvedSocketAddrs,
    at: Instant,
}

/// A [`Resolver`] that remembers the last answer (the agent talks to one server).
#[derive(Default)]
pub(super) struct CachingResolver {
    inner: DefaultResolver,
    cached: Mutex<Option<Cached>>,
    /// Look-ups made, for tests and the log.
    lookups: AtomicU64,
}

impl std::fmt::Debug for CachingResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingResolver")
            .field("lookups", &self.lookups.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CachingResolver {
    /// The addresses will be looked up again before the next connection (the last one
    /// failed: the server may have moved).
    pub(super) fn forget(&self) {
        lock(&self.cached).take();
    }

    /// How many look-ups went to the system resolver.
    #[cfg(test)]
    pub(super) fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }
}

/// The resolver as the ureq agent holds it, shared with the client (which forgets the
/// addresses after a failure).
#[derive(Debug, Clone, Default)]
pub(super) struct Shared(pub(super) Arc<CachingResolver>);

impl Resolver for Shared {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        self.0.resolve(uri, config, timeout)
    }
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let scheme = uri.scheme_str().unwrap_or_default();
        let authority = uri.authority().map_or("", |a| a.as_str());
        if let Some(cached) = lock(&self.cached).as_ref() {
            if cached.scheme == scheme
                && cached.authority == authority
                && cached.at.elapsed() < MAX_AGE
            {
                return Ok(cached.addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let n = self.lookups.fetch_add(1, Ordering::Relaxed) + 1;
        log::debug!("resolved {authority}: {:?} (look-up {n})", &addrs[..]);
        *lock(&self.cached) = Some(Cached {
            scheme: scheme.to_owned(),
            authority: authority.to_owned(),
            addrs: addrs.clone(),
            at: Instant::now(),
        });
        Ok(addrs)
    }
}
