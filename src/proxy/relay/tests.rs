//! The relay on its own: frames in from a scripted client and runtime,
//! frames out checked per hop. The integration tests (tests/proxy.rs,
//! tests/intercept.rs, tests/bad_input.rs, tests/grpc_go_client.rs) run the
//! same code against a real containerd.

use super::*;
use crate::proxy::CallFuture;

const LOCAL: &str = "/test.Svc/Local";
const WATCH: &str = "/test.Svc/Watch";
const RELAYED: &str = "/runtime.v1.RuntimeService/Version";

struct LocalOnly;

impl Interceptor for LocalOnly {
    fn intercepts(&self, method: &str) -> bool {
        method == LOCAL || method == WATCH
    }
    fn streams(&self, method: &str) -> bool {
        method == WATCH
    }
    fn call(&self, _: LocalCall) -> CallFuture {
        unreachable!("the tests answer local calls themselves")
    }
}

/// A frame as a peer reads it, header blocks decoded.
#[derive(Debug, Clone, PartialEq)]
enum F {
    Settings(Vec<(u16, u32)>),
    SettingsAck,
    Ping(Vec<u8>),
    PingAck(Vec<u8>),
    Headers(u32, HeaderList, bool),
    Data(u32, Vec<u8>, bool),
    Rst(u32, u32),
    GoAway(u32, u32),
    Window(u32, u32),
    Preface,
}

/// One side of the relay as a peer sees it: an encoder for what it sends, a
/// decoder for what it receives.
#[derive(Default)]
struct Peer {
    enc: hpack::Encoder,
    dec: hpack::Decoder,
    block: Option<(u32, bool, Vec<u8>)>,
}

impl Peer {
    fn headers(&mut self, stream: u32, headers: &[(&str, &str)], end: bool) -> BytesMut {
        let list: HeaderList = headers
            .iter()
            .map(|(n, v)| {
                (
                    Bytes::copy_from_slice(n.as_bytes()),
                    Bytes::copy_from_slice(v.as_bytes()),
                )
            })
            .collect();
        let mut block = BytesMut::new();
        self.enc.encode(&mut block, &list);
        let mut out = BytesMut::new();
        frame::put_headers(&mut out, stream, &block, end, frame::DEFAULT_MAX_FRAME);
        out
    }

    fn request(&mut self, stream: u32, path: &str) -> BytesMut {
        let mut out = self.headers(
            stream,
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "%2Frun%2Fsidecar-shim.sock"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
            false,
        );
        frame::put_data(&mut out, stream, &grpc::frame_message(b"req"), true, 16384);
        out
    }

    /// Parse (and consume) every complete frame in `buf`.
    fn read(&mut self, buf: &mut BytesMut) -> Vec<F> {
        let mut frames = Vec::new();
        if buf.starts_with(frame::PREFACE) {
            let _ = buf.split_to(frame::PREFACE.len());
            frames.push(F::Preface);
        }
        while let Some(head) = Head::parse(buf) {
            if buf.len() < head.frame_len() {
                break;
            }
            let raw = buf.split_to(head.frame_len());
            let p = &raw[frame::HEADER_LEN..];
            let f = match head.kind {
                kind::SETTINGS if head.has(flag::ACK) => F::SettingsAck,
                kind::SETTINGS => F::Settings(frame::settings(p).collect()),
                kind::PING if head.has(flag::ACK) => F::PingAck(p.to_vec()),
                kind::PING => F::Ping(p.to_vec()),
                kind::DATA => F::Data(head.stream, p.to_vec(), head.has(flag::END_STREAM)),
                kind::RST_STREAM => F::Rst(head.stream, frame::payload_u32(p).unwrap()),
                kind::WINDOW_UPDATE => F::Window(head.stream, frame::payload_u32(p).unwrap()),
                kind::GOAWAY => F::GoAway(
                    frame::payload_u32(p).unwrap(),
                    frame::payload_u32(&p[4..]).unwrap(),
                ),
                kind::HEADERS | kind::CONTINUATION => {
                    let (stream, end, mut block) = match self.block.take() {
                        Some(b) => b,
                        None => (head.stream, head.has(flag::END_STREAM), Vec::new()),
                    };
                    block.extend_from_slice(p);
                    if !head.has(flag::END_HEADERS) {
                        self.block = Some((stream, end, block));
                        continue;
                    }
                    F::Headers(stream, self.dec.decode(&block).unwrap(), end)
                }
                k => panic!("unexpected frame type {k}"),
            };
            frames.push(f);
        }
        frames
    }
}

