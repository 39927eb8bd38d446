//! One whole client connection through a [`Relay`]: a scripted client whose
//! bytes (well-formed frames mostly, raw bytes now and then) reach the relay
//! split at arbitrary points, a runtime that behaves like a real one
//! (acknowledges settings, answers pings, answers every stream it is given
//! with headers, a message and trailers, returns flow-control credit, and
//! sometimes says GOAWAY or closes), and local calls answered, failed or
//! left to be cancelled by the harness.
//!
//! Each peer checks, as the frames are written, that what it gets is valid
//! HTTP/2 for its role (frame sizes, stream states, flow-control windows,
//! header blocks that decode, credit never returned twice), and that streams
//! carry what the other side sent. At the end the harness lets every peer
//! finish what it started and checks that every stream the client opened
//! got an answer, a RST_STREAM or a GOAWAY that leaves it out.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::Input;
use crate::metrics::Metrics;
use crate::proxy::frame::{self, flag, kind, setting, Head};
use crate::proxy::hpack::{self, HeaderList};
use crate::proxy::relay::{Action, Relay, OUT_HIGH};
use crate::proxy::{grpc, CallFuture, Interceptor, LocalCall};

/// Methods the harness's interceptor claims.
fn is_local(method: &str) -> bool {
    method.starts_with("/local.") || method == "/runtime.v1.RuntimeService/StartContainer"
}

struct Harness;

impl Interceptor for Harness {
    fn intercepts(&self, method: &str) -> bool {
        is_local(method)
    }
    fn call(&self, _: LocalCall) -> CallFuture {
        // The harness answers through `Relay::local_result` itself.
        Box::pin(async { Err(tonic::Status::internal("unused")) })
    }
}

const PATHS: &[&str] = &[
    "/runtime.v1.RuntimeService/Version",
    "/runtime.v1.RuntimeService/ListContainers",
    "/local.Svc/Answer",
    "/runtime.v1.RuntimeService/StartContainer",
    "/runtime.v1alpha2.RuntimeService/Version",
    "/local.Svc/Other",
    "",
    "/",
];

/// How much the client may feed in one read (what the I/O loop reads at
/// once: its buffer, grown to a whole frame).
const READ_CHUNK: usize = 16 * 1024 + frame::HEADER_LEN + frame::DEFAULT_MAX_FRAME;

/// What may sit in an output buffer beyond [`OUT_HIGH`]: the frames that
/// one event adds without looking at the buffer (acknowledgements, resets,
/// header blocks of the streams answered at once, one DATA frame each).
const OUT_SLACK: usize = 64 * 1024;

/// The relay's own limits as a peer sees them.
const RELAY_RUNTIME_WINDOW: i64 = 1 << 20;

/// With SIDECAR_SHIM_FUZZ_TRACE set, every frame is printed (to read a
/// crash's input).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("SIDECAR_SHIM_FUZZ_TRACE").is_some())
}

fn frames(buf: &[u8]) -> Vec<(Head, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = Head::parse(&buf[at..]) {
        if buf.len() - at < head.frame_len() {
            break;
        }
        out.push((head, &buf[at + frame::HEADER_LEN..at + head.frame_len()]));
        at += head.frame_len();
    }
    out
}

fn settings_of(payload: &[u8]) -> Vec<(u16, u32)> {
    frame::settings(payload).collect()
}

