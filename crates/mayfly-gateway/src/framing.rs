//! A watch on HTTP/1 request framing, below hyper. A request that frames
//! its body two ways (`Content-Length` and `Transfer-Encoding`), or folds
//! a header over lines, is read differently by different servers: the
//! root of request smuggling. Hyper reads such a request by
//! `Transfer-Encoding` alone and closes the connection after it, which
//! keeps the gateway itself in step, but it drops the `Content-Length`
//! before the service sees the request. So this wrapper reads the same
//! bytes as they pass to hyper, follows each request's head and body,
//! and marks the connection when a head is ambiguous; the service then
//! refuses every request of that connection, and nothing reaches the
//! upstream.
//!
//! HTTP/2 (its preface) is left alone: it has no such framing.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head followed; a longer one hyper refuses itself.
const MAX_HEAD: usize = 64 * 1024;

/// Longest chunk-size line followed.
const MAX_LINE: usize = 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a connection sent an ambiguous request.
#[derive(Debug, Clone, Default)]
pub struct Ambiguous(Arc<AtomicBool>);

impl Ambiguous {
    /// Whether it did.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Where the reader is in the stream.
#[derive(Debug)]
enum State {
    /// Reading a head (bytes so far).
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// In a chunk's data (bytes left, then its CRLF).
    ChunkData(u64),
    /// The CRLF after a chunk's data (bytes of it left).
    ChunkEnd(u8),
    /// The trailer section after the last chunk (the line so far).
    Trailers(Vec<u8>),
    /// Nothing more to follow: HTTP/2, or the connection is marked.
    Done,
}

/// Wraps a connection's stream.
#[derive(Debug)]
pub struct Watched<I> {
    inner: I,
    state: State,
    /// Whether any byte was seen yet (for the HTTP/2 preface).
    started: bool,
    ambiguous: Ambiguous,
}

impl<I> Watched<I> {
    /// Watches `inner`; `ambiguous` is set on an ambiguous request.
    pub fn new(inner: I, ambiguous: Ambiguous) -> Self {
        Self {
            inner,
            state: State::Head(Vec::new()),
            started: false,
            ambiguous,
        }
    }

    /// Follows `bytes`, read from the client.
    fn follow(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Head(head) => {
                    if head.is_empty() {
                        // Blank lines before a request line are ignored
                        // (RFC 9112 §2.2).
                        let skip = bytes
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    let before = head.len();
                    head.extend_from_slice(bytes);
                    if !self.started {
                        // "PRI " starts HTTP/2's preface, and no HTTP/1
                        // request.
                        if head.len() < 4 {
                            return;
                        }
                        self.started = true;
                        if head.starts_with(&H2_PREFACE[..4]) {
                            self.state = State::Done;
                            return;
                        }
                    }
                    let Some(head_len) = head_end(head) else {
                        if head.len() > MAX_HEAD {
                            self.state = State::Done;
                        }
                        return;
                    };
                    let framing = head_framing(&head[..head_len]);
                    bytes = &bytes[head_len - before..];
                    self.state = match framing {
                        None => {
                            self.ambiguous.set();
                            State::Done
                        }
                        Some(Framing::None | Framing::Length(0)) => State::Head(Vec::new()),
                        Some(Framing::Length(n)) => State::Body(n),
                        Some(Framing::Chunked) => State::ChunkSize(Vec::new()),
                    };
                }
                State::Body(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let Some(at) = bytes.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(bytes);
                        if line.len() > MAX_LINE {
                            self.state = State::Done;
                        }
                        return;
                    };
                    line.extend_from_slice(&bytes[..at]);
                    bytes = &bytes[at + 1..];
                    let text = String::from_utf8_lossy(line);
                    let size = text.trim_end_matches('\r');
                    let size = size.split(';').next().unwrap_or("").trim();
                    match u64::from_str_radix(size, 16) {
                        Ok(0) => self.state = State::Trailers(Vec::new()),
                        Ok(n) => self.state = State::ChunkData(n),
                        // Hyper refuses it, and closes.
                        Err(_) => self.state = State::Done,
                    }
                }
                State::ChunkData(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    let n = usize::from(*left).min(bytes.len());
                    *left -= n as u8;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(line) => {
                    let Some(at) = bytes.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(bytes);
                        if line.len() > MAX_HEAD {
                            self.state = State::Done;
                        }
                        return;
                    };
                    line.extend_from_slice(&bytes[..at]);
                    bytes = &bytes[at + 1..];
                    let blank = line.iter().all(|b| *b == b'\r');
                    line.clear();
                    if blank {
                        self.state = State::Head(Vec::new());
                    }
                }
            }
        }
    }
}

