//! A CRI client that behaves like grpc-go's (kubelet's, crictl's,
//! critest's) at the HTTP/2 level, written frame by frame so that a test can
//! see and count everything a real client would do and receive.
//!
//! What it models, after grpc-go's `internal/transport/http2_client.go`,
//! `bdp_estimator.go` and `flowcontrol.go`, and the transparent retry of its
//! `stream.go`:
//!
//! * One connection at a time, opened on first use: the preface, then an
//!   empty SETTINGS frame (grpc-go announces nothing when its windows are
//!   the dynamic defaults: no INITIAL_WINDOW_SIZE, no MAX_HEADER_LIST_SIZE,
//!   no connection WINDOW_UPDATE). Calls are sent only once the server's
//!   SETTINGS has arrived (grpc-go's transport is ready on the server
//!   preface), at most MAX_CONCURRENT_STREAMS at a time.
//! * Requests: HEADERS (`:method`, `:scheme`, `:path`, `:authority`,
//!   `content-type`, `user-agent`, `te`, `grpc-timeout`, in grpc-go's order,
//!   HPACK with the dynamic table) then the message in DATA with END_STREAM,
//!   within the server's stream and connection windows and frame size.
//! * The BDP estimator: on every DATA frame received, if no BDP ping is
//!   outstanding, a connection WINDOW_UPDATE with all unacknowledged credit
//!   and then a PING with grpc-go's BDP payload; the ACK ends the sample and
//!   may raise the windows (WINDOW_UPDATE and SETTINGS INITIAL_WINDOW_SIZE,
//!   as grpc-go's `updateFlowControl`). So a PING follows every DATA frame
//!   that arrives while no BDP ping is in flight, which on a quiet
//!   connection is every DATA frame. [`Options::bdp_pings`] turns it off
//!   for tests that send their own PINGs ([`GrpcGoClient::ping`]).
//! * Receive flow control: the connection's unacknowledged bytes are given
//!   back once they reach a quarter of the window (and before each BDP
//!   ping); a stream's once its read bytes reach a quarter of its window and
//!   it has not ended.
//! * The server's PINGs are answered at once; its SETTINGS acknowledged and
//!   applied (INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_CONCURRENT_STREAMS,
//!   HEADER_TABLE_SIZE).
//! * GOAWAY: the connection takes no new streams; every stream above the
//!   frame's last-stream-id (and at or below a previous GOAWAY's) is
//!   unprocessed and sent again on a new connection (transparent retry),
//!   recorded as a [`Resend`]; streams at or below it are awaited on the old
//!   connection, which is closed once they are done. RST_STREAM
//!   REFUSED_STREAM also marks a stream unprocessed. As in grpc-go a call is
//!   retried transparently only once (on its first attempt); an unprocessed
//!   second attempt fails UNAVAILABLE.
//! * A connection that ends fails the calls it carries with UNAVAILABLE (no
//!   retry: the server may have processed them).
//! * Deadlines: a call past its deadline is reset (RST_STREAM CANCEL) and
//!   fails DEADLINE_EXCEEDED.
//!
//! Where it deviates from grpc-go: HPACK is loona-hpack's encoder (which
//! adds new header names to the dynamic table but not new values of known
//! names, where golang.org/x/net's indexes most fields), no keepalive pings
//! (kubelet sets none),
//! no compression, no retry policy, no connection backoff (a failed connect
//! fails the calls waiting for it), the BDP ping's send time is taken when
//! it is queued rather than written, a stream's read window is credited when
//! its DATA arrives (the application reads at once), and response headers
//! are not validated beyond `grpc-status`/`grpc-message` (and `:status` when
//! those are missing).
//!
//! Besides answers, [`GrpcGoClient::stats`] reports what happened on the
//! wire: connections, GOAWAY frames with their code and debug data, the
//! resent streams, pings, and anomalies (frames for a call already answered
//! or a stream never opened, undecodable header blocks, unsolicited PING
//! ACKs).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use sidecar_shim::proxy::frame::{self, flag, kind, Head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// grpc-go's BDP ping payload.
pub const BDP_PING: [u8; 8] = [2, 4, 16, 16, 9, 14, 7, 7];
/// HTTP/2 error code ENHANCE_YOUR_CALM (what grpc-go servers send with
/// `too_many_pings`).
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
/// HTTP/2 error code NO_ERROR.
pub const NO_ERROR: u32 = 0x0;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

const DEFAULT_WINDOW: u32 = 65_535;
/// grpc-go's bdpLimit (the largest window the estimator sets).
const BDP_LIMIT: u32 = 16 << 20;
const BDP_ALPHA: f64 = 0.9;
const BDP_BETA: f64 = 0.66;
const BDP_GAMMA: f64 = 2.0;
/// HPACK's default dynamic table size.
const HPACK_TABLE: u32 = 4096;
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// How the client behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Send grpc-go's BDP pings (see the module docs).
    pub bdp_pings: bool,
    /// The `:authority` (current kubelets send `localhost`).
    pub authority: String,
    /// `user-agent`.
    pub user_agent: String,
    /// Every call's deadline (kubelet's runtime-request-timeout is 2 min).
    pub deadline: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bdp_pings: true,
            authority: "localhost".into(),
            // kubelet 1.28 vendors grpc-go 1.58.
            user_agent: "grpc-go/1.58.3".into(),
            deadline: Duration::from_secs(120),
        }
    }
}

/// A GOAWAY frame the client received.
#[derive(Clone, Debug)]
pub struct GoAway {
    /// Which connection (1 for the first).
    pub connection: u32,
    pub last_stream_id: u32,
    pub code: u32,
    pub debug: String,
    /// The streams it left unprocessed: (stream id, method).
    pub unprocessed: Vec<(u32, String)>,
    /// The streams still awaited on the connection: (stream id, method).
    pub awaited: Vec<(u32, String)>,
    /// PINGs (BDP and explicit) the client had sent on the connection.
    pub pings_before: u64,
}

