//! A gRPC service of one unary method, framed here rather than by tonic's
//! generated server: Verify's and ext_authz's Check, the calls every
//! request of a protected API makes (README, "Performance").
//!
//! tonic's server runs a general streaming decoder and encoder for every
//! call, each with a buffer of its own (8 KiB, allocated per call), and
//! copies the request into its buffer before a codec sees it. A unary
//! request is one message, nearly always in one DATA frame: here it is
//! sliced out of that frame as received, and the answer is written once
//! into a buffer of its size, length prefix included, and sent as one
//! frame and the `grpc-status` trailer (BENCHMARKS.md, "Framed by
//! keystile"). What reaches the wire is what tonic sends: the tests of each
//! front end call them with tonic's own clients.
//!
//! The request is read to its end (its last frame) before the handler
//! runs, as tonic does: that is when the connection counts the call as
//! started (`fairness.rs`). What differs from tonic, on requests no gRPC
//! client sends: bytes after the first message are discarded unread, not
//! decoded; request trailers are not merged into the metadata; a request
//! whose message has not arrived [`REQUEST_BODY_DEADLINE`] after the call
//! began is `DEADLINE_EXCEEDED` (tonic waits for `--request-timeout`).

use std::pin::Pin;
use std::task::{Context, Poll};

use prost::bytes::{BufMut, Bytes, BytesMut};
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::UnaryService;
use tonic::{Request, Status};

/// A unary method's request and answer on the wire.
pub trait UnaryCodec {
    type Request: Send + 'static;
    type Answer: Send + 'static;
    /// The request, from its message's bytes (a slice of what was
    /// received).
    fn decode(message: Bytes) -> Result<Self::Request, Status>;
    /// About how many bytes [`write`](Self::write) takes, so that the
    /// answer's buffer is allocated once.
    const ANSWER_BYTES: usize;
    /// Appends the encoded answer to `buf` (which holds its length prefix
    /// already); never removes what is there.
    fn write(answer: &Self::Answer, buf: &mut BytesMut);
}

/// The gRPC message prefix: a compressed flag and a 4-byte length.
const PREFIX: usize = 5;

/// Names a handler's metadata may not set, as tonic drops them: the
/// framing's own. Made once, not parsed at each call.
const RESERVED: [http::HeaderName; 5] = [
    http::header::TE,
    http::header::CONTENT_TYPE,
    http::HeaderName::from_static("grpc-status"),
    http::HeaderName::from_static("grpc-message"),
    http::HeaderName::from_static("grpc-message-type"),
];

/// How long a request's message may take to arrive once its call has
/// begun (README, "Limits"). A client sends a unary request whole; one
/// that opens streams and never ends them would otherwise hold a call in
/// progress each (of `--max-inflight`) for the whole `--request-timeout`.
pub const REQUEST_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// `reading`, bounded by `deadline` once it has to wait: a request whose
/// frames have all arrived is read without arming a timer.
async fn read_within<F>(deadline: std::time::Duration, reading: F) -> Result<Bytes, Status>
where
    F: std::future::Future<Output = Result<Bytes, Status>>,
{
    let mut reading = std::pin::pin!(reading);
    match std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await {
        Poll::Ready(read) => read,
        Poll::Pending => tokio::time::timeout(deadline, reading).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "the request's message did not arrive within {} s",
                deadline.as_secs()
            )))
        }),
    }
}

/// Serves `handler` on `path` (any other path is `UNIMPLEMENTED`), with
/// requests capped at `max_request_bytes`.
pub struct UnaryServer<C, H> {
    path: &'static str,
    max_request_bytes: usize,
    handler: H,
    codec: std::marker::PhantomData<fn() -> C>,
}

impl<C, H: Clone> Clone for UnaryServer<C, H> {
    fn clone(&self) -> Self {
        UnaryServer {
            path: self.path,
            max_request_bytes: self.max_request_bytes,
            handler: self.handler.clone(),
            codec: std::marker::PhantomData,
        }
    }
}

impl<C, H> UnaryServer<C, H> {
    pub fn new(path: &'static str, max_request_bytes: usize, handler: H) -> UnaryServer<C, H> {
        UnaryServer { path, max_request_bytes, handler, codec: std::marker::PhantomData }
    }
}

impl<C, H, B> Service<http::Request<B>> for UnaryServer<C, H>
where
    C: UnaryCodec + 'static,
    H: UnaryService<C::Request, Response = C::Answer> + Clone + Send + 'static,
    H::Future: Send,
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != self.path {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let (handler, max) = (self.handler.clone(), self.max_request_bytes);
        Box::pin(async move { Ok(serve::<C, H, B>(handler, req, max).await.unwrap_or_else(Status::into_http)) })
    }
}

