//! The attempt timeout, just inside each endpoint's circuit breaker so that a
//! call too slow for its deadline counts against the endpoint like a failure.
//!
//! An attempt ends at the call's [`Deadline`] or, when a per-try timeout is
//! configured, earlier; the time left is written into the attempt's
//! `grpc-timeout`, so the server stops working when nobody waits any more.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{HeaderValue, Request};
use mesh_runtime::grpc::{GRPC_TIMEOUT, format_grpc_timeout};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::{
    deadline::Deadline,
    error::{BoxError, Error},
};

/// Adds [`AttemptTimeout`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptTimeoutLayer {
    per_try: Option<Duration>,
}

impl AttemptTimeoutLayer {
    /// Attempts end at the call's deadline, or after `per_try` if that is sooner.
    pub fn new(per_try: Option<Duration>) -> Self {
        Self { per_try }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AttemptTimeout { inner, per_try: self.per_try }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
    per_try: Option<Duration>,
}

impl<S, B> Service<Request<B>> for AttemptTimeout<S>
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
        let call_deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let per_try = self.per_try.and_then(|t| now.checked_add(t));
        let Some(deadline) = [call_deadline, per_try].into_iter().flatten().min() else {
            let fut = self.inner.call(req);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
        let budget = deadline.saturating_duration_since(now);
        match format_grpc_timeout(budget).and_then(|v| HeaderValue::from_str(&v).ok()) {
            Some(mut v) => {
                // A different value on every call: keep it out of the HPACK table.
                v.set_sensitive(true);
                req.headers_mut().insert(GRPC_TIMEOUT, v);
            }
            None => return Box::pin(async move { Err(Error::Timeout(Duration::ZERO).into()) }),
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Error::Timeout(budget).into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_attempt_carries_what_is_left_and_stops_there() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let inner = tower::service_fn({
            let seen = seen.clone();
            move |req: Request<()>| {
                seen.lock().unwrap().push(req.headers().get(GRPC_TIMEOUT).cloned());
                async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, BoxError>(())
                }
            }
        });
        let mut svc = AttemptTimeoutLayer::new(Some(Duration::from_millis(100))).layer(inner);
        let start = Instant::now();
        let mut req = Request::new(());
        req.extensions_mut().insert(Deadline(start + Duration::from_millis(250)));
        // The per-try timeout is sooner than the deadline.
        let err = svc.call(req).await.unwrap_err();
        assert!(matches!(crate::error::failure_of(&*err), crate::error::Failure::Timeout));
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // Later, the deadline is sooner.
        tokio::time::advance(Duration::from_millis(100)).await;
        let mut req = Request::new(());
        req.extensions_mut().insert(Deadline(start + Duration::from_millis(250)));
        svc.call(req).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Some("100000u".parse().unwrap()), Some("50000000n".parse().unwrap())]
        );
    }
}
