//! The request-size cap as the README words it: a message over 16 KiB is
//! `INVALID_ARGUMENT`, on every service of the port.
//!
//! Each service is built with `max_decoding_message_size`, so tonic refuses
//! an oversized message as soon as its 5-byte length prefix is read, before
//! any of it is buffered. Two layers make the answer say so:
//!
//! - [`oversize_is_invalid_argument`]: a unary call is answered
//!   `OUT_OF_RANGE` in the response headers; this renames that one answer.
//!   Handlers never answer `OUT_OF_RANGE` themselves.
//! - [`StreamCapLayer`]: a streaming service (server reflection) sees the
//!   refused message as the end of its input and ends its answer with OK.
//!   For streaming paths this layer watches the length prefixes of the
//!   request and, when one is over the cap, turns that OK into
//!   `INVALID_ARGUMENT`. Unary paths (Verify) pass through untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use http::HeaderValue;
use http_body::Frame;
use tonic::body::Body;
use tower::util::MapResponseLayer;
use tower::{Layer, Service};

use super::MAX_REQUEST_BYTES;

const OUT_OF_RANGE: &str = "11";
const INTERNAL: &str = "13";
const UNDECODABLE: HeaderValue = HeaderValue::from_static(super::status::UNDECODABLE);
const INVALID_ARGUMENT: HeaderValue = HeaderValue::from_static("3");
const TOO_LARGE: HeaderValue = HeaderValue::from_static("the request message is larger than 16 KiB");

/// Paths whose requests are streams of messages.
const STREAMING_PREFIXES: [&str; 1] = ["/grpc.reflection."];

pub type OversizeLayer<B> = MapResponseLayer<fn(http::Response<B>) -> http::Response<B>>;

pub fn oversize_is_invalid_argument<B>() -> OversizeLayer<B> {
    MapResponseLayer::new(rename::<B>)
}

// Names made once: a name given as a string is parsed at every lookup, and
// this runs on every answer.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

fn rename<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers_mut();
    // An answer with a message has its status in the trailers.
    let Some(status) = headers.get(&GRPC_STATUS) else { return resp };
    if status == OUT_OF_RANGE {
        headers.insert(GRPC_STATUS, INVALID_ARGUMENT);
        headers.insert(GRPC_MESSAGE, TOO_LARGE);
    } else if status == INTERNAL
        && headers.get(&GRPC_MESSAGE).is_some_and(|m| m.to_str().is_ok_and(|m| m.contains("decode")))
    {
        // A request that is not the message it claims to be is the caller's
        // mistake, not an internal error (handlers never answer INTERNAL).
        headers.insert(GRPC_STATUS, INVALID_ARGUMENT);
        headers.insert(GRPC_MESSAGE, UNDECODABLE);
    }
    resp
}

#[derive(Debug, Clone, Copy, Default)]
pub struct StreamCapLayer;

impl<S> Layer<S> for StreamCapLayer {
    type Service = StreamCap<S>;

    fn layer(&self, inner: S) -> StreamCap<S> {
        StreamCap { inner }
    }
}

#[derive(Debug, Clone)]
pub struct StreamCap<S> {
    inner: S,
}

impl<S> Service<http::Request<Body>> for StreamCap<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = StreamCapFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if !STREAMING_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return StreamCapFuture { inner: self.inner.call(request), tripped: None };
        }
        let tripped = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| WatchedBody::request(body, tripped.clone()));
        StreamCapFuture { inner: self.inner.call(request), tripped: Some(tripped) }
    }
}

pin_project_lite::pin_project! {
    /// The inner call, unchanged but for the answer's body on streaming paths.
    pub struct StreamCapFuture<F> {
        #[pin]
        inner: F,
        tripped: Option<Arc<AtomicBool>>,
    }
}

impl<F, E> Future for StreamCapFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx));
        Poll::Ready(response.map(|r| match this.tripped.take() {
            None => r,
            Some(tripped) => r.map(|body| WatchedBody::answer(body, tripped)),
        }))
    }
}

/// Follows the gRPC framing (1 flag byte, 4 length bytes, the message)
/// across chunk boundaries.
#[derive(Default)]
struct FrameScan {
    header: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl FrameScan {
    /// Whether `data` starts a message longer than the cap.
    fn too_large(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                if len as usize > MAX_REQUEST_BYTES {
                    return true;
                }
                self.remaining = len as u64;
            }
        }
        false
    }
}

/// A body on a streaming path: on the request side it scans the length
/// prefixes (`scan` is set); on the answer side it rewrites an OK end of
/// stream into `INVALID_ARGUMENT` when the request carried a message over
/// the cap.
struct WatchedBody {
    inner: Body,
    scan: Option<FrameScan>,
    tripped: Arc<AtomicBool>,
}

impl WatchedBody {
    fn request(inner: Body, tripped: Arc<AtomicBool>) -> Body {
        Body::new(WatchedBody { inner, scan: Some(FrameScan::default()), tripped })
    }

    fn answer(inner: Body, tripped: Arc<AtomicBool>) -> Body {
        Body::new(WatchedBody { inner, scan: None, tripped })
    }

    fn watch(&mut self, frame: Frame<bytes::Bytes>) -> Frame<bytes::Bytes> {
        let tripped = self.tripped.load(Ordering::Relaxed);
        match &mut self.scan {
            Some(scan) => {
                if !tripped && frame.data_ref().is_some_and(|data| scan.too_large(data)) {
                    self.tripped.store(true, Ordering::Relaxed);
                }
                frame
            }
            None if tripped => match frame.into_trailers() {
                Ok(mut trailers) => {
                    if trailers.get("grpc-status").is_some_and(|v| v == "0") {
                        trailers.insert("grpc-status", INVALID_ARGUMENT);
                        trailers.insert("grpc-message", TOO_LARGE);
                    }
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            },
            None => frame,
        }
    }
}

impl http_body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        Poll::Ready(frame.map(|f| f.map(|f| this.watch(f))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_finds_an_oversized_prefix_across_chunks() {
        let mut scan = FrameScan::default();
        let mut small = vec![0u8, 0, 0, 0, 3, b'a', b'b', b'c'];
        assert!(!scan.too_large(&small));
        small.clear();
        let big = ((MAX_REQUEST_BYTES as u32) + 1).to_be_bytes();
        assert!(!scan.too_large(&[0, big[0], big[1]]), "half a prefix says nothing yet");
        assert!(scan.too_large(&[big[2], big[3]]));
    }
}