impl fmt::Display for GoAway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GOAWAY on connection {}: code {} ({}), debug data {:?}, last-stream-id {}, \
             {} stream(s) above it unprocessed {:?}, {} awaited {:?}; \
             it came after the client's PING number {} on the connection",
            self.connection,
            self.code,
            error_name(self.code),
            self.debug,
            self.last_stream_id,
            self.unprocessed.len(),
            self.unprocessed,
            self.awaited.len(),
            self.awaited,
            self.pings_before
        )
    }
}

/// A call sent again on a new connection because the server left its stream
/// unprocessed (GOAWAY or REFUSED_STREAM).
#[derive(Clone, Debug)]
pub struct Resend {
    /// The client's number for the call (its order of issue, from 1).
    pub call: u64,
    pub method: String,
    /// Where it was first sent: (connection, stream id).
    pub first: (u32, u32),
    /// Why it was unprocessed.
    pub why: String,
}

impl fmt::Display for Resend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "call #{} {} (connection {} stream {}) resent: {}",
            self.call,
            short_method(&self.method),
            self.first.0,
            self.first.1,
            self.why
        )
    }
}

/// What happened on the wire so far.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Connections opened.
    pub connections: u32,
    pub goaways: Vec<GoAway>,
    pub resends: Vec<Resend>,
    /// Connections that ended, and how.
    pub closed: Vec<String>,
    /// Frames that do not fit the calls (a second answer, DATA after the
    /// end), undecodable header blocks, unsolicited ping ACKs.
    pub anomalies: Vec<String>,
    pub calls_started: u64,
    pub calls_answered: u64,
    /// The most streams open at once on one connection.
    pub max_in_flight: usize,
    pub data_frames_received: u64,
    pub bdp_pings_sent: u64,
    pub bdp_pings_acked: u64,
    /// PINGs sent with [`GrpcGoClient::ping`], and their ACKs.
    pub pings_sent: u64,
    pub pings_acked: u64,
    pub server_pings_answered: u64,
    pub window_updates_sent: u64,
    /// SETTINGS sent after the preface (BDP window updates).
    pub settings_updates_sent: u64,
    /// PINGs (BDP or explicit) sent and not acknowledged yet.
    pub pings_outstanding: u64,
}

impl Stats {
    /// GOAWAY frames with an error code (anything but NO_ERROR).
    pub fn error_goaways(&self) -> Vec<&GoAway> {
        self.goaways.iter().filter(|g| g.code != NO_ERROR).collect()
    }

    /// One line of counts.
    pub fn summary(&self) -> String {
        format!(
            "{} connection(s), {} GOAWAY ({} with an error code), {} resend(s), \
             {} call(s) started / {} answered, at most {} in flight, \
             {} DATA frames received, {} BDP pings sent / {} acked, \
             {} pings sent / {} acked, {} server pings answered, \
             {} WINDOW_UPDATEs and {} SETTINGS updates sent, {} anomalies",
            self.connections,
            self.goaways.len(),
            self.error_goaways().len(),
            self.resends.len(),
            self.calls_started,
            self.calls_answered,
            self.max_in_flight,
            self.data_frames_received,
            self.bdp_pings_sent,
            self.bdp_pings_acked,
            self.pings_sent,
            self.pings_acked,
            self.server_pings_answered,
            self.window_updates_sent,
            self.settings_updates_sent,
            self.anomalies.len()
        )
    }
}

/// The answer to one call.
#[derive(Clone, Debug)]
pub struct Reply {
    pub code: tonic::Code,
    pub message: String,
    /// The response message (OK answers).
    pub body: Option<Bytes>,
    /// Every attempt: (connection, stream id).
    pub attempts: Vec<(u32, u32)>,
    pub elapsed: Duration,
}

impl Reply {
    fn failed(code: tonic::Code, message: impl Into<String>) -> Reply {
        Reply {
            code,
            message: message.into(),
            body: None,
            attempts: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }
}

/// The client. Clones share the connection (as kubelet's pod workers share
/// its one gRPC channel).
#[derive(Clone)]
pub struct GrpcGoClient {
    tx: mpsc::UnboundedSender<Input>,
    stats: Arc<Mutex<Stats>>,
    _driver: Arc<DriverHandle>,
}

struct DriverHandle(JoinHandle<()>);

impl Drop for DriverHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl GrpcGoClient {
    /// A client of the server on the Unix socket `socket`; connects on the
    /// first call. Must be called inside a tokio runtime.
    pub fn new(socket: &Path, options: Options) -> GrpcGoClient {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let driver = Driver {
            socket: socket.to_path_buf(),
            options,
            tx: tx.clone(),
            stats: stats.clone(),
            conns: Vec::new(),
            next_conn: 1,
            calls: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_ping: 1,
        };
        let handle = tokio::spawn(driver.run(rx));
        GrpcGoClient {
            tx,
            stats,
            _driver: Arc::new(DriverHandle(handle)),
        }
    }

    /// A unary call of `method` (a gRPC path) with an encoded request.
    pub async fn call_raw(
        &self,
        method: &str,
        request: Bytes,
        deadline: Option<Duration>,
    ) -> Reply {
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        let input = Input::Call {
            method: method.to_string(),
            body: request,
            deadline,
            reply,
        };
        if self.tx.send(input).is_err() {
            return Reply::failed(tonic::Code::Unavailable, "the client has shut down");
        }
        let mut reply = rx.await.unwrap_or_else(|_| {
            Reply::failed(tonic::Code::Unavailable, "the client has shut down")
        });
        reply.elapsed = started.elapsed();
        reply
    }