fn settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    frame::put_settings(out, values);
}

fn ping(out: &mut BytesMut, payload: &[u8; 8]) {
    frame::put_head(out, 8, kind::PING, 0, 0);
    out.extend_from_slice(payload);
}

fn window_update(out: &mut BytesMut, stream: u32, inc: u32) {
    frame::put_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&inc.to_be_bytes());
}

fn goaway(out: &mut BytesMut, last: u32, code: u32) {
    frame::put_goaway(out, last, code, b"test");
}

fn status(headers: &HeaderList) -> Option<&str> {
    hpack::get(headers, b"grpc-status").map(|v| std::str::from_utf8(v).unwrap())
}

/// A relay whose runtime is connected, with both prefaces exchanged.
struct Setup {
    relay: Relay,
    client: Peer,
    runtime: Peer,
}

impl Setup {
    fn new() -> Setup {
        let mut relay = Relay::new(
            Arc::new(LocalOnly),
            Arc::new(Metrics::disabled()),
            Arc::new(PathBuf::from("/run/containerd/containerd.sock")),
        );
        relay.runtime_attached();
        let mut s = Setup {
            relay,
            client: Peer::default(),
            runtime: Peer::default(),
        };
        let mut c = BytesMut::new();
        settings(&mut c, &[]);
        s.client_sends(c);
        let mut r = BytesMut::new();
        settings(&mut r, &[]);
        s.runtime_sends(r);
        let to_client = s.client_reads();
        assert!(matches!(to_client[0], F::Settings(_)), "{to_client:?}");
        assert!(to_client.contains(&F::SettingsAck), "{to_client:?}");
        let to_runtime = s.runtime_reads();
        assert_eq!(to_runtime[0], F::Preface);
        assert!(
            to_runtime.contains(&F::Settings(vec![
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, RUNTIME_WINDOW as u32),
                (
                    setting::MAX_HEADER_LIST_SIZE,
                    RUNTIME_MAX_HEADER_LIST_SIZE as u32
                ),
            ])),
            "{to_runtime:?}"
        );
        assert!(to_runtime.contains(&F::SettingsAck), "{to_runtime:?}");
        s
    }

    fn client_sends(&mut self, mut bytes: BytesMut) {
        self.relay.client_input(&mut bytes);
        assert!(bytes.is_empty(), "the relay left bytes: {bytes:?}");
    }

    fn runtime_sends(&mut self, mut bytes: BytesMut) {
        self.relay.runtime_input(&mut bytes);
        assert!(bytes.is_empty(), "the relay left bytes: {bytes:?}");
    }

    fn client_reads(&mut self) -> Vec<F> {
        self.relay.pump();
        self.client.read(&mut self.relay.client_out)
    }

    fn runtime_reads(&mut self) -> Vec<F> {
        self.relay.pump();
        self.runtime.read(&mut self.relay.runtime_out)
    }

    /// A local call's request: returns its stream after checking that the
    /// relay asked for it to run.
    fn local_call(&mut self, stream: u32) {
        let req = self.client.request(stream, LOCAL);
        self.client_sends(req);
        let actions = self.relay.actions();
        assert!(
            matches!(actions.as_slice(), [Action::Call(s, c)] if *s == stream && c.method == LOCAL),
            "expected the local call of stream {stream}"
        );
    }

    fn relayed_call(&mut self, stream: u32) {
        let req = self.client.request(stream, RELAYED);
        self.client_sends(req);
        let up = self.runtime_reads();
        assert!(
            matches!(&up[..], [F::Headers(s, h, false), F::Data(s2, _, true)]
                if *s == stream && *s2 == stream && hpack::get(h, b":path") == Some(RELAYED.as_bytes())),
            "{up:?}"
        );
    }

    fn runtime_answer(&mut self, stream: u32, body: &[u8]) {
        let mut r = self.runtime.headers(
            stream,
            &[(":status", "200"), ("content-type", "application/grpc")],
            false,
        );
        frame::put_data(&mut r, stream, &grpc::frame_message(body), false, 16384);
        r.extend_from_slice(&self.runtime.headers(stream, &[("grpc-status", "0")], true));
        self.runtime_sends(r);
    }
}

