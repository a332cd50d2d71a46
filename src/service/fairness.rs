//! Fairness between connections (README, "Limits"): one connection's flood
//! queues in its own socket, not ahead of every other caller.
//!
//! Every call HTTP/2 accepts becomes a task that waits its turn for the
//! CPU behind every call accepted before it. Fifty connections of a
//! hundred streams each put five thousand calls ahead of a newcomer, and
//! nothing is refused: the newcomer just waits, seconds. So each
//! connection counts its *queued* calls: the requests read from it to
//! their end ([`FrameCounter`]) less the calls that have read them
//! ([`StartedLayer`]). A call still waiting for the rest of its request
//! is not counted: it is waiting for the network, not for the CPU, and
//! counting it could pause the very connection its bytes come on. Once the whole process has more than
//! [`FairnessSettings::busy_above`] queued, a connection with its share
//! queued is not read from until half of it has started, and reads bring
//! about a share of calls at a time. Its next calls wait in TCP buffers
//! (and its client's flow control) instead of the run queue; a connection
//! under its share is always read.
//!
//! A stream that never becomes a call (refused by HTTP/2 over the stream
//! limit, or shed by the per-connection cap before it ran) would hold its
//! connection's count up forever: a count that does not move while others
//! do is cleared after [`FORGIVE_AFTER`] (see `load.rs`). Behind TLS the
//! frames cannot be seen and nothing is counted. Calls see their
//! connection as [`ConnectionInfo`], so tonic's `Request::remote_addr`
//! finds nothing: use [`peer_ip`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

use super::load::{InflightCap, InflightFuture, Place};

/// When the process counts as busy and how much each connection may then
/// have queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairnessSettings {
    /// Queued calls in the whole process beyond which connections over
    /// their share are no longer read from.
    pub busy_above: usize,
    /// Queued calls a connection may have while the process is busy, at
    /// least (when few connections are open, each may have an even split
    /// of `busy_above`).
    pub per_connection: usize,
}

impl Default for FairnessSettings {
    /// Measured (BENCHMARKS.md, "Hostile load"): with these a second
    /// caller's turn stays within milliseconds under `h2load -c 50 -m 1000`.
    fn default() -> Self {
        FairnessSettings { busy_above: 128, per_connection: 2 }
    }
}

/// What a read may bring is budgeted in calls, turned into bytes by what
/// the connection's calls have taken on the wire so far ([`FrameCounter::
/// bytes_per_call`]): a Health/Check call is about 45 bytes, a Verify 100
/// to 150, an ext_authz Check with a dozen headers 650. A budget at the
/// smallest size for every call made an ext_authz connection read three
/// calls at a time (BENCHMARKS.md, "Reads sized by the calls"). The
/// estimate starts here and stays within these bounds: an estimate too
/// high lets one read bring more than the share (never more than
/// HTTP/2's `--max-concurrent-streams`), one too low costs a read more.
const BYTES_PER_CALL: std::ops::RangeInclusive<usize> = 64..=2048;

/// A connection whose count has not moved for this long while other
/// connections' calls started has it cleared (see the module's
/// documentation).
pub const FORGIVE_AFTER: Duration = Duration::from_millis(100);

/// The queued calls of the whole process.
#[derive(Debug)]
pub struct Fairness {
    settings: FairnessSettings,
    pauses: metrics::Counter,
    queued: AtomicUsize,
    /// Calls started in the whole process, ever.
    started: std::sync::atomic::AtomicU64,
    connections: AtomicUsize,
}

impl Fairness {
    /// `pauses` counts the times a connection is not read from.
    pub fn new(settings: FairnessSettings, pauses: metrics::Counter) -> Arc<Fairness> {
        Arc::new(Fairness {
            settings,
            pauses,
            queued: AtomicUsize::new(0),
            started: std::sync::atomic::AtomicU64::new(0),
            connections: AtomicUsize::new(0),
        })
    }