/// How a request's body is framed.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// The length of the head at the start of `bytes` (through its blank
/// line, CRLF or bare LF), once it is all there.
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .enumerate()
        .find_map(|(i, b)| match (b, bytes.get(i + 1), bytes.get(i + 2)) {
            (b'\n', Some(b'\n'), _) => Some(i + 2),
            (b'\n', Some(b'\r'), Some(b'\n')) => Some(i + 3),
            _ => None,
        })
}

/// The framing of the request whose head is `head`, or `None` when it is
/// ambiguous: both framings, or a folded header line.
fn head_framing(head: &[u8]) -> Option<Framing> {
    let mut content_length = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    for (i, line) in head.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if i == 0 || line.is_empty() {
            continue;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return None;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line[..colon].to_ascii_lowercase();
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim()
            .to_ascii_lowercase();
        match name.as_slice() {
            b"content-length" => content_length = value.parse::<u64>().ok().or(Some(0)),
            b"transfer-encoding" => {
                transfer_encoding = true;
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|v| v.trim() == "chunked");
            }
            _ => {}
        }
    }
    match (content_length, transfer_encoding) {
        (Some(_), true) => None,
        (_, true) if chunked => Some(Framing::Chunked),
        // Hyper refuses a non-chunked transfer coding, and closes.
        (_, true) => Some(Framing::None),
        (Some(n), false) => Some(Framing::Length(n)),
        (None, false) => Some(Framing::None),
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            this.follow(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Follows `stream` in pieces of `step` bytes: whether it was marked.
    fn marked(stream: &str, step: usize) -> bool {
        let ambiguous = Ambiguous::default();
        let mut w = Watched::new((), ambiguous.clone());
        for piece in stream.as_bytes().chunks(step) {
            w.follow(piece);
        }
        ambiguous.is_set()
    }

    /// A body that looks like a head's lines.
    const LOOKALIKE: &str = "x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn plain() -> String {
        format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{LOOKALIKE}",
            LOOKALIKE.len()
        )
    }

    fn chunked() -> String {
        format!(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{LOOKALIKE}\r\n\
             0\r\nT: 1\r\n\r\n",
            LOOKALIKE.len()
        )
    }

    const BOTH: &str =
        "POST /a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn bodies_are_skipped_and_only_heads_are_read() {
        for step in [1, 3, 7, 1000] {
            // Header-like text inside bodies is not a head.
            let (plain, chunked) = (plain(), chunked());
            assert!(!marked(
                &format!("{plain}{chunked}GET / HTTP/1.1\r\n\r\n"),
                step
            ));
            // A later ambiguous head on the same connection is found.
            assert!(
                marked(&format!("{plain}{chunked}{BOTH}"), step),
                "step {step}"
            );
        }
    }

    #[test]
    fn ambiguous_heads_are_marked() {
        assert!(marked(BOTH, 1000));
        assert!(marked(
            "POST /a HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
            1000
        ));
        // Bare line feeds end lines too.
        assert!(marked(
            "POST /a HTTP/1.1\nContent-Length: 3\nTransfer-Encoding: chunked\n\n",
            2
        ));
        // A header folded over two lines.
        assert!(marked(
            "POST /a HTTP/1.1\r\nX-A: 1\r\n X-B: 2\r\n\r\n",
            1000
        ));
        assert!(!marked(
            "POST /a HTTP/1.1\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
            1000
        ));
    }

    #[test]
    fn http2_is_left_alone() {
        let preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert!(!marked(&format!("{preface}{BOTH}"), 2));
    }
}