    /// A unary call: the decoded response, or the reply that was not OK (or
    /// whose message did not decode).
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        request: &Req,
    ) -> (Reply, Option<Resp>) {
        let mut reply = self
            .call_raw(method, Bytes::from(request.encode_to_vec()), None)
            .await;
        if reply.code != tonic::Code::Ok {
            return (reply, None);
        }
        match reply.body.clone().map(Resp::decode) {
            Some(Ok(resp)) => (reply, Some(resp)),
            Some(Err(e)) => {
                reply.code = tonic::Code::Internal;
                reply.message = format!("response does not decode: {e}");
                (reply, None)
            }
            None => {
                reply.code = tonic::Code::Internal;
                reply.message = "OK without a response message".into();
                (reply, None)
            }
        }
    }

    /// Send a PING (with a payload other than the BDP one) on the current
    /// connection and wait for its ACK. Fails if there is no ready
    /// connection or it ends first.
    pub async fn ping(&self) -> Result<Duration, String> {
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        self.tx
            .send(Input::Ping { reply })
            .map_err(|_| "the client has shut down".to_string())?;
        match rx.await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the connection ended before the PING's ACK".into()),
        }
    }

    /// What happened on the wire so far.
    pub fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// Close every connection (as a client going away); calls still in
    /// flight fail CANCELLED.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Input::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `/runtime.v1.RuntimeService/Version` -> `Version`.
pub fn short_method(method: &str) -> &str {
    method.rsplit('/').next().unwrap_or(method)
}

/// The name of an HTTP/2 error code.
pub fn error_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------
// The driver: one task that owns every connection's state, fed by the
// callers and by one reader task per connection (grpc-go's reader goroutine
// and loopy writer, serialised).