#[test]
fn pings_are_answered_on_their_own_hop() {
    let mut s = Setup::new();
    s.local_call(1);
    s.relay.local_result(1, Ok(Bytes::from_static(b"answer")));
    let down = s.client_reads();
    assert!(
        matches!(&down[..], [F::Headers(1, _, false), F::Data(1, _, false), F::Headers(1, t, true)] if status(t) == Some("0")),
        "{down:?}"
    );
    // The client pings after the DATA it received, as grpc-go does: the
    // proxy answers, and the runtime hears nothing of it.
    for i in 0..10u8 {
        let mut p = BytesMut::new();
        ping(&mut p, &[i; 8]);
        s.client_sends(p);
        assert_eq!(s.client_reads(), vec![F::PingAck(vec![i; 8])]);
        assert_eq!(s.runtime_reads(), vec![]);
    }
    // And the runtime's pings are the proxy's to answer.
    let mut p = BytesMut::new();
    ping(&mut p, b"runtime!");
    s.runtime_sends(p);
    assert_eq!(s.runtime_reads(), vec![F::PingAck(b"runtime!".to_vec())]);
    assert_eq!(s.client_reads(), vec![]);
}

#[test]
fn settings_stay_on_their_hop() {
    let mut s = Setup::new();
    let mut c = BytesMut::new();
    settings(
        &mut c,
        &[
            (setting::INITIAL_WINDOW_SIZE, 1 << 20),
            (setting::MAX_FRAME_SIZE, 1 << 20),
        ],
    );
    s.client_sends(c);
    assert_eq!(s.client_reads(), vec![F::SettingsAck]);
    assert_eq!(s.runtime_reads(), vec![]);
    let mut r = BytesMut::new();
    settings(&mut r, &[(setting::MAX_CONCURRENT_STREAMS, 100)]);
    s.runtime_sends(r);
    assert_eq!(s.runtime_reads(), vec![F::SettingsAck]);
    assert_eq!(s.client_reads(), vec![]);
}

#[test]
fn request_and_answer_are_relayed_with_their_headers() {
    let mut s = Setup::new();
    s.relayed_call(1);
    s.runtime_answer(1, b"version");
    let down = s.client_reads();
    match &down[..] {
        [F::Headers(1, h, false), F::Data(1, d, false), F::Headers(1, t, true)] => {
            assert_eq!(hpack::get(h, b":status"), Some(&b"200"[..]));
            assert_eq!(&d[5..], b"version");
            assert_eq!(status(t), Some("0"));
        }
        other => panic!("{other:?}"),
    }
    assert!(s.relay.streams.is_empty());
}

/// The bug of the HTTP/2 per-hop issue: the runtime's GOAWAY named only the
/// streams it saw. Now the client's GOAWAY covers every stream the proxy
/// accepted, and only the relayed streams the runtime did not take are
/// refused (and may be sent again).
#[test]
fn runtime_goaway_refuses_only_what_the_runtime_did_not_take() {
    let mut s = Setup::new();
    s.relayed_call(1);
    s.local_call(3);
    s.relayed_call(5);
    let mut g = BytesMut::new();
    goaway(&mut g, 1, reason::NO_ERROR);
    s.runtime_sends(g);
    let down = s.client_reads();
    assert_eq!(
        down,
        vec![
            F::Rst(5, reason::REFUSED_STREAM),
            F::GoAway(5, reason::NO_ERROR)
        ]
    );
    // Stream 1 is answered by the runtime, stream 3 by the proxy.
    s.runtime_answer(1, b"one");
    let down = s.client_reads();
    assert!(
        matches!(&down[..], [F::Headers(1, ..), F::Data(1, ..), F::Headers(1, t, true)] if status(t) == Some("0")),
        "{down:?}"
    );
    assert!(!s.relay.finished());
    s.relay.local_result(3, Ok(Bytes::from_static(b"three")));
    let down = s.client_reads();
    assert!(
        matches!(&down[..], [F::Headers(3, ..), F::Data(3, ..), F::Headers(3, t, true)] if status(t) == Some("0")),
        "{down:?}"
    );
    assert!(s.relay.finished());
    // A stream the client opened before it saw the GOAWAY is refused.
    let late = s.client.request(7, RELAYED);
    s.client_sends(late);
    assert_eq!(s.client_reads(), vec![F::Rst(7, reason::REFUSED_STREAM)]);
}