/// The value of an RFC 7541 integer with a 5-bit prefix at the start of a
/// block that opens with a dynamic table size update.
fn size_updates(block: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < block.len() && block[at] & 0xe0 == 0x20 {
        let mut value = usize::from(block[at] & 0x1f);
        at += 1;
        if value == 0x1f {
            let mut shift = 0;
            while at < block.len() && shift < 35 {
                let b = block[at];
                at += 1;
                value += usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        out.push(value);
    }
    out
}

// -- The client -------------------------------------------------------------------

/// What the relay has consumed from the client, as the client sent it.
struct ClientSent {
    dec: hpack::Decoder,
    /// Streams opened with a valid new id, in order.
    opened: Vec<u32>,
    max_id: u32,
    ended: HashSet<u32>,
    reset: HashSet<u32>,
    settings: usize,
    initial_window: i64,
    max_frame: usize,
    /// The smallest HEADER_TABLE_SIZE since the relay's last header block,
    /// if the client lowered it.
    table_lowered: Option<u32>,
    table_size: u32,
    /// The smallest table size the client ever set (the relay's encoder
    /// only shrinks its table).
    encoder_max: u32,
    conn_update: i64,
    stream_update: HashMap<u32, i64>,
    data_conn: i64,
    data: HashMap<u32, i64>,
    /// Unpadded DATA, per stream.
    body: HashMap<u32, Vec<u8>>,
    /// Header lists, per stream.
    blocks: HashMap<u32, Vec<HeaderList>>,
    pings: VecDeque<Vec<u8>>,
    block: Option<(u32, bool, Vec<u8>)>,
    /// The client broke the protocol in a way the relay may answer with a
    /// connection error, or ignore.
    misbehaved: bool,
    hpack_broken: bool,
}

impl ClientSent {
    fn new() -> ClientSent {
        ClientSent {
            dec: hpack::Decoder::default(),
            opened: Vec::new(),
            max_id: 0,
            ended: HashSet::new(),
            reset: HashSet::new(),
            settings: 0,
            initial_window: frame::DEFAULT_WINDOW,
            max_frame: frame::DEFAULT_MAX_FRAME,
            table_lowered: None,
            table_size: 4096,
            encoder_max: 4096,
            conn_update: 0,
            stream_update: HashMap::new(),
            data_conn: 0,
            data: HashMap::new(),
            body: HashMap::new(),
            blocks: HashMap::new(),
            pings: VecDeque::new(),
            block: None,
            misbehaved: false,
            hpack_broken: false,
        }
    }

    fn consumed(&mut self, bytes: &[u8]) {
        for (head, p) in frames(bytes) {
            if trace() {
                eprintln!("client -> relay: {head:?}");
            }
            self.frame(&head, p);
        }
    }

    fn frame(&mut self, head: &Head, p: &[u8]) {
        if let Some((stream, end, mut block)) = self.block.take() {
            if head.kind != kind::CONTINUATION || head.stream != stream {
                self.misbehaved = true;
                return;
            }
            block.extend_from_slice(p);
            if head.has(flag::END_HEADERS) {
                self.header_block(stream, end, &block);
            } else {
                self.block = Some((stream, end, block));
            }
            return;
        }
        match head.kind {
            kind::HEADERS => {
                let Some(range) = frame::headers_fragment(head, p) else {
                    self.misbehaved = true;
                    return;
                };
                let id = head.stream;
                if id != 0 && id % 2 == 1 && id > self.max_id {
                    self.max_id = id;
                    self.opened.push(id);
                } else if !self.opened.contains(&id) {
                    self.misbehaved = true;
                }
                let end = head.has(flag::END_STREAM);
                if head.has(flag::END_HEADERS) {
                    self.header_block(id, end, &p[range]);
                } else {
                    self.block = Some((id, end, p[range].to_vec()));
                }
            }
            kind::DATA => {
                let len = head.len as i64;
                self.data_conn += len;
                *self.data.entry(head.stream).or_default() += len;
                let open = !self.ended.contains(&head.stream);
                match frame::unpadded(head, p) {
                    // What the client sends after its END_STREAM is not
                    // part of the request.
                    Some(r) if open => self
                        .body
                        .entry(head.stream)
                        .or_default()
                        .extend_from_slice(&p[r]),
                    Some(_) => self.misbehaved = true,
                    None => self.misbehaved = true,
                }
                if head.has(flag::END_STREAM) {
                    self.ended.insert(head.stream);
                }
            }
            kind::RST_STREAM => {
                self.reset.insert(head.stream);
            }
            kind::SETTINGS if !head.has(flag::ACK) && p.len() % 6 == 0 => {
                self.settings += 1;
                for (id, value) in settings_of(p) {
                    match id {
                        setting::INITIAL_WINDOW_SIZE => self.initial_window = i64::from(value),
                        setting::MAX_FRAME_SIZE => {
                            if (frame::DEFAULT_MAX_FRAME..=frame::MAX_FRAME_LIMIT)
                                .contains(&(value as usize))
                            {
                                self.max_frame = value as usize;
                            } else {
                                self.misbehaved = true;
                            }
                        }
                        setting::HEADER_TABLE_SIZE => {
                            if value < self.encoder_max {
                                self.encoder_max = value;
                                self.table_lowered =
                                    Some(self.table_lowered.map_or(value, |t| t.min(value)));
                            }
                            self.table_size = value;
                        }
                        _ => {}
                    }
                }
            }
            kind::PING if !head.has(flag::ACK) && p.len() == 8 && head.stream == 0 => {
                self.pings.push_back(p.to_vec());
            }
            kind::WINDOW_UPDATE if p.len() == 4 => {
                let inc = i64::from(frame::payload_u32(p).unwrap_or(0) & 0x7fff_ffff);
                if head.stream == 0 {
                    self.conn_update += inc;
                } else {
                    *self.stream_update.entry(head.stream).or_default() += inc;
                }
            }
            _ => {}
        }
    }

    fn header_block(&mut self, stream: u32, end: bool, block: &[u8]) {
        match self.dec.decode(block) {
            Ok(list) => self.blocks.entry(stream).or_default().push(list),
            Err(_) => self.hpack_broken = true,
        }
        if end {
            self.ended.insert(stream);
        }
    }
}

/// A response as the client reads it.
#[derive(Default)]
struct Response {
    blocks: Vec<HeaderList>,
    data: Vec<u8>,
    data_len: i64,
    ended: bool,
    reset: bool,
    /// WINDOW_UPDATEs the relay gave for this stream.
    credit: i64,
}

/// The relay's frames as the client reads them, checked as they are written.
struct ClientView {
    dec: hpack::Decoder,
    seen_settings: bool,
    block: Option<(u32, bool, Vec<u8>)>,
    streams: BTreeMap<u32, Response>,
    goaway: Option<u32>,
    /// A GOAWAY with an error code: the connection is over.
    failed: bool,
    acks: usize,
    data_conn: i64,
    credit_conn: i64,
}

impl ClientView {
    fn new() -> ClientView {
        ClientView {
            dec: hpack::Decoder::default(),
            seen_settings: false,
            block: None,
            streams: BTreeMap::new(),
            goaway: None,
            failed: false,
            acks: 0,
            data_conn: 0,
            credit_conn: 0,
        }
    }

    /// Check the relay's new frames toward the client.
    fn check(&mut self, bytes: &[u8], sent: &mut ClientSent) {
        let all = frames(bytes);
        let whole: usize = all.iter().map(|(h, _)| h.frame_len()).sum();
        assert_eq!(whole, bytes.len(), "the relay writes whole frames");
        for (head, p) in all {
            self.frame(&head, p, sent);
        }
    }

    fn frame(&mut self, head: &Head, p: &[u8], sent: &mut ClientSent) {
        if trace() {
            eprintln!("relay -> client: {head:?}");
        }
        assert!(!self.failed, "a frame after a connection error: {head:?}");
        assert!(
            head.len <= sent.max_frame,
            "frame larger than the client's SETTINGS_MAX_FRAME_SIZE: {head:?}"
        );
        if !self.seen_settings {
            assert!(
                head.kind == kind::SETTINGS && !head.has(flag::ACK),
                "the server preface is SETTINGS: {head:?}"
            );
            self.seen_settings = true;
        }
        if let Some((stream, end, mut block)) = self.block.take() {
            assert!(
                head.kind == kind::CONTINUATION && head.stream == stream,
                "CONTINUATION expected: {head:?}"
            );
            block.extend_from_slice(p);
            if head.has(flag::END_HEADERS) {
                self.header_block(stream, end, &block, sent);
            } else {
                self.block = Some((stream, end, block));
            }
            return;
        }
        let id = head.stream;
        match head.kind {
            kind::SETTINGS => {
                assert_eq!(id, 0);
                if head.has(flag::ACK) {
                    assert!(p.is_empty());
                    self.acks += 1;
                    assert!(
                        self.acks <= sent.settings,
                        "more SETTINGS ACKs than SETTINGS"
                    );
                } else {
                    assert_eq!(p.len() % 6, 0);
                }
            }
            kind::PING => {
                assert_eq!(id, 0);
                assert_eq!(p.len(), 8);
                assert!(head.has(flag::ACK), "the relay does not ping the client");
                let want = sent.pings.pop_front();
                assert_eq!(
                    want.as_deref(),
                    Some(p),
                    "a PING ACK for a PING the client sent"
                );
            }
            kind::GOAWAY => {
                assert_eq!(id, 0);
                assert!(p.len() >= 8);
                let last = frame::payload_u32(p).expect("8 bytes") & 0x7fff_ffff;
                let code = frame::payload_u32(&p[4..]).expect("8 bytes");
                if let Some(before) = self.goaway {
                    // RFC 9113 §6.8: a later GOAWAY never names a higher
                    // stream (fuzzer finding, fixed).
                    assert!(
                        last <= before,
                        "GOAWAY's last stream grew: {before} then {last}"
                    );
                }
                assert!(
                    last <= sent.max_id,
                    "GOAWAY names stream {last}, never opened"
                );
                self.goaway = Some(last);
                if code != frame::reason::NO_ERROR {
                    self.failed = true;
                }
            }
            kind::RST_STREAM => {
                assert_ne!(id, 0, "RST_STREAM on stream 0");
                assert_eq!(p.len(), 4);
                assert!(
                    id <= sent.max_id,
                    "RST_STREAM {id} on an idle stream (client opened up to {})",
                    sent.max_id
                );
                let s = self.streams.entry(id).or_default();
                s.reset = true;
            }
            kind::WINDOW_UPDATE => {
                assert_eq!(p.len(), 4);
                let inc = i64::from(frame::payload_u32(p).expect("4 bytes") & 0x7fff_ffff);
                assert!(inc > 0, "WINDOW_UPDATE of 0");
                if id == 0 {
                    self.credit_conn += inc;
                    assert!(
                        self.credit_conn <= sent.data_conn,
                        "connection credit {} beyond the {} DATA bytes the client sent",
                        self.credit_conn,
                        sent.data_conn
                    );
                } else {
                    assert!(id <= sent.max_id, "WINDOW_UPDATE on idle stream {id}");
                    let s = self.streams.entry(id).or_default();
                    s.credit += inc;
                    let data = sent.data.get(&id).copied().unwrap_or(0);
                    assert!(
                        s.credit <= data,
                        "stream {id}: credit {} beyond the {data} DATA bytes sent",
                        s.credit
                    );
                }
            }
            kind::HEADERS => {
                self.stream_open(id, sent);
                let range = frame::headers_fragment(head, p).expect("valid HEADERS");
                let end = head.has(flag::END_STREAM);
                if head.has(flag::END_HEADERS) {
                    self.header_block(id, end, &p[range], sent);
                } else {
                    self.block = Some((id, end, p[range].to_vec()));
                }
            }
            kind::DATA => {
                self.stream_open(id, sent);
                let s = self.streams.entry(id).or_default();
                assert!(!s.blocks.is_empty(), "stream {id}: DATA before HEADERS");
                let len = head.len as i64;
                s.data_len += len;
                self.data_conn += len;
                let window = sent.initial_window
                    + sent.stream_update.get(&id).copied().unwrap_or(0)
                    - s.data_len;
                assert!(window >= 0, "stream {id}: DATA beyond the stream's window");
                assert!(
                    frame::DEFAULT_WINDOW + sent.conn_update - self.data_conn >= 0,
                    "DATA beyond the connection's window"
                );
                let r = frame::unpadded(head, p).expect("valid DATA");
                s.data.extend_from_slice(&p[r]);
                if head.has(flag::END_STREAM) {
                    s.ended = true;
                    assert!(
                        s.blocks.len() >= 2
                            || s.blocks
                                .iter()
                                .any(|b| hpack::get(b, b"grpc-status").is_some()),
                        "stream {id}: a response without trailers"
                    );
                }
            }
            k => panic!("unexpected frame type {k} toward the client"),
        }
    }

    /// A frame on stream `id` must be on a stream the client opened and the
    /// relay has not closed.
    fn stream_open(&mut self, id: u32, sent: &ClientSent) {
        assert!(
            id != 0 && id % 2 == 1 && id <= sent.max_id,
            "frame on stream {id}, which the client did not open"
        );
        let s = self.streams.entry(id).or_default();
        assert!(
            !s.ended && !s.reset,
            "stream {id}: a frame after the stream ended"
        );
    }

    fn header_block(&mut self, id: u32, end: bool, block: &[u8], sent: &mut ClientSent) {
        if let Some(lowered) = sent.table_lowered.take() {
            let updates = size_updates(block);
            assert!(
                updates.first().is_some_and(|&u| u <= lowered as usize),
                "the client lowered its table to {lowered}: the next block must say so ({updates:?})"
            );
        }
        for u in size_updates(block) {
            assert!(
                u <= sent.table_size as usize,
                "table size update above the client's setting"
            );
        }
        let list = self
            .dec
            .decode(block)
            .unwrap_or_else(|e| panic!("stream {id}: a header block that does not decode: {e}"));
        let s = self.streams.entry(id).or_default();
        if s.blocks.is_empty() {
            assert!(
                hpack::get(&list, b":status").is_some(),
                "stream {id}: response headers without :status: {list:?}"
            );
        } else {
            assert!(
                end,
                "stream {id}: a second header block must end the stream"
            );
            assert!(
                list.iter().all(|(n, _)| !n.starts_with(b":")),
                "stream {id}: pseudo-header in trailers"
            );
        }
        if end {
            assert!(
                hpack::get(&list, b"grpc-status").is_some(),
                "stream {id}: the response ends without grpc-status: {list:?}"
            );
            s.ended = true;
        }
        s.blocks.push(list);
    }

    fn closed(&self, id: u32) -> bool {
        self.failed
            || self.goaway.is_some_and(|last| id > last)
            || self.streams.get(&id).is_some_and(|s| s.ended || s.reset)
    }
}

/// The client: writes frames, and reads (or does not read) what it gets.
struct Client {
    enc: hpack::Encoder,
    /// Written, not yet taken by the relay.
    pending: BytesMut,
    next_id: u32,
    sent: ClientSent,
    view: ClientView,
    /// Bytes at the front of `relay.client_out` already checked.
    checked: usize,
    /// Raw bytes were sent: the client may be out of step with itself.
    raw: bool,
    /// DATA read, not yet given back (connection, streams).
    unreturned_conn: i64,
}

impl Client {
    fn new() -> Client {
        Client {
            enc: hpack::Encoder::default(),
            pending: BytesMut::new(),
            next_id: 1,
            sent: ClientSent::new(),
            view: ClientView::new(),
            checked: 0,
            raw: false,
            unreturned_conn: 0,
        }
    }

    fn headers(&mut self, id: u32, list: &HeaderList, end: bool, split: usize, pad: u8) {
        let mut block = BytesMut::new();
        self.enc.encode(&mut block, list);
        if pad > 0 && block.len() < split {
            // One padded HEADERS frame.
            let mut payload = vec![pad];
            payload.extend_from_slice(&block);
            payload.extend(std::iter::repeat_n(0, usize::from(pad)));
            let flags = flag::END_HEADERS | flag::PADDED | if end { flag::END_STREAM } else { 0 };
            frame::put_head(&mut self.pending, payload.len(), kind::HEADERS, flags, id);
            self.pending.extend_from_slice(&payload);
        } else {
            frame::put_headers(&mut self.pending, id, &block, end, split.max(1));
        }
    }

    fn data(&mut self, id: u32, data: &[u8], end: bool, pad: Option<u8>) {
        match pad {
            Some(pad) => {
                let mut payload = vec![pad];
                payload.extend_from_slice(data);
                payload.extend(std::iter::repeat_n(0, usize::from(pad)));
                let flags = flag::PADDED | if end { flag::END_STREAM } else { 0 };
                frame::put_head(&mut self.pending, payload.len(), kind::DATA, flags, id);
                self.pending.extend_from_slice(&payload);
            }
            None => frame::put_data(&mut self.pending, id, data, end, frame::DEFAULT_MAX_FRAME),
        }
    }

    /// Streams the client opened and may still send on.
    fn open_streams(&self) -> Vec<u32> {
        self.sent
            .opened
            .iter()
            .copied()
            .filter(|id| !self.sent.ended.contains(id) && !self.sent.reset.contains(id))
            .filter(|id| !self.view.closed(*id))
            .collect()
    }
}

// -- The runtime -----------------------------------------------------------------

/// How the runtime answers a stream.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Headers, one message of this size, trailers with this code.
    Message(usize, u8),
    /// Headers and trailers in one block (an error).
    TrailersOnly(u8),
    /// RST_STREAM with this code.
    Reset(u32),
    /// Headers at once (before the request ends), then as Message.
    Early(usize),
}

#[derive(Default)]
struct RtStream {
    request: Vec<HeaderList>,
    body: Vec<u8>,
    data_len: i64,
    req_ended: bool,
    reset_by_relay: bool,
    /// The runtime's own side.
    headers_sent: bool,
    done: bool,
    /// Response DATA still to send, and whether trailers follow.
    to_send: Vec<u8>,
    code: Option<u8>,
    sent_data: i64,
    /// Relay's credit for this stream.
    credit: i64,
    /// Request bytes not given back yet.
    unreturned: i64,
    /// Credit given beyond the DATA received (a runtime with a small
    /// initial window opens each stream's window itself).
    extra: i64,
}

struct Runtime {
    enc: hpack::Encoder,
    dec: hpack::Decoder,
    /// Written, not yet taken by the relay.
    pending: BytesMut,
    /// Bytes at the front of `relay.runtime_out` already checked.
    checked: usize,
    preface: bool,
    relay_settings: usize,
    acks_sent: usize,
    relay_initial_window: i64,
    relay_max_frame: usize,
    relay_conn_credit: i64,
    data_conn_sent: i64,
    /// What the runtime advertised.
    initial_window: i64,
    max_streams: Option<u32>,
    max_frame: usize,
    /// Settings the runtime sent that the relay has taken.
    settings_sent: usize,
    acks_received: usize,
    streams: BTreeMap<u32, RtStream>,
    max_id: u32,
    block: Option<(u32, bool, Vec<u8>)>,
    answers: Vec<Answer>,
    next_answer: usize,
    /// GOAWAY written by the runtime (last stream), and whether the relay
    /// has read it.
    goaway: Option<u32>,
    goaway_read: bool,
    pings: VecDeque<[u8; 8]>,
    unreturned_conn: i64,
}

impl Runtime {
    fn new(input: &mut Input) -> Runtime {
        let mut answers = Vec::new();
        for _ in 0..(input.u8() % 4 + 1) {
            let a = match input.u8() % 8 {
                0 => Answer::TrailersOnly(input.u8() % 17),
                1 => Answer::Reset(u32::from(input.u8() % 14)),
                2 => Answer::Early(usize::from(input.u16()) * 4),
                3 => Answer::Message(usize::from(input.u16()) * 4, input.u8() % 17),
                _ => Answer::Message(usize::from(input.u8()), 0),
            };
            answers.push(a);
        }
        let mut settings = Vec::new();
        let mut initial_window = frame::DEFAULT_WINDOW;
        let mut max_streams = None;
        let mut max_frame = frame::DEFAULT_MAX_FRAME;
        let flags = input.u8();
        if flags & 1 != 0 {
            let n = u32::from(input.u8() % 4);
            settings.push((setting::MAX_CONCURRENT_STREAMS, n));
            max_streams = Some(n);
        }
        if flags & 2 != 0 {
            let w = u32::from(input.u16());
            settings.push((setting::INITIAL_WINDOW_SIZE, w));
            initial_window = i64::from(w);
        }
        if flags & 4 != 0 {
            settings.push((setting::HEADER_TABLE_SIZE, u32::from(input.u16() % 5000)));
        }
        if flags & 8 != 0 {
            let size = 16_384 + u32::from(input.u16());
            settings.push((setting::MAX_FRAME_SIZE, size));
            max_frame = size as usize;
        }
        if trace() {
            eprintln!("runtime settings: {settings:?}, answers: {answers:?}");
        }
        let mut pending = BytesMut::new();
        frame::put_settings(&mut pending, &settings);
        Runtime {
            enc: hpack::Encoder::default(),
            dec: hpack::Decoder::default(),
            pending,
            checked: 0,
            preface: false,
            relay_settings: 0,
            acks_sent: 0,
            relay_initial_window: frame::DEFAULT_WINDOW,
            relay_max_frame: frame::DEFAULT_MAX_FRAME,
            relay_conn_credit: 0,
            data_conn_sent: 0,
            initial_window,
            max_streams,
            max_frame,
            settings_sent: 1,
            acks_received: 0,
            streams: BTreeMap::new(),
            max_id: 0,
            block: None,
            answers,
            next_answer: 0,
            goaway: None,
            goaway_read: false,
            pings: VecDeque::new(),
            unreturned_conn: 0,
        }
    }

    /// The relay took `bytes` of what the runtime wrote.
    fn consumed(&mut self, bytes: &[u8]) {
        for (head, _) in frames(bytes) {
            if trace() {
                eprintln!("runtime -> relay: {head:?}");
            }
            if head.kind == kind::GOAWAY {
                self.goaway_read = true;
            }
        }
    }

    /// Check the relay's new frames toward the runtime (and act on them, as
    /// a runtime reading them would).
    fn check(&mut self, mut bytes: &[u8], client: &ClientSent) {
        if !self.preface {
            assert!(
                bytes.starts_with(frame::PREFACE),
                "the runtime connection starts with the client preface"
            );
            bytes = &bytes[frame::PREFACE.len()..];
            self.preface = true;
        }
        let all = frames(bytes);
        let whole: usize = all.iter().map(|(h, _)| h.frame_len()).sum();
        assert_eq!(
            whole,
            bytes.len(),
            "the relay writes whole frames to the runtime"
        );
        for (i, (head, p)) in all.into_iter().enumerate() {
            if self.relay_settings == 0 {
                assert!(
                    i == 0 && head.kind == kind::SETTINGS && !head.has(flag::ACK),
                    "the client preface ends with SETTINGS"
                );
            }
            self.frame(&head, p, client);
        }
    }

    fn frame(&mut self, head: &Head, p: &[u8], client: &ClientSent) {
        if trace() {
            eprintln!("relay -> runtime: {head:?}");
        }
        let max_frame = if self.acks_received > 0 {
            self.max_frame
        } else {
            frame::DEFAULT_MAX_FRAME
        };
        assert!(
            head.len <= max_frame,
            "frame too large for the runtime: {head:?}"
        );
        if let Some((stream, end, mut block)) = self.block.take() {
            assert!(
                head.kind == kind::CONTINUATION && head.stream == stream,
                "CONTINUATION expected toward the runtime"
            );
            block.extend_from_slice(p);
            if head.has(flag::END_HEADERS) {
                self.header_block(stream, end, &block, client);
            } else {
                self.block = Some((stream, end, block));
            }
            return;
        }
        let id = head.stream;
        match head.kind {
            kind::SETTINGS => {
                assert_eq!(id, 0);
                if head.has(flag::ACK) {
                    self.acks_received += 1;
                    assert!(self.acks_received <= self.settings_sent);
                    return;
                }
                self.relay_settings += 1;
                for (k, v) in settings_of(p) {
                    match k {
                        setting::INITIAL_WINDOW_SIZE => self.relay_initial_window = i64::from(v),
                        setting::MAX_FRAME_SIZE => self.relay_max_frame = v as usize,
                        setting::ENABLE_PUSH => assert_eq!(v, 0),
                        _ => {}
                    }
                }
                frame::put_settings_ack(&mut self.pending);
                self.acks_sent += 1;
            }
            kind::PING => {
                assert_eq!(p.len(), 8);
                if head.has(flag::ACK) {
                    let want = self.pings.pop_front();
                    assert_eq!(want.as_ref().map(|w| &w[..]), Some(p));
                } else {
                    frame::put_ping_ack(&mut self.pending, p);
                }
            }
            kind::GOAWAY => {
                assert_eq!(id, 0);
                assert!(p.len() >= 8);
            }
            kind::WINDOW_UPDATE => {
                assert_eq!(p.len(), 4);
                let inc = i64::from(frame::payload_u32(p).expect("4") & 0x7fff_ffff);
                assert!(inc > 0, "WINDOW_UPDATE of 0 toward the runtime");
                if id == 0 {
                    self.relay_conn_credit += inc;
                    assert!(
                        self.relay_conn_credit
                            <= RELAY_RUNTIME_WINDOW - frame::DEFAULT_WINDOW + self.data_conn_sent,
                        "the relay gives the runtime more connection credit than it got DATA"
                    );
                } else {
                    let s = self
                        .streams
                        .get_mut(&id)
                        .unwrap_or_else(|| panic!("WINDOW_UPDATE on idle stream {id}"));
                    s.credit += inc;
                    assert!(
                        s.credit <= s.sent_data,
                        "stream {id}: more credit than the runtime's DATA"
                    );
                }
            }
            kind::RST_STREAM => {
                assert_eq!(p.len(), 4);
                let s = self
                    .streams
                    .get_mut(&id)
                    .unwrap_or_else(|| panic!("RST_STREAM on idle stream {id} toward the runtime"));
                assert!(!s.reset_by_relay, "stream {id}: RST_STREAM twice");
                s.reset_by_relay = true;
                s.done = true;
            }
            kind::HEADERS => {
                assert!(id % 2 == 1, "the relay opens even stream {id}");
                if !self.streams.contains_key(&id) {
                    assert!(
                        id > self.max_id,
                        "stream {id} opened after stream {} on the runtime connection",
                        self.max_id
                    );
                    if self.goaway_read {
                        let last = self.goaway.expect("read");
                        assert!(
                            id <= last,
                            "stream {id} opened after the runtime's GOAWAY({last})"
                        );
                    }
                    let mut refuse = false;
                    if let Some(max) = self.max_streams {
                        let open = self
                            .streams
                            .values()
                            .filter(|s| !(s.done && (s.req_ended || s.reset_by_relay)))
                            .count();
                        // Before the relay acknowledged the limit it may
                        // open more (RFC 9113 §6.5.2); the runtime refuses them.
                        if open as u32 >= max {
                            assert!(
                                self.acks_received == 0,
                                "stream {id}: {open} streams open, the runtime allows {max}"
                            );
                            refuse = true;
                        }
                    }
                    self.max_id = id;
                    let mut s = RtStream::default();
                    if refuse {
                        frame::put_rst_stream(&mut self.pending, id, frame::reason::REFUSED_STREAM);
                        s.done = true;
                    }
                    self.streams.insert(id, s);
                }
                let s = &self.streams[&id];
                assert!(
                    !s.req_ended && !s.reset_by_relay,
                    "stream {id}: HEADERS after its end"
                );
                let range = frame::headers_fragment(head, p).expect("valid HEADERS");
                let end = head.has(flag::END_STREAM);
                if head.has(flag::END_HEADERS) {
                    self.header_block(id, end, &p[range], client);
                } else {
                    self.block = Some((id, end, p[range].to_vec()));
                }
            }
            kind::DATA => {
                let s = self
                    .streams
                    .get_mut(&id)
                    .unwrap_or_else(|| panic!("DATA on idle stream {id} toward the runtime"));
                assert!(
                    !s.req_ended && !s.reset_by_relay,
                    "stream {id}: DATA after its end"
                );
                let len = head.len as i64;
                s.data_len += len;
                s.unreturned += len;
                self.unreturned_conn += len;
                // Its window: what it advertised (once the relay has
                // acknowledged it), less what it has not given back.
                let initial = if self.acks_received > 0 {
                    self.initial_window
                } else {
                    frame::DEFAULT_WINDOW
                };
                assert!(
                    initial + s.extra - s.unreturned >= 0,
                    "stream {id}: DATA beyond the runtime's window"
                );
                assert!(
                    self.unreturned_conn <= frame::DEFAULT_WINDOW,
                    "DATA beyond the runtime's connection window"
                );
                let r = frame::unpadded(head, p).expect("valid DATA");
                s.body.extend_from_slice(&p[r]);
                let sent = client.body.get(&id).map(Vec::as_slice).unwrap_or_default();
                assert!(
                    sent.starts_with(&s.body),
                    "stream {id}: the runtime got other bytes than the client sent"
                );
                if head.has(flag::END_STREAM) {
                    s.req_ended = true;
                }
            }
            k => panic!("unexpected frame type {k} toward the runtime"),
        }
    }

    fn header_block(&mut self, id: u32, end: bool, block: &[u8], client: &ClientSent) {
        let list = self
            .dec
            .decode(block)
            .unwrap_or_else(|e| panic!("stream {id}: a block the runtime cannot decode: {e}"));
        let s = self.streams.get_mut(&id).expect("opened");
        let n = s.request.len();
        let sent = client.blocks.get(&id).and_then(|b| b.get(n));
        assert_eq!(
            Some(&list),
            sent,
            "stream {id}: header block {n} is not what the client sent"
        );
        s.request.push(list);
        if end {
            s.req_ended = true;
        }
    }

    /// Write what a runtime would now: credit for request bytes, answers
    /// to ended requests (as far as the windows allow).
    fn work(&mut self, input: &mut Input, everything: bool) {
        // Credit back.
        if self.unreturned_conn > 0 && (everything || input.bool()) {
            frame::put_window_update(&mut self.pending, 0, self.unreturned_conn as u32);
            self.unreturned_conn = 0;
        }
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            let answer = self.answers[self.next_answer % self.answers.len()];
            let s = self.streams.get_mut(&id).expect("listed");
            if s.unreturned > 0 && !s.req_ended && !s.done {
                frame::put_window_update(&mut self.pending, id, s.unreturned as u32);
                s.unreturned = 0;
            }
            let initial = if self.acks_received > 0 {
                self.initial_window
            } else {
                frame::DEFAULT_WINDOW
            };
            if !s.req_ended && !s.done && initial + s.extra - s.unreturned < 16_384 {
                frame::put_window_update(&mut self.pending, id, 65_535);
                s.extra += 65_535;
            }
            if s.done || self.goaway.is_some_and(|last| id > last) {
                continue;
            }
            if !s.headers_sent && s.code.is_none() {
                let early = matches!(answer, Answer::Early(_));
                if !s.req_ended && !early {
                    continue;
                }
                self.next_answer += 1;
                match answer {
                    Answer::Reset(code) => {
                        frame::put_rst_stream(&mut self.pending, id, code);
                        s.done = true;
                        continue;
                    }
                    Answer::TrailersOnly(code) => {
                        let list = vec![
                            (Bytes::from_static(b":status"), Bytes::from_static(b"200")),
                            (
                                Bytes::from_static(b"content-type"),
                                Bytes::from_static(b"application/grpc"),
                            ),
                            (
                                Bytes::from_static(b"grpc-status"),
                                code.max(1).to_string().into(),
                            ),
                            (
                                Bytes::from_static(b"grpc-message"),
                                Bytes::from_static(b"runtime%20says%20no"),
                            ),
                        ];
                        let mut block = BytesMut::new();
                        self.enc.encode(&mut block, &list);
                        frame::put_headers(
                            &mut self.pending,
                            id,
                            &block,
                            true,
                            self.relay_max_frame,
                        );
                        s.headers_sent = true;
                        s.done = true;
                        continue;
                    }
                    Answer::Message(size, code) => {
                        s.to_send = grpc::frame_message(&vec![0x5a; size]).to_vec();
                        s.code = Some(code);
                    }
                    Answer::Early(size) => {
                        s.to_send = grpc::frame_message(&vec![0xa5; size]).to_vec();
                        s.code = Some(0);
                    }
                }
                let list = vec![
                    (Bytes::from_static(b":status"), Bytes::from_static(b"200")),
                    (
                        Bytes::from_static(b"content-type"),
                        Bytes::from_static(b"application/grpc"),
                    ),
                ];
                let mut block = BytesMut::new();
                self.enc.encode(&mut block, &list);
                frame::put_headers(&mut self.pending, id, &block, false, self.relay_max_frame);
                s.headers_sent = true;
            }
            // A server-streaming style answer waits for the request's end
            // before its trailers, like a unary one.
            let window = (self.relay_initial_window + s.credit - s.sent_data)
                .min(frame::DEFAULT_WINDOW + self.relay_conn_credit - self.data_conn_sent);
            let n = (s.to_send.len() as i64).min(window).max(0) as usize;
            if n > 0 {
                let chunk: Vec<u8> = s.to_send.drain(..n).collect();
                frame::put_data(&mut self.pending, id, &chunk, false, self.relay_max_frame);
                s.sent_data += n as i64;
                self.data_conn_sent += n as i64;
            }
            if s.to_send.is_empty() && s.req_ended {
                let code = s.code.take().unwrap_or(0);
                let mut list = vec![(Bytes::from_static(b"grpc-status"), code.to_string().into())];
                if code != 0 {
                    list.push((
                        Bytes::from_static(b"grpc-message"),
                        Bytes::from_static(b"failed"),
                    ));
                }
                let mut block = BytesMut::new();
                self.enc.encode(&mut block, &list);
                frame::put_headers(&mut self.pending, id, &block, true, self.relay_max_frame);
                s.done = true;
            }
        }
    }

    fn goaway(&mut self, input: &mut Input) {
        if self.goaway.is_some() {
            return;
        }
        let last = match input.u8() % 3 {
            0 => self.max_id,
            1 => 0,
            _ => self.max_id.saturating_sub(2),
        };
        frame::put_goaway(
            &mut self.pending,
            last,
            u32::from(input.u8() % 3) * 0xb / 2,
            b"bye",
        );
        self.goaway = Some(last);
    }

    fn ping(&mut self, input: &mut Input) {
        let payload = input.u32().to_be_bytes();
        let p = [payload, payload].concat();
        let mut arr = [0u8; 8];
        arr.copy_from_slice(&p);
        frame::put_head(&mut self.pending, 8, kind::PING, 0, 0);
        self.pending.extend_from_slice(&arr);
        self.pings.push_back(arr);
    }
}

