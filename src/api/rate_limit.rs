//! Per-client rate limiting (generic cell rate algorithm, by the `governor` crate).
//!
//! Two budgets, both configured under `[rate_limit]`:
//! - every authenticated client (the token's issuer, `client_id` and subject: one caller of one
//!   application) has its own sustained rate and burst; a request beyond it is answered `429 Too Many Requests`
//!   with `Retry-After`, before any handler runs;
//! - requests without a valid token are budgeted per network address, so that a flood of bad
//!   credentials is throttled too (an address behind a proxy is the proxy's: that budget only
//!   ever limits unauthenticated traffic, never a client with a valid token).
//!
//! Every answer to an authenticated request carries `X-RateLimit-Limit` (the burst), and
//! `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until the full burst is available
//! again). Refused requests pass through the audit layer like every other answer.
//!
//! The budgets are per node: with N nodes behind a balancer a client may get up to N times the
//! rate. Limiter state is memory only; idle keys are dropped every minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::authz::principal::Principal;
use crate::config::RateLimitSettings;
use crate::error::ApiError;

type Limiter<K> = DefaultKeyedRateLimiter<K, StateInformationMiddleware>;

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// How often idle limiter keys are forgotten.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);

/// The node's rate limiters.
pub struct RateLimits {
    clients: Option<Arc<Limiter<String>>>,
    addresses: Option<Arc<Limiter<IpAddr>>>,
}

/// What a limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No budget applies.
    Unlimited,
    /// Within the budget.
    Allowed {
        burst: u32,
        remaining: u32,
        reset_secs: u64,
    },
    /// Over the budget until `retry_after_secs` have passed.
    Refused { burst: u32, retry_after_secs: u64 },
}

impl RateLimits {
    /// Limiters for the configured budgets (a rate of 0 turns a budget off).
    pub fn new(settings: &RateLimitSettings) -> RateLimits {
        RateLimits {
            clients: quota(settings.client_per_sec, settings.client_burst)
                .map(|quota| Arc::new(governor::RateLimiter::keyed(quota).with_middleware())),
            addresses: quota(
                settings.unauthenticated_per_sec,
                settings.unauthenticated_burst,
            )
            .map(|quota| Arc::new(governor::RateLimiter::keyed(quota).with_middleware())),
        }
    }

    /// Charges one request to an authenticated client.
    pub fn check_client(&self, principal: &Principal) -> Decision {
        let Some(limiter) = &self.clients else {
            return Decision::Unlimited;
        };
        // One budget per caller of one application: the users of a shared front end (one
        // `client_id`) must not spend each other's budget. NULs keep the parts apart.
        let key = format!(
            "{}\u{0}{}\u{0}{}",
            principal.issuer,
            principal.client_id.as_deref().unwrap_or_default(),
            principal.subject
        );
        check(limiter, &key)
    }

    /// Charges one unauthenticated request to its network address (unknown address: one shared
    /// budget, never none).
    pub fn check_address(&self, address: Option<IpAddr>) -> Decision {
        match &self.addresses {
            None => Decision::Unlimited,
            Some(limiter) => check(
                limiter,
                &address.unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
            ),
        }
    }