    /// A new connection's count.
    pub fn connection(self: &Arc<Self>) -> Arc<ConnectionLoad> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        Arc::new(ConnectionLoad {
            fairness: self.clone(),
            opened: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        })
    }

    fn busy(&self) -> bool {
        self.queued.load(Ordering::SeqCst) > self.settings.busy_above
    }

    /// What each connection may have queued while the process is busy: an
    /// even split of the busy threshold, and never less than the share set.
    fn share(&self) -> usize {
        let connections = self.connections.load(Ordering::SeqCst).max(1);
        (self.settings.busy_above / connections).max(self.settings.per_connection)
    }

    /// Calls the process can still queue before it is busy.
    fn headroom(&self) -> usize {
        self.settings.busy_above.saturating_sub(self.queued.load(Ordering::SeqCst))
    }
}

/// One connection's calls opened and started, and the reader to wake when
/// its queue drops below its share.
#[derive(Debug)]
pub struct ConnectionLoad {
    fairness: Arc<Fairness>,
    /// Written by the connection's reader only.
    opened: AtomicUsize,
    /// Never more than `opened`.
    started: AtomicUsize,
    paused: AtomicBool,
    reader: AtomicWaker,
}

impl ConnectionLoad {
    /// Calls read from this connection that have not started yet.
    pub fn queued(&self) -> usize {
        // `started` first: it only grows towards `opened`.
        let started = self.started.load(Ordering::SeqCst);
        self.opened.load(Ordering::SeqCst).saturating_sub(started)
    }

    /// Calls of this connection that have started so far.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Calls of the whole process that have started so far.
    pub fn process_started(&self) -> u64 {
        self.fairness.started.load(Ordering::Relaxed)
    }

    /// Whether answers of this connection are likely due within a turn of
    /// the run queue: calls read from it have not started, most of them
    /// waiting there (some may still be in h2's read buffer, and a stale
    /// count, cleared within a second, holds calls that never start).
    /// Writing now would send the answer at hand alone and each of theirs
    /// in a write of its own (README, "Runtime"); a wrong guess costs one
    /// turn of the run queue.
    pub fn answers_due(&self) -> bool {
        self.queued() > 0
    }

    /// Whether it has its share queued while the process is busy.
    pub fn over_share(&self) -> bool {
        self.queued() >= self.fairness.share() && self.fairness.busy()
    }

    /// `Ready(n)`: read at most `n` calls (for the headroom of the process,
    /// or this connection's share, whichever is more); `Pending`: do not
    /// read now, the reader is woken when half of its share has started.
    pub fn poll_read_allowance(&self, cx: &mut Context<'_>) -> Poll<usize> {
        if self.over_share() {
            self.reader.register(cx.waker());
            if !self.paused.swap(true, Ordering::SeqCst) {
                self.fairness.pauses.increment(1);
            }
            // A call started between the check and the registration has
            // seen no pause: look again.
            if self.over_share() {
                return Poll::Pending;
            }
        }
        if self.paused.load(Ordering::Relaxed) {
            self.paused.store(false, Ordering::SeqCst);
        }
        // A whole share per read, even with some of it queued: fewer and
        // larger reads.
        Poll::Ready(self.fairness.headroom().max(self.fairness.share()))
    }

    /// `n` calls were read.
    pub fn opened(&self, n: usize) {
        if n > 0 {
            self.fairness.queued.fetch_add(n, Ordering::SeqCst);
            self.opened.fetch_add(n, Ordering::SeqCst);
        }
    }

    /// A call of this connection starts to run.
    pub fn start(&self) {
        let opened = self.opened.load(Ordering::SeqCst);
        if self.started.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| (s < opened).then_some(s + 1)).is_ok() {
            self.fairness.queued.fetch_sub(1, Ordering::SeqCst);
            self.fairness.started.fetch_add(1, Ordering::Relaxed);
            self.wake_if_under_share();
        }
    }

    /// Clears this connection's count: what it has queued will never start
    /// (see [`FORGIVE_AFTER`]), or the connection is closing.
    pub fn forgive(&self) {
        let opened = self.opened.load(Ordering::SeqCst);
        if let Ok(before) =
            self.started.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| (s < opened).then_some(opened))
        {
            self.fairness.queued.fetch_sub(opened - before, Ordering::SeqCst);
            self.wake_if_under_share();
        }
    }

    fn wake_if_under_share(&self) {
        // Woken at half its share, not at the first start: every pause and
        // resume costs the connection a turn of its own.
        if self.queued() <= self.fairness.share() / 2 && self.paused.swap(false, Ordering::SeqCst) {
            self.reader.wake();
        }
    }
}