async fn serve<C, H, B>(
    mut handler: H,
    req: http::Request<B>,
    max: usize,
) -> Result<http::Response<tonic::body::Body>, Status>
where
    C: UnaryCodec,
    H: UnaryService<C::Request, Response = C::Answer>,
    B: tonic::codegen::Body<Data = Bytes>,
    B::Error: Into<StdError>,
{
    identity_encoding(req.headers())?;
    let (parts, body) = req.into_parts();
    let message = read_within(REQUEST_BODY_DEADLINE, read_message(body, max)).await?;
    let request = C::decode(message)?;
    let (metadata, answer, extensions) =
        handler.call(Request::from_http(http::Request::from_parts(parts, request))).await?.into_parts();
    let mut buf = BytesMut::with_capacity(PREFIX + C::ANSWER_BYTES);
    buf.put_bytes(0, PREFIX);
    C::write(&answer, &mut buf);
    let len = u32::try_from(buf.len() - PREFIX).map_err(|_| Status::internal("the answer is too large"))?;
    buf[1..PREFIX].copy_from_slice(&len.to_be_bytes());
    let mut response = http::Response::new(tonic::body::Body::new(Answer { data: Some(buf.freeze()), done: false }));
    let mut headers = metadata.into_headers();
    if !headers.is_empty() {
        // As tonic does: names a handler's metadata must not set.
        for reserved in RESERVED {
            headers.remove(reserved);
        }
    }
    *response.headers_mut() = headers;
    *response.extensions_mut() = extensions;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// Requests are not compressed: keystile accepts none of gRPC's
/// compressions (what tonic answers, with the same status).
fn identity_encoding(headers: &http::HeaderMap) -> Result<(), Status> {
    // A name given as a string would be parsed at every call.
    const GRPC_ENCODING: http::HeaderName = http::HeaderName::from_static("grpc-encoding");
    match headers.get(&GRPC_ENCODING) {
        None => Ok(()),
        Some(v) if v.as_bytes() == b"identity" => Ok(()),
        Some(other) => {
            let name = String::from_utf8_lossy(other.as_bytes());
            let mut status =
                Status::unimplemented(format!("Content is compressed with `{name}` which isn't supported"));
            status
                .metadata_mut()
                .insert("grpc-accept-encoding", tonic::metadata::MetadataValue::from_static("identity"));
            Err(status)
        }
    }
}

/// The request's one message, read to the end of the request. The first
/// DATA frame nearly always holds all of it: it is then a slice of that
/// frame, no copy. Never holds more than `max` bytes of message.
async fn read_message<B>(body: B, max: usize) -> Result<Bytes, Status>
where
    B: tonic::codegen::Body<Data = Bytes>,
    B::Error: Into<StdError>,
{
    let mut body = std::pin::pin!(body);
    let mut message = Message::default();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        if let Ok(data) = frame.into_data() {
            message.push(data, max)?;
        }
    }
    message.finish()
}

/// A message as its bytes arrive.
#[derive(Default)]
struct Message {
    /// The bytes of a message that spans frames, gathered up to its end
    /// (never more than its prefix and `max` bytes, and never more than has
    /// arrived).
    gathered: BytesMut,
    /// The prefix and message length, once the prefix is read.
    want: usize,
    /// The whole message, once read; later bytes are dropped.
    done: Option<Bytes>,
}

impl Message {
    fn push(&mut self, data: Bytes, max: usize) -> Result<(), Status> {
        if self.done.is_some() || data.is_empty() {
            return Ok(());
        }
        if self.gathered.is_empty()
            && let Some(len) = message_len(&data, max)?
            && data.len() >= PREFIX + len
        {
            self.done = Some(data.slice(PREFIX..PREFIX + len));
            return Ok(());
        }
        let mut data = &data[..];
        if self.gathered.len() < PREFIX {
            let n = (PREFIX - self.gathered.len()).min(data.len());
            self.gathered.extend_from_slice(&data[..n]);
            data = &data[n..];
            let Some(len) = message_len(&self.gathered, max)? else { return Ok(()) };
            // Not reserved up front: the buffer grows with what arrives,
            // not with what a prefix announces.
            self.want = PREFIX + len;
        }
        let n = (self.want - self.gathered.len()).min(data.len());
        self.gathered.extend_from_slice(&data[..n]);
        if self.gathered.len() == self.want {
            self.done = Some(self.gathered.split().freeze().slice(PREFIX..));
        }
        Ok(())
    }

    fn finish(self) -> Result<Bytes, Status> {
        match self.done {
            Some(message) => Ok(message),
            None if self.gathered.is_empty() => Err(Status::invalid_argument("Missing request message.")),
            None => Err(Status::invalid_argument("Unexpected EOF decoding stream.")),
        }
    }
}