#[test]
fn a_runtime_that_closes_ends_relayed_calls_and_local_ones_go_on() {
    let mut s = Setup::new();
    s.relayed_call(1);
    s.local_call(3);
    s.relayed_call(5);
    // Stream 5 has its response headers already.
    let h = s.runtime.headers(
        5,
        &[(":status", "200"), ("content-type", "application/grpc")],
        false,
    );
    s.runtime_sends(h);
    s.relay.runtime_lost("end of stream");
    assert!(!s.relay.runtime_live());
    let down = s.client_reads();
    let mut saw = (false, false, false);
    for f in &down {
        match f {
            F::Headers(1, h, true) => {
                assert_eq!(status(h), Some("14"), "{h:?}");
                assert_eq!(hpack::get(h, b":status"), Some(&b"200"[..]));
                saw.0 = true;
            }
            F::Headers(5, h, false) => assert_eq!(hpack::get(h, b":status"), Some(&b"200"[..])),
            F::Headers(5, h, true) => {
                assert_eq!(status(h), Some("14"), "{h:?}");
                assert_eq!(
                    hpack::get(h, b":status"),
                    None,
                    "trailers, not Trailers-Only"
                );
                saw.1 = true;
            }
            F::GoAway(5, reason::NO_ERROR) => saw.2 = true,
            other => panic!("unexpected {other:?} in {down:?}"),
        }
    }
    assert_eq!(saw, (true, true, true), "{down:?}");
    s.relay
        .local_result(3, Err(tonic::Status::not_found("nope")));
    let down = s.client_reads();
    assert!(
        matches!(&down[..], [F::Headers(3, t, true)] if status(t) == Some("5")),
        "{down:?}"
    );
    assert!(s.relay.finished());
}

#[test]
fn unreachable_runtime_answers_unavailable_then_relays_once_it_is_back() {
    let mut relay = Relay::new(
        Arc::new(LocalOnly),
        Arc::new(Metrics::disabled()),
        Arc::new(PathBuf::from("/run/containerd/containerd.sock")),
    );
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    relay.runtime_unreachable(&refused);
    let mut client = Peer::default();
    let mut runtime = Peer::default();
    let mut c = BytesMut::new();
    settings(&mut c, &[]);
    c.extend_from_slice(&client.request(1, RELAYED));
    relay.client_input(&mut c);
    assert!(matches!(relay.actions().as_slice(), [Action::Connect]));
    relay.runtime_unreachable(&refused);
    let down = client.read(&mut relay.client_out);
    let answer = down.iter().find_map(|f| match f {
        F::Headers(1, h, true) => Some(h.clone()),
        _ => None,
    });
    let answer = answer.unwrap_or_else(|| panic!("{down:?}"));
    assert_eq!(status(&answer), Some("14"));
    let message = String::from_utf8_lossy(hpack::get(&answer, b"grpc-message").unwrap());
    assert!(
        message.contains("cannot reach the container runtime"),
        "{message}"
    );
    // The next call tries again, and is relayed once the runtime answers.
    let mut c = client.request(3, RELAYED);
    relay.client_input(&mut c);
    assert!(matches!(relay.actions().as_slice(), [Action::Connect]));
    relay.runtime_attached();
    let up = runtime.read(&mut relay.runtime_out);
    assert_eq!(up[0], F::Preface);
    assert!(
        up.iter().any(|f| matches!(f, F::Headers(3, h, false) if hpack::get(h, b":path") == Some(RELAYED.as_bytes()))),
        "{up:?}"
    );
    assert!(
        up.iter().any(|f| matches!(f, F::Data(3, _, true))),
        "{up:?}"
    );
}

