//! Request-size limit as the README words it: a message over 16 KiB is
//! `INVALID_ARGUMENT`, on every service of the port. tonic rejects an oversized message while decoding, as
//! `OUT_OF_RANGE`, before any handler runs; this layer renames that one
//! answer. Handlers never answer `OUT_OF_RANGE` themselves.

use http::HeaderValue;
use tower::util::MapResponseLayer;

const OUT_OF_RANGE: &str = "11";
const INVALID_ARGUMENT: HeaderValue = HeaderValue::from_static("3");

pub type OversizeLayer<B> = MapResponseLayer<fn(http::Response<B>) -> http::Response<B>>;

pub fn oversize_is_invalid_argument<B>() -> OversizeLayer<B> {
    MapResponseLayer::new(rename::<B>)
}

fn rename<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers_mut();
    if headers.get("grpc-status").is_some_and(|v| v == OUT_OF_RANGE) {
        headers.insert("grpc-status", INVALID_ARGUMENT);
        headers.insert("grpc-message", HeaderValue::from_static("the request message is larger than 16 KiB"));
    }
    resp
}