/// The length the prefix at the start of `bytes` announces, once all five
/// of its bytes are there; for a compressed message or one over `max`,
/// tonic's words. A request that is not a message is the caller's
/// `INVALID_ARGUMENT` (where tonic says `INTERNAL`: SPEC, undecodable
/// requests); one over the cap is `OUT_OF_RANGE`, which every service's
/// answer renames (`limits.rs`).
fn message_len(bytes: &[u8], max: usize) -> Result<Option<usize>, Status> {
    let Some(prefix) = bytes.get(..PREFIX) else { return Ok(None) };
    match prefix[0] {
        0 => {}
        1 => {
            return Err(Status::invalid_argument(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        f => {
            return Err(Status::invalid_argument(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
            )));
        }
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    Ok(Some(len))
}

/// The answer's one frame, then the `grpc-status: 0` trailer.
struct Answer {
    data: Option<Bytes>,
    done: bool,
}

impl tonic::codegen::Body for Answer {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    // No exact size: hyper would send it as `content-length`, which tonic
    // never does.
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    fn read(chunks: &[&[u8]], max: usize) -> Result<Bytes, Status> {
        let mut m = Message::default();
        for c in chunks {
            m.push(Bytes::copy_from_slice(c), max)?;
        }
        m.finish()
    }

    #[test]
    fn a_message_is_read_across_any_split_of_its_frames() {
        let wire = framed(b"a unary request");
        for cut in 0..=wire.len() {
            for cut2 in cut..=wire.len() {
                let got = read(&[&wire[..cut], &wire[cut..cut2], &wire[cut2..]], 1024).unwrap();
                assert_eq!(&got[..], b"a unary request", "split at {cut} and {cut2}");
            }
        }
        let mut two = wire.clone();
        two.extend(framed(b"a second one, never read"));
        assert_eq!(&read(&[&two], 1024).unwrap()[..], b"a unary request");
        assert_eq!(&read(&[&framed(b"")], 1024).unwrap()[..], b"", "an empty message is a message");
    }

    #[test]
    fn a_frame_holding_the_whole_message_is_not_copied() {
        let wire = Bytes::from(framed(b"in one frame"));
        let mut m = Message::default();
        m.push(wire.clone(), 1024).unwrap();
        let got = m.finish().unwrap();
        assert_eq!(got.as_ptr(), wire[PREFIX..].as_ptr());
    }

    #[test]
    fn bad_requests_are_the_callers_invalid_argument_in_tonics_words() {
        let err = read(&[], 1024).unwrap_err();
        assert_eq!((err.code(), err.message()), (tonic::Code::InvalidArgument, "Missing request message."));
        let wire = framed(b"cut short");
        let err = read(&[&wire[..8]], 1024).unwrap_err();
        assert_eq!((err.code(), err.message()), (tonic::Code::InvalidArgument, "Unexpected EOF decoding stream."));
        let err = read(&[&wire[..3]], 1024).unwrap_err();
        assert_eq!((err.code(), err.message()), (tonic::Code::InvalidArgument, "Unexpected EOF decoding stream."));
        let err = read(&[&framed(&[7; 2000])[..5]], 1024).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "refused by its prefix, before its bytes: {err:?}");
        assert!(err.message().contains("found 2000 bytes, the limit is: 1024 bytes"), "{}", err.message());
        let mut compressed = framed(b"x");
        compressed[0] = 1;
        let err = read(&[&compressed], 1024).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("compressed-flag but no grpc-encoding"), "{}", err.message());
        compressed[0] = 7;
        let err = read(&[&compressed], 1024).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("invalid compression flag: 7"), "{}", err.message());
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let err = identity_encoding(&headers).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        assert_eq!(err.message(), "Content is compressed with `gzip` which isn't supported");
        assert_eq!(err.metadata().get("grpc-accept-encoding").unwrap(), "identity");
        headers.insert("grpc-encoding", http::HeaderValue::from_static("identity"));
        assert!(identity_encoding(&headers).is_ok());
    }

    #[test]
    fn a_message_spread_over_frames_holds_what_arrived_not_what_it_announced() {
        let wire = framed(&[9; 1000]);
        let mut m = Message::default();
        for (i, byte) in wire.iter().enumerate() {
            m.push(Bytes::copy_from_slice(&[*byte]), 1 << 20).unwrap();
            let arrived = i + 1;
            assert!(m.gathered.capacity() <= 2 * arrived + 64, "{} after {arrived}", m.gathered.capacity());
        }
        assert_eq!(m.finish().unwrap().len(), 1000);
        // A prefix announcing the most there may be reserves nothing.
        let mut prefix = vec![0u8];
        prefix.extend(((1u32 << 20) - 1).to_be_bytes());
        let mut m = Message::default();
        m.push(Bytes::copy_from_slice(&prefix[..3]), 1 << 20).unwrap();
        m.push(Bytes::copy_from_slice(&prefix[3..]), 1 << 20).unwrap();
        assert!(m.gathered.capacity() < 1024, "{}", m.gathered.capacity());
    }

    /// A body that sends nothing and never ends.
    struct Silent;

    impl tonic::codegen::Body for Silent {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_ends_is_refused_after_the_deadline() {
        let started = tokio::time::Instant::now();
        let err = read_within(REQUEST_BODY_DEADLINE, read_message(Silent, 1024)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert_eq!(started.elapsed(), REQUEST_BODY_DEADLINE, "the paused clock moved only to the deadline");
        // A whole request does not wait.
        let whole = one_frame(framed(b"whole"));
        let read = read_within(REQUEST_BODY_DEADLINE, read_message(whole, 1024)).await.unwrap();
        assert_eq!(&read[..], b"whole");
    }

    /// One DATA frame, then the end.
    fn one_frame(bytes: Vec<u8>) -> Answer {
        Answer { data: Some(Bytes::from(bytes)), done: true }
    }

    /// A method whose answer is its request, with metadata that tries to
    /// set names reserved to the framing.
    struct Echo;

    impl UnaryCodec for Echo {
        type Request = Bytes;
        type Answer = Bytes;
        fn decode(message: Bytes) -> Result<Bytes, Status> {
            Ok(message)
        }
        const ANSWER_BYTES: usize = 16;
        fn write(answer: &Bytes, buf: &mut BytesMut) {
            buf.extend_from_slice(answer);
        }
    }

    #[derive(Clone)]
    struct EchoCall;

    impl UnaryService<Bytes> for EchoCall {
        type Response = Bytes;
        type Future = BoxFuture<tonic::Response<Bytes>, Status>;
        fn call(&mut self, request: Request<Bytes>) -> Self::Future {
            Box::pin(async move {
                let mut response = tonic::Response::new(request.into_inner());
                response.metadata_mut().insert("grpc-status", "13".parse().unwrap());
                response.metadata_mut().insert("x-kept", "yes".parse().unwrap());
                Ok(response)
            })
        }
    }

    async fn call<B>(body: B) -> http::Response<tonic::body::Body>
    where
        B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        let mut server = UnaryServer::<Echo, _>::new("/t.T/M", 1024, EchoCall);
        let request = http::Request::builder().uri("/t.T/M").body(body).unwrap();
        match Service::call(&mut server, request).await {
            Ok(response) => response,
        }
    }

    /// The whole server: headers as tonic's, the handler's reserved names
    /// dropped, no length, the message echoed in one frame.
    #[tokio::test]
    async fn a_call_is_answered_as_tonic_answers_it() {
        let response = call(one_frame(framed(b"ping"))).await;
        let headers = response.headers();
        assert_eq!(headers["content-type"], "application/grpc");
        assert!(headers.get("grpc-status").is_none(), "a handler cannot set the status in the headers");
        assert_eq!(headers["x-kept"], "yes");
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| tonic::codegen::Body::poll_frame(Pin::new(&mut body), cx)).await
        {
            frames.push(frame.unwrap());
        }
        assert_eq!(frames.len(), 2, "one DATA frame and the trailers");
        let trailers = frames.pop().unwrap().into_trailers().unwrap();
        let data = frames.pop().unwrap().into_data().unwrap();
        assert_eq!(&data[..], &framed(b"ping")[..]);
        assert_eq!(trailers["grpc-status"], "0");
    }

    /// Through the server, a request that never ends is answered
    /// DEADLINE_EXCEEDED after the deadline, not after the request timeout.
    #[tokio::test(start_paused = true)]
    async fn the_server_refuses_a_request_that_never_ends() {
        let started = tokio::time::Instant::now();
        let response = call(Silent).await;
        assert_eq!(response.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
        assert_eq!(started.elapsed(), REQUEST_BODY_DEADLINE);
    }

    #[tokio::test]
    async fn the_answer_is_one_frame_then_the_ok_trailer_and_no_length() {
        async fn frame(answer: &mut Answer) -> Option<Result<http_body::Frame<Bytes>, Status>> {
            std::future::poll_fn(|cx| tonic::codegen::Body::poll_frame(Pin::new(&mut *answer), cx)).await
        }
        let mut answer = Answer { data: Some(Bytes::from_static(b"\0\0\0\0\x02hi")), done: false };
        assert!(!tonic::codegen::Body::is_end_stream(&answer));
        assert_eq!(tonic::codegen::Body::size_hint(&answer).exact(), None, "hyper would send content-length");
        let first = frame(&mut answer).await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"\0\0\0\0\x02hi"));
        let second = frame(&mut answer).await.unwrap().unwrap();
        let trailers = second.into_trailers().unwrap();
        assert_eq!(trailers.len(), 1);
        assert_eq!(trailers["grpc-status"], "0");
        assert!(tonic::codegen::Body::is_end_stream(&answer));
        assert!(frame(&mut answer).await.is_none());
    }
}