enum Input {
    Call {
        method: String,
        body: Bytes,
        deadline: Option<Duration>,
        reply: oneshot::Sender<Reply>,
    },
    /// The earliest deadline has passed.
    Deadline,
    Ping {
        reply: oneshot::Sender<Result<(), String>>,
    },
    Frame {
        conn: u32,
        head: Head,
        payload: Bytes,
    },
    Closed {
        conn: u32,
        why: String,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

struct Call {
    method: String,
    body: Bytes,
    deadline: Instant,
    reply: Option<oneshot::Sender<Reply>>,
    attempts: Vec<(u32, u32)>,
    /// grpc-go retries a call transparently only on its first attempt.
    first_attempt: bool,
}

struct Driver {
    socket: PathBuf,
    options: Options,
    tx: mpsc::UnboundedSender<Input>,
    stats: Arc<Mutex<Stats>>,
    /// Open connections, oldest first; only the last can take new streams,
    /// and only while it is not draining.
    conns: Vec<Conn>,
    next_conn: u32,
    calls: HashMap<u64, Call>,
    /// Calls' deadlines, earliest first.
    deadlines: BTreeSet<(Instant, u64)>,
    next_ping: u64,
}

struct Conn {
    id: u32,
    out: BytesMut,
    writer: Option<mpsc::UnboundedSender<Bytes>>,
    reader: JoinHandle<()>,
    /// The server's SETTINGS has arrived.
    ready: bool,
    /// A GOAWAY arrived: no new streams.
    draining: bool,
    prev_goaway: Option<u32>,
    next_stream: u32,
    encoder: loona_hpack::Encoder<'static>,
    /// The server shrank its HPACK table: encode literals without indexing
    /// (after a dynamic table size update to 0 in the next block).
    literal_only: bool,
    table_update_due: bool,
    decoder: loona_hpack::Decoder<'static>,
    /// A header block being received: (stream, end_stream, fragment).
    block: Option<(u32, bool, BytesMut)>,
    streams: HashMap<u32, Stream>,
    /// Streams answered (or given up) on this connection, with their method:
    /// frames for them afterwards are anomalies unless we reset them.
    finished: HashMap<u32, String>,
    reset_by_us: HashSet<u32>,
    /// Calls waiting for the server's SETTINGS or for stream quota.
    queued: VecDeque<u64>,
    send_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    max_concurrent: usize,
    /// Connection receive flow control (grpc-go's trInFlow).
    recv_limit: u32,
    recv_unacked: u32,
    /// Our streams' receive window (grpc-go's initialWindowSize).
    stream_recv_limit: u32,
    bdp: Bdp,
    /// Explicit PINGs waiting for their ACK, by payload.
    pings: HashMap<[u8; 8], oneshot::Sender<Result<(), String>>>,
    /// PINGs sent on it (BDP and explicit).
    pings_sent: u64,
}

struct Stream {
    call: u64,
    method: String,
    send_window: i64,
    /// Request bytes not yet sent (waiting for window).
    pending: Bytes,
    recv_pending_update: u32,
    headers: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    data: BytesMut,
}

/// grpc-go's bdpEstimator.
struct Bdp {
    bdp: u32,
    sample: u32,
    sent_at: Instant,
    is_sent: bool,
    bw_max: f64,
    rtt: f64,
    sample_count: u64,
}

impl Bdp {
    fn new() -> Bdp {
        Bdp {
            bdp: DEFAULT_WINDOW,
            sample: 0,
            sent_at: Instant::now(),
            is_sent: false,
            bw_max: 0.0,
            rtt: 0.0,
            sample_count: 0,
        }
    }

    /// A DATA frame of `n` bytes arrived: whether to send a BDP ping.
    fn add(&mut self, n: u32) -> bool {
        if self.bdp == BDP_LIMIT {
            return false;
        }
        if !self.is_sent {
            self.is_sent = true;
            self.sample = n;
            self.sent_at = Instant::now();
            self.sample_count += 1;
            return true;
        }
        self.sample = self.sample.saturating_add(n);
        false
    }

    /// The BDP ping's ACK: a new window, if the estimate grew.
    fn calculate(&mut self) -> Option<u32> {
        let rtt_sample = self.sent_at.elapsed().as_secs_f64();
        if self.sample_count < 10 {
            self.rtt += (rtt_sample - self.rtt) / self.sample_count.max(1) as f64;
        } else {
            self.rtt += (rtt_sample - self.rtt) * BDP_ALPHA;
        }
        self.is_sent = false;
        let bw_current = f64::from(self.sample) / (self.rtt.max(1e-9) * 1.5);
        if bw_current > self.bw_max {
            self.bw_max = bw_current;
        }
        if f64::from(self.sample) >= BDP_BETA * f64::from(self.bdp)
            && bw_current == self.bw_max
            && self.bdp != BDP_LIMIT
        {
            self.bdp = ((BDP_GAMMA * f64::from(self.sample)) as u32).min(BDP_LIMIT);
            return Some(self.bdp);
        }
        None
    }
}

impl Driver {
    fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut next_call = 1u64;
        loop {
            let next_deadline = self.deadlines.first().map(|&(at, _)| at);
            let input = tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => input,
                    None => return,
                },
                _ = sleep_until_some(next_deadline) => Input::Deadline,
            };
            match input {
                Input::Call {
                    method,
                    body,
                    deadline,
                    reply,
                } => {
                    let id = next_call;
                    next_call += 1;
                    let timeout = deadline.unwrap_or(self.options.deadline);
                    let deadline = Instant::now() + timeout;
                    self.calls.insert(
                        id,
                        Call {
                            method,
                            body,
                            deadline,
                            reply: Some(reply),
                            attempts: Vec::new(),
                            first_attempt: true,
                        },
                    );
                    self.stats().calls_started += 1;
                    self.deadlines.insert((deadline, id));
                    self.dispatch(id);
                }
                Input::Deadline => {
                    let now = Instant::now();
                    while let Some(&(at, call)) = self.deadlines.first() {
                        if at > now {
                            break;
                        }
                        self.deadlines.pop_first();
                        self.deadline(call);
                    }
                }
                Input::Ping { reply } => self.explicit_ping(reply),
                Input::Frame {
                    conn,
                    head,
                    payload,
                } => {
                    if let Some(i) = self.conns.iter().position(|c| c.id == conn) {
                        if let Err(why) = self.frame(i, head, payload) {
                            self.stats()
                                .anomalies
                                .push(format!("connection {conn}: {why}"));
                            self.close(i, &format!("client-side protocol error: {why}"));
                        }
                    }
                }
                Input::Closed { conn, why } => {
                    if let Some(i) = self.conns.iter().position(|c| c.id == conn) {
                        self.close(i, &why);
                    }
                }
                Input::Shutdown { reply } => {
                    // Calls first, so that closing connections re-sends
                    // nothing.
                    let calls: Vec<u64> = self.calls.keys().copied().collect();
                    for call in calls {
                        self.answer(call, tonic::Code::Cancelled, "client shutdown".into(), None);
                    }
                    while !self.conns.is_empty() {
                        self.close(0, "client shutdown");
                    }
                    self.flush();
                    let _ = reply.send(());
                    return;
                }
            }
            self.after_drain_check();
            self.flush();
        }
    }

    /// Hand queued bytes to each connection's writer.
    fn flush(&mut self) {
        for conn in &mut self.conns {
            if !conn.out.is_empty() {
                let bytes = conn.out.split().freeze();
                if let Some(w) = &conn.writer {
                    let _ = w.send(bytes);
                }
            }
        }
    }

    /// Draining connections with no streams left are closed (grpc-go closes
    /// a transport once its last stream after a GOAWAY is done).
    fn after_drain_check(&mut self) {
        while let Some(i) = self
            .conns
            .iter()
            .position(|c| c.draining && c.streams.is_empty())
        {
            self.close(i, "drained after GOAWAY");
        }
    }

    /// The connection new streams go to, opened if needed.
    fn current(&mut self) -> Result<usize, String> {
        if let Some(last) = self.conns.last() {
            if !last.draining {
                return Ok(self.conns.len() - 1);
            }
        }
        self.open()?;
        Ok(self.conns.len() - 1)
    }

    fn open(&mut self) -> Result<(), String> {
        let std_stream = std::os::unix::net::UnixStream::connect(&self.socket)
            .map_err(|e| format!("connecting to {}: {e}", self.socket.display()))?;
        std_stream
            .set_nonblocking(true)
            .map_err(|e| format!("set_nonblocking: {e}"))?;
        let stream = UnixStream::from_std(std_stream).map_err(|e| format!("tokio: {e}"))?;
        let id = self.next_conn;
        self.next_conn += 1;
        let (rd, mut wr) = stream.into_split();
        let (wtx, mut wrx) = mpsc::unbounded_channel::<Bytes>();
        tokio::spawn(async move {
            while let Some(bytes) = wrx.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        let reader = tokio::spawn(read_frames(id, rd, self.tx.clone()));
        let mut out = BytesMut::new();
        out.extend_from_slice(frame::PREFACE);
        frame::put_settings(&mut out, &[]);
        self.conns.push(Conn {
            id,
            out,
            writer: Some(wtx),
            reader,
            ready: false,
            draining: false,
            prev_goaway: None,
            next_stream: 1,
            encoder: loona_hpack::Encoder::new(),
            literal_only: false,
            table_update_due: false,
            decoder: loona_hpack::Decoder::new(),
            block: None,
            streams: HashMap::new(),
            finished: HashMap::new(),
            reset_by_us: HashSet::new(),
            queued: VecDeque::new(),
            send_window: i64::from(DEFAULT_WINDOW),
            peer_initial_window: i64::from(DEFAULT_WINDOW),
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            max_concurrent: usize::MAX,
            recv_limit: DEFAULT_WINDOW,
            recv_unacked: 0,
            stream_recv_limit: DEFAULT_WINDOW,
            bdp: Bdp::new(),
            pings: HashMap::new(),
            pings_sent: 0,
        });
        self.stats().connections += 1;
        Ok(())
    }

    /// Send a call on the current connection (or queue it there).
    fn dispatch(&mut self, call: u64) {
        let i = match self.current() {
            Ok(i) => i,
            Err(e) => {
                self.answer(call, tonic::Code::Unavailable, e, None);
                return;
            }
        };
        self.conns[i].queued.push_back(call);
        self.start_queued(i);
    }

    /// Start queued calls as the connection's state and quota allow.
    fn start_queued(&mut self, i: usize) {
        while self.conns[i].ready
            && !self.conns[i].draining
            && self.conns[i].streams.len() < self.conns[i].max_concurrent
        {
            let Some(call) = self.conns[i].queued.pop_front() else {
                break;
            };
            if self.calls.contains_key(&call) {
                self.start_stream(i, call);
            }
        }
    }

    fn start_stream(&mut self, i: usize, call_id: u64) {
        let options = self.options.clone();
        let call = self.calls.get_mut(&call_id).expect("caller checked");
        let conn = &mut self.conns[i];
        let stream = conn.next_stream;
        conn.next_stream += 2;
        call.attempts.push((conn.id, stream));
        let timeout = grpc_timeout(call.deadline.saturating_duration_since(Instant::now()));
        let headers: [(&[u8], &[u8]); 8] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", call.method.as_bytes()),
            (b":authority", options.authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"user-agent", options.user_agent.as_bytes()),
            (b"te", b"trailers"),
            (b"grpc-timeout", timeout.as_bytes()),
        ];
        let mut block = Vec::new();
        if conn.table_update_due {
            // Dynamic Table Size Update to 0 (RFC 7541 6.3).
            block.push(0x20);
            conn.table_update_due = false;
        }
        if conn.literal_only {
            for (name, value) in headers {
                block.push(0);
                let _ = loona_hpack::encoder::encode_integer_into(name.len(), 7, 0, &mut block);
                block.extend_from_slice(name);
                let _ = loona_hpack::encoder::encode_integer_into(value.len(), 7, 0, &mut block);
                block.extend_from_slice(value);
            }
        } else {
            conn.encoder
                .encode_into(headers, &mut block)
                .expect("writing to a Vec");
        }
        frame::put_headers(&mut conn.out, stream, &block, false, conn.peer_max_frame);
        let mut message = BytesMut::with_capacity(5 + call.body.len());
        message.put_u8(0);
        message.put_u32(call.body.len() as u32);
        message.extend_from_slice(&call.body);
        conn.streams.insert(
            stream,
            Stream {
                call: call_id,
                method: call.method.clone(),
                send_window: conn.peer_initial_window,
                pending: message.freeze(),
                recv_pending_update: 0,
                headers: None,
                data: BytesMut::new(),
            },
        );
        send_pending(conn, stream);
        let in_flight = conn.streams.len();
        let mut stats = self.stats();
        stats.max_in_flight = stats.max_in_flight.max(in_flight);
    }

    /// Complete a call (once).
    fn answer(&mut self, call: u64, code: tonic::Code, message: String, body: Option<Bytes>) {
        if let Some(mut c) = self.calls.remove(&call) {
            self.deadlines.remove(&(c.deadline, call));
            // Counted before the caller can see the answer.
            self.stats().calls_answered += 1;
            if let Some(reply) = c.reply.take() {
                let _ = reply.send(Reply {
                    code,
                    message,
                    body,
                    attempts: c.attempts,
                    elapsed: Duration::ZERO,
                });
            }
        }
    }

    /// The stream `stream` of connection `i` ended; forget it.
    fn end_stream(&mut self, i: usize, stream: u32) -> Option<Stream> {
        let conn = &mut self.conns[i];
        let s = conn.streams.remove(&stream)?;
        conn.finished.insert(stream, s.method.clone());
        let i_conn = i;
        self.start_queued(i_conn);
        Some(s)
    }

    /// The server did not process this stream: send the call again on
    /// another connection if it may be (grpc-go's transparent retry).
    fn unprocessed(&mut self, i: usize, stream: u32, why: &str) {
        let conn_id = self.conns[i].id;
        let Some(s) = self.end_stream(i, stream) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&s.call) else {
            return;
        };
        if call.first_attempt {
            call.first_attempt = false;
            let resend = Resend {
                call: s.call,
                method: s.method.clone(),
                first: (conn_id, stream),
                why: why.to_string(),
            };
            self.stats().resends.push(resend);
            self.dispatch(s.call);
        } else {
            self.answer(
                s.call,
                tonic::Code::Unavailable,
                format!("unprocessed again ({why}); grpc-go retries transparently only once"),
                None,
            );
        }
    }

    fn deadline(&mut self, call: u64) {
        if !self.calls.contains_key(&call) {
            return;
        }
        for i in 0..self.conns.len() {
            let conn = &mut self.conns[i];
            let found = conn
                .streams
                .iter()
                .find(|(_, s)| s.call == call)
                .map(|(&id, _)| id);
            if let Some(stream) = found {
                frame::put_rst_stream(&mut conn.out, stream, CANCEL);
                conn.reset_by_us.insert(stream);
                self.end_stream(i, stream);
                break;
            }
        }
        self.answer(
            call,
            tonic::Code::DeadlineExceeded,
            "context deadline exceeded".into(),
            None,
        );
    }

    fn explicit_ping(&mut self, reply: oneshot::Sender<Result<(), String>>) {
        let Some(conn) = self.conns.iter_mut().rev().find(|c| c.ready && !c.draining) else {
            let _ = reply.send(Err("no ready connection to ping on".into()));
            return;
        };
        let payload = (0x7069_6e67_0000_0000u64 | self.next_ping).to_be_bytes();
        self.next_ping += 1;
        frame::put_head(&mut conn.out, 8, kind::PING, 0, 0);
        conn.out.extend_from_slice(&payload);
        conn.pings.insert(payload, reply);
        conn.pings_sent += 1;
        let mut stats = lock(&self.stats);
        stats.pings_sent += 1;
        stats.pings_outstanding += 1;
    }

    /// Close connection `i`: its streams fail UNAVAILABLE, its queued calls
    /// go to another connection.
    fn close(&mut self, i: usize, why: &str) {
        let mut conn = self.conns.remove(i);
        // Whatever was queued for it is dropped with it.
        conn.out.clear();
        conn.writer = None;
        conn.reader.abort();
        let in_flight: Vec<(u32, Stream)> = conn.streams.drain().collect();
        let outstanding = conn.pings.len() as u64 + u64::from(conn.bdp.is_sent);
        {
            let mut stats = self.stats();
            stats.pings_outstanding = stats.pings_outstanding.saturating_sub(outstanding);
            {
                let mut methods: Vec<String> = in_flight
                    .iter()
                    .map(|(id, s)| format!("{id}:{}", short_method(&s.method)))
                    .collect();
                methods.sort();
                stats.closed.push(format!(
                    "connection {} ended ({why}) with {} call(s) in flight {:?}",
                    conn.id,
                    in_flight.len(),
                    methods
                ));
            }
        }
        for (_, reply) in conn.pings.drain() {
            let _ = reply.send(Err(format!("connection ended before the ACK: {why}")));
        }
        for (_, s) in in_flight {
            self.answer(
                s.call,
                tonic::Code::Unavailable,
                format!("connection {} ended: {why}", conn.id),
                None,
            );
        }
        for call in conn.queued {
            if self.calls.contains_key(&call) {
                self.dispatch(call);
            }
        }
    }

    // -- frames from the server --

    fn frame(&mut self, i: usize, head: Head, payload: Bytes) -> Result<(), String> {
        if let Some((stream, end_stream, mut fragment)) = self.conns[i].block.take() {
            if head.kind != kind::CONTINUATION || head.stream != stream {
                return Err(format!(
                    "expected CONTINUATION of stream {stream}, got frame type {} on stream {}",
                    head.kind, head.stream
                ));
            }
            fragment.extend_from_slice(&payload);
            if head.has(flag::END_HEADERS) {
                return self.header_block(i, stream, end_stream, &fragment);
            }
            self.conns[i].block = Some((stream, end_stream, fragment));
            return Ok(());
        }
        match head.kind {
            kind::DATA => self.data(i, head, payload),
            kind::HEADERS => {
                let range =
                    frame::headers_fragment(&head, &payload).ok_or("HEADERS with bad padding")?;
                let fragment = &payload[range];
                let end_stream = head.has(flag::END_STREAM);
                if head.has(flag::END_HEADERS) {
                    self.header_block(i, head.stream, end_stream, fragment)
                } else {
                    self.conns[i].block = Some((head.stream, end_stream, BytesMut::from(fragment)));
                    Ok(())
                }
            }
            kind::CONTINUATION => Err("CONTINUATION without HEADERS".into()),
            kind::RST_STREAM => {
                let code = frame::payload_u32(&payload).ok_or("short RST_STREAM")?;
                self.rst_stream(i, head.stream, code);
                Ok(())
            }
            kind::SETTINGS => {
                self.settings(i, &head, &payload);
                Ok(())
            }
            kind::PING => {
                self.ping(i, &head, &payload);
                Ok(())
            }
            kind::GOAWAY => self.goaway(i, &payload),
            kind::WINDOW_UPDATE => {
                let inc = i64::from(
                    frame::payload_u32(&payload).ok_or("short WINDOW_UPDATE")? & 0x7fff_ffff,
                );
                let conn = &mut self.conns[i];
                if head.stream == 0 {
                    conn.send_window += inc;
                    let ids: Vec<u32> = conn.streams.keys().copied().collect();
                    for id in ids {
                        send_pending(conn, id);
                    }
                } else if let Some(s) = conn.streams.get_mut(&head.stream) {
                    s.send_window += inc;
                    send_pending(conn, head.stream);
                }
                Ok(())
            }
            kind::PUSH_PROMISE => Err("PUSH_PROMISE to a gRPC client".into()),
            _ => Ok(()),
        }
    }

    fn data(&mut self, i: usize, head: Head, payload: Bytes) -> Result<(), String> {
        let bdp_pings = self.options.bdp_pings;
        let conn = &mut self.conns[i];
        let size = head.len as u32;
        let mut window_updates = 0;
        let mut bdp_ping = false;
        let send_bdp = bdp_pings && conn.bdp.add(size);
        conn.recv_unacked += size;
        if conn.recv_unacked >= conn.recv_limit / 4 {
            frame::put_window_update(&mut conn.out, 0, conn.recv_unacked);
            conn.recv_unacked = 0;
            window_updates += 1;
        }
        if send_bdp {
            // "Avoid excessive ping detection (e.g. in an L7 proxy) by
            // sending a window update prior to the BDP ping."
            if conn.recv_unacked > 0 {
                frame::put_window_update(&mut conn.out, 0, conn.recv_unacked);
                conn.recv_unacked = 0;
                window_updates += 1;
            }
            frame::put_head(&mut conn.out, 8, kind::PING, 0, 0);
            conn.out.extend_from_slice(&BDP_PING);
            conn.pings_sent += 1;
            bdp_ping = true;
        }
        let end = head.has(flag::END_STREAM);
        let mut anomaly = None;
        let mut ended_without_trailers = None;
        match conn.streams.get_mut(&head.stream) {
            Some(s) => {
                if s.headers.is_none() {
                    anomaly = Some(format!(
                        "DATA before response headers on stream {}",
                        head.stream
                    ));
                }
                let range = frame::unpadded(&head, &payload).ok_or("DATA with bad padding")?;
                s.data.extend_from_slice(&payload[range]);
                s.recv_pending_update += size;
                if !end && s.recv_pending_update >= conn.stream_recv_limit / 4 {
                    frame::put_window_update(&mut conn.out, head.stream, s.recv_pending_update);
                    s.recv_pending_update = 0;
                    window_updates += 1;
                }
                if end {
                    ended_without_trailers = Some(head.stream);
                }
            }
            None => anomaly = stray(conn, head.stream, "DATA"),
        }
        {
            let mut stats = self.stats();
            stats.data_frames_received += 1;
            stats.window_updates_sent += window_updates;
            if bdp_ping {
                stats.bdp_pings_sent += 1;
                stats.pings_outstanding += 1;
            }
            if let Some(a) = anomaly {
                stats
                    .anomalies
                    .push(format!("connection {}: {a}", self.conns[i].id));
            }
        }
        if let Some(stream) = ended_without_trailers {
            if let Some(s) = self.end_stream(i, stream) {
                self.answer(
                    s.call,
                    tonic::Code::Internal,
                    "server closed the stream without sending trailers".into(),
                    None,
                );
            }
        }
        Ok(())
    }

    fn header_block(
        &mut self,
        i: usize,
        stream: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), String> {
        let conn = &mut self.conns[i];
        let headers = conn
            .decoder
            .decode(block)
            .map_err(|e| format!("undecodable header block on stream {stream}: {e:?}"))?;
        let Some(s) = conn.streams.get_mut(&stream) else {
            let what = format!("HEADERS [{}]", show_headers(&headers));
            if let Some(a) = stray(conn, stream, &what) {
                let a = format!("connection {}: {a}", conn.id);
                self.stats().anomalies.push(a);
            }
            return Ok(());
        };
        if !end_stream {
            let second = s.headers.is_some();
            s.headers = Some(headers);
            if second {
                let a = format!(
                    "connection {}: a second response header block without END_STREAM on stream {stream}",
                    conn.id
                );
                self.stats().anomalies.push(a);
            }
            return Ok(());
        }
        // Trailers, or a trailers-only response.
        let s = self.end_stream(i, stream).expect("looked up above");
        let get = |name: &[u8]| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let (code, message) = match get(b"grpc-status") {
            Some(status) => (
                status
                    .parse::<i32>()
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Unknown),
                percent_decode(&get(b"grpc-message").unwrap_or_default()),
            ),
            None => {
                let http = s
                    .headers
                    .as_ref()
                    .and_then(|h| h.iter().find(|(n, _)| n == b":status"))
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .or_else(|| get(b":status"));
                match http.as_deref() {
                    Some("200") | None => (tonic::Code::Unknown, "missing grpc-status".into()),
                    Some(other) => (http_code(other), format!("unexpected HTTP status {other}")),
                }
            }
        };
        if code != tonic::Code::Ok {
            self.answer(s.call, code, message, None);
            return Ok(());
        }
        let mut data = s.data.freeze();
        if data.len() < 5 {
            self.answer(
                s.call,
                tonic::Code::Internal,
                format!("OK with {} byte(s) of response data", data.len()),
                None,
            );
            return Ok(());
        }
        let compressed = data.get_u8();
        let len = data.get_u32() as usize;
        if compressed != 0 || data.len() != len {
            self.answer(
                s.call,
                tonic::Code::Internal,
                format!(
                    "bad response framing: compressed flag {compressed}, length {len}, {} byte(s)",
                    data.len()
                ),
                None,
            );
            return Ok(());
        }
        self.answer(s.call, tonic::Code::Ok, String::new(), Some(data));
        Ok(())
    }

    fn rst_stream(&mut self, i: usize, stream: u32, code: u32) {
        if !self.conns[i].streams.contains_key(&stream) {
            return;
        }
        if code == REFUSED_STREAM {
            self.unprocessed(i, stream, "RST_STREAM REFUSED_STREAM");
            return;
        }
        let grpc = match code {
            CANCEL => tonic::Code::Cancelled,
            ENHANCE_YOUR_CALM => tonic::Code::ResourceExhausted,
            0xc => tonic::Code::PermissionDenied,
            _ => tonic::Code::Internal,
        };
        if let Some(s) = self.end_stream(i, stream) {
            self.answer(
                s.call,
                grpc,
                format!(
                    "stream terminated by RST_STREAM with error code: {}",
                    error_name(code)
                ),
                None,
            );
        }
    }

    fn settings(&mut self, i: usize, head: &Head, payload: &[u8]) {
        if head.has(flag::ACK) {
            return;
        }
        let conn = &mut self.conns[i];
        for (id, value) in frame::settings(payload) {
            match id {
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    let delta = i64::from(value) - conn.peer_initial_window;
                    conn.peer_initial_window = i64::from(value);
                    for s in conn.streams.values_mut() {
                        s.send_window += delta;
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => conn.peer_max_frame = value as usize,
                SETTINGS_MAX_CONCURRENT_STREAMS => conn.max_concurrent = value as usize,
                SETTINGS_HEADER_TABLE_SIZE if value < HPACK_TABLE && !conn.literal_only => {
                    conn.literal_only = true;
                    conn.table_update_due = true;
                }
                _ => {}
            }
        }
        frame::put_settings_ack(&mut conn.out);
        let ids: Vec<u32> = conn.streams.keys().copied().collect();
        for id in ids {
            send_pending(conn, id);
        }
        conn.ready = true;
        self.start_queued(i);
    }

    fn ping(&mut self, i: usize, head: &Head, payload: &[u8]) {
        let conn = &mut self.conns[i];
        let Ok(data) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        if !head.has(flag::ACK) {
            frame::put_ping_ack(&mut conn.out, &data);
            self.stats().server_pings_answered += 1;
            return;
        }
        if data == BDP_PING && conn.bdp.is_sent {
            let mut settings_update = false;
            if let Some(window) = conn.bdp.calculate() {
                // grpc-go's updateFlowControl.
                let increment = window.saturating_sub(conn.recv_limit);
                conn.recv_limit = window;
                conn.stream_recv_limit = window;
                if increment > 0 {
                    frame::put_window_update(&mut conn.out, 0, increment);
                }
                frame::put_settings(&mut conn.out, &[(SETTINGS_INITIAL_WINDOW_SIZE, window)]);
                settings_update = true;
            }
            let mut stats = self.stats();
            stats.bdp_pings_acked += 1;
            stats.pings_outstanding = stats.pings_outstanding.saturating_sub(1);
            if settings_update {
                stats.settings_updates_sent += 1;
                stats.window_updates_sent += 1;
            }
            return;
        }
        if let Some(reply) = conn.pings.remove(&data) {
            let _ = reply.send(Ok(()));
            let mut stats = self.stats();
            stats.pings_acked += 1;
            stats.pings_outstanding = stats.pings_outstanding.saturating_sub(1);
            return;
        }
        let a = format!("connection {}: unsolicited PING ACK {data:?}", conn.id);
        self.stats().anomalies.push(a);
    }

    fn goaway(&mut self, i: usize, payload: &[u8]) -> Result<(), String> {
        if payload.len() < 8 {
            return Err("short GOAWAY".into());
        }
        let last =
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
        let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
        let conn = &self.conns[i];
        let conn_id = conn.id;
        let pings_before = conn.pings_sent;
        let prev = conn.prev_goaway;
        let upper = prev.unwrap_or(u32::MAX);
        let list = |keep: &dyn Fn(u32) -> bool| {
            let mut v: Vec<(u32, String)> = conn
                .streams
                .iter()
                .filter(|(&id, _)| keep(id))
                .map(|(&id, s)| (id, short_method(&s.method).to_string()))
                .collect();
            v.sort();
            v
        };
        let unprocessed = list(&|id| id > last && id <= upper);
        let awaited = list(&|id| id <= last);
        self.stats().goaways.push(GoAway {
            connection: conn_id,
            last_stream_id: last,
            code,
            debug: debug.clone(),
            unprocessed: unprocessed.clone(),
            awaited,
            pings_before,
        });
        if last > 0 && last % 2 == 0 {
            self.close(i, "GOAWAY with an even last-stream-id");
            return Ok(());
        }
        if prev.is_some_and(|prev| last > prev) {
            self.close(i, "GOAWAY with a last-stream-id above the previous one");
            return Ok(());
        }
        self.conns[i].draining = true;
        self.conns[i].prev_goaway = Some(last);
        let why = format!(
            "GOAWAY {} {debug:?} with last-stream-id {last} on connection {conn_id}",
            error_name(code)
        );
        // New connections are only ever appended: `i` stays this one.
        for (stream, _) in unprocessed {
            self.unprocessed(i, stream, &why);
        }
        // Calls not yet sent on it go to a new connection.
        let queued: Vec<u64> = self.conns[i].queued.drain(..).collect();
        for call in queued {
            if self.calls.contains_key(&call) {
                self.dispatch(call);
            }
        }
        Ok(())
    }
}