#[test]
fn answers_wait_for_the_clients_window_and_the_runtime_gets_its_credit_back() {
    let mut s = Setup::new();
    s.relayed_call(1);
    // 600 KiB from the runtime: many times the client's 64 KiB windows,
    // and more than the quarter of the runtime's 1 MiB windows after which
    // the proxy gives credit back.
    let body = vec![7u8; 600 * 1024];
    let mut r = s.runtime.headers(
        1,
        &[(":status", "200"), ("content-type", "application/grpc")],
        false,
    );
    frame::put_data(&mut r, 1, &grpc::frame_message(&body), false, 16384);
    r.extend_from_slice(&s.runtime.headers(1, &[("grpc-status", "0")], true));
    s.runtime_sends(r);
    let mut received = 0;
    let mut trailers = false;
    let mut credit = 0u64;
    for round in 0..40 {
        let down = s.client_reads();
        let mut got = 0;
        for f in &down {
            match f {
                F::Data(1, d, _) => {
                    assert!(d.len() <= frame::DEFAULT_MAX_FRAME);
                    got += d.len();
                }
                F::Headers(1, t, true) => {
                    assert_eq!(status(t), Some("0"));
                    trailers = true;
                }
                F::Headers(1, _, false) => {}
                other => panic!("{other:?}"),
            }
        }
        received += got;
        assert!(
            received as i64 <= frame::DEFAULT_WINDOW * (round + 1),
            "more than the client's window"
        );
        for f in s.runtime_reads() {
            match f {
                F::Window(_, inc) => credit += u64::from(inc),
                other => panic!("{other:?}"),
            }
        }
        if trailers {
            break;
        }
        // The client reads and gives the window back.
        let mut w = BytesMut::new();
        window_update(&mut w, 0, got as u32);
        window_update(&mut w, 1, got as u32);
        s.client_sends(w);
    }
    assert!(trailers);
    assert_eq!(received, body.len() + 5);
    assert!(
        credit >= (RUNTIME_WINDOW / 4) as u64,
        "the runtime got {credit} bytes of credit back"
    );
    assert!(s.relay.streams.is_empty());
}

#[test]
fn protocol_errors_close_the_connection_with_their_code() {
    type Input = Box<dyn Fn(&mut Peer) -> BytesMut>;
    let cases: Vec<(&str, Input, u32)> = vec![
        (
            "connection WINDOW_UPDATE of 0",
            Box::new(|_| {
                let mut b = BytesMut::new();
                window_update(&mut b, 0, 0);
                b
            }),
            reason::PROTOCOL_ERROR,
        ),
        (
            "WINDOW_UPDATE of 3 bytes",
            Box::new(|_| {
                let mut b = BytesMut::new();
                frame::put_head(&mut b, 3, kind::WINDOW_UPDATE, 0, 0);
                b.extend_from_slice(&[0, 0, 1]);
                b
            }),
            reason::FRAME_SIZE_ERROR,
        ),
        (
            "HEADERS larger than SETTINGS_MAX_FRAME_SIZE",
            Box::new(|_| {
                let mut b = BytesMut::new();
                frame::put_head(&mut b, 20_000, kind::HEADERS, flag::END_HEADERS, 1);
                b.extend_from_slice(&vec![0; 20_000]);
                b
            }),
            reason::FRAME_SIZE_ERROR,
        ),
        (
            "a header block that never ends",
            Box::new(|_| {
                let mut b = BytesMut::new();
                frame::put_head(&mut b, 16_000, kind::HEADERS, 0, 1);
                b.extend_from_slice(&vec![0x40; 16_000]);
                for _ in 0..10 {
                    frame::put_head(&mut b, 16_000, kind::CONTINUATION, 0, 1);
                    b.extend_from_slice(&vec![0x40; 16_000]);
                }
                b
            }),
            reason::ENHANCE_YOUR_CALM,
        ),
        (
            "PING of 7 bytes",
            Box::new(|_| {
                let mut b = BytesMut::new();
                frame::put_head(&mut b, 7, kind::PING, 0, 0);
                b.extend_from_slice(&[0; 7]);
                b
            }),
            reason::FRAME_SIZE_ERROR,
        ),
        (
            "an even stream id",
            Box::new(|c: &mut Peer| c.request(2, RELAYED)),
            reason::PROTOCOL_ERROR,
        ),
        (
            "a table size update above SETTINGS_HEADER_TABLE_SIZE",
            Box::new(|_| {
                let mut block = BytesMut::new();
                // Size update to 8192 (RFC 7541 §6.3), then :method POST.
                block.extend_from_slice(&[0x3f, 0xe1, 0x3f, 0x83]);
                let mut b = BytesMut::new();
                frame::put_headers(&mut b, 1, &block, true, 16384);
                b
            }),
            reason::COMPRESSION_ERROR,
        ),
    ];
    for (what, input, code) in cases {
        let mut s = Setup::new();
        let bytes = input(&mut s.client);
        let mut bytes = bytes;
        s.relay.client_input(&mut bytes);
        let down = s.client_reads();
        assert_eq!(down.last(), Some(&F::GoAway(0, code)), "{what}: {down:?}");
        assert!(s.relay.finished(), "{what}");
    }
}

