//! Process-wide limits on what callers can make this sidecar hold (README,
//! "Limits"): connections and calls in flight, whatever the number of
//! connections. Per-connection caps alone let fifty connections of a
//! thousand streams each take the process's memory and every other
//! caller's latency.
//!
//! - [`InflightCap`]: a call takes its place once its request is
//!   whole; beyond the cap it is answered `RESOURCE_EXHAUSTED` at that
//!   moment (one failed atomic on the way: cheap to refuse).
//! - [`ConnectionGate`]: beyond the cap a new connection is closed as soon
//!   as it is accepted; each accepted one is read only within its share
//!   of a busy process ([`super::fairness`]), and closed when idle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

use super::fairness::{ConnectionInfo, ConnectionLoad, FORGIVE_AFTER, Fairness, FrameCounter};

/// The cap on calls in progress in the whole process (`--max-inflight`).
/// A call takes its place once its request has arrived whole (README,
/// "Limits"): a stream whose request never ends holds none, so streams
/// opened and never finished cannot turn everyone else away. The request
/// body that sees the end takes the place ([`super::fairness::StartedLayer`],
/// which marks the call started at that moment too).
#[derive(Clone)]
pub struct InflightCap {
    inflight: Arc<Inflight>,
}

impl InflightCap {
    /// `refused` counts the calls answered `RESOURCE_EXHAUSTED`.
    pub fn new(cap: usize, refused: metrics::Counter) -> InflightCap {
        InflightCap { inflight: Arc::new(Inflight { held: AtomicUsize::new(0), cap, refused }) }
    }

    /// A new call's place, not taken yet.
    pub(crate) fn place(&self) -> Arc<Place> {
        Arc::new(Place { inflight: self.inflight.clone(), taken: AtomicBool::new(false) })
    }
}

/// The places under the cap, shared by every connection.
struct Inflight {
    held: AtomicUsize,
    cap: usize,
    refused: metrics::Counter,
}

/// One call's place: taken by its request body when the request is whole,
/// given back when both the body and the call are done with it. Shared
/// (one allocation per call) because either may finish last; what it costs
/// is in BENCHMARKS.md, "Instructions per call".
pub(crate) struct Place {
    inflight: Arc<Inflight>,
    taken: AtomicBool,
}