    /// Forgets idle keys every minute so that memory stays bounded by the active clients.
    pub fn spawn_housekeeping(&self) {
        let clients = self.clients.clone();
        let addresses = self.addresses.clone();
        if clients.is_none() && addresses.is_none() {
            return;
        }
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            loop {
                ticks.tick().await;
                if let Some(limiter) = &clients {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                if let Some(limiter) = &addresses {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        });
    }
}

/// One request per `1 / per_sec` seconds with `burst` at once (at least one); none for a rate
/// of 0 (or a negative or non-finite one).
fn quota(per_sec: f64, burst: u32) -> Option<Quota> {
    if !(per_sec.is_finite() && per_sec > 0.0) {
        return None;
    }
    let period = Duration::try_from_secs_f64(1.0 / per_sec)
        .ok()
        .filter(|period| !period.is_zero())
        .unwrap_or(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period).map(|quota| quota.allow_burst(burst))
}

fn check<K: std::hash::Hash + Eq + Clone>(limiter: &Limiter<K>, key: &K) -> Decision {
    match limiter.check_key(key) {
        Ok(snapshot) => {
            let quota = snapshot.quota();
            let burst = quota.burst_size().get();
            let remaining = snapshot.remaining_burst_capacity();
            let refill = quota.replenish_interval() * (burst - remaining);
            Decision::Allowed {
                burst,
                remaining,
                reset_secs: ceil_secs(refill),
            }
        }
        Err(not_until) => Decision::Refused {
            burst: not_until.quota().burst_size().get(),
            // The limiter's own clock: instants of another clock instance do not compare.
            retry_after_secs: ceil_secs(not_until.wait_time_from(limiter.clock().now())).max(1),
        },
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

impl Decision {
    /// The 429 answer for a refused request; `None` when the request may go on.
    pub fn refusal(self) -> Option<Response> {
        let Decision::Refused {
            burst,
            retry_after_secs,
        } = self
        else {
            return None;
        };
        tracing::info!(retry_after_secs, "rate limit exceeded");
        let mut response = ApiError::TooManyRequests.into_response();
        let headers = response.headers_mut();
        headers.insert(axum::http::header::RETRY_AFTER, retry_after_secs.into());
        headers.insert(LIMIT, burst.into());
        headers.insert(REMAINING, HeaderValue::from_static("0"));
        headers.insert(RESET, retry_after_secs.into());
        Some(response)
    }

    /// Adds the budget headers to an answer.
    pub fn annotate(self, headers: &mut HeaderMap) {
        if let Decision::Allowed {
            burst,
            remaining,
            reset_secs,
        } = self
        {
            headers.insert(LIMIT, burst.into());
            headers.insert(REMAINING, remaining.into());
            headers.insert(RESET, reset_secs.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(issuer: &str, client_id: Option<&str>, subject: &str) -> Principal {
        Principal {
            subject: subject.into(),
            client_id: client_id.map(Into::into),
            issuer: issuer.into(),
            fhir_user: None,
            roles: Vec::new(),
            scopes: Default::default(),
            patient: None,
            tenant: None,
            purpose_of_use: None,
            expires_at: 0,
            emergency: None,
        }
    }

    fn settings(client_per_sec: f64, client_burst: u32) -> RateLimitSettings {
        RateLimitSettings {
            client_per_sec,
            client_burst,
            unauthenticated_per_sec: 1.0,
            unauthenticated_burst: 2,
        }
    }

    #[test]
    fn a_client_gets_its_burst_then_is_refused_with_a_retry_delay() {
        let limits = RateLimits::new(&settings(1.0, 3));
        let caller = principal("https://issuer", Some("app"), "alice");
        let remaining: Vec<_> = (0..3)
            .map(|_| match limits.check_client(&caller) {
                Decision::Allowed { remaining, .. } => remaining,
                other => panic!("within the burst, got {other:?}"),
            })
            .collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        match limits.check_client(&caller) {
            Decision::Refused {
                burst,
                retry_after_secs,
            } => {
                assert_eq!(burst, 3);
                assert_eq!(retry_after_secs, 1);
            }
            other => panic!("beyond the burst, got {other:?}"),
        }
        // One request every 4 s: the refusal asks for (almost all of) those 4 s.
        let slow = RateLimits::new(&settings(0.25, 1));
        assert!(matches!(
            slow.check_client(&caller),
            Decision::Allowed { .. }
        ));
        assert_eq!(
            slow.check_client(&caller),
            Decision::Refused {
                burst: 1,
                retry_after_secs: 4
            }
        );
    }

    #[test]
    fn budgets_are_per_client_and_issuer() {
        let limits = RateLimits::new(&settings(1.0, 1));
        let first = principal("https://issuer", Some("app"), "alice");
        assert!(matches!(
            limits.check_client(&first),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limits.check_client(&first),
            Decision::Refused { .. }
        ));
        // The same caller at another issuer or through another application, another caller of
        // the same application, and a token without client id each have their own budget.
        for other in [
            principal("https://other-issuer", Some("app"), "alice"),
            principal("https://issuer", Some("app2"), "alice"),
            principal("https://issuer", Some("app"), "bob"),
            principal("https://issuer", None, "alice"),
        ] {
            assert!(matches!(
                limits.check_client(&other),
                Decision::Allowed { .. }
            ));
        }
    }

    #[test]
    fn a_zero_rate_turns_the_budget_off() {
        let limits = RateLimits::new(&settings(0.0, 0));
        let caller = principal("https://issuer", Some("app"), "alice");
        for _ in 0..1000 {
            assert_eq!(limits.check_client(&caller), Decision::Unlimited);
        }
        let address = Some("10.0.0.1".parse().unwrap());
        assert!(matches!(
            limits.check_address(address),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limits.check_address(address),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limits.check_address(address),
            Decision::Refused { .. }
        ));
        assert!(matches!(
            limits.check_address(Some("10.0.0.2".parse().unwrap())),
            Decision::Allowed { .. }
        ));
    }
}