// -- The harness ------------------------------------------------------------------

struct World {
    relay: Relay,
    client: Client,
    runtime: Option<Runtime>,
    /// The runtime accepts connections (else connecting fails).
    reachable: bool,
    /// Local calls running: stream, method, message.
    calls: Vec<u32>,
    cancelled: Vec<u32>,
    /// Messages the harness answered local calls with.
    local_answers: HashMap<u32, Vec<u8>>,
    /// The runtime's bytes as written per stream (DATA), for all runtimes.
    relay_finished: bool,
    last_chunk: usize,
    /// How every runtime the relay connects to behaves.
    runtime_config: Vec<u8>,
}

impl World {
    fn new(input: &mut Input) -> World {
        let relay = Relay::new(
            Arc::new(Harness),
            Arc::new(Metrics::disabled()),
            Arc::new(PathBuf::from("/run/containerd/containerd.sock")),
        );
        let mut w = World {
            relay,
            client: Client::new(),
            runtime: None,
            reachable: input.u8() % 4 != 0,
            calls: Vec::new(),
            cancelled: Vec::new(),
            local_answers: HashMap::new(),
            relay_finished: false,
            last_chunk: 0,
            runtime_config: input.bytes(16).to_vec(),
        };
        // As the I/O loop does: connect at once.
        w.connect();
        w.after();
        w
    }

