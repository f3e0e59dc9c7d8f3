//! Deadlines: every call gets one absolute deadline covering all its attempts.
//!
//! It is the earliest of: the caller's own timeout (`tonic::Request::set_timeout`,
//! i.e. a `grpc-timeout` header on the request), the deadline of the call
//! being handled ([`CallContext`], read by the server layer from the upstream
//! caller's `grpc-timeout`) less a margin for the answer's way back, and the
//! configured default. A deadline already spent fails the call at once with
//! DEADLINE_EXCEEDED: calling would only make the downstream service do work
//! nobody waits for. The deadline travels down as the [`Deadline`] request
//! extension; the attempt timeout inside the circuit breaker enforces it and
//! writes the remaining time into each attempt's `grpc-timeout`.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::Request;
use mesh_runtime::grpc::{CallContext, GRPC_TIMEOUT, parse_grpc_timeout};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::{
    error::{BoxError, Error},
    metrics::{ClientMetrics, MethodLabels},
};

/// How deadlines are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineConfig {
    /// Deadline of calls that set none and inherit none; `None`: unbounded.
    pub default_timeout: Option<Duration>,
    /// Taken off an inherited deadline, so the answer can travel back up in time.
    pub margin: Duration,
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        Self { default_timeout: Some(Duration::from_secs(10)), margin: Duration::from_millis(5) }
    }
}

/// Request extension: when the whole call, all attempts included, must be over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// Request extension: no default timeout for this call (a long-lived stream
/// such as audit's `Tail`); its own and inherited deadlines still apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDefaultTimeout;

/// The deadline of a call starting at `now` (see the module docs).
pub fn effective_deadline(
    now: Instant,
    own: Option<Duration>,
    inherited: Option<Instant>,
    default: Option<Duration>,
    margin: Duration,
) -> Option<Instant> {
    let own = own.and_then(|t| now.checked_add(t));
    // An inherited deadline closer than the margin leaves nothing: `now`.
    let inherited = inherited.map(|d| d.checked_sub(margin).unwrap_or(now).max(now));
    let default = default.and_then(|t| now.checked_add(t));
    [own, inherited, default].into_iter().flatten().min()
}

/// Adds [`EnforceDeadline`] to a service.
#[derive(Debug, Clone, Default)]
pub struct DeadlineLayer {
    config: DeadlineConfig,
    metrics: ClientMetrics,
}