impl Drop for ConnectionLoad {
    /// A closed connection's queued calls will never start.
    fn drop(&mut self) {
        self.forgive();
        self.fairness.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts the requests a client has finished sending by walking the HTTP/2
/// frame headers of what is read (payloads are skipped, never looked at):
/// the frame that ends a client stream (DATA with END_STREAM, or a header
/// block with it, once read to its last byte), the first such frame of a
/// stream opened and not reset, at most `MAX_OPEN` of them tracked per
/// connection (4 KiB). From then on the call can
/// run without reading anything more; before, it waits for the network
/// and is not work queued for the CPU.
#[derive(Debug)]
pub struct FrameCounter {
    /// Bytes of the client's connection preface still to skip.
    preface: usize,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    /// Client streams opened and not yet ended: only the first END_STREAM
    /// of a stream counts (a frame on a stream already ended or reset is
    /// answered by HTTP/2 and never becomes a call).
    open: Vec<u32>,
    last_stream: u32,
    /// A header block continues in CONTINUATION frames.
    in_block: bool,
    /// The header block being read ends its stream.
    block_ends_stream: bool,
    /// The current frame, once read to its end, completes a request.
    count_at_end: bool,
    /// Bytes read since a request last completed, and the estimate of a
    /// request's size on the wire they update (see [`BYTES_PER_CALL`]).
    bytes_since: usize,
    bytes_per_call: usize,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_BYTES: usize = 24;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const END_HEADERS: u8 = 0x4;
const END_STREAM: u8 = 0x1;

impl Default for FrameCounter {
    fn default() -> Self {
        FrameCounter {
            preface: PREFACE_BYTES,
            header: [0; 9],
            have: 0,
            skip: 0,
            open: Vec::new(),
            last_stream: 0,
            in_block: false,
            block_ends_stream: false,
            count_at_end: false,
            bytes_since: 0,
            bytes_per_call: *BYTES_PER_CALL.start(),
        }
    }
}

/// Open client streams tracked per connection; HTTP/2 refuses more than
/// `--max-concurrent-streams` (100 by default) anyway.
const MAX_OPEN: usize = 1024;

impl FrameCounter {
    /// Ends `stream` if it was open; whether it was.
    fn end(&mut self, stream: u32) -> bool {
        match self.open.iter().position(|&s| s == stream) {
            Some(i) => {
                self.open.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// What a request of this connection takes on the wire, by what the
    /// last ones took: it follows smaller requests at once and larger ones
    /// by a quarter of the difference per read, so a connection that sends
    /// a few large requests and then many small ones gains one larger read.
    pub fn bytes_per_call(&self) -> usize {
        self.bytes_per_call
    }

    /// The requests whose last frame ends in `bytes`.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        self.bytes_since = self.bytes_since.saturating_add(bytes.len());
        let opened = self.count(bytes);
        if let Some(seen) = self.bytes_since.checked_div(opened) {
            self.bytes_since = 0;
            let estimate =
                if seen <= self.bytes_per_call { seen } else { self.bytes_per_call + (seen - self.bytes_per_call) / 4 };
            self.bytes_per_call = estimate.clamp(*BYTES_PER_CALL.start(), *BYTES_PER_CALL.end());
        }
        opened
    }

    fn count(&mut self, mut bytes: &[u8]) -> usize {
        let mut opened = 0;
        let n = self.preface.min(bytes.len());
        self.preface -= n;
        bytes = &bytes[n..];
        loop {
            if self.skip == 0 && self.count_at_end {
                self.count_at_end = false;
                opened += 1;
            }
            if bytes.is_empty() {
                return opened;
            }
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                let h = self.header;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let (kind, flags) = (h[3], h[4]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                let client = stream % 2 == 1;
                if kind == HEADERS && client && stream > self.last_stream && self.open.len() < MAX_OPEN {
                    self.last_stream = stream;
                    self.open.push(stream);
                }
                let ends = flags & END_STREAM != 0 && self.end(stream);
                if kind == HEADERS && client {
                    self.in_block = flags & END_HEADERS == 0;
                    self.block_ends_stream = ends;
                    self.count_at_end = !self.in_block && self.block_ends_stream;
                } else if kind == CONTINUATION && self.in_block && flags & END_HEADERS != 0 {
                    self.in_block = false;
                    self.count_at_end = self.block_ends_stream;
                } else if kind == DATA && ends {
                    self.count_at_end = true;
                } else if kind == RST_STREAM {
                    self.end(stream);
                }
            }
        }
    }
}

/// What a connection tells each of its calls: its peer (as tonic's own
/// [`TcpConnectInfo`]) and its share of the queue.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub load: Arc<ConnectionLoad>,
}

/// The peer's IP address of a gRPC call, plaintext or TLS.
pub fn peer_ip<T>(request: &tonic::Request<T>) -> Option<std::net::IpAddr> {
    let info = request.extensions().get::<ConnectionInfo>().or_else(|| {
        request.extensions().get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>().map(|tls| tls.get_ref())
    })?;
    info.tcp.remote_addr().map(|a| a.ip().to_canonical())
}

fn load_of<B>(request: &http::Request<B>) -> Option<&Arc<ConnectionLoad>> {
    let extensions = request.extensions();
    extensions.get::<ConnectionInfo>().map(|info| &info.load).or_else(|| {
        extensions.get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>().map(|tls| &tls.get_ref().load)
    })
}

/// Marks every call as started once its request has been read (see the
/// module's documentation), and takes its place under the process's cap
/// on calls in progress at that same moment ([`InflightCap`]).
#[derive(Clone)]
pub struct StartedLayer {
    cap: InflightCap,
}

impl StartedLayer {
    pub fn new(cap: InflightCap) -> StartedLayer {
        StartedLayer { cap }
    }
}

impl<S> Layer<S> for StartedLayer {
    type Service = Started<S>;

    fn layer(&self, inner: S) -> Started<S> {
        Started { inner, cap: self.cap.clone() }
    }
}

#[derive(Clone)]
pub struct Started<S> {
    inner: S,
    cap: InflightCap,
}

impl<S> Service<http::Request<tonic::body::Body>> for Started<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = InflightFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let load = load_of(&request).cloned();
        let place = self.cap.place();
        let body_place = Some(place.clone());
        let request = request.map(|body| tonic::body::Body::new(ReadToTheEnd { inner: body, load, place: body_place }));
        InflightFuture::new(self.inner.call(request), Some(place))
    }
}

/// A request body that, once read to its end (END_STREAM, as the frame
/// counter counted it), takes its call's place under the process's cap and
/// marks the call started; when the cap is full it yields
/// `RESOURCE_EXHAUSTED` instead, which the call answers with (no store
/// read, no engine). Dropped unread, it marks the call started if its
/// request had ended. A stream reset before its end fails the call.
struct ReadToTheEnd {
    inner: tonic::body::Body,
    load: Option<Arc<ConnectionLoad>>,
    place: Option<Arc<Place>>,
}

impl ReadToTheEnd {
    fn started(&mut self) {
        if let Some(load) = self.load.take() {
            load.start();
        }
    }
}

impl http_body::Body for ReadToTheEnd {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        let reset = match &frame {
            None => !self.inner.is_end_stream(),
            Some(Err(status)) => status.code() == tonic::Code::Cancelled,
            Some(Ok(_)) => false,
        };
        if reset {
            // The client reset the stream before ending its request: it was
            // never counted, so it must not run either (tonic would take the
            // reset for the end of a whole request and run the call).
            self.load = None;
            self.place = None;
            return Poll::Ready(Some(Err(tonic::Status::aborted("the request was reset before it ended"))));
        }
        if self.inner.is_end_stream() {
            self.started();
            if let Some(place) = self.place.take()
                && let Err(refused) = place.take()
            {
                return Poll::Ready(Some(Err(refused)));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ReadToTheEnd {
    /// A body dropped unread (a call refused before it read its request)
    /// counts as started only if its request had ended, as counted: what
    /// has arrived is drained first.
    fn drop(&mut self) {
        if self.load.is_none() {
            return;
        }
        use http_body::Body as _;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while let Poll::Ready(Some(Ok(_))) = std::pin::Pin::new(&mut self.inner).poll_frame(&mut cx) {}
        if self.inner.is_end_stream() {
            self.started();
        }
    }
}

/// Attaches a connection's share of the queue to what its calls see.
pub fn connection_info<IO: Connected<ConnectInfo = TcpConnectInfo>>(
    io: &IO,
    load: &Arc<ConnectionLoad>,
) -> ConnectionInfo {
    ConnectionInfo { tcp: io.connect_info(), load: load.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn settings(busy_above: usize, per_connection: usize) -> Arc<Fairness> {
        Fairness::new(FairnessSettings { busy_above, per_connection }, metrics::Counter::noop())
    }

    fn allowance(load: &ConnectionLoad) -> Poll<usize> {
        load.poll_read_allowance(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_read_brings_the_headroom_of_the_process_or_an_even_share() {
        let fairness = settings(100, 1);
        let conns: Vec<_> = (0..4).map(|_| fairness.connection()).collect();
        assert_eq!(allowance(&conns[0]), Poll::Ready(100), "a quiet process");
        conns[0].opened(90);
        assert_eq!(allowance(&conns[1]), Poll::Ready(25), "10 calls of headroom, a share of 25");
        drop(conns);
        assert_eq!(fairness.queued.load(Ordering::SeqCst), 0, "a closed connection's calls are no longer counted");
        assert_eq!(fairness.connections.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_busy_process_stops_reading_the_connections_over_their_share() {
        let fairness = settings(4, 3);
        let (a, b) = (fairness.connection(), fairness.connection());
        a.opened(4);
        b.opened(1);
        assert!(a.over_share());
        assert_eq!(allowance(&a), Poll::Pending, "a has 4 queued, its share is 3");
        assert_eq!(allowance(&b), Poll::Ready(3), "b is under its share: read, for a share");
        a.start();
        a.start();
        assert!(!a.over_share());
        assert_eq!(allowance(&a), Poll::Ready(3), "3 queued in all: not busy");
    }

    #[test]
    fn a_call_starting_wakes_the_paused_reader() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let fairness = settings(0, 1);
        let a = fairness.connection();
        a.opened(2);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert_eq!(a.poll_read_allowance(&mut Context::from_waker(&waker)), Poll::Pending);
        a.start();
        assert!(!flag.0.load(Ordering::SeqCst), "not yet at half its share");
        a.start();
        assert!(flag.0.load(Ordering::SeqCst), "at half its share: woken");
        assert_eq!(allowance(&a), Poll::Ready(1));
    }

    #[test]
    fn starts_never_outnumber_what_was_read_and_forgiving_clears_the_count() {
        let fairness = settings(0, 1);
        let (a, b) = (fairness.connection(), fairness.connection());
        a.start();
        assert_eq!(a.started(), 0, "nothing was read from it: a connection behind TLS");
        a.opened(3);
        b.opened(2);
        a.start();
        assert_eq!((a.queued(), fairness.queued.load(Ordering::SeqCst)), (2, 4));
        a.forgive();
        assert_eq!((a.queued(), fairness.queued.load(Ordering::SeqCst)), (0, 2));
        a.forgive();
        assert_eq!(fairness.queued.load(Ordering::SeqCst), 2, "forgiven once");
    }

    #[test]
    fn the_frame_counter_counts_ended_requests_across_any_split() {
        fn frame(kind: u8, flags: u8, stream: u32, payload: usize) -> Vec<u8> {
            let len = (payload as u32).to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], kind, flags];
            f.extend(stream.to_be_bytes());
            f.extend(std::iter::repeat_n(END_STREAM, payload)); // payloads that look like flags
            f
        }
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, 18)); // SETTINGS
        for stream in [1, 3, 5] {
            wire.extend(frame(HEADERS, END_HEADERS, stream, 37));
        }
        for stream in [1, 3, 5] {
            wire.extend(frame(DATA, 0, stream, 20)); // more to come
            wire.extend(frame(DATA, END_STREAM, stream, 60)); // the request ends
        }
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 7, 12)); // a request without a body
        wire.extend(frame(HEADERS, END_STREAM, 9, 20)); // a block in two frames ending its stream
        wire.extend(frame(CONTINUATION, END_HEADERS, 9, 30));
        wire.extend(frame(HEADERS, 0, 11, 20)); // a block in two frames, the body to come
        wire.extend(frame(CONTINUATION, END_HEADERS, 11, 30));
        wire.extend(frame(DATA, END_STREAM, 2, 5)); // not a client stream
        wire.extend(frame(DATA, END_STREAM, 3, 5)); // a stream already ended
        wire.extend(frame(HEADERS, END_HEADERS, 13, 10));
        wire.extend(frame(0x3, 0, 13, 4)); // RST_STREAM: reset before its end
        wire.extend(frame(DATA, END_STREAM, 13, 5)); // so this never becomes a call
        wire.extend(frame(0x8, 0, 0, 4)); // WINDOW_UPDATE
        for bite in [1, 2, 7, 9, 10, 64, wire.len()] {
            let mut counter = FrameCounter::default();
            let counted: usize = wire.chunks(bite).map(|chunk| counter.feed(chunk)).sum();
            assert_eq!(counted, 5, "read {bite} bytes at a time");
        }
        // A request counts once the last byte of its last frame is read.
        let mut counter = FrameCounter::default();
        let last_data = 24 + (9 + 18) + 3 * (9 + 37) + (9 + 20) + 9 + 59;
        assert_eq!(counter.feed(&wire[..last_data]), 0, "one byte of the first request missing");
        assert_eq!(counter.feed(&wire[last_data..last_data + 1]), 1);
    }

    #[test]
    fn a_read_is_sized_by_what_the_connections_requests_take() {
        // A request of `size` bytes: one HEADERS frame ending its stream.
        fn requests(first_stream: u32, n: u32, size: usize) -> Vec<u8> {
            let mut wire = Vec::new();
            for i in 0..n {
                let len = ((size - 9) as u32).to_be_bytes();
                wire.extend([len[1], len[2], len[3], HEADERS, END_HEADERS | END_STREAM]);
                wire.extend((first_stream + 2 * i).to_be_bytes());
                wire.extend(std::iter::repeat_n(0u8, size - 9));
            }
            wire
        }
        let mut counter = FrameCounter::default();
        assert_eq!(counter.bytes_per_call(), 64, "nothing read yet: the smallest");
        counter.preface = 0;
        let mut stream = 1;
        let mut estimates = Vec::new();
        for _ in 0..20 {
            assert_eq!(counter.feed(&requests(stream, 4, 650)), 4);
            stream += 8;
            estimates.push(counter.bytes_per_call());
        }
        assert!(estimates.windows(2).all(|w| w[0] <= w[1]), "rises read by read: {estimates:?}");
        assert!((600..=650).contains(&counter.bytes_per_call()), "{estimates:?}");
        // Smaller requests bring it down at once.
        assert_eq!(counter.feed(&requests(stream, 10, 45)), 10);
        assert_eq!(counter.bytes_per_call(), 64, "never under the smallest");
        stream += 20;
        // Huge requests raise it by a quarter at a time, never past the
        // largest.
        counter.feed(&requests(stream, 1, 100_000));
        assert_eq!(counter.bytes_per_call(), 2048);
        assert_eq!(counter.feed(&requests(stream + 2, 1, 45)), 1);
        assert_eq!(counter.bytes_per_call(), 64);
        // Bytes of no request (here a 991-byte frame on the connection)
        // count toward the next one.
        let mut other = vec![0, 0x03, 0xdf, 0x8, 0, 0, 0, 0, 0];
        other.extend([0u8; 991]);
        assert_eq!(counter.feed(&other), 0);
        assert_eq!(counter.feed(&requests(stream + 4, 1, 45)), 1);
        assert_eq!(counter.bytes_per_call(), 64 + (1045 - 64) / 4);
    }
}