/// What is wrong with a frame for a stream that is not open, if anything
/// (a stream the client reset may still see frames in flight).
fn stray(conn: &Conn, stream: u32, what: &str) -> Option<String> {
    match conn.finished.get(&stream) {
        Some(_) if conn.reset_by_us.contains(&stream) => None,
        Some(method) => Some(format!(
            "{what} on stream {stream} ({}) after its call was answered",
            short_method(method)
        )),
        None => Some(format!(
            "{what} on stream {stream}, which the client never opened"
        )),
    }
}

/// Sleep until `at`, or forever.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Send as much of a stream's pending request as the windows allow.
fn send_pending(conn: &mut Conn, stream: u32) {
    let Some(s) = conn.streams.get_mut(&stream) else {
        return;
    };
    while !s.pending.is_empty() {
        let n = (s.pending.len() as i64)
            .min(conn.send_window)
            .min(s.send_window)
            .min(conn.peer_max_frame as i64);
        if n <= 0 {
            return;
        }
        let chunk = s.pending.split_to(n as usize);
        let end = s.pending.is_empty();
        frame::put_head(
            &mut conn.out,
            chunk.len(),
            kind::DATA,
            if end { flag::END_STREAM } else { 0 },
            stream,
        );
        conn.out.extend_from_slice(&chunk);
        conn.send_window -= n;
        s.send_window -= n;
    }
}

