//! The client→server half of an HTTP/2 connection, rewritten so that h2
//! accepts any `:authority`.
//!
//! Every byte passes through unchanged (the client preface, SETTINGS, DATA,
//! PING, WINDOW_UPDATE, RST_STREAM, GOAWAY, PRIORITY, unknown frames) except
//! header blocks (HEADERS + CONTINUATION): those are reassembled, decoded
//! with a decoder that mirrors the client's HPACK encoder (dynamic table,
//! size updates, Huffman), `:authority` is replaced with `localhost`, and the
//! list is encoded again for h2 with literals that are never indexed. So h2's
//! decoder table stays empty and cannot drift from anything; the only HPACK
//! state is the one the client drives. Every block has to be rewritten, not
//! only those with an authority, because the client's encoder refers to the
//! dynamic table that our decoder, not h2's, maintains.
//!
//! Memory is bounded: a header block (compressed, or decoded by the RFC 7541
//! size rule) above [`MAX_HEADER_BLOCK`] is a connection error, detected
//! from the frame header before its payload is buffered.

use loona_hpack::Decoder;
use loona_hpack::decoder::DecoderError;
use loona_hpack::encoder::encode_integer_into;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest frame payload h2 accepts: SETTINGS_MAX_FRAME_SIZE stays at its
/// initial value because our servers never raise it.
pub const MAX_FRAME_SIZE: usize = 16_384;
/// hyper's SETTINGS_MAX_HEADER_LIST_SIZE is 16 KiB, and h2 answers a list
/// above it on that stream alone. A block four times that size ends the
/// connection here instead of being buffered.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The HPACK dynamic table size our decoder may be asked to use. h2 keeps
/// the initial 4096 unless `header_table_size` is configured, which our
/// servers never do, so a client may not go above it.
const MAX_TABLE_SIZE: usize = 4096;
/// What every rewritten request carries as `:authority`.
pub const AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// A HEADERS frame may carry a pad length byte, 5 priority bytes and up to
/// 255 bytes of padding around its fragment.
const HEADERS_OVERHEAD: usize = 1 + 5 + 255;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("header block of stream {stream} is larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge { stream: u32 },
    #[error("frame type {kind:#x} on stream {stream} inside the header block of stream {open}")]
    Interleaved { kind: u8, stream: u32, open: u32 },
    #[error("CONTINUATION on stream {stream} without a header block in progress")]
    StrayContinuation { stream: u32 },
    #[error("HEADERS frame on stream {stream}: {what}")]
    Malformed { stream: u32, what: &'static str },
    #[error("HPACK decoding of stream {stream}'s header block: {message}")]
    Hpack { stream: u32, message: String },
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8; FRAME_HEADER]) -> FrameHead {
        FrameHead {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored (RFC 9113 §4.1).
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

fn put_frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len <= MAX_FRAME_SIZE);
    // len <= 16384 fits the 24-bit length field.
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

#[derive(Debug)]
enum State {
    /// Bytes of the preface seen so far.
    Preface(usize),
    /// Collecting a frame header.
    Head([u8; FRAME_HEADER], usize),
    /// Passing this many payload bytes through.
    Pass(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    Block(FrameHead, Vec<u8>),
    /// Not HTTP/2 with prior knowledge: everything passes untouched (h2
    /// answers it as it would without us).
    Raw,
}

/// A header block between its HEADERS and its END_HEADERS.
#[derive(Debug)]
struct Open {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The rewriting state of one connection (client→server direction).
pub struct Rewriter {
    state: State,
    decoder: Decoder<'static>,
    open: Option<Open>,
    /// Set by the first error: the connection is dead from then on.
    failed: Option<RewriteError>,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("state", &self.state)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter::new()
    }
}

impl Rewriter {
    pub fn new() -> Rewriter {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
        Rewriter {
            state: State::Preface(0),
            decoder,
            open: None,
            failed: None,
        }
    }

    /// Consumes bytes from the client, in pieces of any size, and appends
    /// what h2 must see to `out`. After an error every later call fails.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.feed_frames(input, out);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn feed_frames(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !input.is_empty() {
            match std::mem::replace(&mut self.state, State::Raw) {
                State::Raw => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(input.len());
                    let (chunk, rest) = input.split_at(n);
                    out.extend_from_slice(chunk);
                    input = rest;
                    if chunk != &PREFACE[seen..seen + n] {
                        self.state = State::Raw;
                    } else if seen + n == PREFACE.len() {
                        self.state = State::Head([0; FRAME_HEADER], 0);
                    } else {
                        self.state = State::Preface(seen + n);
                    }
                }
                State::Head(mut buf, have) => {
                    let n = (FRAME_HEADER - have).min(input.len());
                    buf[have..have + n].copy_from_slice(&input[..n]);
                    input = &input[n..];
                    if have + n < FRAME_HEADER {
                        self.state = State::Head(buf, have + n);
                        continue;
                    }
                    let head = FrameHead::parse(&buf);
                    self.state = self.begin_frame(head, &buf, out)?;
                    if let State::Block(h, p) = &self.state
                        && h.len == 0
                    {
                        let (h, p) = (*h, p.clone());
                        self.state = State::Head([0; FRAME_HEADER], 0);
                        self.end_frame(h, p, out)?;
                    }
                }
                State::Pass(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if left == n {
                        State::Head([0; FRAME_HEADER], 0)
                    } else {
                        State::Pass(left - n)
                    };
                }
                State::Block(head, mut payload) => {
                    let n = (head.len - payload.len()).min(input.len());
                    payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if payload.len() < head.len {
                        self.state = State::Block(head, payload);
                    } else {
                        self.state = State::Head([0; FRAME_HEADER], 0);
                        self.end_frame(head, payload, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Decides what to do with a frame from its header.
    fn begin_frame(
        &mut self,
        head: FrameHead,
        raw: &[u8; FRAME_HEADER],
        out: &mut Vec<u8>,
    ) -> Result<State, RewriteError> {
        if let Some(open) = &self.open
            && (head.kind != CONTINUATION || head.stream != open.stream)
        {
            // RFC 9113 §6.10: nothing may come between the frames of a block.
            return Err(RewriteError::Interleaved {
                kind: head.kind,
                stream: head.stream,
                open: open.stream,
            });
        }
        match head.kind {
            HEADERS => {
                if head.len > MAX_HEADER_BLOCK + HEADERS_OVERHEAD {
                    return Err(RewriteError::TooLarge {
                        stream: head.stream,
                    });
                }
                Ok(State::Block(head, Vec::with_capacity(head.len)))
            }
            CONTINUATION => {
                let Some(open) = &self.open else {
                    return Err(RewriteError::StrayContinuation {
                        stream: head.stream,
                    });
                };
                if open.fragment.len() + head.len > MAX_HEADER_BLOCK {
                    return Err(RewriteError::TooLarge {
                        stream: head.stream,
                    });
                }
                Ok(State::Block(head, Vec::with_capacity(head.len)))
            }
            _ => {
                out.extend_from_slice(raw);
                Ok(if head.len == 0 {
                    State::Head([0; FRAME_HEADER], 0)
                } else {
                    State::Pass(head.len)
                })
            }
        }
    }

    /// A whole HEADERS or CONTINUATION payload is here.
    fn end_frame(
        &mut self,
        head: FrameHead,
        payload: Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let stream = head.stream;
        if head.kind == HEADERS {
            let malformed = |what| RewriteError::Malformed { stream, what };
            let mut p = &payload[..];
            let pad = if head.flags & PADDED != 0 {
                let (&n, rest) = p.split_first().ok_or(malformed("no pad length"))?;
                p = rest;
                usize::from(n)
            } else {
                0
            };
            let priority = if head.flags & PRIORITY != 0 {
                let (pr, rest) = p
                    .split_first_chunk::<5>()
                    .ok_or(malformed("priority field cut short"))?;
                p = rest;
                Some(*pr)
            } else {
                None
            };
            if pad > p.len() {
                return Err(malformed("padding longer than the payload"));
            }
            let fragment = &p[..p.len() - pad];
            if fragment.len() > MAX_HEADER_BLOCK {
                return Err(RewriteError::TooLarge { stream });
            }
            self.open = Some(Open {
                stream,
                end_stream: head.flags & END_STREAM != 0,
                priority,
                fragment: fragment.to_vec(),
            });
        } else if let Some(open) = &mut self.open {
            open.fragment.extend_from_slice(&payload);
        }
        if head.flags & END_HEADERS != 0
            && let Some(open) = self.open.take()
        {
            self.rewrite_block(open, out)?;
        }
        Ok(())
    }

    fn rewrite_block(&mut self, open: Open, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let stream = open.stream;
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let mut over = false;
        let decoded = self.decoder.decode_with_cb(&open.fragment, |name, value| {
            // RFC 7541 §4.1 size; indexed fields can expand a small block.
            size += name.len() + value.len() + 32;
            if size > MAX_HEADER_BLOCK {
                over = true;
            }
            if !over {
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        match decoded {
            Ok(()) => {}
            // The whole block was applied; loona-hpack only refuses a size
            // update as the last thing in a block, which a block of no
            // fields but a size update (valid HPACK) is.
            Err(DecoderError::SizeUpdateAtEnd) => {}
            Err(e) => {
                return Err(RewriteError::Hpack {
                    stream,
                    message: e.to_string(),
                });
            }
        }
        if over {
            return Err(RewriteError::TooLarge { stream });
        }
        let mut block = Vec::with_capacity(size);
        for (name, value) in &fields {
            let value: &[u8] = if name == b":authority" {
                AUTHORITY
            } else {
                value
            };
            encode_never_indexed(name, value, &mut block);
        }
        put_block(out, stream, open.end_stream, open.priority.as_ref(), &block);
        Ok(())
    }
}

/// A literal header field never indexed, with a literal name and no
/// Huffman coding (RFC 7541 §6.2.3): it changes no table on either side.
pub fn encode_never_indexed(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = encode_integer_into(0, 4, 0x10, out);
    for s in [name, value] {
        let _ = encode_integer_into(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}

/// Emits `block` as one HEADERS frame and as many CONTINUATION frames as
/// the frame size needs.
fn put_block(
    out: &mut Vec<u8>,
    stream: u32,
    end_stream: bool,
    priority: Option<&[u8; 5]>,
    block: &[u8],
) {
    let room = MAX_FRAME_SIZE - priority.map_or(0, |p| p.len());
    let (first, rest) = block.split_at(room.min(block.len()));
    let mut flags = 0;
    if end_stream {
        flags |= END_STREAM;
    }
    if priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    put_frame_head(
        out,
        first.len() + priority.map_or(0, |p| p.len()),
        HEADERS,
        flags,
        stream,
    );
    if let Some(p) = priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(first);
    let mut chunks = rest.chunks(MAX_FRAME_SIZE).peekable();
    while let Some(c) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        put_frame_head(out, c.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn f(n: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (n.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        v.push(kind);
        v.push(flags);
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// One frame of the rewritten stream.
    #[derive(Debug, Clone, PartialEq)]
    struct Out {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn parse(mut b: &[u8]) -> Vec<Out> {
        assert_eq!(&b[..24], PREFACE);
        b = &b[24..];
        let mut v = Vec::new();
        while !b.is_empty() {
            let h: [u8; 9] = b[..9].try_into().unwrap();
            let head = FrameHead::parse(&h);
            v.push(Out {
                kind: head.kind,
                flags: head.flags,
                stream: head.stream,
                payload: b[9..9 + head.len].to_vec(),
            });
            b = &b[9 + head.len..];
        }
        v
    }

    /// What h2 sees: header blocks decoded by a fresh decoder (h2's side),
    /// other frames as they are. Checks the frame rules on the way.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Headers {
            stream: u32,
            end_stream: bool,
            priority: Option<[u8; 5]>,
            fields: Fields,
        },
        Other(Out),
    }

    fn h2_view(bytes: &[u8]) -> Vec<Seen> {
        let mut dec = Decoder::new();
        let mut seen = Vec::new();
        // (stream, END_STREAM, priority, block so far)
        type Partial = (u32, bool, Option<[u8; 5]>, Vec<u8>);
        let mut open: Option<Partial> = None;
        for fr in parse(bytes) {
            assert!(fr.payload.len() <= MAX_FRAME_SIZE, "frame too big: {fr:?}");
            match fr.kind {
                HEADERS => {
                    assert!(open.is_none());
                    assert_eq!(fr.flags & PADDED, 0, "we never pad");
                    let (prio, frag) = if fr.flags & PRIORITY != 0 {
                        (Some(fr.payload[..5].try_into().unwrap()), &fr.payload[5..])
                    } else {
                        (None, &fr.payload[..])
                    };
                    open = Some((fr.stream, fr.flags & END_STREAM != 0, prio, frag.to_vec()));
                    if fr.flags & END_HEADERS == 0 {
                        continue;
                    }
                }
                CONTINUATION => {
                    let o = open.as_mut().expect("continuation after headers");
                    assert_eq!(o.0, fr.stream);
                    o.3.extend_from_slice(&fr.payload);
                    if fr.flags & END_HEADERS == 0 {
                        continue;
                    }
                }
                _ => {
                    assert!(open.is_none(), "frame inside a header block");
                    seen.push(Seen::Other(fr));
                    continue;
                }
            }
            let (stream, end_stream, priority, block) = open.take().unwrap();
            // Our encoder never indexes: every field is a never-indexed literal.
            if let Some(b) = block.first() {
                assert_eq!(b & 0xf0, 0x10, "{block:02x?}");
            }
            let fields = dec.decode(&block).expect("h2 side decodes");
            seen.push(Seen::Headers {
                stream,
                end_stream,
                priority,
                fields,
            });
        }
        seen
    }

    fn with_localhost(fields: &Fields) -> Fields {
        fields
            .iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n.clone(), AUTHORITY.to_vec())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect()
    }

    /// Feeds `input` in pieces whose sizes follow `sizes` (cycled).
    fn feed_in_pieces(input: &[u8], sizes: &[usize]) -> Result<Vec<u8>, RewriteError> {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            r.feed(&rest[..n], &mut out)?;
            rest = &rest[n..];
            i += 1;
        }
        Ok(out)
    }

    fn request(path: &str, authority: &str, i: usize) -> Fields {
        vec![
            f(":method", "POST"),
            f(":scheme", "http"),
            f(":path", path),
            f(":authority", authority),
            f("content-type", "application/grpc"),
            f("te", "trailers"),
            f("grpc-accept-encoding", "identity,deflate,gzip"),
            f(
                "user-agent",
                "grpc-python/1.85.1 grpc-c/50.0.0 (linux; chttp2)",
            ),
            f("x-request-id", &format!("req-{i}")),
            f("grpc-timeout", &format!("{}m", 1000 + i)),
        ]
    }

    /// ≥ 100 requests on one connection, with the client's encoder using
    /// its dynamic table and changing its size now and then, and other
    /// frames in between: h2 sees every block as sent, authority replaced,
    /// and every other frame byte for byte; in any delivery pieces.
    #[test]
    fn hpack_state_holds_across_many_requests_on_one_connection() {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        let mut expect = Vec::new();
        let settings = frame(0x4, 0, 0, &[0, 0x4, 0, 0, 0xff, 0xff]);
        input.extend_from_slice(&settings);
        expect.push(Seen::Other(Out {
            kind: 0x4,
            flags: 0,
            stream: 0,
            payload: settings[9..].to_vec(),
        }));
        let paths = [
            "/csi.v1.Identity/Probe",
            "/csi.v1.Node/NodeGetInfo",
            "/csi.v1.Controller/CreateVolume",
            "/csi.v1.Node/NodeStageVolume",
        ];
        let mut dynamic_refs = 0;
        for i in 0..150usize {
            let stream = 1 + 2 * i as u32;
            let authority = if i % 2 == 0 {
                "/run/pmem-agent/csi.sock"
            } else {
                "unix:%2Frun%2Fpmem-agent%2Fcsi.sock"
            };
            let fields = request(paths[i % paths.len()], authority, i);
            // Table size updates at the start of some blocks: shrink (evicts
            // entries the client will no longer refer to), empty, grow back.
            let mut block = Vec::new();
            let resize = match i % 25 {
                10 => Some(256),
                11 => Some(0),
                12 => Some(4096),
                20 => Some(1024),
                24 => Some(4096),
                _ => None,
            };
            if let Some(size) = resize {
                encode_integer_into(size, 5, 0x20, &mut block).unwrap();
                enc.set_max_table_size(size);
            }
            enc.encode_into(fields.iter().map(|(n, v)| (&n[..], &v[..])), &mut block)
                .unwrap();
            if block.iter().any(|&b| b >= 0x80 | 62) {
                dynamic_refs += 1;
            }
            input.extend_from_slice(&frame(HEADERS, END_HEADERS, stream, &block));
            expect.push(Seen::Headers {
                stream,
                end_stream: false,
                priority: None,
                fields: with_localhost(&fields),
            });
            let data = frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 2, 0x0a, 0]);
            input.extend_from_slice(&data);
            expect.push(Seen::Other(Out {
                kind: 0,
                flags: END_STREAM,
                stream,
                payload: data[9..].to_vec(),
            }));
            if i % 7 == 3 {
                let ping = frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
                input.extend_from_slice(&ping);
                expect.push(Seen::Other(Out {
                    kind: 6,
                    flags: 0,
                    stream: 0,
                    payload: ping[9..].to_vec(),
                }));
            }
        }
        // The client really referred to its dynamic table (an indexed field
        // >= 62: a byte >= 0xbe, which no ASCII literal here contains).
        assert!(dynamic_refs >= 100, "{dynamic_refs}");

        for sizes in [&[usize::MAX][..], &[1], &[3, 1, 7, 9, 2, 100], &[8192]] {
            let out = feed_in_pieces(&input, sizes).unwrap();
            assert_eq!(h2_view(&out), expect, "pieces {sizes:?}");
        }
    }

    /// RFC 7541 C.4: three requests with Huffman-coded strings and dynamic
    /// table references.
    #[test]
    fn huffman_and_dynamic_table_references_from_the_rfc_examples() {
        let blocks: [&[u8]; 3] = [
            &[
                0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
                0x90, 0xf4, 0xff,
            ],
            &[
                0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
            ],
            &[
                0x82, 0x87, 0x85, 0xbf, 0x40, 0x88, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f,
                0x89, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf,
            ],
        ];
        let mut input = PREFACE.to_vec();
        for (i, b) in blocks.iter().enumerate() {
            input.extend_from_slice(&frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1 + 2 * i as u32,
                b,
            ));
        }
        let out = feed_in_pieces(&input, &[1]).unwrap();
        let base = |scheme: &str, path: &str| {
            vec![
                f(":method", "GET"),
                f(":scheme", scheme),
                f(":path", path),
                f(":authority", "localhost"),
            ]
        };
        let mut second = base("http", "/");
        second.push(f("cache-control", "no-cache"));
        let mut third = base("https", "/index.html");
        third.push(f("custom-key", "custom-value"));
        let want: Vec<Seen> = [base("http", "/"), second, third]
            .into_iter()
            .enumerate()
            .map(|(i, fields)| Seen::Headers {
                stream: 1 + 2 * i as u32,
                end_stream: true,
                priority: None,
                fields,
            })
            .collect();
        assert_eq!(h2_view(&out), want);
    }

    /// A block that re-encodes beyond one frame is split into HEADERS +
    /// CONTINUATION within 16384 bytes each; the client's own CONTINUATION
    /// pieces of odd sizes are reassembled; END_STREAM stays on HEADERS.
    #[test]
    fn large_blocks_are_reassembled_and_split_into_continuations() {
        let mut fields = request("/csi.v1.Node/NodePublishVolume", "/x/csi.sock", 1);
        for k in 0..3 {
            fields.push(f(&format!("x-big-{k}"), &"v".repeat(7000)));
        }
        let mut enc = Encoder::new();
        let block = enc.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        assert!(block.len() > MAX_FRAME_SIZE);
        let mut input = PREFACE.to_vec();
        let cuts = [0, 5000, 5001, 12000, block.len()];
        input.extend_from_slice(&frame(HEADERS, END_STREAM, 3, &block[cuts[0]..cuts[1]]));
        for w in cuts[1..].windows(2) {
            let last = w[1] == block.len();
            input.extend_from_slice(&frame(
                CONTINUATION,
                if last { END_HEADERS } else { 0 },
                3,
                &block[w[0]..w[1]],
            ));
        }
        for sizes in [&[usize::MAX][..], &[1], &[4097]] {
            let out = feed_in_pieces(&input, sizes).unwrap();
            let frames = parse(&out);
            assert_eq!(frames.len(), 2, "{sizes:?}");
            assert_eq!(frames[0].kind, HEADERS);
            assert_eq!(frames[0].flags, END_STREAM);
            assert_eq!(frames[0].payload.len(), MAX_FRAME_SIZE);
            assert_eq!(frames[1].kind, CONTINUATION);
            assert_eq!(frames[1].flags, END_HEADERS);
            assert_eq!(
                h2_view(&out),
                vec![Seen::Headers {
                    stream: 3,
                    end_stream: true,
                    priority: None,
                    fields: with_localhost(&fields),
                }]
            );
        }
    }

    /// PADDED is removed with its padding, PRIORITY kept with its 5 bytes,
    /// END_STREAM kept; a trailers block (no pseudo-headers) goes through.
    #[test]
    fn padding_and_priority_and_trailers() {
        let fields = request("/csi.v1.Identity/Probe", "/tmp/a b/csi.sock", 7);
        let mut enc = Encoder::new();
        let block = enc.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        let prio = [0x80, 0, 0, 1, 200];
        let mut payload = vec![9];
        payload.extend_from_slice(&prio);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 9]);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(
            HEADERS,
            PADDED | PRIORITY | END_HEADERS,
            5,
            &payload,
        ));
        // Padded only, split into a CONTINUATION.
        let mut payload = vec![3];
        payload.extend_from_slice(&block[..4]);
        payload.extend_from_slice(&[0; 3]);
        input.extend_from_slice(&frame(HEADERS, PADDED, 7, &payload));
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 7, &block[4..]));
        // Trailers on stream 7.
        let trailers = vec![f("x-checksum", "abc"), f("grpc-status", "0")];
        let tb = enc.encode(trailers.iter().map(|(n, v)| (&n[..], &v[..])));
        input.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, 7, &tb));
        let out = feed_in_pieces(&input, &[2, 5]).unwrap();
        assert_eq!(
            h2_view(&out),
            vec![
                Seen::Headers {
                    stream: 5,
                    end_stream: false,
                    priority: Some(prio),
                    fields: with_localhost(&fields),
                },
                Seen::Headers {
                    stream: 7,
                    end_stream: false,
                    priority: None,
                    fields: with_localhost(&fields),
                },
                Seen::Headers {
                    stream: 7,
                    end_stream: true,
                    priority: None,
                    fields: trailers,
                },
            ]
        );
        let frames = parse(&out);
        assert_eq!(frames[0].flags, PRIORITY | END_HEADERS);
        assert_eq!(&frames[0].payload[..5], &prio);
    }

    #[test]
    fn malformed_padding_and_interleaving_are_connection_errors() {
        let block = Encoder::new().encode([(&b":method"[..], &b"POST"[..])]);
        let mut p = vec![200];
        p.extend_from_slice(&block);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, PADDED | END_HEADERS, 1, &p));
        assert!(matches!(
            feed_in_pieces(&input, &[usize::MAX]),
            Err(RewriteError::Malformed { stream: 1, .. })
        ));

        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, 0, 1, &block));
        input.extend_from_slice(&frame(0x0, 0, 1, b"x"));
        assert_eq!(
            feed_in_pieces(&input, &[1]),
            Err(RewriteError::Interleaved {
                kind: 0,
                stream: 1,
                open: 1
            })
        );
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, 0, 1, &block));
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 3, &block));
        assert!(matches!(
            feed_in_pieces(&input, &[usize::MAX]),
            Err(RewriteError::Interleaved { .. })
        ));
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, &block));
        assert_eq!(
            feed_in_pieces(&input, &[usize::MAX]),
            Err(RewriteError::StrayContinuation { stream: 1 })
        );
        // Nothing passes after an error, not even harmless frames.
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        assert!(r.feed(&input, &mut out).is_err());
        out.clear();
        assert_eq!(
            r.feed(&frame(0x6, 0, 0, &[0; 8]), &mut out),
            Err(RewriteError::StrayContinuation { stream: 1 })
        );
        assert!(out.is_empty());
        // An index the table does not have.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, END_HEADERS, 1, &[0xff, 0x10]));
        assert!(matches!(
            feed_in_pieces(&input, &[usize::MAX]),
            Err(RewriteError::Hpack { stream: 1, .. })
        ));
        // A table size above what h2 allows.
        let mut su = Vec::new();
        encode_integer_into(65536, 5, 0x20, &mut su).unwrap();
        su.push(0x82);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, END_HEADERS, 1, &su));
        assert!(matches!(
            feed_in_pieces(&input, &[usize::MAX]),
            Err(RewriteError::Hpack { stream: 1, .. })
        ));
    }

    /// Oversized blocks fail from the frame header, before the payload is
    /// buffered; a small block that expands through the dynamic table fails
    /// while decoding.
    #[test]
    fn oversized_header_blocks_are_refused_not_buffered() {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(PREFACE, &mut out).unwrap();
        // Only the 9-byte header of a 10 MiB HEADERS frame.
        let head = &frame(HEADERS, END_HEADERS, 1, &[])[..];
        let mut big = head.to_vec();
        big[..3].copy_from_slice(&(10u32 << 20).to_be_bytes()[1..]);
        assert_eq!(
            r.feed(&big, &mut out),
            Err(RewriteError::TooLarge { stream: 1 })
        );

        // CONTINUATIONs adding up past the limit.
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(PREFACE, &mut out).unwrap();
        r.feed(&frame(HEADERS, 0, 1, &vec![0x82; 16_000]), &mut out)
            .unwrap();
        let mut n = 0;
        let err = loop {
            match r.feed(&frame(CONTINUATION, 0, 1, &vec![0x82; 16_000]), &mut out) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err, RewriteError::TooLarge { stream: 1 });
        assert_eq!(n, 3);

        // 4000 bytes that refer to one 4000-byte entry: 16 MB decoded.
        let mut block = vec![0x40, 1, b'x'];
        encode_integer_into(4000, 7, 0, &mut block).unwrap();
        block.extend(std::iter::repeat_n(b'a', 4000));
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(PREFACE, &mut out).unwrap();
        r.feed(&frame(HEADERS, END_HEADERS, 1, &block), &mut out)
            .unwrap();
        let bomb = vec![0x80 | 62; 4000];
        assert_eq!(
            r.feed(&frame(HEADERS, END_HEADERS, 3, &bomb), &mut out),
            Err(RewriteError::TooLarge { stream: 3 })
        );
    }

    /// A block of nothing but a table size update is valid HPACK: no
    /// fields, and the new size holds for the next blocks.
    #[test]
    fn a_block_of_only_a_size_update() {
        let mut enc = Encoder::new();
        let first = [f("x-a", "1")];
        let mut input = PREFACE.to_vec();
        let b1 = enc.encode(first.iter().map(|(n, v)| (&n[..], &v[..])));
        input.extend_from_slice(&frame(HEADERS, END_HEADERS, 1, &b1));
        // Size 0 empties both tables; the entry x-a: 1 is gone.
        let mut b2 = Vec::new();
        encode_integer_into(0, 5, 0x20, &mut b2).unwrap();
        enc.set_max_table_size(0);
        input.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &b2));
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        let seen = h2_view(&out);
        assert_eq!(
            seen[1],
            Seen::Headers {
                stream: 1,
                end_stream: true,
                priority: None,
                fields: vec![],
            }
        );
        // A reference to the evicted entry is now an error.
        assert!(matches!(
            r.feed(&frame(HEADERS, END_HEADERS, 3, &[0x80 | 62]), &mut out),
            Err(RewriteError::Hpack { stream: 3, .. })
        ));
    }

    #[test]
    fn not_http2_passes_untouched() {
        let input = b"GET / HTTP/1.1\r\nHost: /run/x.sock\r\n\r\n";
        let out = feed_in_pieces(input, &[1]).unwrap();
        assert_eq!(out, input);
        // Non-header frames and empty frames pass byte for byte.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(0x4, 0x1, 0, &[]));
        input.extend_from_slice(&frame(0x8, 0, 0, &[0, 1, 0, 0]));
        input.extend_from_slice(&frame(0x3, 0, 1, &[0, 0, 0, 8]));
        input.extend_from_slice(&frame(0xfa, 0x3, 9, b"unknown"));
        assert_eq!(feed_in_pieces(&input, &[1]).unwrap(), input);
        assert_eq!(feed_in_pieces(&input, &[usize::MAX]).unwrap(), input);
    }

    #[test]
    fn an_empty_header_block_and_a_block_without_authority() {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, END_STREAM, 1, &[]));
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, &[]));
        let fields = vec![f(":method", "POST"), f(":path", "/a")];
        let block = Encoder::new().encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        input.extend_from_slice(&frame(HEADERS, END_HEADERS, 3, &block));
        let out = feed_in_pieces(&input, &[1]).unwrap();
        let frames = parse(&out);
        assert_eq!(frames[0].flags, END_STREAM | END_HEADERS);
        assert!(frames[0].payload.is_empty());
        assert_eq!(
            h2_view(&out)[1],
            Seen::Headers {
                stream: 3,
                end_stream: false,
                priority: None,
                fields,
            }
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// One request: its fields and how its block is framed.
        #[derive(Debug, Clone)]
        struct Req {
            fields: Fields,
            resize: Option<usize>,
            pieces: usize,
            pad: u8,
            priority: bool,
            end_stream: bool,
        }

        fn req() -> impl Strategy<Value = Req> {
            let name = prop_oneof![
                Just(":authority".to_owned()),
                Just("content-type".to_owned()),
                Just("user-agent".to_owned()),
                Just("te".to_owned()),
                "x-[a-z]{1,12}",
            ];
            let value = prop_oneof![
                Just("/run/pmem-agent/csi.sock".to_owned()),
                Just("application/grpc".to_owned()),
                "[ -~]{0,40}",
                "[a-z]{200,900}",
            ];
            (
                proptest::collection::vec((name, value), 0..12),
                proptest::option::of(prop_oneof![Just(0usize), Just(64), 0usize..=4096]),
                1usize..5,
                0u8..20,
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(fields, resize, pieces, pad, priority, end_stream)| Req {
                    fields: fields
                        .into_iter()
                        .map(|(n, v)| (n.into_bytes(), v.into_bytes()))
                        .collect(),
                    resize,
                    pieces,
                    pad,
                    priority,
                    end_stream,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Any sequence of requests, any framing, any delivery: h2
            /// sees every list as sent, with `:authority` replaced.
            #[test]
            fn any_framing_and_delivery_round_trips(
                reqs in proptest::collection::vec(req(), 1..40),
                sizes in proptest::collection::vec(1usize..300, 1..8),
            ) {
                let mut enc = Encoder::new();
                let mut input = PREFACE.to_vec();
                let mut want = Vec::new();
                for (i, r) in reqs.iter().enumerate() {
                    let stream = 1 + 2 * i as u32;
                    let mut block = Vec::new();
                    if let Some(size) = r.resize {
                        encode_integer_into(size, 5, 0x20, &mut block).unwrap();
                        enc.set_max_table_size(size);
                    }
                    enc.encode_into(r.fields.iter().map(|(n, v)| (&n[..], &v[..])), &mut block)
                        .unwrap();
                    let step = block.len().div_ceil(r.pieces).max(1);
                    let mut frags: Vec<&[u8]> = block.chunks(step).collect();
                    frags.resize(r.pieces, &[]);
                    for (k, frag) in frags.iter().enumerate() {
                        let last = k + 1 == frags.len();
                        let mut flags = if last { END_HEADERS } else { 0 };
                        let mut payload = Vec::new();
                        let kind = if k == 0 {
                            if r.end_stream {
                                flags |= END_STREAM;
                            }
                            if r.pad > 0 {
                                flags |= PADDED;
                                payload.push(r.pad);
                            }
                            if r.priority {
                                flags |= PRIORITY;
                                payload.extend_from_slice(&[0, 0, 0, 3, 7]);
                            }
                            HEADERS
                        } else {
                            CONTINUATION
                        };
                        payload.extend_from_slice(frag);
                        if k == 0 {
                            payload.extend(std::iter::repeat_n(0xaa, usize::from(r.pad)));
                        }
                        input.extend_from_slice(&frame(kind, flags, stream, &payload));
                    }
                    want.push(Seen::Headers {
                        stream,
                        end_stream: r.end_stream,
                        priority: r.priority.then_some([0, 0, 0, 3, 7]),
                        fields: with_localhost(&r.fields),
                    });
                }
                let out = feed_in_pieces(&input, &sizes).unwrap();
                prop_assert_eq!(h2_view(&out), want);
            }
        }
    }
}