impl Place {
    /// Takes the place, or counts a refusal and says why.
    pub(crate) fn take(&self) -> Result<(), tonic::Status> {
        let inflight = &self.inflight;
        if inflight.held.fetch_add(1, Ordering::AcqRel) < inflight.cap {
            self.taken.store(true, Ordering::Release);
            return Ok(());
        }
        inflight.held.fetch_sub(1, Ordering::AcqRel);
        inflight.refused.increment(1);
        Err(tonic::Status::resource_exhausted(format!(
            "this sidecar has {} calls in progress, its limit; retry with backoff",
            inflight.cap
        )))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if *self.taken.get_mut() {
            self.inflight.held.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

pin_project_lite::pin_project! {
    /// A call, holding its place (once taken) until it is done.
    pub struct InflightFuture<F> {
        #[pin]
        inner: F,
        place: Option<Arc<Place>>,
    }
}

impl<F> InflightFuture<F> {
    pub(crate) fn new(inner: F, place: Option<Arc<Place>>) -> InflightFuture<F> {
        InflightFuture { inner, place }
    }
}

impl<F: Future> Future for InflightFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.place.take();
        Poll::Ready(out)
    }
}

pin_project_lite::pin_project! {
    /// An accepted connection holding one of the connection permits, closed
    /// when nothing has been read from it for the idle timeout.
    pub struct CappedConnection<IO> {
        #[pin]
        io: IO,
        _permit: OwnedSemaphorePermit,
        idle: Option<Duration>,
        last_read: tokio::time::Instant,
        writes: Option<Arc<std::sync::atomic::AtomicU64>>,
        // This connection's queued calls (README, "Limits"), counted from
        // the frames read; `None` behind TLS.
        load: Arc<ConnectionLoad>,
        frames: Option<FrameCounter>,
        // Where its count last moved, and the timer that wakes a paused
        // reader to look again (see `poll_turn`).
        stale: Option<Stale>,
        recheck: Option<Pin<Box<tokio::time::Sleep>>>,
        // Whether this flush round's writes have waited their turn (see
        // `defer_once`).
        deferred: bool,
        // Boxed: the connection must stay `Unpin`; made once, when the
        // connection first waits.
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<IO: Connected<ConnectInfo = TcpConnectInfo>> Connected for CappedConnection<IO> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        super::fairness::connection_info(&self.io, &self.load)
    }
}

/// Whether a connection may be read from now, and how much: not while it
/// is over its share of a busy process (README, "Limits"); it is woken when
/// half its share has started. A count that does not move for
/// [`FORGIVE_AFTER`] while other connections' calls do start (or for ten
/// times that in any case) is cleared: what it holds will never start
/// (streams refused or shed before they ran).
fn poll_turn(
    load: &ConnectionLoad,
    stale: &mut Option<Stale>,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<usize> {
    loop {
        let check_at = forgive_stale(load, stale);
        match load.poll_read_allowance(cx) {
            Poll::Ready(most) => return Poll::Ready(most),
            Poll::Pending => {
                // Paused means something is queued, so a check is due.
                let deadline = check_at.unwrap_or_else(|| tokio::time::Instant::now() + FORGIVE_AFTER);
                match timer.as_mut() {
                    None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    Some(t) if t.deadline() != deadline => t.as_mut().reset(deadline),
                    Some(_) => {}
                }
                std::task::ready!(timer.as_mut().expect("armed above").as_mut().poll(cx));
            }
        }
    }
}

/// Where a connection's count stood when it last moved.
#[derive(Debug, Clone, Copy)]
pub struct Stale {
    started: usize,
    process_started: u64,
    since: tokio::time::Instant,
}

/// Clears a connection's count that has not moved for long enough (see
/// [`poll_turn`]); the time of the next check, if anything is queued.
fn forgive_stale(load: &ConnectionLoad, stale: &mut Option<Stale>) -> Option<tokio::time::Instant> {
    let queued = load.queued();
    if queued == 0 {
        *stale = None;
        return None;
    }
    let now = tokio::time::Instant::now();
    let (started, process_started) = (load.started(), load.process_started());
    let mark = match *stale {
        Some(mark) if mark.started == started => mark,
        _ => {
            *stale = Some(Stale { started, process_started, since: now });
            return Some(now + FORGIVE_AFTER);
        }
    };
    // Others moved by at least as much as it holds: it is not the whole
    // process that is stalled (a paused VM, CPU throttling).
    let others_moved = process_started - mark.process_started >= queued as u64;
    let waited = now - mark.since;
    if (others_moved && waited >= FORGIVE_AFTER) || waited >= 10 * FORGIVE_AFTER {
        load.forgive();
        *stale = None;
        return None;
    }
    Some(if waited < FORGIVE_AFTER { mark.since + FORGIVE_AFTER } else { mark.since + 10 * FORGIVE_AFTER })
}

/// A connection with calls waiting in the run queue writes after one more
/// turn of it, once per flush: it would otherwise be woken by each of its
/// calls as it finishes (first, in tokio's work-stealing scheduler) and
/// write each answer on its own, one write per call instead of a batch.
fn defer_once(answers_due: bool, deferred: &mut bool, cx: &mut Context<'_>) -> Poll<()> {
    if answers_due && !*deferred {
        *deferred = true;
        // Woken while it runs, the task goes to the back of the queue.
        cx.waker().wake_by_ref();
        return Poll::Pending;
    }
    Poll::Ready(())
}

impl<IO: AsyncRead> AsyncRead for CappedConnection<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        // A connection over its share of a busy process is not read until
        // half of it has started (README, "Limits"), and then for about a
        // share of calls.
        let most = match this.frames {
            None => usize::MAX,
            Some(frames) => {
                let calls = std::task::ready!(poll_turn(this.load, this.stale, this.recheck, cx));
                calls.saturating_mul(frames.bytes_per_call())
            }
        };
        let filled = buf.filled().len();
        let read = if most < buf.remaining() {
            let mut bite = buf.take(most);
            let start = bite.filled().as_ptr();
            let read = this.io.poll_read(cx, &mut bite);
            let n = bite.filled().len();
            // The reader could have swapped the buffer it was given.
            assert_eq!(bite.filled().as_ptr(), start, "the reader kept the buffer it was given");
            // SAFETY: `bite` is still the view of `buf`'s unfilled part it
            // was made as, and the read initialized the `n` bytes it filled.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            read
        } else {
            this.io.poll_read(cx, buf)
        };
        if let Some(frames) = this.frames.as_mut() {
            this.load.opened(frames.feed(&buf.filled()[filled..]));
        }
        match read {
            Poll::Pending => {}
            ready => {
                *this.last_read = tokio::time::Instant::now();
                return ready;
            }
        }
        // Nothing to read: the idle timer. A live HTTP/2 client answers
        // the server's keepalive pings (every 30 s), so only a peer that
        // sends nothing at all (a socket opened to hold a connection
        // slot, a dead peer) reaches it (README, "Limits").
        let Some(idle) = *this.idle else { return Poll::Pending };
        loop {
            let deadline = *this.last_read + idle;
            match this.timer.as_mut() {
                None => *this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                Some(timer) if timer.deadline() != deadline => timer.as_mut().reset(deadline),
                Some(timer) => {
                    return match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "nothing read for the idle timeout",
                        ))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

impl<IO: AsyncWrite> AsyncWrite for CappedConnection<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        std::task::ready!(defer_once(this.frames.is_some() && this.load.answers_due(), this.deferred, cx));
        if let Some(writes) = this.writes {
            writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        this.io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        *this.deferred = false;
        this.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        std::task::ready!(defer_once(this.frames.is_some() && this.load.answers_due(), this.deferred, cx));
        if let Some(writes) = this.writes {
            writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        this.io.poll_write_vectored(cx, bufs)
    }

    /// Reported as not vectored on purpose: h2 then copies a DATA frame of
    /// up to 1 KiB (not 256 bytes) into its write buffer, so a Verify answer
    /// with its rate-limit headers (about 320 bytes) goes out with the rest
    /// in one write instead of one of its own (BENCHMARKS.md, "Server CPU
    /// per call").
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// Admits accepted connections (README, "Limits"): beyond the cap a new
/// connection is closed as soon as it is accepted; each admitted one is
/// read only within its share of a busy process and closed when idle.
/// Cloned into every runtime that serves connections, so the cap and the
/// shares are the process's, whichever core a connection lands on.
#[derive(Clone)]
pub struct ConnectionGate {
    permits: Arc<Semaphore>,
    idle: Option<Duration>,
    writes: Option<Arc<std::sync::atomic::AtomicU64>>,
    fairness: Option<Arc<Fairness>>,
    // Behind TLS the frames cannot be seen: connections count nothing.
    unseen: Arc<Fairness>,
    refused: metrics::Counter,
}

impl ConnectionGate {
    /// `fairness` is `None` behind TLS; `refused` counts the connections
    /// closed at the cap; `writes`, when given, counts write calls.
    pub fn new(
        cap: usize,
        idle: Option<Duration>,
        writes: Option<Arc<std::sync::atomic::AtomicU64>>,
        fairness: Option<Arc<Fairness>>,
        refused: metrics::Counter,
    ) -> ConnectionGate {
        ConnectionGate {
            permits: Arc::new(Semaphore::new(cap)),
            idle,
            writes,
            fairness,
            unseen: Fairness::new(Default::default(), metrics::Counter::noop()),
            refused,
        }
    }

    /// The connection, holding a permit; `None` (and closed) at the cap.
    pub fn admit<IO>(&self, io: IO) -> Option<CappedConnection<IO>> {
        self.permit().map(|permit| self.open(io, permit))
    }

    /// A connection permit; `None` (counted as refused) at the cap. Taken
    /// where a connection is accepted, before it is handed to another
    /// runtime ([`ConnectionGate::open`]).
    pub fn permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused.increment(1);
        }
        permit
    }

    /// The connection holding `permit`, on the runtime it will be served on
    /// (its timers are that runtime's).
    pub fn open<IO>(&self, io: IO, permit: OwnedSemaphorePermit) -> CappedConnection<IO> {
        CappedConnection {
            io,
            _permit: permit,
            idle: self.idle,
            last_read: tokio::time::Instant::now(),
            writes: self.writes.clone(),
            load: self.fairness.as_ref().unwrap_or(&self.unseen).connection(),
            frames: self.fairness.is_some().then(FrameCounter::default),
            stale: None,
            recheck: None,
            deferred: false,
            timer: None,
        }
    }

    /// `incoming`'s connections through [`ConnectionGate::admit`].
    pub fn incoming<S, IO, E>(self, incoming: S) -> impl tokio_stream::Stream<Item = Result<CappedConnection<IO>, E>>
    where
        S: tokio_stream::Stream<Item = Result<IO, E>>,
    {
        use tokio_stream::StreamExt;
        incoming.filter_map(move |accepted| match accepted {
            Err(e) => Some(Err(e)),
            Ok(io) => self.admit(io).map(Ok),
        })
    }
}

/// Ends the answer streams of `grpc.health.v1.Health/Watch` when shutdown
/// begins (after readiness went NOT_SERVING): a watcher would otherwise hold
/// its connection open, and the drain would wait out the whole grace.
#[derive(Clone)]
pub struct EndWatchesLayer {
    stop: tokio_util::sync::CancellationToken,
}

impl EndWatchesLayer {
    pub fn new(stop: tokio_util::sync::CancellationToken) -> EndWatchesLayer {
        EndWatchesLayer { stop }
    }
}

impl<S> Layer<S> for EndWatchesLayer {
    type Service = EndWatches<S>;

    fn layer(&self, inner: S) -> EndWatches<S> {
        EndWatches { inner, stop: self.stop.clone() }
    }
}

#[derive(Clone)]
pub struct EndWatches<S> {
    inner: S,
    stop: tokio_util::sync::CancellationToken,
}

const WATCH: &str = "/grpc.health.v1.Health/Watch";

impl<S> Service<http::Request<Body>> for EndWatches<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = EndWatchesFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let stop = (request.uri().path() == WATCH).then(|| self.stop.clone());
        EndWatchesFuture { inner: self.inner.call(request), stop }
    }
}