impl DeadlineLayer {
    /// A layer applying `config`.
    pub fn new(config: DeadlineConfig, metrics: ClientMetrics) -> Self {
        Self { config, metrics }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = EnforceDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EnforceDeadline { inner, config: self.config, metrics: self.metrics.clone() }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct EnforceDeadline<S> {
    inner: S,
    config: DeadlineConfig,
    metrics: ClientMetrics,
}

impl<S, B> Service<Request<B>> for EnforceDeadline<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let now = Instant::now();
        let own =
            req.headers_mut().remove(GRPC_TIMEOUT).and_then(|v| v.to_str().ok().and_then(parse_grpc_timeout));
        let inherited = CallContext::current().and_then(|c| c.deadline());
        let default = if req.extensions().get::<NoDefaultTimeout>().is_some() {
            None
        } else {
            self.config.default_timeout
        };
        match effective_deadline(now, own, inherited, default, self.config.margin) {
            None => {
                let fut = self.inner.call(req);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            Some(deadline) if deadline <= now => {
                let labels = MethodLabels::from_path(req.uri().path());
                self.metrics.deadline_exhausted.get_or_create(&labels).inc();
                tracing::debug!(method = %req.uri().path(), "deadline spent before calling, failing fast");
                let method: Arc<str> = req.uri().path().into();
                Box::pin(async move { Err(Error::BudgetExhausted { method }.into()) })
            }
            Some(deadline) => {
                req.extensions_mut().insert(Deadline(deadline));
                let fut = self.inner.call(req);
                Box::pin(async move {
                    // The attempt timeout below normally fires first (it sees the
                    // same deadline); this one also bounds waiting for readiness.
                    match tokio::time::timeout_at(deadline, fut).await {
                        Ok(r) => r.map_err(Into::into),
                        Err(_) => Err(Error::Timeout(deadline - now).into()),
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn the_earliest_deadline_wins_and_inherited_ones_lose_the_margin() {
        let now = Instant::now();
        let margin = 5 * MS;
        // Nothing set: the default.
        assert_eq!(effective_deadline(now, None, None, Some(100 * MS), margin), Some(now + 100 * MS));
        assert_eq!(effective_deadline(now, None, None, None, margin), None);
        // The caller's own timeout, shorter or longer than the default.
        assert_eq!(effective_deadline(now, Some(50 * MS), None, Some(100 * MS), margin), Some(now + 50 * MS));
        assert_eq!(
            effective_deadline(now, Some(500 * MS), None, Some(100 * MS), margin),
            Some(now + 100 * MS)
        );
        // Inherited 200 ms from now: 195 ms, even if the caller asks for more.
        let upstream = now + 200 * MS;
        assert_eq!(
            effective_deadline(now, Some(MS * 1000), Some(upstream), None, margin),
            Some(now + 195 * MS)
        );
        assert_eq!(effective_deadline(now, Some(20 * MS), Some(upstream), None, margin), Some(now + 20 * MS));
        // Inherited deadline closer than the margin, or past: nothing left.
        assert_eq!(effective_deadline(now, None, Some(now + 3 * MS), None, margin), Some(now));
        tokio::time::advance(300 * MS).await;
        let later = Instant::now();
        assert_eq!(effective_deadline(later, None, Some(upstream), Some(100 * MS), margin), Some(later));
    }

    /// Records the deadline each call carried; answers at once.
    #[derive(Clone, Default)]
    struct Probe(Arc<Mutex<Vec<Option<Instant>>>>);

    impl Service<Request<()>> for Probe {
        type Response = ();
        type Error = BoxError;
        type Future = futures::future::Ready<Result<(), BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            self.0.lock().unwrap().push(req.extensions().get::<Deadline>().map(|d| d.0));
            assert!(req.headers().get(GRPC_TIMEOUT).is_none(), "set per attempt, below");
            futures::future::ready(Ok(()))
        }
    }

    fn request(timeout: Option<&str>) -> Request<()> {
        let mut req = Request::builder().uri("/a.B/C").body(()).unwrap();
        if let Some(t) = timeout {
            req.headers_mut().insert(GRPC_TIMEOUT, t.parse().unwrap());
        }
        req
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_passes_its_remaining_budget_down_and_a_spent_one_fails_fast() {
        let probe = Probe::default();
        let metrics = ClientMetrics::default();
        let config = DeadlineConfig { default_timeout: Some(Duration::from_secs(10)), margin: 5 * MS };
        let mut svc = DeadlineLayer::new(config, metrics.clone()).layer(probe.clone());
        let start = Instant::now();
        let ctx = CallContext::new("r", Some(start + 200 * MS));
        ctx.scope(async {
            svc.call(request(None)).await.unwrap();
            tokio::time::advance(150 * MS).await;
            svc.call(request(Some("1S"))).await.unwrap();
            tokio::time::advance(46 * MS).await;
            // 4 ms left, less than the margin: fail without calling.
            let err = svc.call(request(None)).await.unwrap_err();
            let status = crate::error::into_status(err);
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
            assert!(status.message().contains("/a.B/C"), "{status:?}");
        })
        .await;
        assert_eq!(*probe.0.lock().unwrap(), vec![Some(start + 195 * MS), Some(start + 195 * MS)]);
        let labels = MethodLabels::from_path("/a.B/C");
        assert_eq!(metrics.deadline_exhausted.get_or_create(&labels).get(), 1);

        // Outside any call: the caller's own timeout, else the default.
        svc.call(request(Some("20m"))).await.unwrap();
        svc.call(request(None)).await.unwrap();
        let mut no_default = request(None);
        no_default.extensions_mut().insert(NoDefaultTimeout);
        svc.call(no_default).await.unwrap();
        let now = Instant::now();
        assert_eq!(
            probe.0.lock().unwrap()[2..],
            [Some(now + 20 * MS), Some(now + Duration::from_secs(10)), None]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_outlives_its_deadline_ends_with_deadline_exceeded() {
        let slow = tower::service_fn(|_req: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, BoxError>(())
        });
        let mut svc = DeadlineLayer::new(DeadlineConfig::default(), ClientMetrics::default()).layer(slow);
        let start = Instant::now();
        let err = svc.call(request(Some("300m"))).await.unwrap_err();
        assert_eq!(start.elapsed(), 300 * MS);
        assert_eq!(crate::error::into_status(err).code(), tonic::Code::DeadlineExceeded);
    }
}