    fn connect(&mut self) {
        if self.reachable {
            assert!(
                self.relay.runtime_out.is_empty(),
                "bytes for the runtime before it was connected"
            );
            let config = self.runtime_config.clone();
            self.runtime = Some(Runtime::new(&mut Input::new(&config)));
            self.relay.runtime_attached();
        } else {
            self.runtime = None;
            self.relay
                .runtime_unreachable(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        }
    }

    /// After every call into the relay: act on what it asks, check what it
    /// wrote.
    fn after(&mut self) {
        for _ in 0..4 {
            let actions = self.relay.actions();
            if actions.is_empty() {
                break;
            }
            for action in actions {
                match action {
                    Action::Call(id, call) => {
                        assert!(is_local(&call.method), "{}", call.method);
                        let sent = self.client.sent.body.get(&id).cloned().unwrap_or_default();
                        assert_eq!(
                            grpc::unary_message(&sent).ok(),
                            Some(call.message.clone()),
                            "stream {id}: the local call's message is the client's"
                        );
                        assert!(!self.calls.contains(&id));
                        self.calls.push(id);
                    }
                    Action::Cancel(id) => {
                        self.calls.retain(|c| *c != id);
                        self.cancelled.push(id);
                    }
                    Action::Connect => self.connect(),
                    Action::CallStream(..) => {
                        unreachable!("the harness's interceptor claims no streaming method")
                    }
                }
            }
        }
        self.check_outputs();
    }

    fn check_outputs(&mut self) {
        let new = &self.relay.client_out[self.client.checked..];
        self.client.view.check(new, &mut self.client.sent);
        self.client.checked = self.relay.client_out.len();
        if self.relay.runtime_live() {
            if let Some(rt) = &mut self.runtime {
                let new = &self.relay.runtime_out[rt.checked..];
                rt.check(new, &self.client.sent);
                rt.checked = self.relay.runtime_out.len();
            }
        } else {
            assert!(
                self.relay.runtime_out.is_empty() || self.runtime.is_some(),
                "bytes for a runtime that is not connected"
            );
        }
        let bound = OUT_HIGH + OUT_SLACK + 2 * self.last_chunk;
        assert!(
            self.relay.client_out.len() <= bound,
            "client_out holds {} bytes",
            self.relay.client_out.len()
        );
        assert!(
            self.relay.runtime_out.len() <= bound,
            "runtime_out holds {} bytes",
            self.relay.runtime_out.len()
        );
        if self.relay.finished() {
            self.relay_finished = true;
        }
    }

    /// Feed up to `n` of the client's pending bytes (one read).
    fn client_feeds(&mut self, n: usize) -> bool {
        if self.relay_finished || !self.relay.wants_input() || self.client.pending.is_empty() {
            return false;
        }
        let n = n.clamp(1, READ_CHUNK).min(self.client.pending.len());
        // The relay's buffer: what it left last time plus this read.
        let mut buf = self.client.pending.split_to(n);
        let before = buf.clone();
        self.last_chunk = n;
        self.relay.client_input(&mut buf);
        let consumed = before.len() - buf.len();
        self.client.sent.consumed(&before[..consumed]);
        // Unconsumed bytes go back to the front.
        let rest = std::mem::take(&mut self.client.pending);
        buf.extend_from_slice(&rest);
        self.client.pending = buf;
        self.after();
        consumed > 0
    }

    /// The client reads up to `n` bytes of what the relay wrote, and gives
    /// back the credit of the DATA it read (as a client does), sometimes.
    fn client_reads(&mut self, n: usize, credit: bool) -> bool {
        let n = n.min(self.relay.client_out.len());
        if n == 0 {
            return false;
        }
        // Whole frames only, for the credit accounting.
        let mut whole = 0;
        for (head, _) in frames(&self.relay.client_out) {
            if whole + head.frame_len() > n {
                break;
            }
            whole += head.frame_len();
        }
        let n = if whole == 0 { n } else { whole };
        let read = self.relay.client_out.split_to(n);
        self.client.checked -= n;
        for (head, _) in frames(&read) {
            if head.kind == kind::DATA && head.len > 0 {
                self.client.unreturned_conn += head.len as i64;
                if credit && !self.client.view.closed(head.stream) {
                    frame::put_window_update(
                        &mut self.client.pending,
                        head.stream,
                        head.len as u32,
                    );
                }
            }
        }
        if credit && self.client.unreturned_conn > 0 {
            frame::put_window_update(
                &mut self.client.pending,
                0,
                self.client.unreturned_conn as u32,
            );
            self.client.unreturned_conn = 0;
        }
        self.relay.pump();
        self.after();
        true
    }

    /// The runtime reads what the relay wrote, works, and writes back.
    fn runtime_turn(&mut self, input: &mut Input, everything: bool) -> bool {
        if self.relay_finished || !self.relay.runtime_live() {
            return false;
        }
        let Some(rt) = &mut self.runtime else {
            return false;
        };
        let mut moved = false;
        // Read everything the relay wrote (it has been checked).
        if !self.relay.runtime_out.is_empty() {
            let _ = self.relay.runtime_out.split_to(rt.checked);
            rt.checked = 0;
            moved = true;
            self.relay.pump();
        }
        let rt = self.runtime.as_mut().expect("there");
        rt.work(input, everything);
        if self.relay.wants_input() && !rt.pending.is_empty() {
            let n = if everything {
                rt.pending.len()
            } else {
                (usize::from(input.u16()) + 1).min(rt.pending.len())
            }
            .min(READ_CHUNK);
            let mut buf = rt.pending.split_to(n);
            let before = buf.clone();
            self.last_chunk = n;
            self.relay.runtime_input(&mut buf);
            let consumed = before.len() - buf.len();
            if let Some(rt) = &mut self.runtime {
                rt.consumed(&before[..consumed]);
                let rest = std::mem::take(&mut rt.pending);
                buf.extend_from_slice(&rest);
                rt.pending = buf;
            }
            moved |= consumed > 0;
        }
        self.after();
        if !self.relay.runtime_live() {
            self.runtime = None;
        }
        moved
    }

    fn runtime_closes(&mut self) {
        if !self.relay_finished && self.relay.runtime_live() {
            self.relay.runtime_lost("end of stream");
            self.runtime = None;
            self.after();
        }
    }

    fn answer_local(&mut self, input: &mut Input, everything: bool) -> bool {
        if self.relay_finished || self.calls.is_empty() {
            return false;
        }
        let i = usize::from(input.u8()) % self.calls.len();
        let id = self.calls.remove(i);
        let result = match if everything { 0 } else { input.u8() % 4 } {
            0 | 1 => {
                let size = usize::from(input.u16() % 4096);
                let msg = vec![0x33; size];
                self.local_answers.insert(id, msg.clone());
                Ok(Bytes::from(msg))
            }
            2 => Err(tonic::Status::failed_precondition(
                "sidecar not ready: proxy",
            )),
            _ => Err(tonic::Status::unavailable("runtime\nsays \u{1F600}%")),
        };
        self.relay.local_result(id, result);
        self.after();
        true
    }

    /// A result arrives for a call the relay cancelled (the task finished
    /// before its abort) or never started.
    fn late_result(&mut self, input: &mut Input) {
        if self.relay_finished {
            return;
        }
        let id = match self.cancelled.pop() {
            Some(id) => id,
            None => input.u32() & 0x7fff_ffff,
        };
        if self.calls.contains(&id) {
            return;
        }
        self.relay.local_result(id, Ok(Bytes::from_static(b"late")));
        self.after();
    }

    // -- What the client writes -------------------------------------------------

    fn client_writes(&mut self, input: &mut Input) {
        let c = &mut self.client;
        let op = input.u8();
        match op % 16 {
            0..=5 => {
                // A request on a new stream.
                let choice = input.u8();
                let id = match choice % 16 {
                    0 => input.u32() & 0x7fff_ffff,
                    1 => c.next_id.saturating_sub(2),
                    _ => c.next_id,
                };
                if id == c.next_id {
                    c.next_id += 2;
                }
                let path = PATHS[usize::from(input.u8()) % PATHS.len()];
                let mut list: HeaderList = vec![
                    (Bytes::from_static(b":method"), Bytes::from_static(b"POST")),
                    (Bytes::from_static(b":scheme"), Bytes::from_static(b"http")),
                    (
                        Bytes::from_static(b":path"),
                        Bytes::copy_from_slice(path.as_bytes()),
                    ),
                    (
                        Bytes::from_static(b":authority"),
                        Bytes::from_static(b"%2Frun%2Fsidecar-shim%2Fsidecar-shim.sock"),
                    ),
                    (
                        Bytes::from_static(b"content-type"),
                        Bytes::from_static(b"application/grpc"),
                    ),
                    (Bytes::from_static(b"te"), Bytes::from_static(b"trailers")),
                ];
                let extras = input.u8();
                if extras & 1 != 0 {
                    list.push((
                        Bytes::from_static(b"grpc-timeout"),
                        format!("{}m", input.u16()).into(),
                    ));
                }
                if extras & 2 != 0 {
                    list.push((
                        Bytes::from_static(b"x-trace-bin"),
                        Bytes::copy_from_slice(input.string(40)),
                    ));
                }
                if extras & 4 != 0 {
                    let big = usize::from(input.u8()) * 300;
                    list.push((Bytes::from_static(b"x-big"), Bytes::from(vec![b'b'; big])));
                }
                if extras & 8 != 0 {
                    // Something malformed.
                    match input.u8() % 5 {
                        0 => list.push((Bytes::from_static(b"Upper"), Bytes::from_static(b"x"))),
                        1 => list.push((
                            Bytes::from_static(b"connection"),
                            Bytes::from_static(b"close"),
                        )),
                        2 => {
                            list.remove(0);
                        }
                        3 => {
                            list.push((Bytes::from_static(b":method"), Bytes::from_static(b"GET")))
                        }
                        _ => list.push((Bytes::from_static(b"x-nl"), Bytes::from_static(b"a\nb"))),
                    };
                }
                if extras & 16 != 0 {
                    let last = list.len() - 1;
                    list.swap(0, last);
                }
                let body_style = input.u8();
                let end_on_headers = body_style % 8 == 0;
                let split = match input.u8() % 4 {
                    0 => usize::from(input.u8()) + 1,
                    _ => frame::DEFAULT_MAX_FRAME,
                };
                let pad = if extras & 32 != 0 { input.u8() } else { 0 };
                c.headers(id, &list, end_on_headers, split, pad);
                if !end_on_headers {
                    let size = match body_style % 8 {
                        1 => usize::from(input.u16()),
                        _ => usize::from(input.u8()),
                    };
                    let msg = grpc::frame_message(&vec![0x11; size]);
                    let pieces = usize::from(input.u8() % 3) + 1;
                    let step = msg.len().div_ceil(pieces).max(1);
                    let chunks: Vec<&[u8]> = msg.chunks(step).collect();
                    let last_end = body_style % 8 != 7;
                    for (i, chunk) in chunks.iter().enumerate() {
                        let end = last_end && i + 1 == chunks.len();
                        c.data(id, chunk, end, None);
                    }
                    if body_style % 8 == 6 {
                        // Trailers end the request.
                        let tl: HeaderList =
                            vec![(Bytes::from_static(b"x-trailer"), Bytes::from_static(b"t"))];
                        c.headers(id, &tl, true, frame::DEFAULT_MAX_FRAME, 0);
                    }
                }
            }
            6 => {
                // DATA on some stream.
                let id = pick_stream(c, input);
                let size = usize::from(input.u16()) % 20_000;
                let pad = if input.bool() { Some(input.u8()) } else { None };
                let end = input.bool();
                let data = vec![0x22; size.min(frame::DEFAULT_MAX_FRAME)];
                c.data(id, &data, end, pad);
            }
            7 => {
                let id = pick_stream(c, input);
                frame::put_rst_stream(&mut c.pending, id, u32::from(input.u8() % 14));
            }
            8 => {
                let id = if input.bool() {
                    0
                } else {
                    pick_stream(c, input)
                };
                let inc = match input.u8() % 4 {
                    0 => 0,
                    1 => input.u32(),
                    _ => u32::from(input.u16()),
                };
                frame::put_window_update(&mut c.pending, id, inc);
            }
            9 => {
                let n = input.u8() % 4;
                let mut s = Vec::new();
                for _ in 0..n {
                    let id = match input.u8() % 6 {
                        0 => setting::HEADER_TABLE_SIZE,
                        1 => setting::INITIAL_WINDOW_SIZE,
                        2 => setting::MAX_FRAME_SIZE,
                        3 => setting::ENABLE_PUSH,
                        4 => setting::MAX_HEADER_LIST_SIZE,
                        _ => setting::MAX_CONCURRENT_STREAMS,
                    };
                    let v = match input.u8() % 3 {
                        0 => input.u32(),
                        _ => u32::from(input.u16()),
                    };
                    s.push((id, v));
                }
                if s.iter()
                    .any(|(k, v)| *k == setting::HEADER_TABLE_SIZE && *v < 4096)
                    && input.bool()
                {
                    s.retain(|(k, _)| *k != setting::HEADER_TABLE_SIZE);
                }
                frame::put_settings(&mut c.pending, &s);
            }
            10 => {
                let p = input.bytes(8);
                let mut payload = [0u8; 8];
                payload[..p.len()].copy_from_slice(p);
                frame::put_head(&mut c.pending, 8, kind::PING, 0, 0);
                c.pending.extend_from_slice(&payload);
            }
            11 => {
                let id = pick_stream(c, input);
                let len = if input.u8() % 4 == 0 { 4 } else { 5 };
                frame::put_head(&mut c.pending, len, kind::PRIORITY, 0, id);
                let dep = if input.bool() { id } else { 0 };
                c.pending.extend_from_slice(&dep.to_be_bytes());
                c.pending.extend_from_slice(&[16][..len - 4]);
            }
            12 => {
                // An unknown frame type, or a GOAWAY from the client.
                if input.bool() {
                    frame::put_head(&mut c.pending, 3, 0x20 + input.u8() % 8, 0, input.u32());
                    c.pending.extend_from_slice(b"xyz");
                } else {
                    frame::put_goaway(&mut c.pending, 0, 0, b"client bye");
                }
            }
            13 => {
                // Raw bytes, rarely.
                if input.u8() == 0x5a {
                    let raw = input.string(64);
                    c.pending.extend_from_slice(raw);
                    c.raw = true;
                }
            }
            14 => {
                // Trailers (or a second HEADERS) on some stream.
                let id = pick_stream(c, input);
                let tl: HeaderList = vec![(
                    Bytes::from_static(b"x-trailer"),
                    Bytes::copy_from_slice(input.string(8)),
                )];
                c.headers(id, &tl, input.u8() % 4 != 0, frame::DEFAULT_MAX_FRAME, 0);
            }
            _ => {
                // End a stream with an empty DATA frame.
                let id = pick_stream(c, input);
                c.data(id, &[], true, None);
            }
        }
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % 16 {
            0..=4 => self.client_writes(input),
            5..=7 => {
                let n = usize::from(input.u16()) + 1;
                self.client_feeds(n);
            }
            8 => {
                let n = usize::from(input.u16()) * 8;
                let credit = input.u8() % 4 != 0;
                self.client_reads(n, credit);
            }
            9 | 10 => {
                self.runtime_turn(input, false);
            }
            11 => {
                self.answer_local(input, false);
            }
            12 => match input.u8() % 8 {
                0 => self.runtime_closes(),
                1 | 2 => {
                    if let Some(rt) = &mut self.runtime {
                        rt.goaway(input);
                    }
                }
                3 => {
                    if let Some(rt) = &mut self.runtime {
                        rt.ping(input);
                    }
                }
                4 => self.late_result(input),
                5 if !self.relay_finished => {
                    self.relay.drain();
                    self.after();
                }
                6 => self.reachable = !self.reachable,
                _ => {
                    self.relay.pump();
                    self.after();
                }
            },
            _ => {
                // Feed everything that is pending, as one read each.
                let n = self.client.pending.len();
                self.client_feeds(n);
            }
        }
    }

    /// Every peer finishes what it started; then every stream the client
    /// opened must have been answered, reset, or left out by a GOAWAY.
    fn settle(&mut self) {
        let mut none = Input::new(&[]);
        // The client ends the requests it left open (unless it is in the
        // middle of a header block or a frame: then it cannot).
        for round in 0..64 {
            let mut moved = false;
            if !self.client.view.failed && self.client.sent.block.is_none() {
                for id in self.client.open_streams() {
                    if round > 0 && self.client.pending.is_empty() {
                        self.client.data(id, &[], true, None);
                        self.client.sent.ended.insert(id);
                    }
                }
            }
            while self.client_feeds(READ_CHUNK) {
                moved = true;
            }
            while self.client_reads(usize::MAX, true) {
                moved = true;
            }
            // Windows the client shrank with SETTINGS: open them again.
            if round > 2 && !self.client.view.failed {
                let mut need = Vec::new();
                for id in self.client.open_streams_unanswered() {
                    let s = self.client.view.streams.get(&id);
                    let data = s.map_or(0, |s| s.data_len);
                    let window = self.client.sent.initial_window
                        + self
                            .client
                            .sent
                            .stream_update
                            .get(&id)
                            .copied()
                            .unwrap_or(0)
                        - data;
                    if window < 16_384 && window + 65_536 < frame::MAX_WINDOW {
                        need.push(id);
                    }
                }
                for id in need {
                    frame::put_window_update(&mut self.client.pending, id, 65_536);
                }
                let conn = frame::DEFAULT_WINDOW + self.client.sent.conn_update
                    - self.client.view.data_conn;
                if conn < 16_384 {
                    frame::put_window_update(&mut self.client.pending, 0, 65_536);
                }
            }
            while self.runtime_turn(&mut none, true) {
                moved = true;
            }
            while self.answer_local(&mut none, true) {
                moved = true;
            }
            if !moved && round > 4 && self.client.pending.is_empty() {
                break;
            }
        }
        let stuck = self.client.sent.block.is_some()
            || !self.client.pending.is_empty()
            || self.client.raw
            || self.client.sent.hpack_broken;
        if self.client.view.failed || stuck {
            return;
        }
        for &id in &self.client.sent.opened {
            if self.client.sent.reset.contains(&id) {
                continue;
            }
            assert!(
                self.client.view.closed(id),
                "stream {id} was never answered, reset or refused (runtime {:?})",
                self.runtime.as_ref().map(|r| (r.goaway, r.max_id))
            );
        }
        // What the client read of relayed answers is what the runtime sent,
        // and local answers are the harness's.
        for (id, resp) in &self.client.view.streams {
            if let Some(msg) = self.local_answers.get(id) {
                if resp.ended && !resp.data.is_empty() {
                    assert_eq!(resp.data, grpc::frame_message(msg), "stream {id}");
                }
            }
        }
    }
}

impl Client {
    /// Streams opened, not reset by the client, not yet answered.
    fn open_streams_unanswered(&self) -> Vec<u32> {
        self.sent
            .opened
            .iter()
            .copied()
            .filter(|id| !self.sent.reset.contains(id) && !self.view.closed(*id))
            .collect()
    }
}

fn pick_stream(c: &Client, input: &mut Input) -> u32 {
    let choice = input.u8();
    match (choice % 8, c.sent.opened.len()) {
        (0, _) => input.u32() & 0x7fff_ffff,
        (1, _) | (_, 0) => c.next_id.saturating_sub(2).max(1),
        (_, n) => c.sent.opened[usize::from(choice) % n],
    }
}

/// A client connection through the relay; see the module's doc.
pub fn relay(data: &[u8]) {
    let mut input = Input::new(data);
    let mut w = World::new(&mut input);
    // The client's preface SETTINGS (its connection preface was read by the
    // I/O loop), unless the input says otherwise.
    if input.u8() != 0xff {
        frame::put_settings(&mut w.client.pending, &[]);
    }
    let mut steps = 0;
    while !input.is_empty() && steps < 2_000 && !w.relay_finished {
        w.step(&mut input);
        steps += 1;
    }
    w.settle();
}
