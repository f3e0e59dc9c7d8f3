//! Where a call's gRPC status comes from: the response headers of a
//! trailers-only response (how servers answer errors before any message), an
//! HTTP error status when a proxy answered instead of a gRPC server, or the
//! trailers at the end of the body. [`StatusBody`] watches a body for the
//! latter and reports exactly once, also when the body is dropped unfinished.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

/// How a call ended, as far as one layer could see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server (or a proxy) answered with this gRPC status.
    Status(Code),
    /// The connection failed or the call timed out: the endpoint did not answer.
    Transport,
    /// The caller dropped the response before its end: says nothing about the endpoint.
    Dropped,
}

/// `grpc-status` in a header map.
pub(crate) fn status_in(headers: &HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}

/// The status a response head already decides: `grpc-status` in the headers
/// (trailers-only), or a non-200 HTTP status mapped as the gRPC spec says
/// (`doc/http-grpc-status-mapping.md`). `None`: the status is in the trailers.
pub(crate) fn status_of_head(status: StatusCode, headers: &HeaderMap) -> Option<Code> {
    if let Some(code) = status_in(headers) {
        return Some(code);
    }
    Some(match status.as_u16() {
        200 => return None,
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    })
}

/// Receives the outcome a [`StatusBody`] observed, once.
pub trait Watch {
    /// Called with the outcome at the end of the body (or when it is dropped).
    fn finish(self, outcome: Outcome);
}

pin_project! {
    /// A response body that reports the gRPC status in its trailers to a [`Watch`].
    #[derive(Debug)]
    pub struct StatusBody<B, W: Watch> {
        #[pin]
        inner: B,
        watch: Option<W>,
    }

    impl<B, W: Watch> PinnedDrop for StatusBody<B, W> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(w) = this.project().watch.take() {
                w.finish(Outcome::Dropped);
            }
        }
    }
}

impl<B, W: Watch> StatusBody<B, W> {
    /// Watches `inner`; `watch` is `None` when the outcome is already known.
    pub(crate) fn new(inner: B, watch: Option<W>) -> Self {
        Self { inner, watch }
    }
}

impl<B, W> Body for StatusBody<B, W>
where
    B: Body<Data = Bytes>,
    W: Watch,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let outcome = match &frame {
            Some(Ok(f)) => f.trailers_ref().map(|t| Outcome::Status(status_in(t).unwrap_or(Code::Unknown))),
            Some(Err(_)) => Some(Outcome::Transport),
            // The body ended without trailers: a broken gRPC response.
            None => Some(Outcome::Status(Code::Unknown)),
        };
        if let Some(outcome) = outcome
            && let Some(w) = this.watch.take()
        {
            w.finish(outcome);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<Outcome>>>);

    impl Watch for Seen {
        fn finish(self, outcome: Outcome) {
            self.0.lock().unwrap().push(outcome);
        }
    }

    fn trailers(code: i32) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.to_string().parse().unwrap());
        t
    }

    #[test]
    fn the_head_decides_trailers_only_and_proxy_answers() {
        assert_eq!(status_of_head(StatusCode::OK, &HeaderMap::new()), None);
        assert_eq!(status_of_head(StatusCode::OK, &trailers(14)), Some(Code::Unavailable));
        assert_eq!(status_of_head(StatusCode::OK, &trailers(0)), Some(Code::Ok));
        assert_eq!(
            status_of_head(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()),
            Some(Code::Unavailable)
        );
        assert_eq!(status_of_head(StatusCode::NOT_FOUND, &HeaderMap::new()), Some(Code::Unimplemented));
        assert_eq!(status_of_head(StatusCode::IM_A_TEAPOT, &HeaderMap::new()), Some(Code::Unknown));
    }

    #[tokio::test]
    async fn trailers_are_reported_once() {
        let seen = Seen::default();
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            vec![Ok(Frame::data(Bytes::from_static(b"msg"))), Ok(Frame::trailers(trailers(8)))];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let body = StatusBody::new(inner, Some(seen.clone()));
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(*seen.0.lock().unwrap(), vec![Outcome::Status(Code::ResourceExhausted)]);
    }

    #[tokio::test]
    async fn a_dropped_body_and_a_missing_status_are_reported() {
        let seen = Seen::default();
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            vec![Ok(Frame::data(Bytes::from_static(b"msg")))];
        let body = StatusBody::new(
            http_body_util::StreamBody::new(futures::stream::iter(frames)),
            Some(seen.clone()),
        );
        drop(body);
        let body = StatusBody::new(http_body_util::Empty::<Bytes>::new(), Some(seen.clone()));
        body.collect().await.unwrap();
        assert_eq!(*seen.0.lock().unwrap(), vec![Outcome::Dropped, Outcome::Status(Code::Unknown)]);
    }
}