/// Send `n` bytes of DATA on a stream in 16 KiB frames (the relay gives the
/// credit back as it goes). `prefix`: the bytes start with a gRPC message
/// prefix announcing a message of `prefix` bytes.
fn send_body(s: &mut Setup, stream: u32, n: usize, end: bool, prefix: Option<usize>) {
    let mut body = vec![1; n];
    if let Some(len) = prefix {
        body[0] = 0;
        body[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    }
    for (i, chunk) in body.chunks(frame::DEFAULT_MAX_FRAME).enumerate() {
        let last = (i + 1) * frame::DEFAULT_MAX_FRAME >= n;
        let mut d = BytesMut::new();
        frame::put_data(&mut d, stream, chunk, end && last, 16384);
        s.client_sends(d);
    }
}

fn open_local(s: &mut Setup, stream: u32) {
    let h = s.client.headers(
        stream,
        &[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", LOCAL),
            ("content-type", "application/grpc"),
        ],
        false,
    );
    s.client_sends(h);
}

fn refusal(frames: &[F], stream: u32) -> Option<String> {
    frames.iter().find_map(|f| match f {
        F::Headers(s, h, true) if *s == stream && status(h) == Some("8") => Some(
            String::from_utf8_lossy(hpack::get(h, b"grpc-message").unwrap_or_default())
                .into_owned(),
        ),
        _ => None,
    })
}

#[test]
fn local_request_bytes_are_bounded_per_call_and_per_connection() {
    let mut s = Setup::new();
    // One call larger than MAX_LOCAL_REQUEST.
    open_local(&mut s, 1);
    send_body(&mut s, 1, MAX_LOCAL_REQUEST + 1, false, None);
    let down = s.client_reads();
    let why = refusal(&down, 1).unwrap_or_else(|| panic!("{:?}", &down[..4]));
    assert!(why.contains("request too large"), "{why}");
    assert!(down.contains(&F::Rst(1, reason::NO_ERROR)));
    assert!(s.relay.actions().is_empty());
    // Calls that together pass MAX_LOCAL_BUFFERED: the one that passes it
    // is refused, the others go on.
    let each = MAX_LOCAL_BUFFERED / 2 - 1024;
    for id in [3, 5, 7] {
        open_local(&mut s, id);
        send_body(&mut s, id, each, false, Some(each + 1 - 5));
    }
    let down = s.client_reads();
    assert_eq!(refusal(&down, 3), None);
    assert_eq!(refusal(&down, 5), None);
    let why = refusal(&down, 7).expect("stream 7 refused");
    assert!(why.contains("in flight"), "{why}");
    // Once one is answered its bytes are free again.
    send_body(&mut s, 3, 1, true, None);
    assert!(matches!(s.relay.actions().as_slice(), [Action::Call(3, _)]));
    s.relay.local_result(3, Ok(Bytes::new()));
    open_local(&mut s, 9);
    send_body(&mut s, 9, each, true, Some(each - 5));
    assert!(matches!(s.relay.actions().as_slice(), [Action::Call(9, _)]));
    assert_eq!(refusal(&s.client_reads(), 9), None);
}

// The fuzzer's findings (issue 12), each as the smallest exchange.

/// A call reset in the read that opened it never reached the runtime: the
/// runtime gets no RST_STREAM for a stream it never saw (an idle stream for
/// it, which would be a connection error).
#[test]
fn a_call_reset_before_it_reached_the_runtime_is_not_reset_there() {
    let mut s = Setup::new();
    let mut c = s.client.request(1, RELAYED);
    frame::put_rst_stream(&mut c, 1, reason::CANCEL);
    s.client_sends(c);
    assert_eq!(s.runtime_reads(), vec![]);
    assert!(s.relay.streams.is_empty());
    // A call reset after its HEADERS went out is reset there: the runtime
    // owes the answer, and gets told it is no longer wanted.
    s.relayed_call(3);
    let mut c = BytesMut::new();
    frame::put_rst_stream(&mut c, 3, reason::CANCEL);
    s.client_sends(c);
    assert_eq!(s.runtime_reads(), vec![F::Rst(3, reason::CANCEL)]);
}

/// A malformed PRIORITY for a stream the client has not opened: RST_STREAM
/// may not name an idle stream, so it is a connection error.
#[test]
fn a_malformed_priority_for_an_idle_stream_is_a_connection_error() {
    let mut s = Setup::new();
    let mut c = BytesMut::new();
    frame::put_head(&mut c, 4, kind::PRIORITY, 0, 3);
    c.extend_from_slice(&0u32.to_be_bytes());
    s.relay.client_input(&mut c);
    let down = s.client_reads();
    assert!(!down.iter().any(|f| matches!(f, F::Rst(..))), "{down:?}");
    assert_eq!(down.last(), Some(&F::GoAway(0, reason::FRAME_SIZE_ERROR)));
}

/// A connection error after a graceful GOAWAY names no higher stream than
/// the first (RFC 9113 §6.8).
#[test]
fn a_second_goaway_never_names_a_higher_stream() {
    let mut s = Setup::new();
    s.relayed_call(1);
    s.relay.drain();
    let mut c = s.client.request(3, RELAYED);
    frame::put_head(&mut c, 8, kind::PING, 0, 1);
    c.extend_from_slice(&[0; 8]);
    s.relay.client_input(&mut c);
    let lasts: Vec<u32> = s
        .client_reads()
        .iter()
        .filter_map(|f| match f {
            F::GoAway(last, _) => Some(*last),
            _ => None,
        })
        .collect();
    assert_eq!(lasts, vec![1, 1]);
}

/// A server-streaming local call: headers once it answers, a DATA frame a
/// message, trailers with its final status; a client that stops reading
/// ends it instead of filling the proxy's memory.
#[test]
fn streaming_local_calls_send_their_messages_as_they_come() {
    let mut s = Setup::new();
    let req = s.client.request(1, WATCH);
    s.client_sends(req);
    assert!(
        matches!(s.relay.actions().as_slice(), [Action::CallStream(1, c)] if c.method == WATCH)
    );
    s.relay.local_stream_started(1);
    for i in 0..3u8 {
        s.relay.local_stream_message(1, &[i; 10]);
    }
    let down = s.client_reads();
    assert!(
        matches!(&down[0], F::Headers(1, h, false) if hpack::get(h, b":status") == Some(&b"200"[..])),
        "{down:?}"
    );
    let messages: Vec<&F> = down[1..].iter().collect();
    assert_eq!(messages.len(), 3, "{down:?}");
    for (i, f) in messages.iter().enumerate() {
        assert!(
            matches!(f, F::Data(1, d, false) if d[5..] == [i as u8; 10]),
            "{f:?}"
        );
    }
    s.relay
        .local_stream_end(1, tonic::Status::unavailable("runtime restarted"));
    let down = s.client_reads();
    assert!(
        matches!(&down[..], [F::Headers(1, t, true)] if status(t) == Some("14") && hpack::get(t, b":status").is_none()),
        "{down:?}"
    );
    assert!(s.relay.streams.is_empty());

    // A client that never gives its window back: the stream ends, the
    // call is cancelled.
    let req = s.client.request(3, WATCH);
    s.client_sends(req);
    let _ = s.relay.actions();
    s.relay.local_stream_started(3);
    let big = vec![0u8; 16 * 1024];
    for _ in 0..((MAX_LOCAL_STREAM_QUEUE as usize) / big.len() + 8) {
        s.relay.local_stream_message(3, &big);
    }
    assert!(
        s.relay
            .actions()
            .iter()
            .any(|a| matches!(a, Action::Cancel(3))),
        "the call is not cancelled"
    );
    let down = s.client_reads();
    assert!(
        down.iter().all(|f| !matches!(f, F::Headers(3, _, true))),
        "the trailers wait behind the messages the window holds back"
    );
    let mut w = BytesMut::new();
    window_update(&mut w, 0, 0x7fff_0000);
    window_update(&mut w, 3, 0x7fff_0000);
    s.client_sends(w);
    let mut trailers = None;
    for _ in 0..200 {
        for f in s.client_reads() {
            if let F::Headers(3, t, true) = f {
                trailers = Some(t);
            }
        }
        if trailers.is_some() {
            break;
        }
    }
    assert_eq!(trailers.as_ref().and_then(|t| status(t)), Some("8"));
}