/// grpc-go's encodeTimeout: the largest unit that keeps at most 8 digits.
fn grpc_timeout(t: Duration) -> String {
    let t = t.max(Duration::from_nanos(1));
    let nanos = t.as_nanos();
    for (unit, per) in [
        ("n", 1u128),
        ("u", 1_000),
        ("m", 1_000_000),
        ("S", 1_000_000_000),
        ("M", 60_000_000_000),
    ] {
        let v = nanos.div_ceil(per);
        if v <= 99_999_999 {
            return format!("{v}{unit}");
        }
    }
    format!("{}H", nanos.div_ceil(3_600_000_000_000))
}

/// grpc-go's mapping of an HTTP status without grpc-status.
fn http_code(status: &str) -> tonic::Code {
    match status {
        "400" => tonic::Code::Internal,
        "401" => tonic::Code::Unauthenticated,
        "403" => tonic::Code::PermissionDenied,
        "404" => tonic::Code::Unimplemented,
        "429" | "502" | "503" | "504" => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn show_headers(headers: &[(Vec<u8>, Vec<u8>)]) -> String {
    headers
        .iter()
        .map(|(n, v)| {
            format!(
                "{}: {}",
                String::from_utf8_lossy(n),
                String::from_utf8_lossy(v)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Read frames from the server and feed them to the driver.
async fn read_frames(
    conn: u32,
    mut rd: tokio::net::unix::OwnedReadHalf,
    tx: mpsc::UnboundedSender<Input>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let why = loop {
        while let Some(head) = Head::parse(&buf) {
            if buf.len() < head.frame_len() {
                break;
            }
            let mut f = buf.split_to(head.frame_len());
            f.advance(frame::HEADER_LEN);
            if tx
                .send(Input::Frame {
                    conn,
                    head,
                    payload: f.freeze(),
                })
                .is_err()
            {
                return;
            }
        }
        let need = Head::parse(&buf).map_or(frame::HEADER_LEN, |h| h.frame_len());
        buf.reserve(need.max(16 * 1024));
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "EOF from the server".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read error: {e}"),
        }
    };
    let _ = tx.send(Input::Closed { conn, why });
}