pin_project_lite::pin_project! {
    pub struct EndWatchesFuture<F> {
        #[pin]
        inner: F,
        stop: Option<tokio_util::sync::CancellationToken>,
    }
}

impl<F, E> Future for EndWatchesFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx));
        Poll::Ready(response.map(|r| match this.stop.take() {
            None => r,
            Some(stop) => r.map(|body| {
                Body::new(EndingBody { inner: body, stopped: Box::pin(stop.cancelled_owned()), ended: false })
            }),
        }))
    }
}

/// A Watch answer that ends with OK once shutdown begins.
struct EndingBody {
    inner: Body,
    stopped: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl http_body::Body for EndingBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // What the service has to say first (NOT_SERVING), then the end.
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.stopped.as_mut().poll(cx).is_ready() {
            self.ended = true;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::fairness::FairnessSettings;

    #[tokio::test(start_paused = true)]
    async fn a_count_that_does_not_move_is_cleared_when_others_move_or_after_long() {
        let settings = FairnessSettings { busy_above: 0, per_connection: 2 };
        let fairness = Fairness::new(settings, metrics::Counter::noop());
        let (stuck, other) = (fairness.connection(), fairness.connection());
        stuck.opened(3);
        let mut stale = None;
        assert!(forgive_stale(&stuck, &mut stale).is_some(), "a check is due");
        tokio::time::advance(FORGIVE_AFTER).await;
        forgive_stale(&stuck, &mut stale);
        assert_eq!(stuck.queued(), 3, "the whole process stalled: nothing cleared");
        other.opened(3);
        for _ in 0..3 {
            other.start();
        }
        assert_eq!(forgive_stale(&stuck, &mut stale), None);
        assert_eq!(stuck.queued(), 0, "others moved: cleared");
        stuck.opened(1);
        forgive_stale(&stuck, &mut stale);
        tokio::time::advance(10 * FORGIVE_AFTER).await;
        forgive_stale(&stuck, &mut stale);
        assert_eq!(stuck.queued(), 0, "cleared after ten times as long in any case");
    }

    /// A busy process reads about a share of a connection's calls at a
    /// time, in bytes of what that connection's calls take: 650-byte
    /// requests are not read 64 bytes' worth of calls at a time.
    #[tokio::test]
    async fn a_busy_connection_reads_a_share_of_calls_of_its_own_size() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let settings = FairnessSettings { busy_above: 0, per_connection: 2 };
        let fairness = Fairness::new(settings, metrics::Counter::noop());
        let gate = ConnectionGate::new(4, None, None, Some(fairness), metrics::Counter::noop());
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut conn = gate.admit(server).expect("a connection slot");
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for stream in (1u32..80).step_by(2) {
            // HEADERS, END_STREAM | END_HEADERS, a 641-byte block: 650 bytes.
            wire.extend([0, 0x02, 0x81, 0x1, 0x5]);
            wire.extend(stream.to_be_bytes());
            wire.extend([0u8; 641]);
        }
        client.write_all(&wire).await.unwrap();
        let (mut reads, mut total, mut buf) = (Vec::new(), 0, vec![0u8; 64 * 1024]);
        while total < wire.len() {
            let n = conn.read(&mut buf).await.unwrap();
            total += n;
            reads.push(n);
            // The calls read start, so the connection is under its share.
            while conn.load.queued() > 0 {
                conn.load.start();
            }
        }
        assert!(reads[0] <= 2 * 64, "nothing known yet: a share of the smallest calls: {reads:?}");
        assert!(reads.iter().any(|&n| n >= 1200), "a share of 650-byte calls is about 1300 bytes: {reads:?}");
        assert!(reads.iter().all(|&n| n <= 2 * 2048), "never more than a share of the largest: {reads:?}");
    }
}
